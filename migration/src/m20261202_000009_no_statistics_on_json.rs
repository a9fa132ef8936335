use sea_orm_migration::prelude::*;

/// ANALYZE skips the JSON columns of the job ledger and the outbox (a statistics target of
/// 0): no query plan reads their statistics (the console's filters look inside them, which
/// column statistics do not describe), but gathering them sorted thousands of sampled
/// `jsonb` values on every automatic ANALYZE — a job writes each of these tables twice, so
/// autovacuum analyzes them all the time under load. At 0 ms @ 64 that was a quarter of
/// Postgres' CPU (`perf`: `analyze_rel` → `jsonb_cmp`). The scalar columns (`status`,
/// `created_at`, …), whose statistics plans do use, keep theirs.
///
/// `SET STATISTICS` takes a lock that reads and writes do not wait for, so running replicas
/// go on working while this applies.
#[derive(DeriveMigrationName)]
pub struct Migration;

const JSON_COLUMNS: [(&str, &str); 7] = [
    ("generation_job", "request"),
    ("generation_job", "error"),
    ("generation_job", "usage"),
    ("generation_job", "responses"),
    ("generation_job", "calls"),
    ("generation_job", "event"),
    ("event_outbox", "payload"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_statistics(manager, "0").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_statistics(manager, "-1").await
    }
}

/// Sets every JSON column's statistics target (`-1`: the server's default).
async fn set_statistics(manager: &SchemaManager<'_>, target: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for (table, column) in JSON_COLUMNS {
        db.execute_unprepared(&format!("ALTER TABLE {table} ALTER COLUMN {column} SET STATISTICS {target}")).await?;
    }
    Ok(())
}
