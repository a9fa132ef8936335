//! The advisory lock that serialises migrations: replicas that start together (a
//! Deployment's pods, the migration Job) take turns, rather than race to create the same
//! tables. It is session-level, so it is taken on a connection of its own (a pool of one),
//! and it ends with that session, even if the process dies.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

use super::stmt;

/// The lock's key ("instrucd" in ASCII).
const MIGRATION_LOCK: i64 = 0x696e_7374_7275_6364;

/// Takes the lock if it is free: never waits in Postgres. (A session blocked in
/// `pg_advisory_lock` holds a snapshot, which a migration building an index `CONCURRENTLY`
/// would wait for, while that session waits for the migration: a deadlock Postgres cannot
/// see.)
pub async fn try_lock(session: &DatabaseConnection) -> Result<bool, DbErr> {
    let row = session.query_one_raw(stmt("SELECT pg_try_advisory_lock($1) AS locked", [MIGRATION_LOCK.into()])).await?;
    Ok(row.map(|row| row.try_get::<bool>("", "locked")).transpose()?.unwrap_or(false))
}

/// Releases the lock.
pub async fn unlock(session: &DatabaseConnection) -> Result<(), DbErr> {
    session.execute_raw(stmt("SELECT pg_advisory_unlock($1)", [MIGRATION_LOCK.into()])).await?;
    Ok(())
}
