//! The life of one job, top to bottom in [`Worker::run_job`]:
//! receive → claim → generate (with re-ask) → validate and hydrate → store (entity + job +
//! event, one transaction) → acknowledge → announce.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sea_orm::DbErr;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;

use crate::broker::{PublishError, Publisher};
use crate::config::Settings;
use crate::contract::{ErrorKind, JobError};
use crate::decode::{Job, Rejection, decode};
use crate::entities::Registry;
use crate::llm::modes::Strategies;
use crate::llm::{self, LlmClient, generate::Prompt};
use crate::metrics;
use crate::relay::{self, Undelivered};
use crate::store::{Claim, OutboxEvent, Outcome, Store, is_transient};

/// Everything a job needs, shared by all jobs of the process.
pub struct Worker {
    pub settings: Arc<Settings>,
    pub registry: Registry,
    pub store: Store,
    pub llm: LlmClient,
    /// How each entity is asked for in each mode.
    pub strategies: Strategies,
    /// Cancelled when the process stops taking new jobs (first signal).
    pub stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: give up and leave the delivery
    /// to redelivery.
    pub abort: CancellationToken,
    /// Bounds the events being announced by jobs that have already given back their slot
    /// (twice `worker.concurrency`): a slow broker holds jobs back rather than letting
    /// announcements pile up.
    pub announcing: Arc<Semaphore>,
}

/// A job's place among the `worker.concurrency` that run at once. Taken before its delivery
/// is, and held until the request is acked or requeued and, when there is an event to
/// announce, until there is room among the announcements; not while the event is
/// published, which needs neither the model nor the claim, only the broker.
pub type Slot = OwnedSemaphorePermit;

/// Why a job was left for redelivery instead of being finished.
#[derive(Debug, thiserror::Error)]
enum Abandon {
    #[error("shutting down")]
    ShuttingDown,
    #[error("database error: {0}")]
    Database(#[source] DbErr),
}

impl Worker {
    /// Runs one delivery to its end. Never fails: every path ends in an ack (outcome
    /// committed, or dead-lettered), or a requeue for redelivery (shutdown, outage).
    #[tracing::instrument(name = "job", skip_all, fields(job_id = Empty, entity = Empty, attempt = Empty, redelivered = delivery.redelivered))]
    pub async fn run_job(&self, delivery: Delivery, publisher: &Publisher, slot: Slot) {
        let _in_flight = metrics::InFlight::start();
        let job = match decode(&delivery.data, &delivery.properties, &self.registry, &self.settings) {
            Ok(job) => job,
            Err(rejection) => return self.dead_letter(delivery, *rejection, publisher, slot).await,
        };
        let span = tracing::Span::current();
        span.record("job_id", tracing::field::display(job.id));
        span.record("entity", job.kind.name());

        if job.previous_deliveries >= u64::from(self.settings.broker.delivery_limit) {
            return self.give_up(delivery, &job, publisher, slot).await;
        }
        self.finish(delivery, &job, publisher, slot).await
    }

    /// Settles the job, then acks (outcome committed) or requeues (shutdown, outage).
    async fn finish(&self, delivery: Delivery, job: &Job, publisher: &Publisher, slot: Slot) {
        match self.settle(job).await {
            Ok(event) => {
                // The outcome is committed: only now may the request leave the queue.
                acknowledge(delivery).await;
                if let Some(event) = event {
                    self.announce(publisher, &event, slot).await;
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, "job left for redelivery");
                requeue(&delivery).await;
            }
        }
    }

    /// The broker's last allowed delivery of a message whose earlier deliveries all ended
    /// without an outcome (their workers died or were cut off): rather than risk another
    /// crash, and the broker then dead-lettering it without a word, fail the job with kind
    /// `internal`, copy the message to the dead-letter queue with the reason, and announce
    /// the failure. Only if nobody holds a live claim on the job: a job that is running or
    /// finished elsewhere takes the normal path.
    async fn give_up(&self, delivery: Delivery, job: &Job, publisher: &Publisher, slot: Slot) {
        let record = job.record();
        let lease = Duration::from_secs(self.settings.worker.job_lease_secs);
        let token = loop {
            match self.with_db_retries(|| self.store.claim_job(&record, lease)).await {
                Ok(Claim::Acquired { token }) => break token,
                Ok(Claim::Finished) => return self.finish(delivery, job, publisher, slot).await,
                // The last holder may be alive (cut off from the broker, still working):
                // wait for it to finish or for its lease to run out.
                Ok(Claim::Busy { .. }) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = self.stop.cancelled() => return requeue(&delivery).await,
                    }
                }
                Err(reason) => {
                    tracing::warn!(%reason, "job left for redelivery");
                    return requeue(&delivery).await;
                }
            }
        };
        let reason = format!(
            "delivered {} times without finishing (broker.delivery_limit is {}): it may be crashing or stalling \
             workers; not tried again",
            job.previous_deliveries + 1,
            self.settings.broker.delivery_limit
        );
        tracing::error!(%reason, "giving up on a job");
        let failure = JobError::new(ErrorKind::Internal, reason);
        let trace = llm::CallTrace::default();
        let finish = self.store.finish(&record, token, &Outcome { result: Err(&failure), trace: &trace });
        // The claim stays renewed while the broker confirms the copy and the failure commits
        // (a blocked broker may take a while).
        let settled = tokio::select! {
            settled = async {
                publisher.dead_letter(&delivery.data, &delivery.properties, &failure.message).await.map_err(|error| {
                    tracing::error!(%error, "cannot dead-letter the message; leaving it for redelivery");
                })?;
                self.with_db_retries(|| self.store.record(&finish)).await.map_err(|reason| {
                    tracing::warn!(%reason, "job left for redelivery");
                })
            } => settled,
            never = self.renew_lease(job, token) => match never {},
        };
        match settled {
            Ok(event) => {
                acknowledge(delivery).await;
                if let Some(event) = event {
                    metrics::dead_lettered(job.kind.name(), ErrorKind::Internal);
                    self.announce(publisher, &event, slot).await;
                }
            }
            Err(()) => requeue(&delivery).await,
        }
    }

    /// Claims the job and brings it to a committed outcome. Returns the event to announce
    /// (`None` if another worker took the job over and will announce it).
    async fn settle(&self, job: &Job) -> Result<Option<OutboxEvent>, Abandon> {
        let record = job.record();
        let lease = Duration::from_secs(self.settings.worker.job_lease_secs);
        loop {
            match self.with_db_retries(|| self.store.claim_job(&record, lease)).await? {
                Claim::Acquired { token } => return self.generate_and_store(job, token).await,
                Claim::Finished => {
                    tracing::info!("job already finished; announcing its outcome again");
                    return self.with_db_retries(|| self.store.reannounce(&record)).await;
                }
                Claim::Busy { lease_expires_at } => {
                    // A duplicate delivery while another worker runs the job: wait for it
                    // to finish (then announce again) or for its lease to expire (then
                    // take over), so that this delivery, too, gets its event.
                    tracing::info!(%lease_expires_at, "another worker holds this job; waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = self.stop.cancelled() => return Err(Abandon::ShuttingDown),
                    }
                }
            }
        }
    }

    async fn generate_and_store(&self, job: &Job, token: uuid::Uuid) -> Result<Option<OutboxEvent>, Abandon> {
        let started = Instant::now();
        let prompt = Prompt {
            kind: job.kind.as_ref(),
            messages: &job.request.messages,
            model: &job.model,
            strategy: self.strategies.get(job.kind.name(), job.mode),
            max_retries: job.max_retries,
            deadline: started + Duration::from_secs(self.settings.llm.job_timeout_secs),
        };
        // The claim is a lease renewed while the job runs: a worker that dies stops renewing
        // it, and a redelivered copy takes the job over soon after, not after a long fixed
        // lease.
        let generation = tokio::select! {
            generation = llm::generate(&self.llm, &self.settings.llm, prompt) => generation,
            never = self.renew_lease(job, token) => match never {},
        };
        let record = job.record();
        let failure;
        let mut outcome = Outcome { result: generation.outcome.as_ref(), trace: &generation.trace };
        let finish = self.store.finish(&record, token, &outcome);
        let stored = match self.with_db_retries(|| self.store.record(&finish)).await {
            Err(Abandon::Database(error)) => {
                // The record itself cannot be stored (a constraint the schema did not
                // express): the job fails for good rather than looping on redelivery.
                tracing::error!(error = %error, "storing the record failed; failing the job");
                failure = JobError::new(ErrorKind::Internal, format!("the record could not be stored: {error}"));
                outcome.result = Err(&failure);
                let finish = self.store.finish(&record, token, &outcome);
                self.with_db_retries(|| self.store.record(&finish)).await?
            }
            other => other?,
        };
        // What was committed, not what was generated: they differ when storing failed.
        match (&stored, outcome.result) {
            (Some(_), Ok(_)) => {
                metrics::job_finished(job.kind.name(), Ok(()), started.elapsed());
                tracing::info!(attempts = generation.trace.attempts, elapsed = ?started.elapsed(), "job succeeded")
            }
            (Some(_), Err(error)) => {
                metrics::job_finished(job.kind.name(), Err(error.kind), started.elapsed());
                tracing::warn!(kind = ?error.kind, error = %error.message, "job failed")
            }
            (None, _) => {
                tracing::warn!("the job's lease expired and another worker took it over; dropping this result")
            }
        }
        Ok(stored)
    }

    /// Renews the job's lease every third of its length, for as long as it is polled.
    async fn renew_lease(&self, job: &Job, token: uuid::Uuid) -> std::convert::Infallible {
        let lease = Duration::from_secs(self.settings.worker.job_lease_secs);
        loop {
            tokio::time::sleep(lease / 3).await;
            match self.store.renew_lease(job.id, token, lease).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!("the job's claim was taken over; its result will be dropped"),
                Err(error) => tracing::warn!(%error, "renewing the job's lease failed"),
            }
        }
    }

    /// A message that can never succeed: copy it to the DLQ with its reason (confirmed),
    /// record the failed job and its event, then ack. Nothing is dropped silently.
    async fn dead_letter(&self, delivery: Delivery, rejection: Rejection, publisher: &Publisher, slot: Slot) {
        let span = tracing::Span::current();
        span.record("job_id", tracing::field::display(rejection.job_id));
        span.record("entity", rejection.entity.as_str());
        tracing::warn!(reason = %rejection.reason, "dead-lettering an invalid request");
        if let Err(error) = publisher.dead_letter(&delivery.data, &delivery.properties, &rejection.reason).await {
            tracing::error!(%error, "cannot dead-letter the message; leaving it for redelivery");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stop.cancelled() => {}
            }
            return requeue(&delivery).await;
        }
        metrics::dead_lettered(rejection.routing_entity.unwrap_or("unknown"), ErrorKind::InvalidRequest);
        let error = JobError::new(ErrorKind::InvalidRequest, rejection.reason.clone());
        let record = rejection.record();
        let event = self.with_db_retries(|| self.store.record_rejection(&record, &error)).await;
        // The dead-letter copy is confirmed: the request may leave the queue even if the
        // database could not record the failure (it is then only in the DLQ).
        acknowledge(delivery).await;
        match event {
            Ok(event) => self.announce(publisher, &event, slot).await,
            Err(reason) => tracing::error!(%reason, "the failed job could not be recorded; no event is sent"),
        }
    }

    /// Delivers an outboxed event right after its commit and ack, giving the job's slot to
    /// the next delivery once there is room among the announcements. Whatever is not
    /// confirmed stays in the outbox for the relay.
    async fn announce(&self, publisher: &Publisher, event: &OutboxEvent, slot: Slot) {
        let sent = {
            let _announcing = self.announcing.acquire().await.expect("the semaphore is never closed");
            drop(slot);
            relay::send(publisher, event).await
        };
        // The "published" mark waits for its batch (up to `MARK_LINGER`) outside the bound.
        let delivered = match sent {
            Ok(sent) => relay::write_down(relay::Marks::Batched(&self.store), event, sent).await,
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

    /// Runs a database operation, retrying transient errors (an outage pauses the job, it
    /// does not fail it) until it succeeds or the shutdown grace period is over.
    async fn with_db_retries<T, F, Fut>(&self, operation: F) -> Result<T, Abandon>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DbErr>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(usize::MAX)
            .with_jitter();
        let retried = operation
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(is_transient)
            .notify(|error, wait| tracing::warn!(%error, ?wait, "database unavailable; retrying"));
        tokio::select! {
            result = retried => result.map_err(Abandon::Database),
            _ = self.abort.cancelled() => Err(Abandon::ShuttingDown),
        }
    }
}

/// Acks a delivery, and lets go of it (the request's body is no longer needed while the
/// event is announced). A failed ack (the channel died meanwhile) is not an error of the
/// job: the request is redelivered, the claim finds the job finished, and it is announced
/// again.
async fn acknowledge(delivery: Delivery) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!("ack not sent (its channel is gone); the request will be redelivered"),
        Err(error) => tracing::warn!(%error, "ack failed; the request will be redelivered"),
    }
}

/// Returns a delivery to the queue for another try. `requeue: true` explicitly: lapin's
/// default `BasicNackOptions` would dead-letter it.
async fn requeue(delivery: &Delivery) {
    let options = BasicNackOptions { requeue: true, ..Default::default() };
    if let Err(error) = delivery.acker.nack(options).await {
        tracing::warn!(%error, "nack failed; the broker redelivers the request when the channel closes");
    }
}
