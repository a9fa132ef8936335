//! The one transport retry policy: what a failed HTTP call to the provider was, whether
//! calling again may succeed, and how long to wait first (exponential backoff with jitter,
//! or the provider's `Retry-After`, both capped). How long to keep trying is the job's
//! business (its deadline, [`super::client`]); validation re-asks are a separate loop
//! (`generate.rs`), and a transport error is never shown to the model.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::LlmSettings;
use crate::metrics::CallOutcome;

/// The longest `Retry-After` that is read as given: a larger (or absurd, `1e20`) value is
/// clamped here first, then to `llm.transport_max_delay_secs`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

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
    /// The time the caller allowed ran out before the call could be made or finish.
    #[error("out of time")]
    Deadline,
}

impl TransportError {
    /// Whether trying the same call again may succeed: the provider (or the way to it) failed,
    /// not the request.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Http { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            TransportError::Timeout(_) | TransportError::Connect(_) => true,
            TransportError::Malformed(_) | TransportError::Deadline => false,
        }
    }

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

impl From<reqwest::Error> for TransportError {
    fn from(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            TransportError::Timeout(Duration::ZERO)
        } else {
            TransportError::Connect(error_chain(&error))
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
            .without_max_times()
            .with_jitter();
        Self { backoff, max_delay }
    }

    /// The waits between one job's attempts, growing to `llm.transport_max_delay_secs`.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        self.backoff.build()
    }

    /// How long to wait after `error` when the backoff planned `planned`: the provider's
    /// `Retry-After` wins (so a rate limit is honoured), capped at the longer of the two and
    /// `llm.transport_max_delay_secs`, so that a hostile header cannot park a job.
    pub fn wait_after(&self, error: &TransportError, planned: Duration) -> Duration {
        match error {
            TransportError::Http { retry_after: Some(after), .. } => (*after).min(self.max_delay.max(planned)),
            _ => planned,
        }
    }
}

/// `Retry-After` in its delay-seconds form (providers do not send HTTP dates in practice),
/// clamped to [`MAX_RETRY_AFTER`]: `Duration::from_secs_f64` panics on values it cannot hold.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_clamps_what_no_duration_can_hold() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("1e20"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("1e400"), None, "infinite");
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
    }

    #[test]
    fn retry_after_wins_over_the_backoff_but_is_capped() {
        let settings = crate::config::Settings::load_from(None, Default::default()).unwrap();
        let policy = RetryPolicy::from_settings(&settings.llm);
        let limited = |after: u64| TransportError::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(after)),
            message: String::new(),
        };
        let planned = Duration::from_millis(500);
        assert_eq!(policy.wait_after(&limited(3), planned), Duration::from_secs(3));
        assert_eq!(policy.wait_after(&limited(86_400), planned), Duration::from_secs(20), "capped");
        assert_eq!(policy.wait_after(&TransportError::Timeout(Duration::ZERO), planned), planned);
        assert!(policy.delays().take(100).all(|delay| delay <= Duration::from_secs(40)), "jitter at most doubles");
    }
}
