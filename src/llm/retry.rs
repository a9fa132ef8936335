//! The one transport retry policy: exponential backoff with jitter on 429, 5xx, timeouts
//! and connection errors, honouring `Retry-After`, bounded by attempts, by total time and
//! by the job's deadline. Validation re-asks are a separate loop (`generate.rs`); a
//! transport error is never shown to the model.

use std::time::{Duration, Instant};

use async_openai::error::OpenAIError;
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

use super::client::HttpFailure;
use crate::config::LlmSettings;
use crate::metrics::CallOutcome;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    backoff: ExponentialBuilder,
    max_delay: Duration,
}

/// What went wrong with one HTTP call.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("HTTP {status}: {message}")]
    Http { status: u16, retry_after: Option<Duration>, message: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("{0}")]
    Malformed(String),
    #[error("the job's deadline passed")]
    Deadline,
}

impl TransportError {
    /// Whether trying the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Http { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            TransportError::Timeout(_) | TransportError::Connect(_) => true,
            TransportError::Malformed(_) | TransportError::Deadline => false,
        }
    }
}

impl TransportError {
    /// The call's outcome as the `instructd_llm_calls_total` metric labels it.
    pub fn outcome(&self) -> CallOutcome {
        match self {
            TransportError::Http { status: 429, .. } => CallOutcome::RateLimited,
            TransportError::Http { status, .. } if *status >= 500 => CallOutcome::ServerError,
            TransportError::Http { status: 408, .. } | TransportError::Timeout(_) => CallOutcome::Timeout,
            TransportError::Http { .. } => CallOutcome::Rejected,
            TransportError::Connect(_) => CallOutcome::Connect,
            TransportError::Malformed(_) => CallOutcome::Malformed,
            TransportError::Deadline => CallOutcome::Timeout,
        }
    }
}

impl From<OpenAIError> for TransportError {
    fn from(error: OpenAIError) -> Self {
        match error {
            OpenAIError::Boxed(boxed) => match boxed.downcast::<HttpFailure>() {
                Ok(failure) => TransportError::Http {
                    status: failure.status,
                    retry_after: failure.retry_after,
                    message: failure.message,
                },
                Err(other) => TransportError::Connect(other.to_string()),
            },
            OpenAIError::Reqwest(e) if e.is_timeout() => TransportError::Timeout(Duration::ZERO),
            OpenAIError::Reqwest(e) => TransportError::Connect(error_chain(&e)),
            OpenAIError::JSONDeserialize(e, _) => TransportError::Malformed(e.to_string()),
            other => TransportError::Malformed(other.to_string()),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl RetryPolicy {
    pub fn from_settings(settings: &LlmSettings) -> Self {
        let max_delay = Duration::from_secs(settings.transport_max_delay_secs);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(settings.transport_min_delay_ms))
            .with_max_delay(max_delay)
            .with_max_times(settings.transport_max_attempts.saturating_sub(1) as usize)
            .with_total_delay(Some(Duration::from_secs(settings.transport_max_elapsed_secs)))
            .with_jitter();
        Self { backoff, max_delay }
    }

    /// Runs `call` until it succeeds, fails for good, or the budget or `deadline` is spent.
    pub async fn run<T, F, Fut>(&self, deadline: Instant, call: F) -> Result<T, TransportError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TransportError>>,
    {
        let max_delay = self.max_delay;
        call.retry(self.backoff.build())
            .sleep(tokio::time::sleep)
            .when(TransportError::is_retryable)
            // The provider's Retry-After wins over our own backoff (capped, so that a
            // hostile header cannot park a job), and no wait may outlive the deadline.
            .adjust(move |error, planned| {
                let planned = planned?;
                let wanted = match error {
                    TransportError::Http { retry_after: Some(after), .. } => (*after).min(max_delay.max(planned)),
                    _ => planned,
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                (wanted < remaining).then_some(wanted)
            })
            .notify(|error, wait| tracing::warn!(error = %error, wait = ?wait, "LLM call failed; retrying"))
            .await
    }
}
