//! Typed, layered configuration: `config/default.toml` (compiled in) → an optional file →
//! `INSTRUCTD__SECTION__KEY` environment variables. A wrong value stops start-up with an
//! error that names the key. Secrets are `SecretString`s and are redacted whenever the
//! settings are printed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

pub use crate::contract::Mode;

/// The defaults, compiled into the binary so that it runs without the repository.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// The environment variable that names a configuration file (same as `--config`).
pub const CONFIG_FILE_ENV: &str = "INSTRUCTD_CONFIG";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub database: DatabaseSettings,
    pub llm: LlmSettings,
    pub worker: WorkerSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub limits: LimitsSettings,
    pub retention: RetentionSettings,
    pub telemetry: TelemetrySettings,
    /// Where each secret came from (printed by `instructd config`; never the value).
    #[serde(skip)]
    pub secret_sources: Vec<(String, SecretSource)>,
}

/// Where a secret's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The compiled-in default.
    Default,
    /// The key itself, set in a configuration file or an `INSTRUCTD__` variable.
    Inline,
    /// Read from the file its `*_file` key names.
    File(PathBuf),
    /// The `OPENAI_API_KEY` environment variable.
    OpenAiApiKey,
    /// Not set (an empty API key).
    Unset,
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Default => f.write_str("the default"),
            Self::Inline => f.write_str("the key itself (configuration file or environment)"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::OpenAiApiKey => f.write_str("OPENAI_API_KEY"),
            Self::Unset => f.write_str("not set"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    #[serde(serialize_with = "redact_url")]
    pub url: SecretString,
    /// A file holding the URL (wins over `url`); empty: none.
    pub url_file: String,
    /// PEM file of the CA(s) that sign the broker's certificate, for `amqps://`; empty: the
    /// platform's trust store.
    pub ca_file: String,
    pub request_queue: String,
    pub events_exchange: String,
    pub dead_letter_queue: String,
    /// Where a delivery that cannot be worked on now waits (`defer_secs`) before it goes back
    /// to the request queue.
    pub delay_queue: String,
    pub defer_secs: u64,
    pub delivery_limit: u32,
    pub connect_timeout_secs: u64,
    pub reconnect_max_delay_secs: u64,
    pub max_disconnected_secs: u64,
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    #[serde(serialize_with = "redact_url")]
    pub url: SecretString,
    /// A file holding the URL (wins over `url`); empty: none.
    pub url_file: String,
    /// PEM file of the CA(s) that sign the server's certificate (`sslrootcert`), for
    /// `sslmode=verify-ca` / `verify-full`; empty: the URL's `sslrootcert`, if any.
    pub ca_file: String,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    pub migrate_on_start: bool,
}

/// How much of a re-ask chain is sent back to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaskHistory {
    /// Every failed answer and its error.
    All,
    /// Only the latest failed answer and its error: a long chain cannot overflow a small
    /// context window.
    Last,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    pub base_url: String,
    #[serde(serialize_with = "redact_secret")]
    pub api_key: SecretString,
    /// A file holding the API key (wins over `api_key`); empty: none.
    pub api_key_file: String,
    pub model: String,
    /// Models a request may name. Empty: only `model`; `"*"` allows any.
    pub allowed_models: Vec<String>,
    pub mode: Mode,
    pub strict: bool,
    pub reask_history: ReaskHistory,
    pub default_max_retries: u32,
    pub max_retries: u32,
    pub request_timeout_secs: u64,
    pub transport_min_delay_ms: u64,
    pub transport_max_delay_secs: u64,
    pub job_timeout_secs: u64,
    /// A job still waiting for the provider this long after it was first claimed (across
    /// deferrals) fails with kind `llm`.
    pub give_up_after_secs: u64,
    /// Transport failures in a row that open the provider's circuit.
    pub circuit_failures: u32,
    /// How long the circuit stays open before its first probe; doubled after each failed
    /// probe up to `circuit_max_open_secs`.
    pub circuit_min_open_secs: u64,
    pub circuit_max_open_secs: u64,
    /// Largest response body read from the provider.
    pub max_response_bytes: usize,
    pub max_tokens: u32,
    /// Tokens (prompt + completion, summed over every call) a job may spend; once spent,
    /// no more re-asks. 0: no budget.
    pub job_token_budget: u64,
    #[serde(default)]
    pub temperature: Option<f32>,
    pub max_concurrency: u32,
    /// PEM file of the CA(s) that sign the provider's certificate (a gateway with a private
    /// CA), beside the platform's trust store; empty: the platform's trust store only.
    pub ca_file: String,
    /// Calls sent over one HTTP/2 connection at most: calls are spread over
    /// `max concurrent calls ÷ this` connections (a provider's server caps the streams of a
    /// connection, and the calls past the cap would wait).
    pub streams_per_connection: u32,
    /// What each model costs (`[[llm.prices]]`); a model without a price has no cost.
    #[serde(default)]
    pub prices: Vec<Price>,
    /// Dollars a job may spend in all (every call, re-asks included), checked before each
    /// call: once spent, the job stops re-asking and fails with kind `llm`. 0: no budget.
    pub job_cost_budget_usd: f64,
    /// Providers beside the one of `base_url` (`[llm.providers.<name>]`), each with the
    /// models it serves; a model no provider lists goes to `base_url`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderSettings>,
    /// The models a job tries, in order, when one gives up (its provider rejects the call or
    /// stays unavailable past `fallback_after_secs`, or its re-asks run out). Empty: only the
    /// job's model.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// `fallback` for one entity (`[llm.fallback_by_entity] invoice = ["…", "…"]`).
    #[serde(default)]
    pub fallback_by_entity: BTreeMap<String, Vec<String>>,
    /// How long a job waits for an unavailable provider (its circuit open, every call rate
    /// limited or failing) before it moves on to the next model of its fallback list.
    pub fallback_after_secs: u64,
}

/// The name of the provider of `llm.base_url`, `llm.api_key` and the other `llm.*` keys.
pub const DEFAULT_PROVIDER: &str = "default";

/// A provider beside the default one: its endpoint, key and limits, and the models it serves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// An OpenAI-compatible endpoint, like `llm.base_url`.
    pub base_url: String,
    #[serde(default = "no_secret", serialize_with = "redact_secret")]
    pub api_key: SecretString,
    /// A file holding the API key (wins over `api_key`); empty: none.
    #[serde(default)]
    pub api_key_file: String,
    /// The models this provider serves (requests, `llm.model` and fallback lists name them).
    pub models: Vec<String>,
    /// `llm.request_timeout_secs` for this provider's calls; absent: that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_secs: Option<u64>,
    /// The most calls at once to this provider (its AIMD limit starts there); 0: as many as
    /// the default provider's.
    #[serde(default)]
    pub max_concurrency: u32,
    /// PEM file of the CA(s) that sign this provider's certificate; empty: the platform's.
    #[serde(default)]
    pub ca_file: String,
}

fn no_secret() -> SecretString {
    SecretString::from("")
}

/// A model's price, in US dollars per million tokens, as providers list them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// The model, as requests and `llm.model` name it.
    pub model: String,
    /// Prompt tokens.
    pub input_per_million: f64,
    /// Completion tokens.
    pub output_per_million: f64,
    /// Prompt tokens the provider reports as served from its cache
    /// (`usage.prompt_tokens_details.cached_tokens`); absent: `input_per_million`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_million: Option<f64>,
}

impl Price {
    /// What `usage` cost, in dollars, to the nano-dollar.
    pub fn cost(&self, usage: &crate::contract::Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let fresh = usage.prompt_tokens - cached;
        let cached_rate = self.cached_input_per_million.unwrap_or(self.input_per_million);
        let micro = fresh as f64 * self.input_per_million
            + cached as f64 * cached_rate
            + usage.completion_tokens as f64 * self.output_per_million;
        (micro * 1e3).round() / 1e9
    }
}

impl LlmSettings {
    /// The API key, if one is configured (an empty string means none).
    pub fn api_key(&self) -> Option<&str> {
        Some(self.api_key.expose_secret()).filter(|key| !key.is_empty())
    }

    /// `model`'s price, if it has one.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.iter().find(|price| price.model == model)
    }

    /// Whether a request may name `model`: `model`, the allow-list, and every model a
    /// fallback list or a provider names.
    pub fn allows_model(&self, model: &str) -> bool {
        self.named_models().any(|named| named == model) || self.allowed_models.iter().any(|allowed| allowed == "*")
    }

    /// Every model the settings name (with repeats): `model`, the allow-list (but `"*"`), the
    /// fallback lists and the providers' models.
    pub fn named_models(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&self.model)
            .chain(self.allowed_models.iter().filter(|model| *model != "*"))
            .chain(&self.fallback)
            .chain(self.fallback_by_entity.values().flatten())
            .chain(self.providers.values().flat_map(|provider| &provider.models))
            .map(String::as_str)
    }

    /// The models a job of `entity` tries, in order. A job that names no model starts at its
    /// fallback list's first (`llm.model` when there is no list); one that names a model of
    /// the list goes on from there; one that names a model off the list tries it alone.
    pub fn models_for(&self, entity: &str, requested: Option<&str>) -> Vec<String> {
        let list = self.fallback_by_entity.get(entity).unwrap_or(&self.fallback);
        match requested {
            None if list.is_empty() => vec![self.model.clone()],
            None => list.clone(),
            Some(model) => match list.iter().position(|listed| listed == model) {
                Some(at) => list[at..].to_vec(),
                None => vec![model.to_owned()],
            },
        }
    }

    /// The name of the provider that serves `model`.
    pub fn provider_of(&self, model: &str) -> &str {
        self.providers
            .iter()
            .find(|(_, provider)| provider.models.iter().any(|served| served == model))
            .map_or(DEFAULT_PROVIDER, |(name, _)| name.as_str())
    }

    /// The settings a provider's client is built from: these, with the provider's endpoint,
    /// key, timeout and CA.
    pub fn for_provider(&self, provider: &ProviderSettings) -> LlmSettings {
        LlmSettings {
            base_url: provider.base_url.clone(),
            api_key: provider.api_key.clone(),
            api_key_file: String::new(),
            request_timeout_secs: provider.request_timeout_secs.unwrap_or(self.request_timeout_secs),
            ca_file: provider.ca_file.clone(),
            providers: BTreeMap::new(),
            ..self.clone()
        }
    }
}

/// What one request may ask for. A request over a limit is rejected as `invalid_request`
/// (dead-lettered, with a failed event) before anything is spent on it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Most messages in a request.
    pub max_messages: usize,
    /// Largest text of one message's `content` (every text part together), in bytes.
    pub max_content_bytes: usize,
    /// Most parts of one message's `content` when it is a list (text and images).
    pub max_content_parts: usize,
    /// Longest image URL, in bytes (a `data:` URL holds the image itself).
    pub max_image_bytes: usize,
    /// The schemes an image URL may have: `data` (the image inline) and `https` (the provider
    /// fetches it). An image with another scheme is rejected, never forwarded.
    pub image_url_schemes: Vec<String>,
    /// Largest `metadata`, in bytes of JSON.
    pub max_metadata_bytes: usize,
    /// Most bytes of raw provider responses kept on a job's row; later ones are replaced by a
    /// note of their size.
    pub max_responses_bytes: usize,
}

/// How long finished work is kept. Pruned by the daemon in small batches, by one replica at
/// a time. `0` keeps it forever.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// `generation_job` rows of succeeded jobs, after they finished. A job id whose row is gone
    /// is no longer an idempotency key: a late duplicate of it runs again.
    pub succeeded_jobs: Span,
    /// `generation_job` rows of failed jobs.
    pub failed_jobs: Span,
    /// `event_outbox` rows, once published (or given up on).
    pub published_events: Span,
    /// How long an event no queue is bound for is retried before it is given up on (counted
    /// in `instructd_events_abandoned_total`).
    pub unroutable_events: Span,
    /// How often the pruning pass runs.
    pub prune_every: Span,
}

/// A length of time written as a number and a unit: `90s`, `15m`, `12h`, `30d`; `0` is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl Span {
    /// `None` for `0` (keep forever / never).
    pub fn get(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(Span(Duration::ZERO));
        }
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 =
            number.parse().map_err(|_| format!("`{text}` is not a duration such as 30d, 12h, 15m or 90s"))?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
        };
        number
            .checked_mul(unit_secs)
            .map(|secs| Span(Duration::from_secs(secs)))
            .ok_or_else(|| format!("`{text}` is too long"))
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.as_secs();
        match secs {
            0 => f.write_str("0"),
            s if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            s if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            s if s % 60 == 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: u16,
    pub shutdown_grace_secs: u64,
    /// How often the daemon writes its heartbeat (its row in `worker`).
    pub heartbeat_secs: u64,
    /// A claim whose worker has not written its heartbeat for this long (or whose session is
    /// gone) is taken over by the next delivery of its job.
    pub takeover_after_secs: u64,
    /// The longest a delivery is held unacknowledged while the job waits (for the provider,
    /// the database): past it the delivery is moved to the delay queue. Keep it well under
    /// RabbitMQ's `consumer_timeout` (30 minutes by default).
    pub max_hold_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// Serves the console (`/`) and its API (`/api/…`) beside the probes and the metrics.
    pub console: bool,
    /// The token the console's actions need, and every console page and API call on a
    /// listener that is not loopback. Required there while `console` is on.
    #[serde(serialize_with = "redact_secret")]
    pub admin_token: SecretString,
    pub admin_token_file: String,
}

impl HttpSettings {
    /// Whether the console and its API may start on `listen`: a listener other than
    /// loopback needs an admin token while the console is on. The error names the keys.
    pub fn check_console_access(&self) -> anyhow::Result<()> {
        if self.console && !self.listen.ip().is_loopback() && self.admin_token.expose_secret().is_empty() {
            bail!(
                "http.admin_token_file: not set, and http.listen ({}) is not a loopback address, so the console \
                 and its API would be open to the network: set http.admin_token_file (or http.admin_token), or \
                 set http.console = false to serve only /healthz, /readyz and /metrics there",
                self.listen
            );
        }
        Ok(())
    }
}

/// The shortest admin token accepted: it is all that stands between the network and the
/// console's actions.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Traces (OpenTelemetry): exported over OTLP/HTTP when an endpoint is set, else not made.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`; spans are posted to
    /// `{it}/v1/traces`, as JSON). Empty: no traces.
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    /// The share of traces kept that have no sampled parent (a request's `traceparent`
    /// decides for its own job), from 0 to 1.
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Settings {
    /// Loads the settings from the defaults, the file named by `file` (or by
    /// `INSTRUCTD_CONFIG`), and the process environment.
    ///
    /// Fails with a message naming the offending key when a value is missing, has the
    /// wrong type, or is out of range.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, std::env::vars().collect())
    }

    /// Like [`Settings::load`], with the environment given as a map (tests use this).
    pub fn load_from(file: Option<&Path>, env: HashMap<String, String>) -> anyhow::Result<Self> {
        let file: Option<PathBuf> = file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).filter(|p| !p.is_empty()).map(PathBuf::from));
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = &file {
            if !path.is_file() {
                bail!("configuration file {} does not exist", path.display());
            }
            builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        let openai_api_key = env.get("OPENAI_API_KEY").cloned();
        let environment = Environment::with_prefix("INSTRUCTD")
            .prefix_separator("__")
            .separator("__")
            .source(Some(env.into_iter().collect()));
        let mut settings: Settings = builder
            .add_source(environment)
            .build()
            .and_then(Config::try_deserialize)
            .context("invalid configuration")?;
        settings.resolve_secrets(openai_api_key).context("invalid configuration")?;
        settings.validate().context("invalid configuration")?;
        Ok(settings)
    }

    /// Reads every `*_file` secret, falls back to `OPENAI_API_KEY`, and records where each
    /// secret came from.
    fn resolve_secrets(&mut self, openai_api_key: Option<String>) -> anyhow::Result<()> {
        let defaults: Settings = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .build()
            .and_then(Config::try_deserialize)
            .expect("the compiled-in defaults deserialize");
        let broker = resolve_secret("broker.url", &mut self.broker.url, &self.broker.url_file, &defaults.broker.url)?;
        let database =
            resolve_secret("database.url", &mut self.database.url, &self.database.url_file, &defaults.database.url)?;
        let mut api_key =
            resolve_secret("llm.api_key", &mut self.llm.api_key, &self.llm.api_key_file, &defaults.llm.api_key)?;
        if api_key == SecretSource::Default {
            api_key = match openai_api_key.filter(|k| !k.is_empty()) {
                Some(key) => {
                    self.llm.api_key = SecretString::from(key);
                    SecretSource::OpenAiApiKey
                }
                None => SecretSource::Unset,
            };
        }
        let admin_token = resolve_secret(
            "http.admin_token",
            &mut self.http.admin_token,
            &self.http.admin_token_file,
            &defaults.http.admin_token,
        )?;
        self.secret_sources = vec![
            ("broker.url".into(), broker),
            ("database.url".into(), database),
            ("llm.api_key".into(), api_key),
            (
                "http.admin_token".into(),
                if admin_token == SecretSource::Default { SecretSource::Unset } else { admin_token },
            ),
        ];
        for (name, provider) in &mut self.llm.providers {
            let key = format!("llm.providers.{name}.api_key");
            let source = resolve_secret(&key, &mut provider.api_key, &provider.api_key_file, &no_secret())?;
            let source = if source == SecretSource::Default { SecretSource::Unset } else { source };
            self.secret_sources.push((key, source));
        }
        Ok(())
    }

    /// Prices are amounts, each model priced once; a dollar budget needs a price for every
    /// model a job may use.
    fn validate_prices(&self) -> anyhow::Result<()> {
        let llm = &self.llm;
        for (index, price) in llm.prices.iter().enumerate() {
            let key = format!("llm.prices[{index}]");
            if price.model.trim().is_empty() {
                bail!("{key}.model: must not be empty");
            }
            let rates = [
                ("input_per_million", Some(price.input_per_million)),
                ("output_per_million", Some(price.output_per_million)),
                ("cached_input_per_million", price.cached_input_per_million),
            ];
            for (name, rate) in rates {
                if rate.is_some_and(|rate| !rate.is_finite() || !(0.0..=1e6).contains(&rate)) {
                    bail!("{key}.{name}: must be a number of dollars from 0 to 1000000");
                }
            }
            if llm.prices[..index].iter().any(|other| other.model == price.model) {
                bail!("{key}.model: `{}` is priced twice", price.model);
            }
        }
        let budget = llm.job_cost_budget_usd;
        if !budget.is_finite() || budget < 0.0 {
            bail!("llm.job_cost_budget_usd: must be a number of dollars, 0 (no budget) or more");
        }
        if budget > 0.0 {
            if llm.allowed_models.iter().any(|model| model == "*") {
                bail!("llm.job_cost_budget_usd: cannot hold when llm.allowed_models allows any model (\"*\")");
            }
            for model in llm.named_models() {
                if llm.price(model).is_none() {
                    bail!("llm.job_cost_budget_usd: model `{model}` has no price in llm.prices");
                }
            }
        }
        Ok(())
    }

    /// Providers have a URL and models of their own; fallback lists name models once.
    fn validate_providers(&self) -> anyhow::Result<()> {
        let llm = &self.llm;
        for (name, provider) in &llm.providers {
            let key = format!("llm.providers.{name}");
            if name == DEFAULT_PROVIDER {
                bail!("{key}: `{DEFAULT_PROVIDER}` is the provider of llm.base_url; name this one otherwise");
            }
            let base =
                url::Url::parse(&provider.base_url).map_err(|e| anyhow::anyhow!("{key}.base_url: not a URL ({e})"))?;
            if !matches!(base.scheme(), "http" | "https") {
                bail!("{key}.base_url: must be an http:// or https:// URL");
            }
            if provider.models.is_empty() {
                bail!("{key}.models: must name at least one model");
            }
            for (index, model) in provider.models.iter().enumerate() {
                if model.trim().is_empty() {
                    bail!("{key}.models: must not hold an empty name");
                }
                if provider.models[..index].contains(model) {
                    bail!("{key}.models: `{model}` is listed twice");
                }
                if let Some((other, _)) =
                    llm.providers.range::<String, _>(..name).find(|(_, other)| other.models.contains(model))
                {
                    bail!("{key}.models: `{model}` is already served by llm.providers.{other}");
                }
            }
            if provider.request_timeout_secs == Some(0) {
                bail!("{key}.request_timeout_secs: must be at least 1");
            }
            if provider.request_timeout_secs.is_some_and(|secs| secs > llm.job_timeout_secs) {
                bail!("{key}.request_timeout_secs: must be at most llm.job_timeout_secs");
            }
            if !provider.ca_file.is_empty() {
                if !Path::new(&provider.ca_file).is_file() {
                    bail!("{key}.ca_file: no such file");
                }
                if base.scheme() != "https" {
                    bail!("{key}.ca_file: needs an https:// {key}.base_url");
                }
            }
        }
        let lists = std::iter::once(("llm.fallback".to_owned(), &llm.fallback)).chain(
            llm.fallback_by_entity.iter().map(|(entity, list)| (format!("llm.fallback_by_entity.{entity}"), list)),
        );
        for (key, list) in lists {
            for (index, model) in list.iter().enumerate() {
                if model.trim().is_empty() {
                    bail!("{key}: must not hold an empty name");
                }
                if list[..index].contains(model) {
                    bail!("{key}: `{model}` is listed twice");
                }
            }
        }
        if llm.fallback_after_secs < 1 {
            bail!("llm.fallback_after_secs: must be at least 1");
        }
        Ok(())
    }

    /// Every entity a fallback list is given for is one the application knows.
    pub fn check_fallback_entities(&self, mut known: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
        match self.llm.fallback_by_entity.keys().find(|entity| !known(entity)) {
            Some(entity) => bail!("llm.fallback_by_entity.{entity}: no such entity"),
            None => Ok(()),
        }
    }

    /// Range and consistency checks that types cannot express; each error names its key.
    fn validate(&self) -> anyhow::Result<()> {
        fn ensure(ok: bool, key: &str, why: &str) -> anyhow::Result<()> {
            if ok { Ok(()) } else { bail!("{key}: {why}") }
        }
        check_url(&self.broker.url, "broker.url", &["amqp", "amqps"])?;
        check_url(&self.database.url, "database.url", &["postgres", "postgresql"])?;
        let base = url::Url::parse(&self.llm.base_url).map_err(|e| anyhow::anyhow!("llm.base_url: not a URL ({e})"))?;
        ensure(matches!(base.scheme(), "http" | "https"), "llm.base_url", "must be an http:// or https:// URL")?;
        for (key, name) in [
            ("broker.request_queue", &self.broker.request_queue),
            ("broker.events_exchange", &self.broker.events_exchange),
            ("broker.dead_letter_queue", &self.broker.dead_letter_queue),
            ("broker.delay_queue", &self.broker.delay_queue),
            ("llm.model", &self.llm.model),
        ] {
            ensure(!name.trim().is_empty(), key, "must not be empty")?;
        }
        ensure(self.broker.delivery_limit >= 1, "broker.delivery_limit", "must be at least 1")?;
        ensure(self.broker.max_disconnected_secs >= 1, "broker.max_disconnected_secs", "must be at least 1")?;
        ensure(self.broker.max_message_bytes >= 1024, "broker.max_message_bytes", "must be at least 1024")?;
        ensure(self.database.max_connections >= 1, "database.max_connections", "must be at least 1")?;
        ensure(self.worker.concurrency >= 1, "worker.concurrency", "must be at least 1")?;
        ensure(self.llm.request_timeout_secs >= 1, "llm.request_timeout_secs", "must be at least 1")?;
        ensure(self.broker.defer_secs >= 1, "broker.defer_secs", "must be at least 1")?;
        ensure(self.llm.circuit_failures >= 1, "llm.circuit_failures", "must be at least 1")?;
        ensure(self.llm.circuit_min_open_secs >= 1, "llm.circuit_min_open_secs", "must be at least 1")?;
        ensure(
            self.llm.circuit_max_open_secs >= self.llm.circuit_min_open_secs,
            "llm.circuit_max_open_secs",
            "must be at least llm.circuit_min_open_secs",
        )?;
        ensure(self.llm.max_response_bytes >= 1024, "llm.max_response_bytes", "must be at least 1024")?;
        ensure(self.llm.streams_per_connection >= 1, "llm.streams_per_connection", "must be at least 1")?;
        self.validate_prices()?;
        self.validate_providers()?;
        ensure(self.limits.max_content_parts >= 1, "limits.max_content_parts", "must be at least 1")?;
        if let Some(scheme) =
            self.limits.image_url_schemes.iter().find(|scheme| !matches!(scheme.as_str(), "data" | "https" | "http"))
        {
            bail!("limits.image_url_schemes: `{scheme}` is not one of data, https, http");
        }
        ensure(
            self.llm.give_up_after_secs >= self.llm.job_timeout_secs,
            "llm.give_up_after_secs",
            "must be at least llm.job_timeout_secs",
        )?;
        ensure(self.limits.max_responses_bytes >= 1024, "limits.max_responses_bytes", "must be at least 1024")?;
        ensure(self.worker.heartbeat_secs >= 1, "worker.heartbeat_secs", "must be at least 1")?;
        ensure(
            self.worker.takeover_after_secs >= 2 * self.worker.heartbeat_secs,
            "worker.takeover_after_secs",
            "must be at least twice worker.heartbeat_secs",
        )?;
        ensure(
            self.worker.max_hold_secs > self.llm.job_timeout_secs,
            "worker.max_hold_secs",
            "must be more than llm.job_timeout_secs",
        )?;
        ensure(self.retention.prune_every.get().is_some(), "retention.prune_every", "must not be 0")?;
        let token = self.http.admin_token.expose_secret();
        ensure(
            token.is_empty() || token.trim().chars().count() >= MIN_ADMIN_TOKEN_CHARS,
            if self.http.admin_token_file.is_empty() { "http.admin_token" } else { "http.admin_token_file" },
            "the token must be at least 16 characters (e.g. `openssl rand -hex 32`)",
        )?;
        ensure(
            !token.to_ascii_uppercase().contains("CHANGE-ME"),
            if self.http.admin_token_file.is_empty() { "http.admin_token" } else { "http.admin_token_file" },
            "still the example's placeholder: set a token of your own (e.g. `openssl rand -hex 32`)",
        )?;
        ensure(
            self.llm.default_max_retries <= self.llm.max_retries,
            "llm.default_max_retries",
            "must not exceed llm.max_retries",
        )?;
        ensure(
            self.llm.job_timeout_secs >= self.llm.request_timeout_secs,
            "llm.job_timeout_secs",
            "must be at least llm.request_timeout_secs",
        )?;
        for (key, file) in [
            ("broker.ca_file", &self.broker.ca_file),
            ("database.ca_file", &self.database.ca_file),
            ("llm.ca_file", &self.llm.ca_file),
        ] {
            ensure(file.is_empty() || Path::new(file).is_file(), key, "no such file")?;
        }
        // A CA file that would silently verify nothing is refused.
        if !self.broker.ca_file.is_empty() {
            let scheme = url::Url::parse(self.broker.url.expose_secret()).map(|u| u.scheme().to_owned());
            ensure(scheme.as_deref() == Ok("amqps"), "broker.ca_file", "needs an amqps:// broker.url")?;
        }
        if !self.llm.ca_file.is_empty() {
            let scheme = url::Url::parse(&self.llm.base_url).map(|u| u.scheme().to_owned());
            ensure(scheme.as_deref() == Ok("https"), "llm.ca_file", "needs an https:// llm.base_url")?;
        }
        if !self.database.ca_file.is_empty() {
            let url = url::Url::parse(self.database.url.expose_secret()).ok();
            let mode = url.and_then(|u| {
                u.query_pairs().find(|(k, _)| k == "sslmode" || k == "ssl-mode").map(|(_, v)| v.into_owned())
            });
            ensure(
                matches!(mode.as_deref(), Some("verify-full" | "verify-ca")),
                "database.ca_file",
                "needs sslmode=verify-full (or verify-ca) in database.url, or the certificate is not checked",
            )?;
        }
        for model in &self.llm.allowed_models {
            ensure(!model.trim().is_empty(), "llm.allowed_models", "must not hold an empty name")?;
        }
        ensure(self.limits.max_messages >= 1, "limits.max_messages", "must be at least 1")?;
        ensure(self.limits.max_content_bytes >= 1, "limits.max_content_bytes", "must be at least 1")?;
        if let Some(temperature) = self.llm.temperature {
            ensure((0.0..=2.0).contains(&temperature), "llm.temperature", "must be between 0 and 2")?;
        }
        let telemetry = &self.telemetry;
        if !telemetry.otlp_endpoint.is_empty() {
            let endpoint = url::Url::parse(&telemetry.otlp_endpoint)
                .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint: not a URL ({e})"))?;
            ensure(
                matches!(endpoint.scheme(), "http" | "https"),
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL (OTLP/HTTP)",
            )?;
            ensure(
                endpoint.password().is_none() && endpoint.username().is_empty(),
                "telemetry.otlp_endpoint",
                "must not hold credentials",
            )?;
        }
        ensure(!telemetry.service_name.trim().is_empty(), "telemetry.service_name", "must not be empty")?;
        ensure(
            (0.0..=1.0).contains(&telemetry.sample_ratio),
            "telemetry.sample_ratio",
            "must be a number from 0 to 1",
        )?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| anyhow::anyhow!("log.level: not a valid filter ({e})"))?;
        Ok(())
    }

    /// The most LLM calls at once: `llm.max_concurrency`, or `worker.concurrency` when 0
    /// (each job makes one call at a time).
    pub fn llm_max_concurrency(&self) -> usize {
        match self.llm.max_concurrency {
            0 => self.worker.concurrency.into(),
            n => n as usize,
        }
    }

    /// The effective settings as TOML, with every secret redacted, after a comment that says
    /// where each secret came from.
    pub fn to_redacted_toml(&self) -> String {
        let mut out = String::from("# Secrets (values never shown) came from:\n");
        for (key, source) in &self.secret_sources {
            out.push_str(&format!("#   {key}: {source}\n"));
        }
        out.push('\n');
        out.push_str(&toml::to_string(self).expect("settings serialize to TOML"));
        out
    }
}

/// Replaces `value` with the contents of `file` when one is named (one trailing newline
/// dropped, as `echo` and Kubernetes secrets leave one), and says where the value came from.
fn resolve_secret(
    key: &str,
    value: &mut SecretString,
    file: &str,
    default: &SecretString,
) -> anyhow::Result<SecretSource> {
    let inline = value.expose_secret() != default.expose_secret();
    if file.is_empty() {
        return Ok(if inline { SecretSource::Inline } else { SecretSource::Default });
    }
    if inline {
        bail!("{key}: set either {key} or {key}_file, not both");
    }
    // The I/O error names the path and the cause, never the contents. A "path" without a
    // slash may be the secret itself, put in the wrong variable: it is not repeated.
    let contents = std::fs::read_to_string(file).map_err(|e| {
        let shown = if file.contains('/') {
            file
        } else {
            "the file it names (not an absolute path: is it the secret itself?)"
        };
        anyhow::anyhow!("{key}_file: cannot read {shown}: {e}")
    })?;
    let secret = contents.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(&contents);
    if secret.trim().is_empty() {
        bail!("{key}_file: {file} is empty");
    }
    *value = SecretString::from(secret.to_owned());
    Ok(SecretSource::File(PathBuf::from(file)))
}

fn check_url(url: &SecretString, key: &str, schemes: &[&str]) -> anyhow::Result<()> {
    // The parse error is safe to show: url's errors never echo the input.
    let parsed = url::Url::parse(url.expose_secret()).map_err(|e| anyhow::anyhow!("{key}: not a URL ({e})"))?;
    if !schemes.contains(&parsed.scheme()) {
        bail!("{key}: scheme must be one of {}", schemes.join(", "));
    }
    Ok(())
}

/// A URL with its password (if any) replaced by `***`, safe to log.
pub fn redacted_url(url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "[unparseable URL redacted]".to_owned(),
    }
}

fn redact_url<S: Serializer>(url: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redacted_url(url))
}

fn redact_secret<S: Serializer>(secret: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    let shown = if secret.expose_secret().is_empty() { "" } else { "[redacted]" };
    serializer.serialize_str(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn an_admin_token_that_is_short_or_the_examples_placeholder_is_refused_naming_the_key() {
        for (token, why) in [
            ("short", "http.admin_token: the token must be at least 16 characters"),
            ("CHANGE-ME-32-random-hex-characters", "http.admin_token: still the example's placeholder"),
        ] {
            let error = Settings::load_from(None, env(&[("INSTRUCTD__HTTP__ADMIN_TOKEN", token)])).unwrap_err();
            assert!(format!("{error:#}").contains(why), "{token}: {error:#}");
        }
        let settings =
            Settings::load_from(None, env(&[("INSTRUCTD__HTTP__ADMIN_TOKEN", "0123456789abcdef0123")])).unwrap();
        assert!(settings.to_redacted_toml().contains("admin_token = \"[redacted]\""));
        assert!(!settings.to_redacted_toml().contains("0123456789abcdef0123"));
        // Beyond loopback, the console needs it.
        let mut open = Settings::load_from(None, env(&[("INSTRUCTD__HTTP__LISTEN", "0.0.0.0:9464")])).unwrap();
        assert!(format!("{:#}", open.http.check_console_access().unwrap_err()).starts_with("http.admin_token_file: "));
        open.http.console = false;
        open.http.check_console_access().unwrap();
    }

    #[test]
    fn a_price_or_a_dollar_budget_that_cannot_hold_stops_start_up_naming_the_key() {
        let budget = env(&[("INSTRUCTD__LLM__JOB_COST_BUDGET_USD", "0.5")]);
        let error = Settings::load_from(None, budget).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(error.contains("llm.job_cost_budget_usd: model `gpt-4o-mini"), "{error}");
        assert!(error.ends_with("` has no price in llm.prices"), "{error}");
        let negative = env(&[("INSTRUCTD__LLM__JOB_COST_BUDGET_USD", "-1")]);
        let error = Settings::load_from(None, negative).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(error.contains("llm.job_cost_budget_usd: must be a number of dollars"), "{error}");

        let dir = std::env::temp_dir().join(format!("instructd-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("prices.toml");
        let write = |text: &str| std::fs::write(&file, text).unwrap();
        write("[llm]\nmodel = \"m\"\n[[llm.prices]]\nmodel = \"m\"\ninput_per_million = -1\noutput_per_million = 1\n");
        let error = Settings::load_from(Some(&file), env(&[])).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(
            error.ends_with("llm.prices[0].input_per_million: must be a number of dollars from 0 to 1000000"),
            "{error}"
        );
        write(
            "[llm]\nmodel = \"m\"\njob_cost_budget_usd = 0.5\n\
             [[llm.prices]]\nmodel = \"m\"\ninput_per_million = 0.15\noutput_per_million = 0.6\n",
        );
        let settings = Settings::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(settings.llm.price("m").map(|price| price.output_per_million), Some(0.6));
        write(
            "[[llm.prices]]\nmodel = \"m\"\ninput_per_million = 1\noutput_per_million = 1\n\
             [[llm.prices]]\nmodel = \"m\"\ninput_per_million = 2\noutput_per_million = 2\n",
        );
        let error = Settings::load_from(Some(&file), env(&[])).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(error.ends_with("llm.prices[1].model: `m` is priced twice"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_calls_cost_prices_cached_prompt_tokens_apart() {
        let price = Price {
            model: "m".into(),
            input_per_million: 2.5,
            output_per_million: 10.0,
            cached_input_per_million: Some(1.25),
        };
        let usage = crate::contract::Usage {
            prompt_tokens: 1_000,
            completion_tokens: 500,
            total_tokens: 1_500,
            cached_tokens: 400,
            cost_usd: None,
        };
        // 600 × 2.5 + 400 × 1.25 + 500 × 10 = 7,000 millionths.
        assert_eq!(price.cost(&usage), 0.007);
        let uncached = Price { cached_input_per_million: None, ..price };
        assert_eq!(uncached.cost(&usage), 0.0075);
    }

    #[test]
    fn defaults_load_and_validate() {
        let settings = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(settings.broker.request_queue, "instructd.requests");
        assert_eq!(settings.worker.concurrency, 8);
        assert!(settings.llm.api_key().is_none());
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let settings = Settings::load_from(
            None,
            env(&[("INSTRUCTD__WORKER__CONCURRENCY", "3"), ("INSTRUCTD__LLM__MODEL", "local")]),
        )
        .unwrap();
        assert_eq!(settings.worker.concurrency, 3);
        assert_eq!(settings.llm.model, "local");
    }

    #[test]
    fn openai_api_key_is_a_fallback_for_the_configured_key() {
        let fallback = Settings::load_from(None, env(&[("OPENAI_API_KEY", "sk-fallback")])).unwrap();
        assert_eq!(fallback.llm.api_key(), Some("sk-fallback"));
        let explicit = Settings::load_from(
            None,
            env(&[("OPENAI_API_KEY", "sk-fallback"), ("INSTRUCTD__LLM__API_KEY", "sk-explicit")]),
        )
        .unwrap();
        assert_eq!(explicit.llm.api_key(), Some("sk-explicit"));
    }

    #[test]
    fn a_wrong_value_names_its_key() {
        let err = Settings::load_from(None, env(&[("INSTRUCTD__WORKER__CONCURRENCY", "many")])).unwrap_err();
        assert!(format!("{err:#}").contains("worker.concurrency"), "{err:#}");
        let err = Settings::load_from(None, env(&[("INSTRUCTD__WORKER__CONCURRENCY", "0")])).unwrap_err();
        assert!(format!("{err:#}").contains("worker.concurrency"), "{err:#}");
        let err = Settings::load_from(None, env(&[("INSTRUCTD__LOG__FORMAT", "xml")])).unwrap_err();
        assert!(format!("{err:#}").contains("log.format"), "{err:#}");
        let err = Settings::load_from(None, env(&[("INSTRUCTD__BROKER__URL", "http://x")])).unwrap_err();
        assert!(format!("{err:#}").contains("broker.url"), "{err:#}");
    }

    #[test]
    fn an_unknown_key_is_rejected_by_name() {
        let err = Settings::load_from(None, env(&[("INSTRUCTD__WORKER__CONCURRENCYY", "2")])).unwrap_err();
        assert!(format!("{err:#}").contains("concurrencyy"), "{err:#}");
    }

    #[test]
    fn printed_settings_never_show_secrets() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("INSTRUCTD__LLM__API_KEY", "sk-very-secret"),
                ("INSTRUCTD__DATABASE__URL", "postgres://app:hunter2@db:5432/app"),
                ("INSTRUCTD__BROKER__URL", "amqp://app:tr0ub4dor@mq:5672/%2f"),
            ]),
        )
        .unwrap();
        let printed = settings.to_redacted_toml();
        for secret in ["sk-very-secret", "hunter2", "tr0ub4dor"] {
            assert!(!printed.contains(secret), "{secret} leaked:\n{printed}");
            assert!(!format!("{settings:?}").contains(secret), "{secret} leaked through Debug");
        }
        assert!(printed.contains("postgres://app:***@db:5432/app"), "{printed}");
        assert!(printed.contains("[redacted]"), "{printed}");
    }

    fn secret_file(contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("instructd-secret-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn secrets_are_read_from_their_files_and_the_sources_printed_never_the_values() {
        let key = secret_file("sk-from-a-file\n");
        let broker = secret_file("amqps://app:s3cr3t-broker@mq.internal:5671/%2f\r\n");
        let settings = Settings::load_from(
            None,
            env(&[
                ("INSTRUCTD__LLM__API_KEY_FILE", key.to_str().unwrap()),
                ("INSTRUCTD__BROKER__URL_FILE", broker.to_str().unwrap()),
                ("OPENAI_API_KEY", "sk-from-the-environment"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.llm.api_key(), Some("sk-from-a-file"), "the file wins over OPENAI_API_KEY");
        assert_eq!(settings.broker.url.expose_secret(), "amqps://app:s3cr3t-broker@mq.internal:5671/%2f");
        let printed = settings.to_redacted_toml();
        assert!(printed.contains(&format!("#   llm.api_key: file {}", key.display())), "{printed}");
        assert!(printed.contains(&format!("#   broker.url: file {}", broker.display())), "{printed}");
        assert!(printed.contains("#   database.url: the default"), "{printed}");
        assert!(printed.contains("amqps://app:***@mq.internal:5671/%2f"), "{printed}");
        assert!(!printed.contains("sk-from") && !printed.contains("s3cr3t-broker"), "{printed}");

        let from_env = Settings::load_from(None, env(&[("OPENAI_API_KEY", "sk-from-the-environment")])).unwrap();
        assert!(from_env.to_redacted_toml().contains("#   llm.api_key: OPENAI_API_KEY"));
        let unset = Settings::load_from(None, env(&[])).unwrap();
        assert!(unset.to_redacted_toml().contains("#   llm.api_key: not set"));
        for path in [key, broker] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn a_secret_file_that_is_missing_empty_or_doubled_names_its_key() {
        let err =
            Settings::load_from(None, env(&[("INSTRUCTD__DATABASE__URL_FILE", "/nonexistent/db-url")])).unwrap_err();
        let shown = format!("{err:#}");
        assert!(shown.contains("database.url_file: cannot read /nonexistent/db-url"), "{shown}");

        let empty = secret_file("\n");
        let err =
            Settings::load_from(None, env(&[("INSTRUCTD__LLM__API_KEY_FILE", empty.to_str().unwrap())])).unwrap_err();
        assert!(format!("{err:#}").contains("llm.api_key_file"), "{err:#}");

        let key = secret_file("sk-in-a-file");
        let err = Settings::load_from(
            None,
            env(&[("INSTRUCTD__LLM__API_KEY_FILE", key.to_str().unwrap()), ("INSTRUCTD__LLM__API_KEY", "sk-inline")]),
        )
        .unwrap_err();
        let shown = format!("{err:#}");
        assert!(shown.contains("set either llm.api_key or llm.api_key_file, not both"), "{shown}");
        assert!(!shown.contains("sk-in"), "{shown}");
        for path in [empty, key] {
            std::fs::remove_file(path).unwrap();
        }
    }

    /// Settings from a configuration file holding `toml`, and the environment `pairs`.
    fn from_file(toml: &str, pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let path = std::env::temp_dir().join(format!("instructd-config-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, toml).unwrap();
        let settings = Settings::load_from(Some(&path), env(pairs));
        std::fs::remove_file(path).unwrap();
        settings
    }

    #[test]
    fn providers_serve_their_models_and_fallback_lists_say_what_a_job_tries() {
        let key = secret_file("sk-large-from-a-file\n");
        let toml = format!(
            r#"
            [llm]
            model = "small"
            fallback = ["small", "medium", "large"]
            [llm.fallback_by_entity]
            invoice = ["large"]
            [llm.providers.big]
            base_url = "https://gateway.example.com/v1"
            api_key_file = "{}"
            models = ["large", "medium"]
            "#,
            key.display()
        );
        let settings = from_file(&toml, &[]).unwrap();
        let llm = &settings.llm;
        assert_eq!(llm.provider_of("large"), "big");
        assert_eq!(llm.provider_of("small"), DEFAULT_PROVIDER);
        assert_eq!(llm.for_provider(&llm.providers["big"]).api_key(), Some("sk-large-from-a-file"));
        assert!(
            llm.allows_model("medium") && llm.allows_model("large"),
            "a provider's or a list's models may be named"
        );
        assert!(!llm.allows_model("other"));
        assert_eq!(llm.models_for("hero", None), ["small", "medium", "large"]);
        assert_eq!(llm.models_for("hero", Some("medium")), ["medium", "large"], "on from the named model");
        assert_eq!(llm.models_for("invoice", None), ["large"], "the entity's own list");
        assert_eq!(llm.models_for("invoice", Some("small")), ["small"], "a model off the list, alone");
        let printed = settings.to_redacted_toml();
        assert!(printed.contains(&format!("#   llm.providers.big.api_key: file {}", key.display())), "{printed}");
        assert!(!printed.contains("sk-large-from"), "{printed}");
        // A provider's key from the environment, as a Kubernetes secret would set it.
        let toml = "[llm.providers.big]\nbase_url = \"https://gateway.example.com/v1\"\nmodels = [\"large\"]";
        let from_env = from_file(toml, &[("INSTRUCTD__LLM__PROVIDERS__BIG__API_KEY", "sk-big-from-env")]).unwrap();
        let big = &from_env.llm.providers["big"];
        assert_eq!(from_env.llm.for_provider(big).api_key(), Some("sk-big-from-env"));
        let printed = from_env.to_redacted_toml();
        assert!(printed.contains("#   llm.providers.big.api_key: the key itself"), "{printed}");
        assert!(!printed.contains("sk-big-from-env"), "{printed}");
        // Without a list, a job tries its own model.
        let plain = Settings::load_from(None, env(&[("INSTRUCTD__LLM__MODEL", "small")])).unwrap();
        assert_eq!(plain.llm.models_for("hero", None), ["small"]);
        assert_eq!(plain.llm.models_for("hero", Some("other")), ["other"]);
        std::fs::remove_file(key).unwrap();
    }

    #[test]
    fn a_wrong_provider_or_fallback_list_names_its_key() {
        let provider = |body: &str| format!("[llm.providers.big]\n{body}");
        let cases = [
            (provider(r#"base_url = "ftp://x"
                models = ["m"]"#), "llm.providers.big.base_url: must be an http:// or https:// URL"),
            (provider(r#"base_url = "https://x/v1"
                models = []"#), "llm.providers.big.models: must name at least one model"),
            (provider(r#"base_url = "https://x/v1"
                models = ["m", "m"]"#), "llm.providers.big.models: `m` is listed twice"),
            (provider(r#"base_url = "https://x/v1"
                models = ["m"]
                request_timeout_secs = 0"#), "llm.providers.big.request_timeout_secs: must be at least 1"),
            (provider(r#"base_url = "https://x/v1"
                models = ["m"]
                api_key = "sk-a"
                api_key_file = "/x""#), "set either llm.providers.big.api_key or llm.providers.big.api_key_file"),
            (
                r#"[llm.providers.default]
                base_url = "https://x/v1"
                models = ["m"]"#.to_owned(),
                "llm.providers.default: `default` is the provider of llm.base_url",
            ),
            (
                r#"[llm.providers.a]
                base_url = "https://x/v1"
                models = ["m"]
                [llm.providers.b]
                base_url = "https://y/v1"
                models = ["m"]"#.to_owned(),
                "llm.providers.b.models: `m` is already served by llm.providers.a",
            ),
            ("[llm]\nfallback = [\"a\", \"a\"]".to_owned(), "llm.fallback: `a` is listed twice"),
            ("[llm.fallback_by_entity]\nhero = [\"\"]".to_owned(), "llm.fallback_by_entity.hero: must not hold an empty name"),
            ("[llm]\nfallback_after_secs = 0".to_owned(), "llm.fallback_after_secs: must be at least 1"),
            (
                "[llm]\njob_cost_budget_usd = 1\nfallback = [\"gpt-4o-mini\", \"unpriced\"]\n[[llm.prices]]\nmodel = \"gpt-4o-mini\"\ninput_per_million = 1\noutput_per_million = 1".to_owned(),
                "llm.job_cost_budget_usd: model `unpriced` has no price",
            ),
        ];
        for (toml, expected) in cases {
            let err = from_file(&toml, &[]).unwrap_err();
            assert!(format!("{err:#}").contains(expected), "{toml}\n→ {err:#}");
        }
        let settings = from_file("[llm.fallback_by_entity]\nnot_an_entity = [\"m\"]", &[]).unwrap();
        let err = settings.check_fallback_entities(|entity| entity == "hero").unwrap_err();
        assert_eq!(err.to_string(), "llm.fallback_by_entity.not_an_entity: no such entity");
    }

    #[test]
    fn allowed_models_default_to_the_configured_model_and_star_allows_any() {
        let settings = Settings::load_from(None, env(&[("INSTRUCTD__LLM__MODEL", "small")])).unwrap();
        assert!(settings.llm.allows_model("small"));
        assert!(!settings.llm.allows_model("large"));
        let mut settings = settings;
        settings.llm.allowed_models = vec!["large".into()];
        assert!(settings.llm.allows_model("large") && settings.llm.allows_model("small"));
        assert!(!settings.llm.allows_model("huge"));
        settings.llm.allowed_models = vec!["*".into()];
        assert!(settings.llm.allows_model("huge"));
    }
}
