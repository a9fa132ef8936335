//! The provider client: async-openai over a reqwest client we build, with async-openai's
//! own retry layer replaced by a plain transport ([`transport`]) so that the retry policy
//! lives in one place ([`super::retry`]) and failed calls keep their status code and
//! `Retry-After` header.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::CreateChatCompletionRequest;
use serde::Deserialize;
use serde_json::Value;

use super::limit::AdaptiveLimit;
use super::retry::{RetryPolicy, TransportError};
use crate::config::LlmSettings;
use crate::contract::Usage;
use crate::metrics::{self, CallOutcome};

/// A chat-completions client with timeouts and transport retries.
#[derive(Clone)]
pub struct LlmClient {
    client: Client<OpenAIConfig>,
    policy: RetryPolicy,
    /// Provider protection: concurrent calls, lowered while the provider answers 429.
    limit: Arc<AdaptiveLimit>,
    request_timeout: Duration,
    /// Kept only to scrub it from provider error messages that echo it back.
    api_key: Option<String>,
}

/// One successful call: the raw response as the provider sent it (kept on the job row)
/// and the parts of it instructd reads.
#[derive(Debug, Clone)]
pub struct Completion {
    pub raw: Value,
    pub message: ResponseMessage,
    pub finish_reason: Option<String>,
    pub usage: Usage,
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

/// Why a call produced no completion.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider refused the call for good (400, 401, 403, 404, …): not retried.
    #[error("the provider rejected the call: {0}")]
    Rejected(String),
    /// Transport retries ran out (429, 5xx, timeouts, connection errors).
    #[error("the provider kept failing after {attempts} attempt(s): {last}")]
    Exhausted { attempts: u32, last: String },
    /// The job's deadline passed before a completion arrived.
    #[error("the job's deadline passed while calling the provider")]
    DeadlineExceeded,
    /// A 2xx answer that is not a chat completion.
    #[error("the provider's answer is not a chat completion: {0}")]
    Malformed(String),
}

impl LlmClient {
    /// Builds the client from settings alone: nothing is read from the environment behind
    /// our back (async-openai's `OpenAIConfig::new()` would read `OPENAI_*` variables).
    /// `max_concurrency` bounds concurrent calls (the adaptive limit starts there).
    pub fn new(settings: &LlmSettings, max_concurrency: usize) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(settings.request_timeout_secs.min(10)))
            .build()?;
        let api_key = settings.api_key().map(str::to_owned);
        let config = OpenAIConfig::default()
            .with_api_base(settings.base_url.trim_end_matches('/'))
            .with_api_key(api_key.clone().unwrap_or_default())
            .with_org_id("")
            .with_project_id("");
        let client = Client::build(http.clone(), config)
            .with_http_service(tower::service_fn(move |factory: HttpRequestFactory| transport(http.clone(), factory)));
        Ok(Self {
            client,
            policy: RetryPolicy::from_settings(settings),
            limit: AdaptiveLimit::new(max_concurrency),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            api_key,
        })
    }

    /// Sends one chat completion, retrying transient failures with backoff, and returns
    /// the completion; fails when the provider rejects the call, keeps failing, or the
    /// `deadline` passes.
    pub async fn complete(
        &self,
        request: &CreateChatCompletionRequest,
        deadline: Instant,
    ) -> Result<Completion, CallError> {
        let mut attempts = 0u32;
        let result = self
            .policy
            .run(deadline, || {
                attempts += 1;
                self.call_once(request, deadline)
            })
            .await;
        match result {
            Ok(completion) => Ok(completion),
            Err(TransportError::Deadline) => Err(CallError::DeadlineExceeded),
            Err(TransportError::Malformed(why)) => Err(CallError::Malformed(why)),
            Err(error) if error.is_retryable() => {
                Err(CallError::Exhausted { attempts, last: self.scrub(&error.to_string()) })
            }
            Err(error) => Err(CallError::Rejected(self.scrub(&error.to_string()))),
        }
    }

    async fn call_once(
        &self,
        request: &CreateChatCompletionRequest,
        deadline: Instant,
    ) -> Result<Completion, TransportError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::Deadline);
        }
        let permit = tokio::select! {
            permit = self.limit.acquire() => permit,
            _ = tokio::time::sleep(remaining) => return Err(TransportError::Deadline),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::Deadline);
        }
        let timeout = self.request_timeout.min(remaining);
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, self.client.chat().create_byot::<_, Value>(request)).await {
            Err(_) => Err(TransportError::Timeout(timeout)),
            Ok(result) => result.map_err(TransportError::from).and_then(parse_completion),
        };
        let outcome = match &result {
            Ok(_) => CallOutcome::Ok,
            Err(error) => error.outcome(),
        };
        metrics::llm_call(outcome, started.elapsed());
        match outcome {
            CallOutcome::Ok => permit.succeeded(),
            CallOutcome::RateLimited => permit.rate_limited(),
            _ => drop(permit),
        }
        result
    }

    fn scrub(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) if key.len() >= 8 => text.replace(key.as_str(), "[redacted]"),
            _ => text.to_owned(),
        }
    }
}

/// Reads the parts of a chat completion instructd needs. Parsed loosely (and kept raw) so
/// that compatible servers with extra or unusual fields still work.
fn parse_completion(raw: Value) -> Result<Completion, TransportError> {
    #[derive(Deserialize)]
    struct Body {
        choices: Vec<Choice>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: ResponseMessage,
        #[serde(default)]
        finish_reason: Option<String>,
    }
    let body = Body::deserialize(&raw).map_err(|e| TransportError::Malformed(e.to_string()))?;
    let choice = body
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| TransportError::Malformed("no choices in the response".into()))?;
    Ok(Completion {
        message: choice.message,
        finish_reason: choice.finish_reason,
        usage: body.usage.map(complete_total).unwrap_or_default(),
        raw,
    })
}

/// Some servers leave `total_tokens` at 0: the job's token budget counts the parts then.
fn complete_total(mut usage: Usage) -> Usage {
    usage.total_tokens = usage.total_tokens.max(usage.prompt_tokens + usage.completion_tokens);
    usage
}

/// Executes one HTTP request for async-openai. Unlike async-openai's default executor it
/// does not retry, and a non-2xx answer becomes a [`HttpFailure`] that keeps the status
/// and `Retry-After` for [`super::retry`].
async fn transport(http: reqwest::Client, factory: HttpRequestFactory) -> Result<reqwest::Response, OpenAIError> {
    let request = factory.build().await?;
    let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let body = response.text().await.unwrap_or_default();
    Err(OpenAIError::Boxed(Box::new(HttpFailure { status, retry_after, message: provider_message(&body) })))
}

/// A non-2xx answer from the provider.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {message}")]
pub struct HttpFailure {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub message: String,
}

/// The provider's own error message (`{"error": {"message": …}}`), or the start of the body.
fn provider_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(500).collect())
}

/// `Retry-After` in its delay-seconds form (providers do not send HTTP dates in practice).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn provider_message_prefers_the_error_object() {
        assert_eq!(provider_message(r#"{"error":{"message":"bad key"}}"#), "bad key");
        assert_eq!(provider_message("upstream down"), "upstream down");
    }
}
