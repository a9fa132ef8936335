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
///   from the row (outbox rows are pruned once published).
/// - `event_outbox.abandoned_at`: an unroutable event given up on.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE worker (
                worker_id bigint PRIMARY KEY,
                hostname text NOT NULL,
                pid integer NOT NULL,
                started_at timestamptz NOT NULL DEFAULT now(),
                seen_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
        db.execute_unprepared(
            "ALTER TABLE generation_job
               ADD COLUMN claimed_by bigint NULL,
               ADD COLUMN takeovers integer NOT NULL DEFAULT 0,
               ADD COLUMN event jsonb NULL,
               ADD COLUMN event_routing_key text NULL",
        )
        .await?;
        // Finished jobs keep the event that was announced for them.
        db.execute_unprepared(
            "UPDATE generation_job job SET event = latest.payload, event_routing_key = latest.routing_key
               FROM (SELECT DISTINCT ON (job_id) job_id, payload, routing_key FROM event_outbox
                      ORDER BY job_id, created_at DESC) latest
              WHERE latest.job_id = job.job_id AND job.status <> 'running'
                AND latest.payload->>'status' = job.status",
        )
        .await?;
        db.execute_unprepared("ALTER TABLE event_outbox ADD COLUMN abandoned_at timestamptz NULL").await?;
        db.execute_unprepared("DROP INDEX event_outbox_pending_idx").await?;
        db.execute_unprepared(
            "CREATE INDEX event_outbox_pending_idx ON event_outbox (created_at)
              WHERE published_at IS NULL AND abandoned_at IS NULL",
        )
        .await?;
        db.execute_unprepared(
            "CREATE INDEX event_outbox_done_idx ON event_outbox (coalesce(published_at, abandoned_at))
              WHERE published_at IS NOT NULL OR abandoned_at IS NOT NULL",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX event_outbox_done_idx").await?;
        db.execute_unprepared("DROP INDEX event_outbox_pending_idx").await?;
        db.execute_unprepared(
            "CREATE INDEX event_outbox_pending_idx ON event_outbox (created_at) WHERE published_at IS NULL",
        )
        .await?;
        db.execute_unprepared("ALTER TABLE event_outbox DROP COLUMN abandoned_at").await?;
        db.execute_unprepared(
            "ALTER TABLE generation_job DROP COLUMN claimed_by, DROP COLUMN takeovers, DROP COLUMN event,
               DROP COLUMN event_routing_key",
        )
        .await?;
        db.execute_unprepared("DROP TABLE worker").await?;
        Ok(())
    }
}
