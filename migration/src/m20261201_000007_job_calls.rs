use sea_orm_migration::prelude::*;

/// What the console and its API read, and what its cancel writes.
///
/// - `generation_job.calls`: each call of the job to the model, in order (model, when, how
///   long, tokens, finish reason, and what was wrong with the answer), beside the raw answers
///   in `responses`. Jobs finished before this migration have none: nothing is backfilled.
/// - An index on `(created_at, job_id)`: the jobs list, newest first, one page after
///   another (keyset pagination), and the counts over the last hour and day.
/// - An index on the request's `replay_of`: a job's page lists the jobs that replayed it.
/// - `generation_job.cancel_requested_at`: an operator asked to cancel the running job; the
///   worker holding it sees it at its next heartbeat (the partial index keeps that look cheap).
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
            "ALTER TABLE generation_job ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz NULL",
        )
        .await?;
        for (index, definition) in [
            ("generation_job_created_idx", "ON generation_job (created_at, job_id)"),
            (
                "generation_job_replay_of_idx",
                "ON generation_job ((request->>'replay_of')) WHERE request->>'replay_of' IS NOT NULL",
            ),
            (
                "generation_job_cancel_idx",
                "ON generation_job (claimed_by) WHERE cancel_requested_at IS NOT NULL AND status = 'running'",
            ),
        ] {
            // A build that failed half-way leaves an invalid index, which `IF NOT EXISTS` would
            // keep: it is dropped first, so that running this again finishes the job.
            db.execute_unprepared(&format!(
                "DO $$ BEGIN
                    IF EXISTS (SELECT 1 FROM pg_index JOIN pg_class ON pg_class.oid = pg_index.indexrelid
                                WHERE pg_class.relname = '{index}' AND NOT pg_index.indisvalid
                                  AND pg_class.relnamespace = current_schema()::regnamespace) THEN
                        DROP INDEX {index};
                    END IF;
                 END $$"
            ))
            .await?;
            db.execute_unprepared(&format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} {definition}")).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for index in ["generation_job_created_idx", "generation_job_replay_of_idx", "generation_job_cancel_idx"] {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}")).await?;
        }
        db.execute_unprepared(
            "ALTER TABLE generation_job DROP COLUMN IF EXISTS calls, DROP COLUMN IF EXISTS cancel_requested_at",
        )
        .await?;
        Ok(())
    }
}
