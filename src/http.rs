//! The operator's endpoint on `http.listen`:
//! - `/healthz` — liveness: 200 while the process can do its work; 503 once it has been
//!   without a RabbitMQ session for longer than `broker.max_disconnected_secs`, so that an
//!   orchestrator restarts a daemon whose reconnection keeps failing;
//! - `/readyz` — readiness: 200 only with a broker session, a reachable database, and no
//!   shutdown under way; 503 otherwise, with what failed;
//! - `/metrics` — Prometheus text format ([`crate::metrics`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// What the probes report on, shared by the broker supervisor (which updates it) and the
/// HTTP handlers (which read it).
pub struct Health {
    link: Mutex<Link>,
    max_disconnected: Duration,
    db: DatabaseConnection,
    /// Cancelled when the daemon stops taking jobs.
    draining: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
enum Link {
    Connected,
    /// Without a broker session since then (start-up counts as disconnected).
    Disconnected(Instant),
}

/// The readiness checks, as `/readyz` reports them.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    pub broker: bool,
    pub database: bool,
    pub draining: bool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.broker && self.database && !self.draining
    }
}

impl Health {
    pub fn new(db: DatabaseConnection, max_disconnected: Duration, draining: CancellationToken) -> Self {
        metrics::broker_connected(false);
        Self { link: Mutex::new(Link::Disconnected(Instant::now())), max_disconnected, db, draining }
    }

    /// Records whether a broker session is up (consuming and able to publish).
    pub fn set_broker_connected(&self, connected: bool) {
        let mut link = self.link.lock().expect("the health lock is never poisoned");
        *link = match (connected, *link) {
            (true, _) => Link::Connected,
            (false, Link::Disconnected(since)) => Link::Disconnected(since),
            (false, Link::Connected) => Link::Disconnected(Instant::now()),
        };
        metrics::broker_connected(connected);
    }

    fn link(&self) -> Link {
        *self.link.lock().expect("the health lock is never poisoned")
    }

    /// Alive unless cut off from the broker for too long.
    pub fn alive(&self) -> bool {
        match self.link() {
            Link::Connected => true,
            Link::Disconnected(since) => since.elapsed() <= self.max_disconnected,
        }
    }

    /// Runs the readiness checks (pings the database, for at most two seconds).
    pub async fn readiness(&self) -> Readiness {
        let database = matches!(tokio::time::timeout(Duration::from_secs(2), self.db.ping()).await, Ok(Ok(())));
        let readiness = Readiness {
            broker: matches!(self.link(), Link::Connected),
            database,
            draining: self.draining.is_cancelled(),
        };
        metrics::ready(readiness.ready());
        readiness
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Binds `http.listen` (at start-up, so that a port in use stops the daemon with a clear error).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("http.listen: cannot listen on {addr}: {e}"))
}

/// Serves the endpoint until `stop` is cancelled.
pub async fn serve(listener: TcpListener, health: Arc<Health>, metrics: PrometheusHandle, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics });
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
    let checks = state.health.readiness().await;
    let status = if checks.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "ready": checks.ready(),
        "broker": if checks.broker { "up" } else { "down" },
        "database": if checks.database { "up" } else { "down" },
        "draining": checks.draining,
    });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    // Keeps `instructd_ready` current for scrapes even where nothing probes /readyz.
    state.health.readiness().await;
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
