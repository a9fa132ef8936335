use sea_orm_migration::prelude::*;

/// The job ledger: one row per job id. Claiming a job id is an upsert on the primary key,
/// so a redelivered or duplicate request can never start a second generation while the
/// first one's lease is live, nor store a second row once the job has finished.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE generation_job (
                job_id uuid PRIMARY KEY,
                entity text NOT NULL,
                status text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
                attempts integer NOT NULL DEFAULT 0,
                request jsonb NOT NULL,
                record_id uuid NULL,
                error jsonb NULL,
                usage jsonb NULL,
                responses jsonb NOT NULL DEFAULT '[]'::jsonb,
                claim_token uuid NULL,
                lease_expires_at timestamptz NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now(),
                finished_at timestamptz NULL
            )",
        )
        .await?;
        db.execute_unprepared("CREATE INDEX generation_job_status_idx ON generation_job (status, updated_at)").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared("DROP TABLE generation_job").await?;
        Ok(())
    }
}
