//! The event outbox: events committed with their job's outcome, marked published once the
//! broker confirmed them, backed off while no queue is bound for them. The relay
//! ([`crate::relay`]) claims pending rows with `FOR UPDATE SKIP LOCKED`.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Store, stmt};
use crate::contract::CompletionEvent;
use crate::job::{JobRecord, OutboxEvent, TraceContext};

impl Store {
    /// Marks an event published once the broker confirmed it; marks of concurrent jobs
    /// share one statement. A mark that is lost (the process dies first) only means the
    /// relay sends the event again.
    pub async fn mark_published(&self, event_id: Uuid) -> Result<(), DbErr> {
        self.published.submit(event_id).await
    }
}

pub(super) fn outbox_event(job: &JobRecord<'_>, event: &CompletionEvent) -> OutboxEvent {
    OutboxEvent {
        event_id: event.event_id,
        routing_key: crate::contract::routing_key(event.status, job.routing_entity),
        correlation_id: job.correlation_id.to_owned(),
        reply_to: job.reply_to.map(str::to_owned),
        payload: serde_json::to_vec(event).expect("events serialize"),
        trace: job.trace.cloned(),
    }
}

fn outbox_event_from_row(row: &QueryResult) -> Result<OutboxEvent, DbErr> {
    let payload: Value = row.try_get("", "payload")?;
    Ok(OutboxEvent {
        event_id: row.try_get("", "event_id")?,
        routing_key: row.try_get("", "routing_key")?,
        correlation_id: row.try_get("", "correlation_id")?,
        reply_to: row.try_get("", "reply_to")?,
        payload: serde_json::to_vec(&payload).expect("JSON serializes"),
        trace: row
            .try_get::<Option<String>>("", "traceparent")?
            .map(|traceparent| Ok::<_, DbErr>(TraceContext { traceparent, tracestate: row.try_get("", "tracestate")? }))
            .transpose()?,
    })
}

/// Up to `limit` pending events at least `min_age` old and due, oldest first, locked in
/// `txn` (`FOR UPDATE SKIP LOCKED`: replicas relaying at once take different rows).
pub async fn lock_pending(
    txn: &impl ConnectionTrait,
    min_age: Duration,
    limit: i64,
) -> Result<Vec<OutboxEvent>, DbErr> {
    let rows = txn
        .query_all_raw(stmt(
            "SELECT event_id, routing_key, correlation_id, reply_to, payload, traceparent, tracestate FROM event_outbox
              WHERE published_at IS NULL AND abandoned_at IS NULL
                AND created_at <= now() - make_interval(secs => $1)
                AND (next_attempt_at IS NULL OR next_attempt_at <= now())
              ORDER BY created_at LIMIT $2
              FOR UPDATE SKIP LOCKED",
            [min_age.as_secs_f64().into(), limit.into()],
        ))
        .await?;
    rows.iter().map(outbox_event_from_row).collect()
}

/// Marks a batch of events published.
pub(super) async fn mark_published_batch(db: &DatabaseConnection, batch: Vec<Uuid>) -> Vec<Result<(), DbErr>> {
    match mark_published_in(db, &batch).await {
        Ok(_) => batch.iter().map(|_| Ok(())).collect(),
        Err(error) => batch.iter().map(|_| Err(error.clone())).collect(),
    }
}

/// Marks events published, in `db` (a transaction or the pool): the batched marks of
/// [`Store::mark_published`], and the relay's own, in the transaction that holds the rows.
pub async fn mark_published_in(db: &impl ConnectionTrait, event_ids: &[Uuid]) -> Result<(), DbErr> {
    db.execute_raw(stmt(
        "UPDATE event_outbox SET published_at = coalesce(published_at, now()), last_error = NULL
          WHERE event_id IN (SELECT jsonb_array_elements_text($2)::uuid LIMIT $1)",
        [(event_ids.len() as i64).into(), json!(event_ids).into()],
    ))
    .await?;
    Ok(())
}

/// An event came back unroutable: tried again after 5 s, doubling to 5 min; `replied`: the
/// requester has its copy, which later tries do not send again.
pub async fn back_off_unroutable(
    db: &impl ConnectionTrait,
    event_id: Uuid,
    why: &str,
    replied: bool,
) -> Result<(), DbErr> {
    db.execute_raw(stmt(
        "UPDATE event_outbox
            SET attempts = attempts + 1,
                next_attempt_at = now() + make_interval(secs => least(300, 5 * power(2, least(attempts, 10)))),
                last_error = $2,
                reply_to = CASE WHEN $3 THEN NULL ELSE reply_to END
          WHERE event_id = $1",
        [event_id.into(), crate::text::message(why).into(), replied.into()],
    ))
    .await?;
    Ok(())
}

/// The requester has its copy of an event that is still pending: later tries do not send it
/// again.
pub async fn forget_reply_to(db: &impl ConnectionTrait, event_id: Uuid) -> Result<(), DbErr> {
    db.execute_raw(stmt("UPDATE event_outbox SET reply_to = NULL WHERE event_id = $1", [event_id.into()])).await?;
    Ok(())
}

/// Events committed but not yet confirmed (nor given up on).
pub async fn count_pending(db: &impl ConnectionTrait) -> Result<u64, DbErr> {
    let row = db
        .query_one_raw(stmt(
            "SELECT count(*) AS pending FROM event_outbox WHERE published_at IS NULL AND abandoned_at IS NULL",
            [],
        ))
        .await?;
    let pending: i64 = row.map(|row| row.try_get("", "pending")).transpose()?.unwrap_or(0);
    Ok(pending.max(0) as u64)
}
