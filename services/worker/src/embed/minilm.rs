//! all-MiniLM-L6-v2 on candle: BERT, mean pooling over the attention mask, L2-normalised, as
//! sentence-transformers computes it. Synchronous and CPU-bound: call it on the model's own
//! threads, never on the async runtime's.

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
pub use sluice_common::minilm::MAX_TOKENS;
use sluice_common::minilm::read;
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer};

pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pub dimensions: usize,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm")
            .field("dimensions", &self.dimensions)
            .finish()
    }
}

/// The three files the model needs, each named in the error when missing or unreadable.
impl MiniLm {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let device = Device::Cpu;
        let config: Config =
            serde_json::from_slice(&read(dir, "config.json")?).with_context(|| {
                format!("{} is not a BERT config", dir.join("config.json").display())
            })?;
        let weights = read(dir, "model.safetensors")?;
        let builder = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .with_context(|| {
                format!(
                    "{} is not a safetensors file",
                    dir.join("model.safetensors").display()
                )
            })?;
        let model = BertModel::load(builder, &config).with_context(|| {
            format!(
                "{} does not hold all-MiniLM-L6-v2's weights",
                dir.join("model.safetensors").display()
            )
        })?;
        let mut tokenizer: Tokenizer = sluice_common::minilm::tokenizer(dir)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        Ok(Self {
            model,
            tokenizer,
            device,
            dimensions: config.hidden_size,
        })
    }

    /// One forward pass over `texts`, padded to the longest: one unit vector per text, and
    /// the tokens read for each (padding excluded).
    pub fn embed(&self, texts: &[String]) -> anyhow::Result<(Vec<Vec<f32>>, Vec<usize>)> {
        if texts.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|error| anyhow::anyhow!("tokenizing: {error}"))?;
        let (batch, length) = (encodings.len(), encodings[0].get_ids().len());
        let flat = |get: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| get(e).iter().copied())
                .collect()
        };
        let mask_values = flat(tokenizers::Encoding::get_attention_mask);
        let tokens = encodings
            .iter()
            .map(|encoding| {
                encoding
                    .get_attention_mask()
                    .iter()
                    .filter(|&&m| m == 1)
                    .count()
            })
            .collect();
        let ids = Tensor::from_vec(
            flat(tokenizers::Encoding::get_ids),
            (batch, length),
            &self.device,
        )?;
        let types = Tensor::from_vec(
            flat(tokenizers::Encoding::get_type_ids),
            (batch, length),
            &self.device,
        )?;
        let mask = Tensor::from_vec(mask_values, (batch, length), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over the real tokens only: padding must not pull the average.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let pooled = summed.broadcast_div(&counts)?;
        let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        let unit = pooled.broadcast_div(&norms)?;
        Ok((unit.to_vec2::<f32>()?, tokens))
    }
}
