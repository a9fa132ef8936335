//! Prometheus metrics. Every name instructd exports is declared here, with its help text,
//! and recorded through the methods of [`Metrics`] so that label values stay few and known
//! (an entity label is a registered entity's name or `unknown`, never request text).
//!
//! Each application has a recorder of its own (not the process-wide one of the `metrics`
//! facade): two daemons in one process (the tests run many) never add up each other's
//! counts, and every series exists at zero from the start.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::contract::{ErrorKind, Usage};

pub const JOBS: &str = "instructd_jobs_total";
pub const JOB_DURATION: &str = "instructd_job_duration_seconds";
pub const JOBS_IN_FLIGHT: &str = "instructd_jobs_in_flight";
pub const JOB_PANICS: &str = "instructd_job_panics_total";
pub const DEFERRED: &str = "instructd_deliveries_deferred_total";
pub const LLM_CALLS: &str = "instructd_llm_calls_total";
pub const LLM_CALL_DURATION: &str = "instructd_llm_call_duration_seconds";
pub const LLM_TOKENS: &str = "instructd_llm_tokens_total";
pub const LLM_COST: &str = "instructd_llm_cost_microdollars_total";
pub const LLM_CIRCUIT_OPEN: &str = "instructd_llm_circuit_open";
pub const REASKS: &str = "instructd_reasks_total";
pub const LLM_FALLBACKS: &str = "instructd_llm_fallbacks_total";
pub const DEAD_LETTERS: &str = "instructd_dead_letters_total";
pub const OUTBOX_PENDING: &str = "instructd_outbox_pending";
pub const EVENTS_PUBLISHED: &str = "instructd_events_published_total";
pub const EVENTS_ABANDONED: &str = "instructd_events_abandoned_total";
pub const ROWS_PRUNED: &str = "instructd_rows_pruned_total";
pub const LLM_CONCURRENCY_LIMIT: &str = "instructd_llm_concurrency_limit";
pub const BROKER_CONNECTED: &str = "instructd_broker_connected";
pub const DATABASE_WRITABLE: &str = "instructd_database_writable";
pub const READY: &str = "instructd_ready";
pub const CONSOLE_ACTIONS: &str = "instructd_console_actions_total";

/// Every metric name, for tests that check dashboards and alerts against the export.
pub const ALL: &[&str] = &[
    JOBS,
    JOB_DURATION,
    JOBS_IN_FLIGHT,
    JOB_PANICS,
    DEFERRED,
    LLM_CALLS,
    LLM_CALL_DURATION,
    LLM_TOKENS,
    LLM_COST,
    LLM_CIRCUIT_OPEN,
    REASKS,
    LLM_FALLBACKS,
    DEAD_LETTERS,
    OUTBOX_PENDING,
    EVENTS_PUBLISHED,
    EVENTS_ABANDONED,
    ROWS_PRUNED,
    LLM_CONCURRENCY_LIMIT,
    BROKER_CONNECTED,
    DATABASE_WRITABLE,
    READY,
    CONSOLE_ACTIONS,
];

/// What the console and `instructd jobs|dlq` may do, as `instructd_console_actions_total`
/// labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A job sent again as a new job.
    Replay,
    /// A job ended before it finished.
    Cancel,
    /// A dead letter moved back to the request queue.
    DeadLetterReplay,
    /// A dead letter deleted.
    DeadLetterPurge,
}

impl Action {
    pub const ALL: [Action; 4] = [Self::Replay, Self::Cancel, Self::DeadLetterReplay, Self::DeadLetterPurge];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Cancel => "cancel",
            Self::DeadLetterReplay => "dead_letter_replay",
            Self::DeadLetterPurge => "dead_letter_purge",
        }
    }
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Why a delivery was moved to the delay queue instead of being worked on now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeferReason {
    /// Another live worker holds the job's claim.
    Claimed,
    /// The LLM provider's circuit stayed open until the job's deadline.
    Provider,
    /// The database kept refusing work until the delivery's hold ran out.
    Database,
}

impl DeferReason {
    pub const ALL: [DeferReason; 3] = [Self::Claimed, Self::Provider, Self::Database];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Provider => "provider",
            Self::Database => "database",
        }
    }
}

/// The tables retention prunes, as the `table` label spells them.
pub const PRUNED_TABLES: [&str; 3] = ["generation_job", "event_outbox", "worker"];

/// One application's metrics: cheap to clone, recorded through the methods below and
/// rendered by [`Metrics::render`].
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    handle: PrometheusHandle,
    /// Registers the series made after start-up (a provider's, when its client is built).
    registrar: Registrar,
    jobs: HashMap<(&'static str, &'static str), Counter>,
    job_duration: HashMap<(&'static str, &'static str), Histogram>,
    jobs_in_flight: Gauge,
    job_panics: Counter,
    deferred: HashMap<DeferReason, Counter>,
    llm_calls: HashMap<CallOutcome, Counter>,
    llm_call_duration: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    /// By model (the configured one and every priced one) and entity: the counter of
    /// millionths, and the nano-dollars counted so far (so that calls cheaper than a millionth
    /// still add up).
    cost: HashMap<(String, &'static str), (Counter, AtomicU64)>,
    reasks: HashMap<&'static str, Counter>,
    fallbacks: HashMap<&'static str, Counter>,
    dead_letters: Counter,
    outbox_pending: Gauge,
    events_published: Counter,
    events_abandoned: Counter,
    rows_pruned: HashMap<&'static str, Counter>,
    broker_connected: Gauge,
    database_writable: Gauge,
    ready: Gauge,
    console_actions: HashMap<Action, Counter>,
}

/// One provider's gauges ([`Metrics::llm_provider`]).
#[derive(Clone)]
pub struct ProviderMetrics {
    circuit_open: Gauge,
    concurrency_limit: Gauge,
}

impl ProviderMetrics {
    pub fn circuit_open(&self, open: bool) {
        self.circuit_open.set(if open { 1.0 } else { 0.0 });
    }

    pub fn concurrency_limit(&self, limit: usize) {
        self.concurrency_limit.set(limit as f64);
    }
}

/// Registers series on one recorder.
struct Registrar(PrometheusRecorder);

impl Registrar {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.counter_of(&Self::key(name, labels))
    }

    fn counter_of(&self, key: &Key) -> Counter {
        let counter = self.0.register_counter(key, &metadata());
        counter.increment(0);
        counter
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        let gauge = self.0.register_gauge(&Self::key(name, labels), &metadata());
        gauge.set(0.0);
        gauge
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Histogram {
        self.0.register_histogram(&Self::key(name, labels), &metadata())
    }

    fn describe(&self, name: &'static str, unit: Option<Unit>, help: &'static str, kind: Kind) {
        let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
        match kind {
            Kind::Counter => self.0.describe_counter(name, unit, help),
            Kind::Gauge => self.0.describe_gauge(name, unit, help),
            Kind::Histogram => self.0.describe_histogram(name, unit, help),
        }
    }
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, None)
}

impl Metrics {
    /// A recorder for one application. Labelled series for the given entities (and
    /// `unknown`) and models (the configured one and every priced one: a bounded set, never a
    /// request's text) are created at zero, so that dashboards and `rate()` see them before
    /// the first job.
    pub fn new<'m>(
        entities: impl IntoIterator<Item = &'static str>,
        models: impl IntoIterator<Item = &'m str>,
    ) -> Self {
        let recorder =
            PrometheusBuilder::new().set_buckets(BUCKETS).expect("the bucket list is not empty").build_recorder();
        let handle = recorder.handle();
        let r = Registrar(recorder);
        describe(&r);
        let entities: Vec<&'static str> = entities.into_iter().chain(["unknown"]).collect();
        let outcomes: Vec<&'static str> =
            std::iter::once(Ok(())).chain(ErrorKind::ALL.into_iter().map(Err)).map(outcome_label).collect();
        let mut jobs = HashMap::new();
        let mut job_duration = HashMap::new();
        let mut reasks = HashMap::new();
        let mut fallbacks = HashMap::new();
        for &entity in &entities {
            for &outcome in &outcomes {
                let labels = [("entity", entity), ("outcome", outcome)];
                jobs.insert((entity, outcome), r.counter(JOBS, &labels));
                job_duration.insert((entity, outcome), r.histogram(JOB_DURATION, &labels));
            }
            reasks.insert(entity, r.counter(REASKS, &[("entity", entity)]));
            fallbacks.insert(entity, r.counter(LLM_FALLBACKS, &[("entity", entity)]));
        }
        let mut cost = HashMap::new();
        for model in models {
            for &entity in &entities {
                let labels = vec![Label::new("model", model.to_owned()), Label::new("entity", entity)];
                let counter = r.counter_of(&Key::from_parts(LLM_COST, labels));
                cost.insert((model.to_owned(), entity), (counter, AtomicU64::new(0)));
            }
        }
        let inner = Inner {
            jobs,
            job_duration,
            jobs_in_flight: r.gauge(JOBS_IN_FLIGHT, &[]),
            job_panics: r.counter(JOB_PANICS, &[]),
            deferred: DeferReason::ALL
                .into_iter()
                .map(|d| (d, r.counter(DEFERRED, &[("reason", d.as_str())])))
                .collect(),
            llm_calls: CallOutcome::ALL
                .into_iter()
                .map(|outcome| (outcome, r.counter(LLM_CALLS, &[("outcome", outcome.as_str())])))
                .collect(),
            llm_call_duration: r.histogram(LLM_CALL_DURATION, &[]),
            prompt_tokens: r.counter(LLM_TOKENS, &[("kind", "prompt")]),
            completion_tokens: r.counter(LLM_TOKENS, &[("kind", "completion")]),
            cost,
            reasks,
            fallbacks,
            dead_letters: r.counter(DEAD_LETTERS, &[]),
            outbox_pending: r.gauge(OUTBOX_PENDING, &[]),
            events_published: r.counter(EVENTS_PUBLISHED, &[]),
            events_abandoned: r.counter(EVENTS_ABANDONED, &[]),
            rows_pruned: PRUNED_TABLES.into_iter().map(|t| (t, r.counter(ROWS_PRUNED, &[("table", t)]))).collect(),
            broker_connected: r.gauge(BROKER_CONNECTED, &[]),
            database_writable: r.gauge(DATABASE_WRITABLE, &[]),
            ready: r.gauge(READY, &[]),
            console_actions: Action::ALL
                .into_iter()
                .map(|action| (action, r.counter(CONSOLE_ACTIONS, &[("action", action.as_str())])))
                .collect(),
            handle,
            registrar: r,
        };
        Self(Arc::new(inner))
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        self.0.handle.render()
    }

    /// Folds recorded histogram samples into buckets (run every few seconds, scraped or not).
    pub fn run_upkeep(&self) {
        self.0.handle.run_upkeep();
    }

    /// A finished job (an outcome was committed).
    pub fn job_finished(&self, entity: &str, outcome: Result<(), ErrorKind>, elapsed: Duration) {
        let key = (self.entity_label(entity), outcome_label(outcome));
        self.0.jobs[&key].increment(1);
        self.0.job_duration[&key].record(elapsed.as_secs_f64());
    }

    /// A registered entity's label, or `unknown`.
    fn entity_label(&self, entity: &str) -> &'static str {
        self.0.reasks.get_key_value(entity).map_or("unknown", |(name, _)| *name)
    }

    /// A message moved to the dead-letter queue, its job failed with `kind` (`invalid_request`,
    /// or `internal` for one given up at its delivery limit).
    pub fn dead_lettered(&self, entity: &str, kind: ErrorKind) {
        self.0.dead_letters.increment(1);
        self.0.jobs[&(self.entity_label(entity), outcome_label(Err(kind)))].increment(1);
    }

    /// A job task panicked; its delivery was returned to the queue.
    pub fn job_panicked(&self) {
        self.0.job_panics.increment(1);
    }

    /// A delivery moved to the delay queue.
    pub fn deferred(&self, reason: DeferReason) {
        self.0.deferred[&reason].increment(1);
    }

    pub fn llm_call(&self, outcome: CallOutcome, elapsed: Duration) {
        self.0.llm_calls[&outcome].increment(1);
        self.0.llm_call_duration.record(elapsed.as_secs_f64());
    }

    pub fn tokens(&self, usage: &Usage) {
        self.0.prompt_tokens.increment(usage.prompt_tokens);
        self.0.completion_tokens.increment(usage.completion_tokens);
    }

    /// What a call of `model` for `entity` cost, in dollars (counted in millionths).
    pub fn cost(&self, model: &str, entity: &str, usd: f64) {
        // (A model outside the set, which a priced one never is, is not counted.)
        if let Some((counter, nanos)) = self.0.cost.get(&(model.to_owned(), self.entity_label(entity))) {
            // Saturating: a cost comes from a provider's counts, which are not to be trusted.
            let added = (usd * 1e9).round().clamp(0.0, u64::MAX as f64) as u64;
            let before = nanos
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |so_far| Some(so_far.saturating_add(added)))
                .unwrap_or_else(|so_far| so_far);
            counter.increment(before.saturating_add(added) / 1_000 - before / 1_000);
        }
    }

    /// `count` things an operator did (jobs replayed, dead letters purged…).
    pub fn console_action(&self, action: Action, count: u64) {
        self.0.console_actions[&action].increment(count);
    }

    /// The series of one provider (`provider` label): its circuit and its concurrency limit.
    pub fn llm_provider(&self, provider: &str) -> ProviderMetrics {
        let gauge = |name: &'static str| {
            let key = Key::from_parts(name, vec![Label::new("provider", provider.to_owned())]);
            let gauge = self.0.registrar.0.register_gauge(&key, &metadata());
            gauge.set(0.0);
            gauge
        };
        ProviderMetrics { circuit_open: gauge(LLM_CIRCUIT_OPEN), concurrency_limit: gauge(LLM_CONCURRENCY_LIMIT) }
    }

    /// A job moved on from a model that gave up to the next of its fallback list.
    pub fn fallback(&self, entity: &str) {
        self.0.fallbacks[self.entity_label(entity)].increment(1);
    }

    pub fn reask(&self, entity: &str) {
        self.0.reasks[self.entity_label(entity)].increment(1);
    }

    pub fn event_published(&self) {
        self.0.events_published.increment(1);
    }

    /// Events given up on after `retention.unroutable_events` without a queue to route to.
    pub fn events_abandoned(&self, count: u64) {
        self.0.events_abandoned.increment(count);
    }

    /// Rows deleted by retention from `table` (one of [`PRUNED_TABLES`]).
    pub fn rows_pruned(&self, table: &'static str, count: u64) {
        if let Some(counter) = self.0.rows_pruned.get(table) {
            counter.increment(count);
        }
    }

    pub fn outbox_pending(&self, count: u64) {
        self.0.outbox_pending.set(count as f64);
    }

    pub fn broker_connected(&self, connected: bool) {
        self.0.broker_connected.set(if connected { 1.0 } else { 0.0 });
    }

    pub fn database_writable(&self, writable: bool) {
        self.0.database_writable.set(if writable { 1.0 } else { 0.0 });
    }

    pub fn ready(&self, ready: bool) {
        self.0.ready.set(if ready { 1.0 } else { 0.0 });
    }

    /// Counts a job as in flight for as long as the guard lives.
    pub fn in_flight(&self) -> InFlight {
        self.0.jobs_in_flight.increment(1.0);
        InFlight(self.0.jobs_in_flight.clone())
    }
}

fn describe(r: &Registrar) {
    use Kind::*;
    r.describe(
        CONSOLE_ACTIONS,
        None,
        "What operators did through the console, its API or `instructd jobs|dlq`, by action: jobs replayed or \
         cancelled, dead letters replayed or purged.",
        Counter,
    );
    r.describe(JOBS, None, "Jobs finished, by entity and outcome (succeeded or the error kind).", Counter);
    r.describe(JOB_DURATION, Some(Unit::Seconds), "Time from claiming a job to committing its outcome.", Histogram);
    r.describe(JOBS_IN_FLIGHT, None, "Deliveries being worked on now.", Gauge);
    r.describe(JOB_PANICS, None, "Job tasks that panicked; their deliveries were returned to the queue.", Counter);
    r.describe(
        DEFERRED,
        None,
        "Deliveries moved to the delay queue instead of being held, by reason (claimed elsewhere, provider \
         down, database refusing).",
        Counter,
    );
    r.describe(LLM_CALLS, None, "HTTP calls to the LLM provider, transport retries included, by outcome.", Counter);
    r.describe(LLM_CALL_DURATION, Some(Unit::Seconds), "Duration of one HTTP call to the LLM provider.", Histogram);
    r.describe(LLM_TOKENS, None, "Tokens reported by the provider, by kind (prompt, completion).", Counter);
    r.describe(
        LLM_COST,
        None,
        "What answered calls cost, in millionths of a US dollar (llm.prices), by model and entity; \
         a model without a price counts nothing.",
        Counter,
    );
    r.describe(
        LLM_CIRCUIT_OPEN,
        None,
        "1 while a provider's circuit is open (calls paused after repeated transport failures), else 0; by provider \
         (`default` for llm.base_url, else its name in llm.providers).",
        Gauge,
    );
    r.describe(REASKS, None, "Answers that failed validation and were re-asked, by entity.", Counter);
    r.describe(
        LLM_FALLBACKS,
        None,
        "Jobs that moved on from a model that gave up to the next of their fallback list (llm.fallback), by \
         entity.",
        Counter,
    );
    r.describe(DEAD_LETTERS, None, "Request messages moved to the dead-letter queue.", Counter);
    r.describe(OUTBOX_PENDING, None, "Completion events committed but not yet confirmed by the broker.", Gauge);
    r.describe(EVENTS_PUBLISHED, None, "Completion events confirmed by the broker.", Counter);
    r.describe(
        EVENTS_ABANDONED,
        None,
        "Completion events given up on after retention.unroutable_events with no queue bound for them.",
        Counter,
    );
    r.describe(ROWS_PRUNED, None, "Rows deleted by retention, by table.", Counter);
    r.describe(
        LLM_CONCURRENCY_LIMIT,
        None,
        "Current limit on concurrent calls to an LLM provider, by provider.",
        Gauge,
    );
    r.describe(BROKER_CONNECTED, None, "1 while the daemon has a working RabbitMQ session, else 0.", Gauge);
    r.describe(
        DATABASE_WRITABLE,
        None,
        "1 while the daemon's heartbeat writes to Postgres succeed, else 0 (down, read-only, missing tables).",
        Gauge,
    );
    r.describe(READY, None, "1 when /readyz answers 200 (as of the last probe or scrape), else 0.", Gauge);
}

/// Counts a job as in flight for as long as it lives.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_below_a_millionth_still_add_up() {
        let metrics = Metrics::new(["hero"], ["m"]);
        for _ in 0..1_000 {
            metrics.cost("m", "hero", 0.000_000_4);
        }
        metrics.cost("m", "hero", 0.25);
        let rendered = metrics.render();
        let line = rendered.lines().find(|line| line.starts_with(&format!("{LLM_COST}{{")) && line.contains("hero"));
        assert_eq!(line.and_then(|line| line.rsplit(' ').next()), Some("250400"), "{rendered}");
        // An absurd cost (a provider's absurd counts) saturates rather than overflows.
        metrics.cost("m", "hero", 1e30);
        metrics.cost("m", "hero", 1e30);
    }
}
