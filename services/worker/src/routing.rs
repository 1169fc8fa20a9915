//! Which backend serves which model, each model's fallback chain and static fallback, and one
//! circuit breaker per backend.
//!
//! `SLUICE_MODELS` (JSON, or `@path` to a JSON file) describes it:
//!
//! ```json
//! {
//!   "backends": { "gpu": { "base_url": "http://gpu:8000", "api_key_env": "GPU_API_KEY" } },
//!   "models": {
//!     "llama-70b": { "backend": "gpu", "fallbacks": ["llama-8b"], "static_fallback": "Busy; try again." },
//!     "llama-8b": {}
//!   }
//! }
//! ```
//!
//! The backend named `default` is `MODEL_BASE_URL` with `MODEL_API_KEY`; models not listed, and
//! listed models without a `backend`, go there.

use crate::breaker::CircuitBreaker;
use crate::embed::{Embedder, LOCAL_MODEL};
use crate::limit::AdaptiveLimit;
use crate::model::ModelClient;
use anyhow::Context;
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const DEFAULT_BACKEND: &str = "default";
/// The in-process embedding model's backend, when one is loaded.
pub(crate) const LOCAL_BACKEND: &str = "local";

/// `SLUICE_MODELS`, parsed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsFile {
    #[serde(default)]
    pub(crate) backends: HashMap<String, BackendSpec>,
    #[serde(default)]
    pub(crate) models: HashMap<String, ModelSpec>,
}

impl ModelsFile {
    /// `SLUICE_MODELS`: JSON, `@path` to a JSON file, or empty for none.
    pub fn parse(setting: &str) -> Result<Self, String> {
        parse_models(setting)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendSpec {
    pub base_url: String,
    /// Name of the environment variable holding the bearer token, so secrets stay out of JSON.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelSpec {
    #[serde(default)]
    pub backend: Option<String>,
    /// Models tried in order when this one's attempts are spent or its backend's circuit is open.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Answer given, marked `degraded: true`, when every model in the chain failed.
    #[serde(default)]
    pub static_fallback: Option<String>,
}

/// One backend: its pooled client and its breaker.
pub struct Backend {
    pub name: String,
    pub client: ModelClient,
    pub breaker: CircuitBreaker,
    pub limit: AdaptiveLimit,
}

/// What the routes are built from: the models description, the default backend, and each
/// backend's breaker and concurrency settings.
#[derive(Debug, Clone)]
pub struct RoutingSettings {
    pub models: ModelsFile,
    pub default_base_url: String,
    pub default_api_key: Option<SecretString>,
    pub connect_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub concurrency: ConcurrencySettings,
}

/// Each backend's adaptive limit on calls in flight.
#[derive(Debug, Clone, Copy)]
pub struct ConcurrencySettings {
    pub initial: usize,
    pub min: usize,
    pub max: usize,
    pub adaptive: bool,
}

#[derive(Clone)]
pub struct Routes {
    backends: HashMap<String, Arc<Backend>>,
    models: Arc<HashMap<String, ModelSpec>>,
}

impl Routes {
    pub fn from_settings(settings: &RoutingSettings) -> anyhow::Result<Self> {
        let file = &settings.models;
        let concurrency = settings.concurrency;
        let make = |name: &str,
                    url: &str,
                    key: Option<SecretString>|
         -> anyhow::Result<Arc<Backend>> {
            Ok(Arc::new(Backend {
                name: name.to_owned(),
                client: ModelClient::new(url, key, settings.connect_timeout)?,
                breaker: CircuitBreaker::new(settings.breaker_threshold, settings.breaker_cooldown),
                limit: AdaptiveLimit::new(
                    concurrency.initial,
                    concurrency.min,
                    concurrency.max,
                    concurrency.adaptive,
                ),
            }))
        };
        let mut backends = HashMap::new();
        backends.insert(
            DEFAULT_BACKEND.to_owned(),
            make(
                DEFAULT_BACKEND,
                &settings.default_base_url,
                settings.default_api_key.clone(),
            )?,
        );
        for (name, spec) in &file.backends {
            anyhow::ensure!(
                name != DEFAULT_BACKEND && name != LOCAL_BACKEND,
                "SLUICE_MODELS: the backend names `default` (MODEL_BASE_URL) and `local` (the \
                 in-process embedding model) are taken"
            );
            reqwest::Url::parse(&spec.base_url)
                .with_context(|| format!("SLUICE_MODELS: backend {name}: base_url"))?;
            let key = match &spec.api_key_env {
                Some(variable) => Some(
                    std::env::var(variable)
                        .with_context(|| {
                            format!("SLUICE_MODELS: backend {name}: {variable} is not set")
                        })?
                        .into(),
                ),
                None => None,
            };
            backends.insert(name.clone(), make(name, &spec.base_url, key)?);
        }
        for (model, spec) in &file.models {
            if let Some(backend) = &spec.backend {
                anyhow::ensure!(
                    backends.contains_key(backend) || backend == LOCAL_BACKEND,
                    "SLUICE_MODELS: model {model} names unknown backend {backend}"
                );
            }
        }
        Ok(Self {
            backends,
            models: Arc::new(file.models.clone()),
        })
    }

    /// Adds the in-process embedding model as the backend `local`, and routes
    /// `all-minilm-l6-v2` to it unless `SLUICE_MODELS` routes that name elsewhere.
    pub fn with_local_embedder(mut self, embedder: Embedder) -> Self {
        let local = Arc::new(Backend {
            name: LOCAL_BACKEND.to_owned(),
            client: ModelClient::local(embedder),
            // The model cannot be unreachable; a failure is about the input, not its health.
            breaker: CircuitBreaker::new(u32::MAX, Duration::from_secs(1)),
            // The batcher queues; the pool bounds the work. No adaptive limit in front of it.
            limit: AdaptiveLimit::new(4096, 1, 4096, false),
        });
        self.backends.insert(LOCAL_BACKEND.to_owned(), local);
        let mut models = (*self.models).clone();
        models
            .entry(LOCAL_MODEL.to_owned())
            .or_insert_with(|| ModelSpec {
                backend: Some(LOCAL_BACKEND.to_owned()),
                ..ModelSpec::default()
            });
        self.models = Arc::new(models);
        self
    }

    /// Whether some model is routed to the in-process embedding model.
    pub fn uses_local(&self) -> bool {
        self.models
            .values()
            .any(|spec| spec.backend.as_deref() == Some(LOCAL_BACKEND))
    }

    pub fn backend_for(&self, model: &str) -> &Arc<Backend> {
        let name = self
            .models
            .get(model)
            .and_then(|spec| spec.backend.as_deref())
            .unwrap_or(DEFAULT_BACKEND);
        &self.backends[name]
    }

    /// The model asked for, then its fallbacks, each once.
    pub fn chain(&self, model: &str) -> Vec<String> {
        let mut chain = vec![model.to_owned()];
        for fallback in self
            .models
            .get(model)
            .map(|spec| spec.fallbacks.as_slice())
            .unwrap_or_default()
        {
            if !chain.contains(fallback) {
                chain.push(fallback.clone());
            }
        }
        chain
    }

    pub fn static_fallback(&self, model: &str) -> Option<&str> {
        self.models.get(model)?.static_fallback.as_deref()
    }
}

/// `SLUICE_MODELS`: JSON, `@path` to a JSON file, or empty for none.
pub(crate) fn parse_models(setting: &str) -> Result<ModelsFile, String> {
    let setting = setting.trim();
    if setting.is_empty() {
        return Ok(ModelsFile::default());
    }
    let text = match setting.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|error| format!("reading {path}: {error}"))?
        }
        None => setting.to_owned(),
    };
    serde_json::from_str(&text).map_err(|error| format!("not a valid models description: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(models: &str) -> anyhow::Result<Routes> {
        let mut settings = crate::Config::defaults().routing();
        settings.models = parse_models(models).map_err(anyhow::Error::msg)?;
        Routes::from_settings(&settings)
    }

    #[test]
    fn chains_and_backends_follow_the_description() {
        let routes = routes(
            r#"{"backends": {"gpu": {"base_url": "http://gpu:8000"}},
                "models": {"big": {"backend": "gpu", "fallbacks": ["small", "big", "small"], "static_fallback": "busy"}}}"#,
        )
        .unwrap();
        assert_eq!(routes.chain("big"), ["big", "small"]);
        assert_eq!(routes.chain("unknown"), ["unknown"]);
        assert_eq!(routes.backend_for("big").name, "gpu");
        assert_eq!(routes.backend_for("small").name, DEFAULT_BACKEND);
        assert_eq!(routes.static_fallback("big"), Some("busy"));
    }

    #[test]
    fn mistakes_are_refused_at_start_up() {
        assert!(routes(r#"{"models": {"m": {"backend": "nowhere"}}}"#).is_err());
        assert!(routes(r#"{"modles": {}}"#).is_err());
        assert!(routes(r#"{"backends": {"b": {"base_url": "not a url"}}}"#).is_err());
        assert!(routes("").is_ok());
    }
}
