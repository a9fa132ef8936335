//! Pruning what is old: finished jobs' rows, published events, events nobody could be
//! routed to, and the rows of workers long gone. In batches of [`BATCH`] rows, each in a
//! short transaction that holds an advisory lock, so that one replica at a time prunes and
//! no statement holds many locks for long.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};

use super::stmt;
use crate::config::RetentionSettings;

/// Rows per pruning statement.
pub const BATCH: i64 = 1000;

/// The advisory lock a pruning batch holds ("instprun" in ASCII).
const RETENTION_LOCK: i64 = 0x696e_7374_7072_756e;

/// Between two full batches.
const PAUSE: Duration = Duration::from_millis(100);

/// A worker's row is removed this long after its last heartbeat (its claims were taken over
/// long before: see [`super::claims`]).
const GONE_WORKERS: Duration = Duration::from_secs(3600);

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub events: u64,
    pub workers: u64,
    /// Unroutable events given up on.
    pub abandoned: u64,
    /// Another replica was pruning: this pass stopped early.
    pub yielded: bool,
}

/// One kind of row to prune: rows older than the age, by the statement, counted where.
type Step = (Option<Duration>, &'static str, fn(&mut Pruned) -> &mut u64);

/// One pruning pass, as `retention.*` says.
pub async fn prune(db: &DatabaseConnection, retention: &RetentionSettings) -> Result<Pruned, DbErr> {
    let mut pruned = Pruned::default();
    let steps: [Step; 4] = [
        (
            retention.unroutable_events.get(),
            // Only events that came back unroutable (`last_error` set); those waiting for a
            // broker outage to end are not given up on.
            "UPDATE event_outbox SET abandoned_at = now()
              WHERE event_id IN (SELECT event_id FROM event_outbox
                                  WHERE published_at IS NULL AND abandoned_at IS NULL AND last_error IS NOT NULL
                                    AND created_at < now() - make_interval(secs => $1)
                                  LIMIT $2)",
            |p| &mut p.abandoned,
        ),
        (
            retention.published_events.get(),
            "DELETE FROM event_outbox
              WHERE event_id IN (SELECT event_id FROM event_outbox
                                  WHERE (published_at IS NOT NULL OR abandoned_at IS NOT NULL)
                                    AND coalesce(published_at, abandoned_at) < now() - make_interval(secs => $1)
                                  LIMIT $2)",
            |p| &mut p.events,
        ),
        (
            retention.succeeded_jobs.get(),
            "DELETE FROM generation_job
              WHERE job_id IN (SELECT job_id FROM generation_job
                                WHERE status = 'succeeded' AND updated_at < now() - make_interval(secs => $1)
                                LIMIT $2)",
            |p| &mut p.jobs,
        ),
        (
            retention.failed_jobs.get(),
            "DELETE FROM generation_job
              WHERE job_id IN (SELECT job_id FROM generation_job
                                WHERE status = 'failed' AND updated_at < now() - make_interval(secs => $1)
                                LIMIT $2)",
            |p| &mut p.jobs,
        ),
    ];
    for (age, sql, count) in steps {
        let Some(age) = age else { continue };
        loop {
            let Some(rows) = batch(db, sql, age).await? else {
                pruned.yielded = true;
                return Ok(pruned);
            };
            *count(&mut pruned) += rows;
            if rows < BATCH as u64 {
                break;
            }
            // A backlog (the first pass after an upgrade, say) is worked off in small steps
            // that leave the database to the jobs in between.
            tokio::time::sleep(PAUSE).await;
        }
    }
    let gone = db
        .execute_raw(stmt(
            "DELETE FROM worker WHERE seen_at < now() - make_interval(secs => $1)",
            [GONE_WORKERS.as_secs_f64().into()],
        ))
        .await?;
    pruned.workers = gone.rows_affected();
    Ok(pruned)
}

/// Runs one batch of `sql` under the retention lock: the rows it touched, or `None` if
/// another replica holds the lock.
async fn batch(db: &DatabaseConnection, sql: &str, age: Duration) -> Result<Option<u64>, DbErr> {
    let txn = db.begin().await?;
    let locked = txn
        .query_one_raw(stmt("SELECT pg_try_advisory_xact_lock($1) AS locked", [RETENTION_LOCK.into()]))
        .await?
        .map(|row| row.try_get::<bool>("", "locked"))
        .transpose()?
        .unwrap_or(false);
    if !locked {
        return Ok(None);
    }
    let rows = txn.execute_raw(stmt(sql, [age.as_secs_f64().into(), BATCH.into()])).await?.rows_affected();
    txn.commit().await?;
    Ok(Some(rows))
}
