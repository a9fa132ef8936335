//! The console: every job and what happened to it, for operators, on `http.listen` beside the
//! probes (`http.console`).
//!
//! - [`api`]: the JSON API (`/api/jobs…`, `/api/dead-letters…`), documented in
//!   `docs/openapi.json`;
//! - [`pages`]: the same as server-rendered HTML (`/`, `/jobs`, `/jobs/{job_id}`,
//!   `/dead-letters`) with forms for the actions, every text from a request or a model escaped;
//! - [`actions`]: replay, cancel, and the dead letters' replay and purge, whoever asks; [`broker`]:
//!   the console's own connection to RabbitMQ for them;
//! - [`access`]: who may read and who may act.
//!
//! Both read the ledger through [`crate::store::jobs`], as `instructd jobs` does.

pub mod access;
pub mod actions;
pub mod api;
pub mod broker;
pub mod pages;

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::routing::{get, post};
use sea_orm::DatabaseConnection;

use crate::config::Settings;
use crate::http::Health;
use crate::metrics::Metrics;
use access::Access;
use actions::Actions;

/// What the console's handlers share.
#[derive(Clone)]
pub struct Console {
    pub(crate) db: DatabaseConnection,
    pub(crate) health: Arc<Health>,
    pub(crate) access: Arc<Access>,
    /// The application's entities, for the filters.
    pub(crate) entities: Arc<[&'static str]>,
    pub(crate) actions: Arc<Actions>,
}

impl Console {
    pub fn new(
        db: DatabaseConnection,
        health: Arc<Health>,
        access: Access,
        entities: Vec<&'static str>,
        settings: Arc<Settings>,
        metrics: Metrics,
    ) -> Self {
        let actions = Arc::new(Actions::new(db.clone(), settings, metrics, entities.clone()));
        Self { db, health, access: Arc::new(access), entities: entities.into(), actions }
    }

    /// The console's routes: the sign-in page is open; the pages, their forms and the API's
    /// reads need a caller who may read ([`access::require_reader`]; a form's action then
    /// checks its CSRF token); the API's actions need the bearer token
    /// ([`access::require_admin`]).
    pub fn router(self) -> Router {
        let reads = Router::new()
            .route("/", get(pages::overview))
            .route("/jobs", get(pages::jobs))
            .route("/jobs/replay", post(pages::replay_jobs))
            .route("/jobs/{job_id}", get(pages::job))
            .route("/jobs/{job_id}/replay", post(pages::replay_job))
            .route("/jobs/{job_id}/cancel", post(pages::cancel_job))
            .route("/dead-letters", get(pages::dead_letters))
            .route("/dead-letters/replay", post(pages::replay_dead_letters))
            .route("/dead-letters/purge", post(pages::purge_dead_letters))
            .route("/api/jobs", get(api::list_jobs))
            .route("/api/jobs/counts", get(api::count_jobs))
            .route("/api/jobs/{job_id}", get(api::show_job))
            .route("/api/dead-letters", get(api::list_dead_letters))
            .route_layer(middleware::from_fn_with_state(self.clone(), access::require_reader));
        let acts = Router::new()
            .route("/api/jobs/replay", post(api::replay_jobs))
            .route("/api/jobs/{job_id}/replay", post(api::replay_job))
            .route("/api/jobs/{job_id}/cancel", post(api::cancel_job))
            .route("/api/dead-letters/replay", post(api::replay_dead_letters))
            .route("/api/dead-letters/purge", post(api::purge_dead_letters))
            .route_layer(middleware::from_fn_with_state(self.clone(), access::require_admin));
        Router::new()
            .route("/login", get(pages::login_form).post(pages::login))
            .merge(reads)
            .merge(acts)
            .with_state(self)
    }
}
