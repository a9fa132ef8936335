//! Delivering outboxed completion events, and the relay that delivers what was committed
//! but not confirmed (the process died between commit and publish, the broker was down,
//! no queue was bound for the event, …). Rows are claimed with `FOR UPDATE SKIP LOCKED`,
//! so several workers can relay at once without sending the same event twice, and marked
//! only after the broker's confirm.

use std::collections::BTreeSet;
use std::time::Duration;

use sea_orm::{DatabaseTransaction, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{PublishError, Publisher};
use crate::job::OutboxEvent;
use crate::store::{Store, outbox};

/// Events younger than this are left to the worker that wrote them (it publishes right
/// after its commit), so the normal case sends each event once.
pub const HANDOFF_AGE: Duration = Duration::from_secs(10);
const BATCH: i64 = 100;

/// Why an event is still pending.
#[derive(Debug, thiserror::Error)]
pub enum Undelivered {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the outbox could not be updated: {0}")]
    Database(#[from] DbErr),
}

/// Where a delivered event is marked published.
#[derive(Clone, Copy)]
pub enum Marks<'a> {
    /// In the relay's transaction, which holds the event row's lock.
    In(&'a DatabaseTransaction),
    /// With other jobs' marks, in a shared statement (a worker announcing its own event
    /// right after its commit).
    Batched(&'a Store),
}

impl Marks<'_> {
    async fn published(self, event_id: Uuid) -> Result<(), DbErr> {
        match self {
            Marks::In(txn) => outbox::mark_published_in(txn, &[event_id]).await,
            Marks::Batched(store) => store.mark_published(event_id).await,
        }
    }

    async fn unroutable(self, event_id: Uuid, why: &str, replied: bool) -> Result<(), DbErr> {
        match self {
            Marks::In(txn) => outbox::back_off_unroutable(txn, event_id, why, replied).await,
            Marks::Batched(store) => outbox::back_off_unroutable(store.db(), event_id, why, replied).await,
        }
    }

    async fn replied(self, event_id: Uuid) -> Result<(), DbErr> {
        match self {
            Marks::In(txn) => outbox::forget_reply_to(txn, event_id).await,
            Marks::Batched(store) => outbox::forget_reply_to(store.db(), event_id).await,
        }
    }
}

/// Delivers one outboxed event: first the requester's copy (when the request had a
/// `reply_to`), then the mandatory copy to the events exchange; marks the event published
/// once the broker confirmed and routed the latter. An event that could not be routed is
/// backed off (5 s doubling to 5 min) and stays pending; once the requester has its copy,
/// later tries do not send it again.
pub async fn deliver(marks: Marks<'_>, publisher: &Publisher, event: &OutboxEvent) -> Result<(), Undelivered> {
    let sent = send(publisher, event).await?;
    write_down(marks, event, sent).await
}

/// The broker's half of [`deliver`]: what became of an event's copies, not yet written
/// down.
pub struct Sent {
    /// The requester's copy was confirmed.
    replied: bool,
    /// The copy to the events exchange.
    event: Result<(), PublishError>,
}

impl Sent {
    /// What became of the copy to the events exchange.
    pub fn into_event(self) -> Result<(), PublishError> {
        self.event
    }
}

/// Publishes the requester's copy (if any) and the event, as [`deliver`] does, without
/// touching the database. Fails only if the requester's copy could not be sent.
pub async fn send(publisher: &Publisher, event: &OutboxEvent) -> Result<Sent, PublishError> {
    let replied = match &event.reply_to {
        Some(reply_to) => {
            publisher.publish_reply(event, reply_to).await?;
            true
        }
        None => false,
    };
    Ok(Sent { replied, event: publisher.publish_event(event).await })
}

/// The database's half of [`deliver`]: marks the event published, or backs it off.
pub async fn write_down(marks: Marks<'_>, event: &OutboxEvent, sent: Sent) -> Result<(), Undelivered> {
    let Sent { replied, event: published } = sent;
    match published {
        Ok(()) => Ok(marks.published(event.event_id).await?),
        Err(error @ PublishError::Returned(_)) => {
            marks.unroutable(event.event_id, &error.to_string(), replied).await?;
            Err(error.into())
        }
        Err(error) => {
            if replied {
                marks.replied(event.event_id).await?;
            }
            Err(error.into())
        }
    }
}

/// Relays pending events every `interval` until `stop` is cancelled.
pub async fn run(store: Store, publisher: Publisher, interval: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(error) = relay_pending(&store, &publisher, HANDOFF_AGE).await {
            tracing::warn!(%error, "outbox relay pass failed");
        }
    }
}

/// Publishes the pending events that are at least `min_age` old and due, in batches,
/// until none is left or the broker fails. Returns how many were published.
pub async fn relay_pending(store: &Store, publisher: &Publisher, min_age: Duration) -> Result<usize, DbErr> {
    let mut published = 0;
    let mut unroutable = BTreeSet::new();
    loop {
        let txn = store.db().begin().await?;
        let events = outbox::lock_pending(&txn, min_age, BATCH).await?;
        let batch = events.len();
        for event in events {
            match deliver(Marks::In(&txn), publisher, &event).await {
                Ok(()) => published += 1,
                Err(Undelivered::Publish(PublishError::Returned(_))) => {
                    unroutable.insert(event.routing_key);
                }
                Err(Undelivered::Database(error)) => return Err(error),
                Err(Undelivered::Publish(error)) => {
                    tracing::warn!(%error, "relay could not publish; will retry");
                    txn.commit().await?;
                    return Ok(published);
                }
            }
        }
        txn.commit().await?;
        if (batch as i64) < BATCH {
            break;
        }
    }
    if published > 0 {
        tracing::info!(published, "outbox relay published pending events");
    }
    if !unroutable.is_empty() {
        tracing::warn!(
            routing_keys = ?unroutable,
            "events could not be routed: no queue is bound to the events exchange for them; \
             they stay pending and are retried with backoff (until retention.unroutable_events)"
        );
    }
    Ok(published)
}
