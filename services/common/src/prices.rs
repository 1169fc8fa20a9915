//! Model prices (`SLUICE_MODEL_PRICES`): what a million prompt and answer tokens of each model
//! cost, for the usage the results service records. One parse for every service that prices.

use serde::Deserialize;
use std::collections::HashMap;

/// One model's prices, per million tokens, in the deployment's currency (the README says USD).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

/// Prices by model name; a model without one costs nothing.
#[derive(Debug, Clone, Default)]
pub struct Prices(HashMap<String, Price>);

impl Prices {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let prices: HashMap<String, Price> = serde_json::from_str(text)
            .map_err(|error| anyhow::anyhow!("SLUICE_MODEL_PRICES is not valid: {error}"))?;
        for (model, price) in &prices {
            for (name, value) in [
                ("input_per_million", price.input_per_million),
                ("output_per_million", price.output_per_million),
            ] {
                anyhow::ensure!(
                    value.is_finite() && value >= 0.0,
                    "SLUICE_MODEL_PRICES.{model}.{name} must be a number of at least 0"
                );
            }
        }
        Ok(Self(prices))
    }

    /// `SLUICE_MODEL_PRICES` as clap reads it: a bad value stops the process at start.
    pub fn setting(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|error| format!("{error:#}"))
    }

    /// What `prompt` and `completion` tokens of `model` cost.
    pub fn cost(&self, model: &str, prompt: u64, completion: u64) -> f64 {
        self.0.get(model).map_or(0.0, |price| {
            (prompt as f64 * price.input_per_million + completion as f64 * price.output_per_million)
                / 1_000_000.0
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct PriceArgs {
    /// Prices per million tokens by model, JSON: `{"llama-3.1-8b": {"input_per_million": 0.05,
    /// "output_per_million": 0.08}}`. A model without a price costs nothing.
    #[arg(
        long = "model-prices",
        env = "SLUICE_MODEL_PRICES",
        default_value = "",
        value_parser = Prices::setting
    )]
    pub prices: Prices,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_price_is_per_million_tokens_and_an_unpriced_model_is_free() {
        let prices =
            Prices::parse(r#"{"big": {"input_per_million": 2.5, "output_per_million": 10}}"#)
                .unwrap();
        assert_eq!(prices.cost("big", 1_000_000, 100_000), 2.5 + 1.0);
        assert_eq!(prices.cost("small", 1_000_000, 1_000_000), 0.0);
        assert!(
            Prices::parse(r#"{"big": {"input_per_million": -1, "output_per_million": 0}}"#)
                .is_err()
        );
        assert!(Prices::parse("").unwrap().0.is_empty());
    }
}
