//! The console's JSON API, documented in `docs/openapi.json`:
//! - `GET /api/jobs`: a page of jobs, newest first, filtered (`status`, `entity`, `model`,
//!   `error_kind`, `since`, `until`, `q`), `limit` long, `after` the previous page's `next`;
//! - `GET /api/jobs/counts`: how many jobs the filter matches, by status and by entity;
//! - `GET /api/jobs/{job_id}`: everything recorded of one job.
//!
//! A bad parameter is a 400 naming it; an unknown job a 404; a database that cannot answer a
//! 503. Every error is `{"error": "…"}`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use sea_orm::DbErr;
use uuid::Uuid;

use super::Console;
use crate::store::jobs::{self, BadFilter, JobFilter, ListQuery};

/// The query string as name and value pairs, in order.
pub type Params = Query<Vec<(String, String)>>;

/// Why an API call has no answer.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(BadFilter),
    NotFound(String),
    Database(DbErr),
}

impl From<BadFilter> for ApiError {
    fn from(bad: BadFilter) -> Self {
        Self::BadRequest(bad)
    }
}

impl From<DbErr> for ApiError {
    fn from(error: DbErr) -> Self {
        Self::Database(error)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the caller is told (a database error's text names no secret: sqlx never shows
    /// the URL's password).
    pub fn message(&self) -> String {
        match self {
            Self::BadRequest(bad) => bad.to_string(),
            Self::NotFound(what) => what.clone(),
            Self::Database(error) => crate::text::message(&format!("the database did not answer: {error}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Database(error) = &self {
            tracing::warn!(%error, "a console query failed");
        }
        (self.status(), Json(serde_json::json!({ "error": self.message() }))).into_response()
    }
}

/// The pairs of a query string as `&str`s.
pub fn pairs(params: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> + Clone {
    params.iter().map(|(name, value)| (name.as_str(), value.as_str()))
}

/// A job id from a path.
pub fn job_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text).map_err(|_| ApiError::BadRequest(BadFilter::new("job_id", "not a UUID")))
}

pub async fn list_jobs(State(console): State<Console>, Query(params): Params) -> Result<Response, ApiError> {
    let query = ListQuery::parse(pairs(&params), Utc::now())?;
    let page = jobs::list(&console.db, &query.filter, query.after, query.limit).await?;
    Ok(Json(page).into_response())
}

pub async fn count_jobs(State(console): State<Console>, Query(params): Params) -> Result<Response, ApiError> {
    let filter = JobFilter::parse(pairs(&params), Utc::now())?;
    Ok(Json(jobs::count(&console.db, &filter).await?).into_response())
}

pub async fn show_job(State(console): State<Console>, Path(job_id): Path<String>) -> Result<Response, ApiError> {
    let job_id = self::job_id(&job_id)?;
    match jobs::get(&console.db, job_id).await? {
        Some(job) => Ok(Json(job).into_response()),
        None => Err(ApiError::NotFound(format!("no job {job_id}"))),
    }
}
