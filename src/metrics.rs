//! Prometheus metrics. Every name instructd exports is declared here, with its help text,
//! and recorded through the small functions below so that label values stay few and known
//! (an entity label is a registered entity's name or `unknown`, never request text).
//!
//! The recorder is process-global (the `metrics` facade); [`install`] is idempotent, so
//! tests that build several applications in one process share it.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::contract::{ErrorKind, Usage};

pub const JOBS: &str = "instructd_jobs_total";
pub const JOB_DURATION: &str = "instructd_job_duration_seconds";
pub const JOBS_IN_FLIGHT: &str = "instructd_jobs_in_flight";
pub const LLM_CALLS: &str = "instructd_llm_calls_total";
pub const LLM_CALL_DURATION: &str = "instructd_llm_call_duration_seconds";
pub const LLM_TOKENS: &str = "instructd_llm_tokens_total";
pub const REASKS: &str = "instructd_reasks_total";
pub const DEAD_LETTERS: &str = "instructd_dead_letters_total";
pub const OUTBOX_PENDING: &str = "instructd_outbox_pending";
pub const EVENTS_PUBLISHED: &str = "instructd_events_published_total";
pub const LLM_CONCURRENCY_LIMIT: &str = "instructd_llm_concurrency_limit";
pub const BROKER_CONNECTED: &str = "instructd_broker_connected";
pub const READY: &str = "instructd_ready";

/// Every metric name, for tests that check dashboards and alerts against the export.
pub const ALL: &[&str] = &[
    JOBS,
    JOB_DURATION,
    JOBS_IN_FLIGHT,
    LLM_CALLS,
    LLM_CALL_DURATION,
    LLM_TOKENS,
    REASKS,
    DEAD_LETTERS,
    OUTBOX_PENDING,
    EVENTS_PUBLISHED,
    LLM_CONCURRENCY_LIMIT,
    BROKER_CONNECTED,
    READY,
];

/// Seconds; from a fast fake model to `llm.job_timeout_secs`' default.
const BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A job's outcome as a label: `succeeded` or the error kind.
pub fn outcome_label(outcome: Result<(), ErrorKind>) -> &'static str {
    match outcome {
        Ok(()) => "succeeded",
        Err(kind) => kind.as_str(),
    }
}

/// How one HTTP call to the provider ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    RateLimited,
    ServerError,
    Timeout,
    Connect,
    Rejected,
    Malformed,
}

impl CallOutcome {
    pub const ALL: [CallOutcome; 7] =
        [Self::Ok, Self::RateLimited, Self::ServerError, Self::Timeout, Self::Connect, Self::Rejected, Self::Malformed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Rejected => "rejected",
            Self::Malformed => "malformed",
        }
    }
}

/// Installs the process-wide recorder (once) and returns the handle that renders it.
/// Labelled series for the given entities are created at zero, so that dashboards and
/// `rate()` see them before the first job.
pub fn install<'a>(entities: impl IntoIterator<Item = &'a str>) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("the bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone();
    let outcomes = std::iter::once(Ok(())).chain(ErrorKind::ALL.into_iter().map(Err));
    for entity in entities.into_iter().chain(["unknown"]) {
        for outcome in outcomes.clone() {
            counter!(JOBS, "entity" => entity.to_owned(), "outcome" => outcome_label(outcome)).increment(0);
        }
        counter!(REASKS, "entity" => entity.to_owned()).increment(0);
    }
    for outcome in CallOutcome::ALL {
        counter!(LLM_CALLS, "outcome" => outcome.as_str()).increment(0);
    }
    for kind in ["prompt", "completion"] {
        counter!(LLM_TOKENS, "kind" => kind).increment(0);
    }
    counter!(DEAD_LETTERS).increment(0);
    counter!(EVENTS_PUBLISHED).increment(0);
    gauge!(JOBS_IN_FLIGHT).set(0.0);
    handle
}

fn describe() {
    describe_counter!(JOBS, "Jobs finished, by entity and outcome (succeeded or the error kind).");
    describe_histogram!(JOB_DURATION, Unit::Seconds, "Time from claiming a job to committing its outcome.");
    describe_gauge!(JOBS_IN_FLIGHT, "Deliveries being worked on now.");
    describe_counter!(LLM_CALLS, "HTTP calls to the LLM provider, transport retries included, by outcome.");
    describe_histogram!(LLM_CALL_DURATION, Unit::Seconds, "Duration of one HTTP call to the LLM provider.");
    describe_counter!(LLM_TOKENS, "Tokens reported by the provider, by kind (prompt, completion).");
    describe_counter!(REASKS, "Answers that failed validation and were re-asked, by entity.");
    describe_counter!(DEAD_LETTERS, "Request messages moved to the dead-letter queue.");
    describe_gauge!(OUTBOX_PENDING, "Completion events committed but not yet confirmed by the broker.");
    describe_counter!(EVENTS_PUBLISHED, "Completion events confirmed by the broker.");
    describe_gauge!(LLM_CONCURRENCY_LIMIT, "Current limit on concurrent calls to the LLM provider.");
    describe_gauge!(BROKER_CONNECTED, "1 while the daemon has a working RabbitMQ session, else 0.");
    describe_gauge!(READY, "1 when /readyz answers 200 (as of the last probe or scrape), else 0.");
}

/// A finished job (an outcome was committed).
pub fn job_finished(entity: &str, outcome: Result<(), ErrorKind>, elapsed: Duration) {
    let outcome = outcome_label(outcome);
    counter!(JOBS, "entity" => entity.to_owned(), "outcome" => outcome).increment(1);
    histogram!(JOB_DURATION, "entity" => entity.to_owned(), "outcome" => outcome).record(elapsed.as_secs_f64());
}

/// A message moved to the dead-letter queue, its job failed with `kind` (`invalid_request`,
/// or `internal` for one given up at its delivery limit).
pub fn dead_lettered(entity: &str, kind: ErrorKind) {
    counter!(DEAD_LETTERS).increment(1);
    counter!(JOBS, "entity" => entity.to_owned(), "outcome" => outcome_label(Err(kind))).increment(1);
}

pub fn llm_call(outcome: CallOutcome, elapsed: Duration) {
    counter!(LLM_CALLS, "outcome" => outcome.as_str()).increment(1);
    histogram!(LLM_CALL_DURATION).record(elapsed.as_secs_f64());
}

pub fn tokens(usage: &Usage) {
    counter!(LLM_TOKENS, "kind" => "prompt").increment(usage.prompt_tokens);
    counter!(LLM_TOKENS, "kind" => "completion").increment(usage.completion_tokens);
}

pub fn reask(entity: &str) {
    counter!(REASKS, "entity" => entity.to_owned()).increment(1);
}

pub fn event_published() {
    counter!(EVENTS_PUBLISHED).increment(1);
}

pub fn outbox_pending(count: u64) {
    gauge!(OUTBOX_PENDING).set(count as f64);
}

pub fn llm_concurrency_limit(limit: usize) {
    gauge!(LLM_CONCURRENCY_LIMIT).set(limit as f64);
}

pub fn broker_connected(connected: bool) {
    gauge!(BROKER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

pub fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

/// Counts a job as in flight for as long as the guard lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        gauge!(JOBS_IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(JOBS_IN_FLIGHT).decrement(1.0);
    }
}
