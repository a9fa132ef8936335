//! The operator's endpoint on `http.listen`:
//! - `/healthz` — liveness: 200 while the process can do its work; 503 once it has been
//!   without a RabbitMQ session for longer than `broker.max_disconnected_secs`, so that an
//!   orchestrator restarts a daemon whose reconnection keeps failing;
//! - `/readyz` — readiness: 200 only with a broker session, a database that takes writes
//!   (the heartbeat's), a provider whose circuit is not open, and no shutdown under way; 503
//!   otherwise, with what failed;
//! - `/metrics` — Prometheus text format ([`crate::metrics`]);
//! - with `http.console`, the console and its API ([`crate::console`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::llm::Providers;
use crate::llm::circuit::CircuitState;
use crate::metrics::Metrics;
use crate::presence::{DbState, Presence};

/// What the probes report on, shared by the broker supervisor (which updates it) and the
/// HTTP handlers (which read it).
pub struct Health {
    link: Mutex<Link>,
    max_disconnected: Duration,
    /// The database, as the heartbeat found it.
    presence: Presence,
    /// The providers' circuits.
    llm: Providers,
    /// Cancelled when the daemon stops taking jobs.
    draining: CancellationToken,
    metrics: Metrics,
}

#[derive(Debug, Clone, Copy)]
enum Link {
    /// The daemon is not trying yet (it waits for the database first): not a broker
    /// outage, so liveness holds.
    NotStarted,
    Connected,
    /// Without a broker session since then (start-up counts as disconnected).
    Disconnected(Instant),
}

/// The readiness checks, as `/readyz` reports them.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub broker: bool,
    pub database: DbState,
    /// The best of the providers' circuits: work goes on while one of them takes calls
    /// (the others' models fall back to it, or wait).
    pub llm: CircuitState,
    /// Each provider's circuit (`default` first).
    pub providers: Vec<(String, CircuitState)>,
    pub draining: bool,
}

impl Readiness {
    /// Ready to work: a broker session, a database that takes writes, a provider whose circuit
    /// is not open, and no shutdown under way.
    pub fn ready(&self) -> bool {
        self.broker && self.database == DbState::Up && self.llm == CircuitState::Closed && !self.draining
    }
}

impl Health {
    pub fn new(
        presence: Presence,
        llm: Providers,
        max_disconnected: Duration,
        draining: CancellationToken,
        metrics: Metrics,
    ) -> Self {
        metrics.broker_connected(false);
        Self { link: Mutex::new(Link::NotStarted), max_disconnected, presence, llm, draining, metrics }
    }

    /// Records whether a broker session is up (consuming and able to publish).
    pub fn set_broker_connected(&self, connected: bool) {
        let mut link = self.link.lock().expect("the health lock is never poisoned");
        *link = match (connected, *link) {
            (true, _) => Link::Connected,
            (false, Link::Disconnected(since)) => Link::Disconnected(since),
            (false, Link::Connected | Link::NotStarted) => Link::Disconnected(Instant::now()),
        };
        self.metrics.broker_connected(connected);
    }

    fn link(&self) -> Link {
        *self.link.lock().expect("the health lock is never poisoned")
    }

    /// Alive unless cut off from the broker for too long. (A database or provider outage
    /// does not fail it: jobs wait for them, and a restart would not help.)
    pub fn alive(&self) -> bool {
        match self.link() {
            Link::Connected | Link::NotStarted => true,
            Link::Disconnected(since) => since.elapsed() <= self.max_disconnected,
        }
    }

    /// The readiness checks, as last observed (the heartbeat writes to the database every
    /// `worker.heartbeat_secs`).
    pub fn readiness(&self) -> Readiness {
        let readiness = Readiness {
            broker: matches!(self.link(), Link::Connected),
            database: self.presence.state(),
            llm: best(self.llm.circuits().into_iter().map(|(_, state)| state)),
            providers: self.llm.circuits().into_iter().map(|(name, state)| (name.to_owned(), state)).collect(),
            draining: self.draining.is_cancelled(),
        };
        self.metrics.ready(readiness.ready());
        readiness
    }
}

/// The circuit that lets the most through: closed, else half-open, else open.
fn best(states: impl Iterator<Item = CircuitState>) -> CircuitState {
    let rank = |state: &CircuitState| match state {
        CircuitState::Closed => 0,
        CircuitState::HalfOpen => 1,
        CircuitState::Open => 2,
    };
    states.min_by_key(rank).unwrap_or(CircuitState::Closed)
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Metrics,
}

/// Binds `http.listen` (at start-up, so that a port in use stops the daemon with a clear error).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("http.listen: cannot listen on {addr}: {e}"))
}

/// Serves the endpoint, and the console's routes when given, until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Metrics,
    console: Option<Router>,
    stop: CancellationToken,
) {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics });
    if let Some(console) = console {
        app = app.merge(console);
    }
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(%error, "the HTTP endpoint failed");
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.health.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let why = format!("no RabbitMQ session for over {:?}\n", state.health.max_disconnected);
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let checks = state.health.readiness();
    let status = if checks.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "ready": checks.ready(),
        "broker": if checks.broker { "up" } else { "down" },
        "database": checks.database.describe(),
        "llm": checks.llm.as_str(),
        "providers": checks.providers.iter().map(|(name, state)| (name.clone(), state.as_str().into())).collect::<serde_json::Map<_, _>>(),
        "draining": checks.draining,
    });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    // Keeps `instructd_ready` current for scrapes even where nothing probes /readyz.
    state.health.readiness();
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
