//! The in-process embedding model's files and tokenizer, written once for the worker (which runs
//! the model) and ingest (which counts a job's tokens with the same tokenizer, so a token
//! reservation for the local model is what the model will report, not an estimate).

use anyhow::Context;
use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

/// The name jobs use for the in-process model.
pub const LOCAL_MODEL: &str = "all-minilm-l6-v2";

/// sentence-transformers' `max_seq_length` for this model: longer inputs are truncated.
pub const MAX_TOKENS: usize = 256;

/// One of the model's files, or an error naming it.
pub fn read(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).with_context(|| {
        format!(
            "the embedding model file {} is missing or unreadable (scripts/run and scripts/test fetch it)",
            path.display()
        )
    })
}

/// The model's tokenizer (`tokenizer.json` in `dir`), truncating at `MAX_TOKENS` as the model
/// reads its input.
pub fn tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_bytes(read(dir, "tokenizer.json")?).map_err(|error| {
        anyhow::anyhow!(
            "{} is not a tokenizer: {error}",
            dir.join("tokenizer.json").display()
        )
    })?;
    // The file's own padding (to a fixed length) would count pad tokens; whoever batches sets
    // its own.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_TOKENS,
            ..TruncationParams::default()
        }))
        .map_err(|error| anyhow::anyhow!("configuring truncation: {error}"))?;
    Ok(tokenizer)
}

/// The tokens the model reads for `texts` (special tokens included, each text truncated): what
/// it reports as the job's `prompt_tokens`.
pub fn count(tokenizer: &Tokenizer, texts: &[String]) -> anyhow::Result<u64> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(|error| anyhow::anyhow!("tokenizing: {error}"))?;
    // The attention mask marks the tokens read, padding excluded, as the model counts them.
    Ok(encodings
        .iter()
        .map(|encoding| {
            encoding
                .get_attention_mask()
                .iter()
                .filter(|&&mask| mask == 1)
                .count() as u64
        })
        .sum())
}
