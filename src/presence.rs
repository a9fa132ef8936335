//! This daemon's presence in Postgres ([`crate::store::presence`]): one task keeps a
//! connection of its own, holds the session's advisory lock and writes the heartbeat every
//! `worker.heartbeat_secs`. Other workers take this one's claims over as soon as that session
//! ends or the heartbeat goes stale, so it is also the daemon's view of the database: a
//! heartbeat that fails says the database is down, or refusing writes (read-only after a
//! failover, tables missing, no privilege), for `/readyz`, a metric and the logs.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{DbErr, RuntimeErr};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{DbFault, classify, presence};
use crate::text;

/// The database as the heartbeat last found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbState {
    /// Not reached yet.
    Starting,
    /// The heartbeat was written.
    Up,
    /// Cannot be reached (or restarting), with why.
    Down(String),
    /// Reached, but refusing writes, with why.
    Refusing(String),
}

impl DbState {
    /// As `/readyz` says it.
    pub fn describe(&self) -> String {
        match self {
            DbState::Starting => "starting".to_owned(),
            DbState::Up => "up".to_owned(),
            DbState::Down(why) => format!("down: {why}"),
            DbState::Refusing(why) => format!("refusing writes: {why}"),
        }
    }
}

/// The handle on the presence task.
/// This daemon's presence: its worker id and what its heartbeat last found. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    worker_id: i64,
    state: Arc<watch::Sender<DbState>>,
    metrics: Metrics,
}

impl Presence {
    /// A presence with a new worker id (random, positive: it is also the advisory lock's
    /// key), not running yet ([`Presence::run`]).
    pub fn new(metrics: Metrics) -> Self {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let worker_id = (i64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) & i64::MAX).max(1);
        metrics.database_writable(false);
        Self { worker_id, state: Arc::new(watch::channel(DbState::Starting).0), metrics }
    }

    pub fn worker_id(&self) -> i64 {
        self.worker_id
    }

    pub fn state(&self) -> DbState {
        self.state.borrow().clone()
    }

    /// Records what was found of the database (by the heartbeat, or by start-up while it
    /// waits for the database), logging each change once.
    pub fn report(&self, new: DbState) {
        self.metrics.database_writable(new == DbState::Up);
        self.state.send_if_modified(|old| {
            if *old == new {
                return false;
            }
            match &new {
                DbState::Up => tracing::info!(worker_id = self.worker_id, "database writable: heartbeat written"),
                DbState::Down(why) => tracing::warn!(error = %why, "database unavailable; retrying"),
                DbState::Refusing(why) => {
                    tracing::error!(error = %why, "the database refuses writes; jobs wait until it accepts them")
                }
                DbState::Starting => {}
            }
            *old = new.clone();
            true
        });
    }

    /// Waits until a heartbeat was written: `false` if `stop` came first.
    pub async fn wait_until_up(&self, stop: &CancellationToken) -> bool {
        let mut state = self.state.subscribe();
        tokio::select! {
            up = state.wait_for(|state| *state == DbState::Up) => up.is_ok(),
            _ = stop.cancelled() => false,
        }
    }

    /// Keeps the presence session and writes the heartbeat every `every` until `stop` is
    /// cancelled, then removes the worker's row and closes the session (which frees its lock).
    pub async fn run(self, options: PgConnectOptions, every: Duration, stop: CancellationToken) {
        let worker_id = self.worker_id;
        let reconnect = || crate::startup::backoff(Duration::from_millis(250), Duration::from_secs(10));
        let mut delays = reconnect();
        while !stop.is_cancelled() {
            let connected = tokio::select! {
                connected = connect(&options, every) => connected,
                _ = stop.cancelled() => return,
            };
            let mut connection = match connected {
                Ok(connection) => connection,
                Err(error) => {
                    self.report(state_of(error));
                    tokio::select! {
                        _ = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            delays = reconnect();
            let mut locked = false;
            // The first heartbeat at once, then every `every`.
            let mut beat = tokio::time::interval(every);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = beat.tick() => {}
                    _ = stop.cancelled() => {
                        let bye = async {
                            let _ = presence::withdraw(&mut connection, worker_id).await;
                            let _ = connection.close().await;
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
                        return;
                    }
                }
                let patience = every.max(Duration::from_secs(2));
                let beat = async {
                    if !locked {
                        locked = presence::lock(&mut connection, worker_id).await?;
                        if !locked {
                            tracing::warn!(
                                worker_id,
                                "an earlier session of this worker still holds its lock (the server has not noticed it \
                                 is gone); trying again at the next heartbeat"
                            );
                        }
                    }
                    presence::heartbeat(&mut connection, worker_id).await
                };
                match tokio::time::timeout(patience, beat).await {
                    Ok(Ok(())) => self.report(DbState::Up),
                    Ok(Err(error)) => {
                        let state = state_of(error);
                        let lost = matches!(state, DbState::Down(_));
                        self.report(state);
                        if lost {
                            break;
                        }
                    }
                    Err(_) => {
                        self.report(DbState::Down("the heartbeat got no answer in time".to_owned()));
                        break;
                    }
                }
            }
        }
    }
}

/// Opens the presence session.
async fn connect(options: &PgConnectOptions, every: Duration) -> Result<PgConnection, sqlx::Error> {
    let patience = every.max(Duration::from_secs(10));
    tokio::time::timeout(patience, PgConnection::connect_with(options)).await.unwrap_or_else(|_| {
        let why = format!("no connection within {patience:?}");
        Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, why)))
    })
}

/// What a failed presence statement says of the database, classified as the jobs' own
/// statements are ([`classify`]).
fn state_of(error: sqlx::Error) -> DbState {
    let why = text::message(&error.to_string());
    match classify(&DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(error)))) {
        DbFault::Outage => DbState::Down(why),
        DbFault::Refusal | DbFault::Data => DbState::Refusing(why),
    }
}
