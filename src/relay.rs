//! The outbox relay: publishes completion events that were committed but not confirmed
//! (the process died between commit and publish, the broker was down, …). Rows are
//! claimed with `FOR UPDATE SKIP LOCKED`, so several workers can relay at once without
//! sending the same event twice, and marked only after the broker's confirm.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, TransactionTrait};
use tokio_util::sync::CancellationToken;

use crate::broker::Publisher;
use crate::store::{Store, outbox_event_from_row};

/// Events younger than this are left to the worker that wrote them (it publishes right
/// after its commit), so the normal case sends each event once.
pub const HANDOFF_AGE: Duration = Duration::from_secs(10);
const BATCH: i64 = 100;

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

/// Publishes pending events at least `min_age` old, in batches, until none is left or a
/// publish fails. Returns how many were published.
pub async fn relay_pending(store: &Store, publisher: &Publisher, min_age: Duration) -> Result<usize, DbErr> {
    let mut published = 0;
    loop {
        let txn = store.db().begin().await?;
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT event_id, routing_key, correlation_id, reply_to, payload FROM event_outbox
                  WHERE published_at IS NULL AND created_at <= now() - make_interval(secs => $1)
                  ORDER BY created_at LIMIT $2
                  FOR UPDATE SKIP LOCKED",
                [min_age.as_secs_f64().into(), BATCH.into()],
            ))
            .await?;
        let batch = rows.len();
        for row in &rows {
            let event = outbox_event_from_row(row)?;
            if let Err(error) = publisher.publish_event(&event).await {
                tracing::warn!(%error, "relay could not publish; will retry");
                txn.commit().await?;
                return Ok(published);
            }
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE event_outbox SET published_at = now() WHERE event_id = $1",
                [event.event_id.into()],
            ))
            .await?;
            published += 1;
        }
        txn.commit().await?;
        if published > 0 {
            tracing::info!(published, "outbox relay published pending events");
        }
        if (batch as i64) < BATCH {
            return Ok(published);
        }
    }
}
