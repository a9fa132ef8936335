use sea_orm_migration::prelude::*;

/// The transactional outbox: a completion event is written in the same transaction as the
/// entity and the job outcome, and marked published only after the broker confirmed it.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE event_outbox (
                event_id uuid PRIMARY KEY,
                job_id uuid NOT NULL,
                routing_key text NOT NULL,
                correlation_id text NOT NULL,
                reply_to text NULL,
                payload jsonb NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                published_at timestamptz NULL
            )",
        )
        .await?;
        db.execute_unprepared("CREATE INDEX event_outbox_job_idx ON event_outbox (job_id, created_at)").await?;
        // The relay scans only what is still pending.
        db.execute_unprepared(
            "CREATE INDEX event_outbox_pending_idx ON event_outbox (created_at) WHERE published_at IS NULL",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("DROP TABLE event_outbox").await?;
        Ok(())
    }
}
