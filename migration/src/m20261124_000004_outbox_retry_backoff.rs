use sea_orm_migration::prelude::*;

/// Events are published `mandatory`: one that no queue is bound for comes back and stays
/// pending. These columns let the relay back off such an event instead of resending it on
/// every pass, and say why it is still pending.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE event_outbox
                   ADD COLUMN attempts integer NOT NULL DEFAULT 0,
                   ADD COLUMN next_attempt_at timestamptz NULL,
                   ADD COLUMN last_error text NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE event_outbox DROP COLUMN attempts, DROP COLUMN next_attempt_at, DROP COLUMN last_error",
            )
            .await?;
        Ok(())
    }
}
