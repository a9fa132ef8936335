use sea_orm_migration::prelude::*;

/// A completion event carries its job's W3C trace context (`traceparent`, `tracestate`) in
/// its AMQP headers, so that a consumer's spans join the trace of the request. The outbox
/// keeps it beside the event, for the relay that sends the event later.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "ALTER TABLE event_outbox
                   ADD COLUMN IF NOT EXISTS traceparent text NULL,
                   ADD COLUMN IF NOT EXISTS tracestate text NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE event_outbox DROP COLUMN traceparent, DROP COLUMN tracestate")
            .await?;
        Ok(())
    }
}
