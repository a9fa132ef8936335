use sea_orm_migration::prelude::*;

/// Crash takeover in seconds, and what retention needs.
///
/// - `worker`: one row per running daemon, its heartbeat written every second. A daemon also
///   holds a Postgres advisory lock keyed by its `worker_id` for as long as its session lives,
///   so a killed daemon's claims are seen as abandoned at once, and a frozen or unreachable one's
///   once its heartbeat is stale.
/// - `generation_job.claimed_by`: the worker holding a running job's claim (replaces the
///   per-job lease, which every running job had to renew); `takeovers`: how often the claim was
///   taken from a worker that was gone (the job's poison count, which survives deferrals);
///   `event` and `event_routing_key`: the completion event as announced, to answer duplicates
///   from the row (outbox rows are pruned once published). Jobs finished before this migration
///   are answered from their outbox rows instead: nothing is backfilled.
/// - `event_outbox.abandoned_at`: an unroutable event given up on.
///
/// Not in a transaction, so that the indexes are built without blocking writes
/// (`CONCURRENTLY`) on an installation whose outbox was never pruned; every statement may run
/// again if one fails.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS worker (
                worker_id bigint PRIMARY KEY,
                hostname text NOT NULL,
                pid integer NOT NULL,
                started_at timestamptz NOT NULL DEFAULT now(),
                seen_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
        // Constant defaults: no table rewrite.
        db.execute_unprepared(
            "ALTER TABLE generation_job
               ADD COLUMN IF NOT EXISTS claimed_by bigint NULL,
               ADD COLUMN IF NOT EXISTS takeovers integer NOT NULL DEFAULT 0,
               ADD COLUMN IF NOT EXISTS event jsonb NULL,
               ADD COLUMN IF NOT EXISTS event_routing_key text NULL",
        )
        .await?;
        db.execute_unprepared("ALTER TABLE event_outbox ADD COLUMN IF NOT EXISTS abandoned_at timestamptz NULL")
            .await?;
        // Pruning: events published or given up on, by when.
        db.execute_unprepared(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS event_outbox_done_idx
                ON event_outbox (coalesce(published_at, abandoned_at))
             WHERE published_at IS NOT NULL OR abandoned_at IS NOT NULL",
        )
        .await?;
        // Giving up on unroutable events without reading a broker outage's whole backlog.
        db.execute_unprepared(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS event_outbox_unroutable_idx ON event_outbox (created_at)
             WHERE published_at IS NULL AND abandoned_at IS NULL AND last_error IS NOT NULL",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS event_outbox_unroutable_idx").await?;
        db.execute_unprepared("DROP INDEX IF EXISTS event_outbox_done_idx").await?;
        db.execute_unprepared("ALTER TABLE event_outbox DROP COLUMN IF EXISTS abandoned_at").await?;
        db.execute_unprepared(
            "ALTER TABLE generation_job DROP COLUMN IF EXISTS claimed_by, DROP COLUMN IF EXISTS takeovers,
               DROP COLUMN IF EXISTS event, DROP COLUMN IF EXISTS event_routing_key",
        )
        .await?;
        db.execute_unprepared("DROP TABLE IF EXISTS worker").await?;
        Ok(())
    }
}
