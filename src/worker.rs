//! The life of one job, top to bottom in [`Worker::run_job`]:
//! receive → claim → generate (with re-ask) → validate and hydrate → store (entity + job +
//! event, one transaction) → acknowledge → announce.
//!
//! The job's run (`Worker::work`) ends in an [`Ending`]; what becomes of the delivery —
//! ack, dead-letter, defer, requeue — is a plain function of it ([`disposition`]), which the
//! async code only carries out.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sea_orm::DbErr;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

use crate::broker::{PublishError, Publisher};
use crate::config::Settings;
use crate::contract::{ErrorKind, JobError};
use crate::decode::{Job, Rejection, decode};
use crate::entities::Registry;
use crate::job::{CallTrace, JobRecord, OutboxEvent, TraceContext};
use crate::llm::modes::Strategies;
use crate::llm::{self, Providers, generate::Prompt};
use crate::metrics::{DeferReason, Metrics};
use crate::relay::{self, Undelivered};
use crate::store::outcomes::reannouncement;
use crate::store::{Claim, DbFault, Outcome, Store, classify};
use crate::{telemetry, text};

/// Everything a job needs, shared by all jobs of the process.
pub struct Worker {
    pub settings: Arc<Settings>,
    pub registry: Registry,
    pub store: Store,
    pub llm: Providers,
    /// How each entity is asked for in each mode.
    pub strategies: Strategies,
    pub metrics: Metrics,
    /// Cancelled when the process stops taking new jobs (first signal).
    pub stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: jobs give up what they wait for and
    /// leave their deliveries to redelivery.
    pub abort: CancellationToken,
    /// Bounds the events being announced by jobs that have already given back their slot
    /// (twice `worker.concurrency`): a slow broker holds jobs back rather than letting
    /// announcements pile up.
    announcing: Semaphore,
    /// The job ids this process is running, each with the token that cancels it (an
    /// operator's cancel, [`Worker::cancel_running`]). A second delivery of one of them is busy
    /// without asking the database; and a claim held by this worker on a job it is *not*
    /// running is one a panicked or interrupted run left behind, which its next delivery takes
    /// back.
    running: Mutex<HashMap<Uuid, CancellationToken>>,
}

/// A job's place among the `worker.concurrency` that run at once. Taken before its delivery
/// is, and held until the request is acked or requeued and, when there is an event to
/// announce, until there is room among the announcements; not while the event is
/// published, which needs neither the model nor the claim, only the broker.
pub type Slot = OwnedSemaphorePermit;

/// How one delivery's run ended.
#[derive(Debug)]
pub enum Ending {
    /// An outcome (success or failure) was committed, with its event in the outbox (`None`:
    /// the claim was lost to another worker, which announces it).
    Committed(Option<OutboxEvent>),
    /// The job had finished before: this delivery is answered with its event, as announced.
    AlreadyFinished(Option<OutboxEvent>),
    /// The request can never succeed; its failure is recorded (with an event, unless its job
    /// id belongs to another job). `entity` labels the metric.
    Rejected { reason: String, entity: String, event: Option<OutboxEvent> },
    /// Given up at its delivery limit (its workers kept dying); the failure is committed.
    GivenUp { reason: String, entity: String, event: Option<OutboxEvent> },
    /// Cannot be worked on now. `message_id`: the job id, when it was assigned (it is then
    /// given to the copy, so that the copy is the same job).
    Postponed { reason: DeferReason, message_id: Option<Uuid> },
    /// The shutdown's grace period ran out before the job finished.
    Interrupted,
}

/// What becomes of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The outcome is committed, or there is nothing left to do: ack.
    Ack,
    /// A duplicate of a finished job: send it the job's event (confirmed), then ack. Nothing is
    /// kept for it, so the ack waits for the broker; a broker that would not take the event
    /// gets the delivery back.
    Answer,
    /// Copy it to the dead-letter queue with the reason (confirmed), then ack.
    DeadLetter { reason: String, entity: String, kind: ErrorKind },
    /// Copy it to the delay queue (confirmed), then ack: it comes back after
    /// `broker.defer_secs` as a new message, its delivery count untouched.
    Defer { reason: DeferReason, message_id: Option<Uuid> },
    /// Return it to the queue for another worker (shutting down).
    Requeue,
}

/// The decision, from how the run ended. A requeue counts towards the broker's delivery
/// limit (a worker that keeps being interrupted while holding it is a sign of a poison
/// message); a deferral does not (waiting is not failing).
pub fn disposition(ending: &Ending) -> Disposition {
    match ending {
        Ending::Committed(_) | Ending::AlreadyFinished(None) => Disposition::Ack,
        Ending::AlreadyFinished(Some(_)) => Disposition::Answer,
        Ending::Rejected { reason, entity, .. } => {
            Disposition::DeadLetter { reason: reason.clone(), entity: entity.clone(), kind: ErrorKind::InvalidRequest }
        }
        Ending::GivenUp { reason, entity, .. } => {
            Disposition::DeadLetter { reason: reason.clone(), entity: entity.clone(), kind: ErrorKind::Internal }
        }
        Ending::Postponed { reason, message_id } => Disposition::Defer { reason: *reason, message_id: *message_id },
        Ending::Interrupted => Disposition::Requeue,
    }
}

/// Why a job's database work was given up.
#[derive(Debug, thiserror::Error)]
enum Abandon {
    #[error("shutting down")]
    ShuttingDown,
    #[error("the database kept failing for the delivery's whole hold: {0}")]
    Held(#[source] DbErr),
    #[error("the data cannot be stored: {0}")]
    Data(#[source] DbErr),
}

impl Abandon {
    /// How a run that had to give up its database work ends.
    fn ending(&self, message_id: Option<Uuid>) -> Ending {
        match self {
            Abandon::ShuttingDown => Ending::Interrupted,
            Abandon::Held(_) | Abandon::Data(_) => Ending::Postponed { reason: DeferReason::Database, message_id },
        }
    }
}

/// Keeps a job id in [`Worker::running`] while it lives.
struct Running<'a> {
    worker: &'a Worker,
    job_id: Uuid,
    /// Cancelled when an operator cancels the job.
    cancelled: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.worker.running.lock().expect("the running set's lock is never poisoned").remove(&self.job_id);
    }
}

impl Worker {
    pub fn new(
        settings: Arc<Settings>,
        registry: Registry,
        store: Store,
        llm: Providers,
        strategies: Strategies,
        metrics: Metrics,
    ) -> Self {
        // Twice the slots: an announcement is short (a confirm and a batched mark), but must not
        // become what jobs wait for.
        let announcing = Semaphore::new(2 * usize::from(settings.worker.concurrency));
        Self {
            settings,
            registry,
            store,
            llm,
            strategies,
            metrics,
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            announcing,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Runs one delivery to its end. Never fails: every path ends in an ack (outcome
    /// committed, dead-lettered or deferred), or a requeue (shutdown, a broker that would not
    /// take a copy).
    /// `received`: when the delivery arrived; its hold counts from then.
    pub fn run_job<'a>(
        &'a self,
        delivery: Delivery,
        received: Instant,
        publisher: &'a Publisher,
        slot: Slot,
    ) -> impl Future<Output = ()> + Send + 'a {
        // (Not `#[tracing::instrument]`, whose future holds the job's twice.)
        let span = tracing::info_span!(
            "job",
            job_id = Empty,
            entity = Empty,
            attempt = Empty,
            redelivered = delivery.redelivered
        );
        // The request's trace is the job's parent; its event carries the job's.
        let trace = telemetry::adopt_parent(&span, delivery.properties.headers().as_ref(), &self.settings.broker);
        self.run(delivery, received, publisher, slot, trace).instrument(span)
    }

    async fn run(
        &self,
        delivery: Delivery,
        received: Instant,
        publisher: &Publisher,
        slot: Slot,
        trace: Option<TraceContext>,
    ) {
        let _in_flight = self.metrics.in_flight();
        let hold = received + Duration::from_secs(self.settings.worker.max_hold_secs);
        // Each phase is boxed: a job's task then holds only the phase it is in, not room for
        // the largest of them all (thousands of jobs wait on their model at once).
        let ending = Box::pin(self.work(&delivery, hold, trace)).await;
        let disposition = disposition(&ending);
        if Box::pin(self.carry_out(&delivery, publisher, &ending, disposition, hold)).await {
            Box::pin(self.announce(publisher, ending, slot)).await;
        }
    }

    /// decode → claim → generate → store: everything but the broker.
    async fn work(&self, delivery: &Delivery, hold: Instant, trace: Option<TraceContext>) -> Ending {
        let mut job =
            match decode(&delivery.data, &delivery.properties, delivery.redelivered, &self.registry, &self.settings) {
                Ok(job) => job,
                Err(mut rejection) => {
                    rejection.trace = trace;
                    return Box::pin(self.reject(*rejection, hold)).await;
                }
            };
        job.trace = trace;
        let span = tracing::Span::current();
        span.record("job_id", tracing::field::display(job.id));
        span.record("entity", job.kind.name());
        let message_id = job.assigned_id.then_some(job.id);

        let Some(running) = self.start_running(job.id) else {
            tracing::info!("this process is running the same job; deferring the duplicate");
            return Ending::Postponed { reason: DeferReason::Claimed, message_id };
        };
        let record = job.record();
        let claim = match Box::pin(self.with_db_retries(hold, || self.store.claim_job(&record))).await {
            Ok(claim) => claim,
            Err(Abandon::Data(error)) => return Box::pin(self.reject_unstorable(&job, &error, hold)).await,
            Err(abandon) => return abandon.ending(message_id),
        };
        match claim {
            Claim::Busy => {
                tracing::info!("another live worker holds this job; deferring this delivery");
                Ending::Postponed { reason: DeferReason::Claimed, message_id }
            }
            Claim::Finished { event } => {
                tracing::info!("job already finished; answering with its event");
                let event = event.and_then(|stored| {
                    reannouncement(&record, &stored)
                        .map_err(|error| tracing::warn!(%error, "the job's stored event cannot be sent again"))
                        .ok()
                });
                Ending::AlreadyFinished(event)
            }
            Claim::Acquired { token, takeovers, age, cancel_requested } => {
                if cancel_requested {
                    // An operator cancelled it while it waited: no call is made.
                    running.cancelled.cancel();
                }
                // The broker's count (of a redelivery) and the claim's (which survives
                // deferrals): either says how often a worker died holding this job.
                let previous = job.previous_deliveries.max(u64::from(takeovers));
                if previous >= u64::from(self.settings.broker.delivery_limit) {
                    return Box::pin(self.give_up(&job, token, previous, hold)).await;
                }
                self.generate_and_store(&job, token, age, hold, &running.cancelled).await
            }
        }
    }

    fn start_running(&self, job_id: Uuid) -> Option<Running<'_>> {
        let mut running = self.running.lock().expect("the running set's lock is never poisoned");
        // (A guard is built only for a new id: dropping one would remove the other run's id.)
        match running.entry(job_id) {
            Entry::Occupied(_) => None,
            Entry::Vacant(vacant) => {
                let cancelled = vacant.insert(CancellationToken::new()).clone();
                Some(Running { worker: self, job_id, cancelled })
            }
        }
    }

    /// Cancels the jobs of `job_ids` this process is running (an operator asked; see
    /// `store::jobs::cancel_requests`): each gives up its model call and ends with kind
    /// `cancelled`. How many were running here.
    pub fn cancel_running(&self, job_ids: &[Uuid]) -> usize {
        let running = self.running.lock().expect("the running set's lock is never poisoned");
        job_ids.iter().filter_map(|job_id| running.get(job_id)).map(|cancelled| cancelled.cancel()).count()
    }

    /// `age`: how long ago the job was first claimed (it may have been deferred since).
    async fn generate_and_store(
        &self,
        job: &Job,
        token: Uuid,
        age: Duration,
        hold: Instant,
        cancelled: &CancellationToken,
    ) -> Ending {
        let started = Instant::now();
        let message_id = job.assigned_id.then_some(job.id);
        let prompt = Prompt {
            kind: job.kind.as_ref(),
            messages: &job.request.messages,
            models: &job.models,
            strategy: self.strategies.get(job.kind.name(), job.mode),
            max_retries: job.max_retries,
            deadline: started + Duration::from_secs(self.settings.llm.job_timeout_secs),
            hold,
            cancelled,
        };
        let generation = tokio::select! {
            generation = llm::generate(&self.llm, &self.settings.llm, prompt) => generation,
            // The call in flight is dropped: the grace period is over.
            _ = self.abort.cancelled() => return Box::pin(self.hand_back(job.id, token, Ending::Interrupted)).await,
        };
        let give_up_after = Duration::from_secs(self.settings.llm.give_up_after_secs);
        let generation = match generation {
            Ok(generation) => generation,
            Err(unavailable) if age + started.elapsed() < give_up_after => {
                tracing::warn!(last_error = %unavailable, "the provider stayed unavailable; deferring the job");
                let ending = Ending::Postponed { reason: DeferReason::Provider, message_id };
                return Box::pin(self.hand_back(job.id, token, ending)).await;
            }
            // Waited long enough: an outage of a day, or a request on which the provider fails
            // every call while nothing else runs (its own failures keep the circuit open).
            Err(unavailable) => {
                let message = format!(
                    "the provider was unavailable for this job for {:?} (llm.give_up_after_secs); last error: {}",
                    age + started.elapsed(),
                    unavailable.0
                );
                llm::Generation { outcome: Err(JobError::new(ErrorKind::Llm, message)), trace: CallTrace::default() }
            }
        };
        Box::pin(self.store_generation(job, token, &generation, started, hold)).await
    }

    /// Stores a generation's outcome (the record, or the failure when the record cannot be
    /// stored): what was committed.
    async fn store_generation(
        &self,
        job: &Job,
        token: Uuid,
        generation: &llm::Generation,
        started: Instant,
        hold: Instant,
    ) -> Ending {
        let message_id = job.assigned_id.then_some(job.id);
        let record = job.record();
        let failure;
        let mut outcome = Outcome { result: generation.outcome.as_ref(), trace: &generation.trace };
        let finish = self.store.finish(&record, token, &outcome);
        let span = tracing::info_span!(
            "store",
            otel.name = "store outcome",
            db.system.name = "postgresql",
            db.operation.name = "finish job",
            status = if outcome.result.is_ok() { "succeeded" } else { "failed" },
        );
        let storing = self.with_db_retries(hold, || self.store.record(&finish)).instrument(span);
        let stored = match storing.await {
            Ok(stored) => stored,
            Err(Abandon::Data(error)) => {
                // The record itself cannot be stored (a constraint the schema did not
                // express): the job fails for good rather than looping on redelivery.
                tracing::error!(error = %error, "storing the record failed; failing the job");
                failure = JobError::new(ErrorKind::Internal, format!("the record could not be stored: {error}"));
                outcome.result = Err(&failure);
                let finish = self.store.finish(&record, token, &outcome);
                match self.with_db_retries(hold, || self.store.record(&finish)).await {
                    Ok(stored) => stored,
                    Err(abandon) => return self.hand_back(job.id, token, abandon.ending(message_id)).await,
                }
            }
            Err(abandon) => return self.hand_back(job.id, token, abandon.ending(message_id)).await,
        };
        // What was committed, not what was generated: they differ when storing failed.
        match (&stored, outcome.result) {
            (Some(_), Ok(_)) => {
                self.metrics.job_finished(job.kind.name(), Ok(()), started.elapsed());
                tracing::info!(attempts = generation.trace.attempts, elapsed = ?started.elapsed(), "job succeeded")
            }
            (Some(_), Err(error)) => {
                self.metrics.job_finished(job.kind.name(), Err(error.kind), started.elapsed());
                tracing::warn!(kind = ?error.kind, error = %error.message, "job failed")
            }
            (None, _) => {
                tracing::warn!("another worker took the job over (this one was taken for gone); dropping this result")
            }
        }
        Ending::Committed(stored)
    }

    /// A job whose workers kept dying while holding it: rather than risk another crash (and
    /// the broker then dead-lettering it without a word), fail it with kind `internal`, send
    /// the message to the dead-letter queue with the reason, and announce the failure.
    async fn give_up(&self, job: &Job, token: Uuid, previous: u64, hold: Instant) -> Ending {
        let reason = format!(
            "delivered {} times without finishing (broker.delivery_limit is {}): its worker died or was cut off \
             each time, so it may be crashing or stalling workers; not tried again",
            previous + 1,
            self.settings.broker.delivery_limit
        );
        tracing::error!(%reason, "giving up on a job");
        let failure = JobError::new(ErrorKind::Internal, reason.clone());
        let trace = CallTrace::default();
        let finish = self.store.finish(&job.record(), token, &Outcome { result: Err(&failure), trace: &trace });
        match self.with_db_retries(hold, || self.store.record(&finish)).await {
            Ok(event) => Ending::GivenUp { reason, entity: job.kind.name().to_owned(), event },
            Err(abandon) => self.hand_back(job.id, token, abandon.ending(job.assigned_id.then_some(job.id))).await,
        }
    }

    /// A message that can never succeed: its failure is recorded (a `failed` row and event,
    /// unless the job id is another job's), and it goes to the dead-letter queue. Nothing is
    /// dropped silently.
    async fn reject(&self, rejection: Rejection, hold: Instant) -> Ending {
        let span = tracing::Span::current();
        span.record("job_id", tracing::field::display(rejection.job_id));
        span.record("entity", rejection.entity.as_str());
        tracing::warn!(reason = %rejection.reason, "rejecting an invalid request");
        let error = JobError::new(ErrorKind::InvalidRequest, rejection.reason.clone());
        let event = match self.record_rejection(&rejection.record(), &error, hold).await {
            Ok(event) => event,
            Err(abandon) => return abandon.ending(Some(rejection.job_id)),
        };
        let entity = rejection.routing_entity.unwrap_or("unknown").to_owned();
        Ending::Rejected { reason: rejection.reason, entity, event }
    }

    /// A request the database cannot hold (a character its encoding lacks, say): rejected,
    /// its failure recorded without the request.
    async fn reject_unstorable(&self, job: &Job, error: &DbErr, hold: Instant) -> Ending {
        let reason = text::message(&format!("the database cannot store this request: {error}"));
        tracing::warn!(%reason, "rejecting a request");
        let record = JobRecord { request: RawValue::NULL, metadata: &Value::Null, ..job.record() };
        let failure = JobError::new(ErrorKind::InvalidRequest, reason.clone());
        let event = match self.record_rejection(&record, &failure, hold).await {
            Ok(event) => event,
            Err(abandon) => return abandon.ending(job.assigned_id.then_some(job.id)),
        };
        Ending::Rejected { reason, entity: job.kind.name().to_owned(), event }
    }

    /// Records a rejection's failure: its event, or `None` when the job id is another job's, or
    /// when the failure itself cannot be stored (then the dead letter is all, rather than a
    /// delivery held forever). A database that stays unavailable leaves the delivery to be
    /// deferred (its failure is recorded when it comes back), not dead-lettered without a word.
    async fn record_rejection(
        &self,
        record: &JobRecord<'_>,
        error: &JobError,
        hold: Instant,
    ) -> Result<Option<OutboxEvent>, Abandon> {
        let event = match self.with_db_retries(hold, || self.store.record_rejection(record, error)).await {
            Err(Abandon::Data(error)) => {
                tracing::error!(%error, "the failed job could not be recorded; it is dead-lettered without an event");
                return Ok(None);
            }
            event => event?,
        };
        if event.is_none() {
            tracing::warn!(
                "the job id belongs to another job: the rejection is recorded in the dead-letter queue only"
            );
        }
        Ok(event)
    }

    /// Hands the job's claim back before its delivery is deferred or requeued, so that its
    /// next delivery takes it over at once. Best effort, briefly: a claim that could not be
    /// handed back is this worker's, which takes it back on the next delivery it gets.
    async fn hand_back(&self, job_id: Uuid, token: Uuid, ending: Ending) -> Ending {
        match tokio::time::timeout(Duration::from_secs(1), self.store.release_claim(job_id, token)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(%error, "could not hand the claim back"),
            Err(_) => tracing::debug!("could not hand the claim back in time"),
        }
        ending
    }

    /// Carries out `disposition` on the broker, for at most the delivery's `hold`. Whether the
    /// delivery was acked (and the event of an outcome, if any, is to be announced).
    async fn carry_out(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        ending: &Ending,
        disposition: Disposition,
        hold: Instant,
    ) -> bool {
        match disposition {
            Disposition::Ack => acknowledge(delivery).await,
            Disposition::Answer => {
                let Ending::AlreadyFinished(Some(event)) = ending else { return acknowledge(delivery).await };
                let sent = self.bounded(hold, relay::send(publisher, event)).await;
                match sent.map(relay::Sent::into_event) {
                    // Unroutable: the job's own event waits in the outbox for a queue to be bound.
                    Ok(Ok(())) | Ok(Err(PublishError::Returned(_))) => acknowledge(delivery).await,
                    Ok(Err(error)) | Err(error) => {
                        tracing::warn!(%error, "the finished job's event could not be sent again; leaving it for redelivery");
                        self.pause_then_requeue(delivery).await
                    }
                }
            }
            Disposition::Requeue => {
                requeue(delivery).await;
                false
            }
            Disposition::DeadLetter { reason, entity, kind } => {
                let copy = publisher.dead_letter(&delivery.data, &delivery.properties, &reason);
                let acked = self.copy_then_ack(delivery, hold, copy, "the dead-letter queue").await;
                if acked {
                    self.metrics.dead_lettered(&entity, kind);
                }
                acked
            }
            Disposition::Defer { reason, message_id } => {
                let delay = Duration::from_secs(self.settings.broker.defer_secs);
                let copy = publisher.defer(&delivery.data, &delivery.properties, message_id, delay);
                let acked = self.copy_then_ack(delivery, hold, copy, "the delay queue").await;
                if acked {
                    self.metrics.deferred(reason);
                }
                acked
            }
        }
    }

    /// Acks a delivery once its `copy` (to `queue`) is confirmed; a broker that would not take
    /// the copy gets the delivery back. Whether it was acked.
    async fn copy_then_ack(
        &self,
        delivery: &Delivery,
        hold: Instant,
        copy: impl Future<Output = Result<(), PublishError>>,
        queue: &str,
    ) -> bool {
        match self.bounded(hold, copy).await {
            Ok(()) => acknowledge(delivery).await,
            Err(error) => {
                tracing::error!(%error, "cannot copy the delivery to {queue}; leaving it for redelivery");
                self.pause_then_requeue(delivery).await
            }
        }
    }

    /// A broker that would not take a copy: requeue after a pause, so as not to spin on it.
    async fn pause_then_requeue(&self, delivery: &Delivery) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = self.stop.cancelled() => {}
        }
        requeue(delivery).await;
        false
    }

    /// A publish, given up when the grace period is over or the delivery's `hold` ran out (a
    /// blocked broker holds publishes).
    async fn bounded<T>(
        &self,
        hold: Instant,
        publish: impl Future<Output = Result<T, PublishError>>,
    ) -> Result<T, PublishError> {
        tokio::select! {
            published = publish => published,
            _ = self.abort.cancelled() => Err(PublishError::Abandoned),
            _ = tokio::time::sleep_until(hold) => Err(PublishError::Abandoned),
        }
    }

    /// Announces an outcome's event from the outbox after the ack, and marks it published once
    /// confirmed (the relay sends it otherwise). The job's slot goes to the next delivery once
    /// there is room among the announcements.
    async fn announce(&self, publisher: &Publisher, ending: Ending, slot: Slot) {
        let (Ending::Committed(Some(event))
        | Ending::Rejected { event: Some(event), .. }
        | Ending::GivenUp { event: Some(event), .. }) = ending
        else {
            return;
        };
        let sent = {
            let _announcing = self.announcing.acquire().await.expect("the semaphore is never closed");
            drop(slot);
            tokio::select! {
                sent = relay::send(publisher, &event) => sent,
                _ = self.abort.cancelled() => Err(PublishError::Abandoned),
            }
        };
        let delivered = match sent {
            // The "published" mark waits for its batch (up to `MARK_LINGER`) outside the bound.
            Ok(sent) => relay::write_down(relay::Marks::Batched(&self.store), &event, sent).await,
            Err(error) => Err(error.into()),
        };
        match delivered {
            Ok(()) => tracing::debug!(routing_key = %event.routing_key, "event published"),
            Err(Undelivered::Publish(PublishError::Returned(_))) => tracing::warn!(
                routing_key = %event.routing_key,
                "no queue is bound to the events exchange for this event; it stays pending until one is"
            ),
            Err(error) => tracing::warn!(%error, "event not confirmed yet; the outbox relay will retry"),
        }
    }

    /// Runs a database operation, retrying outages and refusals with backoff (they pause the
    /// job; they never fail it nor spin on it) until it succeeds, the delivery's `hold` runs
    /// out, or the grace period is over. A fault in the data is returned at once.
    async fn with_db_retries<T, F, Fut>(&self, hold: Instant, mut operation: F) -> Result<T, Abandon>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DbErr>>,
    {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .with_jitter()
            .build();
        let mut failures = 0u32;
        loop {
            // Each attempt is bounded too: a statement on a connection whose server vanished
            // without a word could otherwise wait for TCP to give up, past the hold.
            let error = tokio::select! {
                result = operation() => match result {
                    Ok(value) => return Ok(value),
                    Err(error) => error,
                },
                _ = self.abort.cancelled() => return Err(Abandon::ShuttingDown),
                _ = tokio::time::sleep_until(hold) => {
                    tracing::warn!("the database did not answer within the delivery's hold");
                    return Err(Abandon::Held(DbErr::Custom("no answer within the delivery's hold".to_owned())));
                }
            };
            let fault = classify(&error);
            if fault == DbFault::Data {
                return Err(Abandon::Data(error));
            }
            let wait = delays.next().unwrap_or(Duration::from_secs(5));
            if Instant::now() + wait >= hold {
                tracing::warn!(%error, "the database kept failing for the delivery's whole hold");
                return Err(Abandon::Held(error));
            }
            failures += 1;
            // One line per job at the first failure; the heartbeat reports the database's state.
            let what =
                if fault == DbFault::Outage { "database unavailable" } else { "the database refuses the job's work" };
            if failures == 1 {
                tracing::warn!(%error, ?wait, "{what}; retrying");
            } else {
                tracing::debug!(%error, ?wait, failures, "{what}; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.abort.cancelled() => return Err(Abandon::ShuttingDown),
            }
        }
    }
}

/// Acks a delivery. A failed ack (the channel died meanwhile) is not an error of the job:
/// the request is redelivered, the claim finds the job finished, and it is announced again.
/// Whether the ack was sent.
async fn acknowledge(delivery: &Delivery) -> bool {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!("ack not sent (its channel is gone); the request will be redelivered");
            false
        }
        Err(error) => {
            tracing::warn!(%error, "ack failed; the request will be redelivered");
            false
        }
    }
}

/// Returns a delivery to the queue for another try. `requeue: true` explicitly: lapin's
/// default `BasicNackOptions` would dead-letter it.
pub async fn requeue(delivery: &Delivery) {
    requeue_with(&delivery.acker).await
}

/// [`requeue`] with the delivery's acker alone (a job that panicked has lost its delivery).
pub async fn requeue_with(acker: &lapin::Acker) {
    let options = BasicNackOptions { requeue: true, ..Default::default() };
    if let Err(error) = acker.nack(options).await {
        tracing::warn!(%error, "nack failed; the broker redelivers the request when the channel closes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            routing_key: "job.succeeded.hero".into(),
            correlation_id: "c".into(),
            reply_to: None,
            payload: b"{}".to_vec(),
            trace: None,
        }
    }

    #[test]
    fn committed_jobs_are_acked_and_duplicates_answered_before_their_ack() {
        assert_eq!(disposition(&Ending::Committed(Some(event()))), Disposition::Ack);
        assert_eq!(disposition(&Ending::Committed(None)), Disposition::Ack, "a claim lost to another worker");
        assert_eq!(disposition(&Ending::AlreadyFinished(Some(event()))), Disposition::Answer);
        assert_eq!(disposition(&Ending::AlreadyFinished(None)), Disposition::Ack, "nothing to answer with");
    }

    #[test]
    fn rejected_and_given_up_jobs_are_dead_lettered_with_their_reason_and_kind() {
        let rejected = Ending::Rejected { reason: "bad".into(), entity: "unknown".into(), event: None };
        assert_eq!(
            disposition(&rejected),
            Disposition::DeadLetter { reason: "bad".into(), entity: "unknown".into(), kind: ErrorKind::InvalidRequest }
        );
        let given_up = Ending::GivenUp { reason: "died".into(), entity: "hero".into(), event: Some(event()) };
        assert_eq!(
            disposition(&given_up),
            Disposition::DeadLetter { reason: "died".into(), entity: "hero".into(), kind: ErrorKind::Internal }
        );
    }

    #[test]
    fn waiting_is_deferred_and_only_a_shutdown_requeues() {
        let id = Some(Uuid::new_v4());
        for reason in DeferReason::ALL {
            let ending = Ending::Postponed { reason, message_id: id };
            assert_eq!(disposition(&ending), Disposition::Defer { reason, message_id: id });
        }
        assert_eq!(disposition(&Ending::Interrupted), Disposition::Requeue);
    }

    #[test]
    fn a_database_given_up_on_defers_and_a_shutdown_requeues() {
        let held = Abandon::Held(DbErr::Custom("read-only".into()));
        assert!(matches!(held.ending(None), Ending::Postponed { reason: DeferReason::Database, .. }));
        assert!(matches!(Abandon::ShuttingDown.ending(None), Ending::Interrupted));
    }
}
