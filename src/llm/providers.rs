//! The providers a daemon calls: the one of `llm.base_url` (named `default`) and those of
//! `[llm.providers.<name>]`, each a [`LlmClient`] with its own circuit breaker and adaptive
//! concurrency limit, and the map from a model to the provider that serves it.

use std::collections::HashMap;
use std::sync::Arc;

use super::circuit::CircuitState;
use super::client::LlmClient;
use crate::config::{DEFAULT_PROVIDER, Settings};
use crate::metrics::Metrics;

/// Every provider's client, and which serves each model.
#[derive(Clone)]
pub struct Providers(Arc<Inner>);

struct Inner {
    /// The default provider first, then the named ones in name order.
    clients: Vec<(String, LlmClient)>,
    /// A model a named provider serves → its index in `clients` (any other: 0).
    by_model: HashMap<String, usize>,
    metrics: Metrics,
}

impl Providers {
    /// Builds a client per provider. A provider's concurrency is its `max_concurrency`, or
    /// the default provider's.
    pub fn new(settings: &Settings, metrics: Metrics) -> anyhow::Result<Self> {
        let concurrency = settings.llm_max_concurrency();
        let mut clients = vec![(
            DEFAULT_PROVIDER.to_owned(),
            LlmClient::new(&settings.llm, DEFAULT_PROVIDER, concurrency, metrics.clone())?,
        )];
        let mut by_model = HashMap::new();
        for (name, provider) in &settings.llm.providers {
            let limit = match provider.max_concurrency {
                0 => concurrency,
                n => n as usize,
            };
            let client = LlmClient::new(&settings.llm.for_provider(provider), name, limit, metrics.clone())
                .map_err(|e| anyhow::anyhow!("llm.providers.{name}: {e:#}"))?;
            for model in &provider.models {
                by_model.insert(model.clone(), clients.len());
            }
            clients.push((name.clone(), client));
        }
        Ok(Self(Arc::new(Inner { clients, by_model, metrics })))
    }

    /// The provider that serves `model`: its name and client.
    pub fn for_model(&self, model: &str) -> (&str, &LlmClient) {
        let (name, client) = &self.0.clients[self.0.by_model.get(model).copied().unwrap_or(0)];
        (name, client)
    }

    /// Each provider's circuit, the default provider's first.
    pub fn circuits(&self) -> Vec<(&str, CircuitState)> {
        self.0.clients.iter().map(|(name, client)| (name.as_str(), client.circuit_state())).collect()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }
}
