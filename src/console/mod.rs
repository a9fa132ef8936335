//! The console: every job and what happened to it, for operators, on `http.listen` beside the
//! probes (`http.console`).
//!
//! - [`api`]: the JSON API (`/api/jobs`, `/api/jobs/counts`, `/api/jobs/{job_id}`),
//!   documented in `docs/openapi.json`;
//! - [`pages`]: the same as server-rendered HTML (`/`, `/jobs`, `/jobs/{job_id}`), every text
//!   from a request or a model escaped;
//! - [`access`]: who may read and who may act.
//!
//! Both read the ledger through [`crate::store::jobs`], as `instructd jobs` does.

pub mod access;
pub mod api;
pub mod pages;

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::routing::get;
use sea_orm::DatabaseConnection;

use crate::http::Health;
use access::Access;

/// What the console's handlers share.
#[derive(Clone)]
pub struct Console {
    pub(crate) db: DatabaseConnection,
    pub(crate) health: Arc<Health>,
    pub(crate) access: Arc<Access>,
    /// The application's entities, for the filters.
    pub(crate) entities: Arc<[&'static str]>,
}

impl Console {
    pub fn new(db: DatabaseConnection, health: Arc<Health>, access: Access, entities: Vec<&'static str>) -> Self {
        Self { db, health, access: Arc::new(access), entities: entities.into() }
    }

    /// The console's routes: the sign-in page is open, everything else needs a caller who
    /// may read ([`access::require_reader`]).
    pub fn router(self) -> Router {
        let reads = Router::new()
            .route("/", get(pages::overview))
            .route("/jobs", get(pages::jobs))
            .route("/jobs/{job_id}", get(pages::job))
            .route("/api/jobs", get(api::list_jobs))
            .route("/api/jobs/counts", get(api::count_jobs))
            .route("/api/jobs/{job_id}", get(api::show_job))
            .route_layer(middleware::from_fn_with_state(self.clone(), access::require_reader));
        Router::new().route("/login", get(pages::login_form).post(pages::login)).merge(reads).with_state(self)
    }
}
