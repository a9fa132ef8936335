//! A daemon's presence in Postgres, on a connection of its own (not the pool, which may
//! recycle a connection and with it the lock): a row in `worker` whose `seen_at` is its
//! heartbeat, and a session-level advisory lock keyed by its `worker_id`, held for as long
//! as the session lives. Claims name their worker (`generation_job.claimed_by`); see
//! [`super::claims`] for how a live claim is told from an abandoned one.

use sqlx::postgres::PgConnection;

/// Takes this worker's advisory lock on `connection`: its session's, released when the
/// session ends, however it ends (a killed process's socket is closed by its kernel).
/// Without waiting: `false` if another session holds it — an earlier session of this worker
/// whose end the server has not noticed yet (the network was cut), which keeps its claims
/// live meanwhile just as well.
pub async fn lock(connection: &mut PgConnection, worker_id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(worker_id).fetch_one(connection).await
}

/// Writes the worker's heartbeat (its row again, should it have been pruned meanwhile).
pub async fn heartbeat(connection: &mut PgConnection, worker_id: i64) -> Result<(), sqlx::Error> {
    let hostname = hostname();
    sqlx::query(
        "INSERT INTO worker (worker_id, hostname, pid) VALUES ($1, $2, $3)
         ON CONFLICT (worker_id) DO UPDATE SET seen_at = now()",
    )
    .bind(worker_id)
    .bind(hostname)
    .bind(std::process::id() as i32)
    .execute(connection)
    .await?;
    Ok(())
}

/// Removes the worker's row on a clean exit: its claims (there should be none left) are
/// free at once.
pub async fn withdraw(connection: &mut PgConnection, worker_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM worker WHERE worker_id = $1").bind(worker_id).execute(connection).await?;
    Ok(())
}

/// The machine's name, for operators reading the `worker` table.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}
