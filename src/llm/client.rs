//! The provider client: async-openai's request types, sent with reqwest clients we build
//! (`LlmClient::post`): one attempt per call, so that the retry policy lives in one place
//! ([`super::retry`]), failed calls keep their status code and `Retry-After` header, and a
//! response is read once, up to a bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::circuit::{Circuit, CircuitState};
use super::limit::AdaptiveLimit;
use super::modes::ChatRequest;
use super::retry::{RetryPolicy, TransportError, parse_retry_after};
use crate::config::LlmSettings;
use crate::contract::Usage;
use crate::metrics::{CallOutcome, Metrics};
use crate::text;

/// The most bytes of a failed call's body that are read (for the provider's message).
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// A chat-completions client with timeouts, transport retries and a circuit breaker.
#[derive(Clone)]
pub struct LlmClient {
    /// The HTTP clients calls are spread over, in turn ([`http_clients`]).
    http: Arc<[reqwest::Client]>,
    turn: Arc<AtomicUsize>,
    /// `{llm.base_url}/chat/completions`.
    url: reqwest::Url,
    /// `Bearer {api key}`, marked sensitive (never shown in a debug view).
    authorization: Option<HeaderValue>,
    /// `llm.max_response_bytes`.
    max_body: usize,
    policy: RetryPolicy,
    /// Provider protection: concurrent calls, lowered while the provider answers 429.
    limit: Arc<AdaptiveLimit>,
    /// Provider outages: no calls while it is open, one probe at a time.
    circuit: Arc<Circuit>,
    request_timeout: Duration,
    /// Kept only to scrub it from provider error messages that echo it back.
    api_key: Option<String>,
    metrics: Metrics,
}

/// One successful call: the raw response as the provider sent it (kept on the job row, as
/// its text: it is read once, into the parts instructd reads, not built as a tree as well)
/// and those parts.
#[derive(Debug, Clone)]
pub struct Completion {
    pub raw: Box<RawValue>,
    pub message: ResponseMessage,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    /// The answer's `id` and `model` (for the call's span), when they are strings.
    pub id: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseMessage {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// Why a call produced no completion. Every message is bounded ([`text::message`]) and
/// free of the API key.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider refused the call for good (400, 401, 403, 404, …): not retried.
    #[error("the provider rejected the call: {0}")]
    Rejected(String),
    /// The job's deadline passed while the provider, answering other calls, kept failing
    /// this one's (5xx, timeouts).
    #[error("the job's deadline passed after {attempts} failed attempt(s); last error: {last}")]
    DeadlineExceeded { attempts: u32, last: String },
    /// The provider is down (its circuit open, or every call rate limited) and stayed down
    /// until the job's deadline or the delivery's hold ran out: not the job's fault, so it is
    /// not failed but deferred.
    #[error("the provider is unavailable ({last})")]
    Unavailable { last: String },
    /// A 2xx answer that is not a chat completion.
    #[error("the provider's answer is not a chat completion: {0}")]
    Malformed(String),
}

impl CallError {
    /// The error's kind, as a span's `error.type` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rejected(_) => "rejected",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::Unavailable { .. } => "unavailable",
            Self::Malformed(_) => "malformed",
        }
    }
}

impl LlmClient {
    /// Builds the client from settings alone: nothing is read from the environment behind
    /// our back (async-openai's `OpenAIConfig::new()` would read `OPENAI_*` variables).
    /// `max_concurrency` bounds concurrent calls (the adaptive limit starts there).
    /// `provider` names it in the metrics (`default` for `llm.base_url`).
    pub fn new(
        settings: &LlmSettings,
        provider: &str,
        max_concurrency: usize,
        metrics: Metrics,
    ) -> anyhow::Result<Self> {
        let http = http_clients(settings, max_concurrency)?;
        let url = format!("{}/chat/completions", settings.base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url).with_context(|| format!("llm.base_url: not a URL: {url}"))?;
        let api_key = settings.api_key().map(str::to_owned);
        let authorization = match &api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| anyhow::anyhow!("llm.api_key: not a valid HTTP header value"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let gauges = metrics.llm_provider(provider);
        let circuit = Circuit::new(
            settings.circuit_failures,
            Duration::from_secs(settings.circuit_min_open_secs),
            Duration::from_secs(settings.circuit_max_open_secs),
            gauges.clone(),
        );
        Ok(Self {
            http,
            turn: Arc::new(AtomicUsize::new(0)),
            url,
            authorization,
            max_body: settings.max_response_bytes,
            policy: RetryPolicy::from_settings(settings),
            limit: AdaptiveLimit::new(max_concurrency, gauges),
            circuit,
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            api_key,
            metrics,
        })
    }

    /// The provider's circuit, as `/readyz` reports it.
    pub fn circuit_state(&self) -> CircuitState {
        self.circuit.state()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sends one chat completion and returns it. Transport failures (429, 408, 5xx, timeouts,
    /// connection errors) are retried with backoff for as long as time allows: until the job's
    /// `deadline`, or the delivery's `hold`, whichever comes first. An open circuit pauses the
    /// call without spending attempts.
    ///
    /// Fails with [`CallError::Rejected`] or [`CallError::Malformed`] at once; with
    /// [`CallError::Unavailable`] when time ran out while the provider was down (or rate
    /// limiting, or the delivery's hold ended first); with [`CallError::DeadlineExceeded`]
    /// when it ran out while the provider answered others but kept failing this call.
    ///
    /// `patience`, when given, bounds the waiting alone (for an open circuit, between
    /// retries), not a call under way: past it the provider counts as unavailable, and
    /// [`CallError::Unavailable`] lets the job fall back to another model.
    pub async fn complete(
        &self,
        request: &ChatRequest<'_>,
        deadline: Instant,
        hold: Instant,
        patience: Option<Instant>,
    ) -> Result<Completion, CallError> {
        let end = deadline.min(hold);
        // Only the patience that comes before both bounds them.
        let patience = patience.filter(|patience| *patience < end);
        let wait_end = patience.unwrap_or(end);
        let mut delays = self.policy.delays();
        let mut attempts = 0u32;
        let mut last: Option<TransportError> = None;
        loop {
            let Some(ticket) = self.circuit.admit(wait_end).await else {
                return Err(self.out_of_time(deadline, hold, patience.is_some(), attempts, last));
            };
            let error = match self.call_once(request, wait_end, end).await {
                Ok(completion) => {
                    ticket.answered();
                    return Ok(completion);
                }
                // Out of time before an answer: says nothing about the provider (a probe
                // dropped here hands the turn on).
                // (Cut short while waiting for a slot, before `end`: by the patience.)
                Err(TransportError::Deadline) => {
                    let impatient = patience.is_some() && Instant::now() < end;
                    return Err(self.out_of_time(deadline, hold, impatient, attempts, last));
                }
                Err(error) if error.is_retryable() => {
                    ticket.failed();
                    error
                }
                Err(error) => {
                    ticket.answered();
                    return Err(match error {
                        TransportError::Malformed(why) => CallError::Malformed(self.describe(&why)),
                        error => CallError::Rejected(self.describe(&error.to_string())),
                    });
                }
            };
            attempts += 1;
            let planned = delays.next().unwrap_or(self.request_timeout);
            let wait = self.policy.wait_after(&error, planned);
            if Instant::now() + wait >= wait_end {
                let impatient = patience.is_some() && Instant::now() + wait < end;
                return Err(self.out_of_time(deadline, hold, impatient, attempts, Some(error)));
            }
            tracing::warn!(error = %self.describe(&error.to_string()), ?wait, "LLM call failed; retrying");
            last = Some(error);
            tokio::time::sleep(wait).await;
        }
    }

    /// What running out of time means: the job's own failure only when the provider is up
    /// and serving others (the circuit is closed, the last failure was not a rate limit) and
    /// the job's deadline, not the delivery's hold, is what ran out. `impatient`: the patience
    /// ran out (before both), which means unavailable: the job may go on with another model.
    fn out_of_time(
        &self,
        deadline: Instant,
        hold: Instant,
        impatient: bool,
        attempts: u32,
        last: Option<TransportError>,
    ) -> CallError {
        let held_out = hold < deadline || impatient;
        let provider_down = self.circuit.state() != CircuitState::Closed
            || matches!(last, None | Some(TransportError::Http { status: 429, .. }));
        let last = last.map_or_else(|| "no call could be made".to_owned(), |error| self.describe(&error.to_string()));
        if held_out || provider_down {
            CallError::Unavailable { last }
        } else {
            CallError::DeadlineExceeded { attempts, last }
        }
    }

    /// One attempt: waits for a slot until `wait_end`, then gives the call until `end`.
    async fn call_once(
        &self,
        request: &ChatRequest<'_>,
        wait_end: Instant,
        end: Instant,
    ) -> Result<Completion, TransportError> {
        let permit = tokio::select! {
            permit = self.limit.acquire() => permit,
            _ = tokio::time::sleep_until(wait_end) => return Err(TransportError::Deadline),
        };
        let remaining = end.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::Deadline);
        }
        let timeout = self.request_timeout.min(remaining);
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, self.post(request)).await {
            // Cut short by the time the job had left, not by the provider's slowness: says
            // nothing about the provider.
            Err(_) if timeout < self.request_timeout => Err(TransportError::Deadline),
            Err(_) => Err(TransportError::Timeout(timeout)),
            Ok(result) => result.and_then(parse_completion),
        };
        let outcome = match &result {
            Ok(_) => CallOutcome::Ok,
            Err(error) => error.outcome(),
        };
        self.metrics.llm_call(outcome, started.elapsed());
        match outcome {
            CallOutcome::Ok => permit.succeeded(),
            CallOutcome::RateLimited => permit.rate_limited(),
            _ => drop(permit),
        }
        result
    }

    /// Sends `request` once, over the next of the HTTP clients: the body of the provider's
    /// answer.
    /// Reads at most `llm.max_response_bytes` of it (a provider cannot make the daemon buffer
    /// without bound); a non-2xx answer keeps its status, `Retry-After` and message.
    async fn post(&self, request: &ChatRequest<'_>) -> Result<Vec<u8>, TransportError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| TransportError::Malformed(format!("the request cannot be serialized: {e}")))?;
        let http = &self.http[self.turn.fetch_add(1, Ordering::Relaxed) % self.http.len()];
        let mut call = http.post(self.url.clone()).header(CONTENT_TYPE, "application/json").body(body);
        if let Some(authorization) = &self.authorization {
            call = call.header(AUTHORIZATION, authorization.clone());
        }
        let mut response = call.send().await?;
        let status = response.status();
        if status.is_success() {
            return read_body(&mut response, self.max_body).await?.ok_or_else(|| {
                TransportError::Malformed(format!(
                    "the provider's response is over llm.max_response_bytes ({} bytes)",
                    self.max_body
                ))
            });
        }
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        // Only the start of an error body is read: it is for the message.
        let body = read_body(&mut response, MAX_ERROR_BODY_BYTES).await.ok().flatten().unwrap_or_default();
        let message = provider_message(&String::from_utf8_lossy(&body));
        Err(TransportError::Http { status: status.as_u16(), retry_after, message })
    }

    /// A provider's text as instructd passes it on: without the API key (some providers echo
    /// it), without NUL, at most [`text::MAX_MESSAGE_BYTES`].
    fn describe(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) if key.len() >= 8 => text::message(&text.replace(key.as_str(), "[redacted]")),
            _ => text::message(text),
        }
    }
}

/// Reads the parts of a chat completion instructd needs. Parsed loosely (and kept raw) so
/// that compatible servers with extra or unusual fields still work.
fn parse_completion(body: Vec<u8>) -> Result<Completion, TransportError> {
    #[derive(Deserialize)]
    struct Body {
        choices: Vec<Choice>,
        #[serde(default)]
        usage: Option<ProviderUsage>,
        #[serde(default, deserialize_with = "string_or_none")]
        id: Option<String>,
        #[serde(default, deserialize_with = "string_or_none")]
        model: Option<String>,
    }
    /// The provider's `usage`, cached prompt tokens nested as OpenAI reports them.
    #[derive(Deserialize)]
    struct ProviderUsage {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
        #[serde(default)]
        total_tokens: u64,
        #[serde(default)]
        prompt_tokens_details: Option<PromptDetails>,
    }
    #[derive(Deserialize)]
    struct PromptDetails {
        #[serde(default)]
        cached_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: ResponseMessage,
        #[serde(default)]
        finish_reason: Option<String>,
    }
    let malformed = |e: &dyn std::fmt::Display| TransportError::Malformed(e.to_string());
    let text = String::from_utf8(body).map_err(|e| malformed(&e))?;
    let raw = RawValue::from_string(text).map_err(|e| malformed(&e))?;
    // Kept on the job row: no deeper than a tree of it could be (the typed read below skips
    // what it does not know at any depth).
    if !text::json_depth_within_limit(raw.get().as_bytes()) {
        return Err(TransportError::Malformed(format!(
            "the response nests arrays and objects deeper than {} levels",
            text::MAX_JSON_DEPTH
        )));
    }
    let body: Body = serde_json::from_str(raw.get()).map_err(|e| malformed(&e))?;
    let choice = body
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| TransportError::Malformed("no choices in the response".into()))?;
    Ok(Completion {
        message: choice.message,
        finish_reason: choice.finish_reason,
        usage: body
            .usage
            .map(|usage| {
                complete_total(Usage {
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    total_tokens: usage.total_tokens,
                    // Part of the prompt's tokens, whatever the provider says.
                    cached_tokens: usage
                        .prompt_tokens_details
                        .and_then(|details| details.cached_tokens)
                        .unwrap_or(0)
                        .min(usage.prompt_tokens),
                    cost_usd: None,
                })
            })
            .unwrap_or_default(),
        id: body.id,
        model: body.model,
        raw,
    })
}

/// A string, or `None` for anything else (a field read only for what it tells, never a
/// reason to refuse an answer).
fn string_or_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::String(text) => Some(text),
        _ => None,
    })
}

/// Some servers leave `total_tokens` at 0: the job's token budget counts the parts then.
fn complete_total(mut usage: Usage) -> Usage {
    usage.total_tokens = usage.total_tokens.max(usage.prompt_tokens.saturating_add(usage.completion_tokens));
    usage
}

/// The HTTP clients calls are spread over, in turn: enough for `max_concurrency` calls at
/// `llm.streams_per_connection` per HTTP/2 connection.
///
/// Over HTTPS, a provider that offers HTTP/2 (ALPN) is spoken to in HTTP/2: calls share a
/// connection, where each HTTP/1.1 call in flight needs one of its own (with hyper's buffers
/// and channel, ~30 KB, and TLS state). But hyper sends one client's calls over a single
/// HTTP/2 connection, and those past the server's cap on concurrent streams wait for a free
/// one: hence several clients, each with its own connection. One TLS configuration (and one
/// certificate verifier, which loads the platform's roots) is shared by them all.
fn http_clients(settings: &LlmSettings, max_concurrency: usize) -> anyhow::Result<Arc<[reqwest::Client]>> {
    let tls = tls_config(settings)?;
    let connections = max_concurrency.div_ceil(settings.streams_per_connection as usize).max(1);
    (0..connections)
        .map(|_| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(settings.request_timeout_secs.min(10)))
                .tls_backend_preconfigured(tls.clone())
                .build()
                .context("cannot build the provider's HTTP client")
        })
        .collect()
}

/// TLS to the provider: the platform's trust store plus `llm.ca_file`'s CAs; HTTP/2 offered
/// first, then HTTP/1.1.
fn tls_config(settings: &LlmSettings) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    crate::install_crypto_provider();
    let provider = rustls::crypto::CryptoProvider::get_default().expect("installed above").clone();
    let extra_roots = if settings.ca_file.is_empty() {
        Vec::new()
    } else {
        CertificateDer::pem_file_iter(&settings.ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("llm.ca_file: cannot read the certificates of {}", settings.ca_file))?
    };
    anyhow::ensure!(
        settings.ca_file.is_empty() || !extra_roots.is_empty(),
        "llm.ca_file: {} holds no PEM certificate",
        settings.ca_file
    );
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
        .context("cannot load the platform's trust store")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// The body of `response`, or `None` if it is over `max` bytes (reading stops there).
async fn read_body(response: &mut reqwest::Response, max: usize) -> Result<Option<Vec<u8>>, TransportError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The provider's own error message (`{"error": {"message": …}}`), or the start of the body;
/// bounded either way.
fn provider_message(body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned));
    match message {
        Some(message) => text::message(&message),
        None => text::clip(body, 500).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_message_prefers_the_error_object() {
        assert_eq!(provider_message(r#"{"error":{"message":"bad key"}}"#), "bad key");
        assert_eq!(provider_message("upstream down"), "upstream down");
        let echoed = format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(300_000));
        assert!(provider_message(&echoed).len() <= text::MAX_MESSAGE_BYTES);
    }

    #[test]
    fn an_answer_is_kept_as_sent_unless_it_is_not_utf_8_or_nests_too_deep() {
        let answer = |extra: &str| {
            format!(
                r#"{{"id": "c1", "model": 7, "choices": [{{"message": {{"content": "hi"}}, "finish_reason": "stop"}}]{extra}}}"#
            )
        };
        let kept = parse_completion(answer("").into_bytes()).unwrap();
        assert_eq!(kept.raw.get(), answer(""), "kept as sent");
        assert_eq!((kept.id.as_deref(), kept.model), (Some("c1"), None), "a model that is not a string is not read");
        assert_eq!(kept.message.content.as_deref(), Some("hi"));

        let deep = answer(&format!(r#", "x": {}{}"#, "[".repeat(200), "]".repeat(200)));
        let refused = parse_completion(deep.into_bytes()).unwrap_err();
        assert!(refused.to_string().contains("deeper than 127 levels"), "{refused}");
        let mut bytes = answer(r#", "x": "?""#).into_bytes();
        let at = bytes.iter().position(|&b| b == b'?').unwrap();
        bytes[at] = 0xff;
        assert!(matches!(parse_completion(bytes), Err(TransportError::Malformed(_))));
    }
}
