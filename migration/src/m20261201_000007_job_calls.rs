use sea_orm_migration::prelude::*;

/// What the console and its API read.
///
/// - `generation_job.calls`: each call of the job to the model, in order (model, when, how
///   long, tokens, finish reason, and what was wrong with the answer), beside the raw answers
///   in `responses`. Jobs finished before this migration have none: nothing is backfilled.
/// - An index on `(created_at, job_id)`: the jobs list, newest first, one page after
///   another (keyset pagination), and the counts over the last hour and day.
///
/// Not in a transaction, so that the index is built without blocking writes (`CONCURRENTLY`);
/// every statement may run again if one fails.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        // A constant default: no table rewrite.
        db.execute_unprepared("ALTER TABLE generation_job ADD COLUMN IF NOT EXISTS calls jsonb NOT NULL DEFAULT '[]'")
            .await?;
        db.execute_unprepared(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS generation_job_created_idx ON generation_job (created_at, job_id)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS generation_job_created_idx").await?;
        db.execute_unprepared("ALTER TABLE generation_job DROP COLUMN IF EXISTS calls").await?;
        Ok(())
    }
}
