//! The console's JSON API, documented in `docs/openapi.json`:
//! - `GET /api/jobs`: a page of jobs, newest first, filtered (`status`, `entity`, `model`,
//!   `error_kind`, `since`, `until`, `q`), `limit` long, `after` the previous page's `next`;
//! - `GET /api/jobs/counts`: how many jobs the filter matches, by status and by entity;
//! - `GET /api/jobs/{job_id}`: everything recorded of one job;
//! - `POST /api/jobs/{job_id}/replay`, `POST /api/jobs/replay` (every finished job the
//!   query's filter matches, up to `limit`): the jobs sent again as new jobs, with optional
//!   overrides in a JSON body (`model`, `max_retries`, `mode`);
//! - `POST /api/jobs/{job_id}/cancel`: a running job abandons its model call and ends with
//!   kind `cancelled`; one waiting for its delivery ends at once;
//! - `GET /api/dead-letters`, `POST /api/dead-letters/replay`, `POST /api/dead-letters/purge`
//!   (a JSON body `{"ids": [...]}` or `{"all": true}`).
//!
//! Actions (`POST`) need the admin token as a bearer token ([`super::access`]).
//!
//! A bad parameter is a 400 naming it; an unknown job a 404; a database that cannot answer a
//! 503. Every error is `{"error": "…"}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use sea_orm::DbErr;
use uuid::Uuid;

use super::Console;
use super::access::Caller;
use super::actions::{ActionError, Overrides, Who};
use super::broker::Which;
use crate::store::jobs::{self, BadFilter, JobFilter, ListQuery};

/// The query string as name and value pairs, in order.
pub type Params = Query<Vec<(String, String)>>;

/// Why an API call has no answer.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(BadFilter),
    NotFound(String),
    /// The job is in a state the action does not apply to.
    Conflict(String),
    Database(DbErr),
    /// RabbitMQ did not take an action's messages.
    Broker(String),
}

impl From<ActionError> for ApiError {
    fn from(error: ActionError) -> Self {
        match error {
            ActionError::BadRequest(bad) => Self::BadRequest(bad),
            ActionError::NotFound(what) => Self::NotFound(what),
            ActionError::Conflict(why) => Self::Conflict(why),
            ActionError::Database(error) => Self::Database(error),
            broker @ ActionError::Broker(_) => Self::Broker(broker.to_string()),
        }
    }
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
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Database(_) | Self::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the caller is told (a database error's text names no secret: sqlx never shows
    /// the URL's password).
    pub fn message(&self) -> String {
        match self {
            Self::BadRequest(bad) => bad.to_string(),
            Self::NotFound(what) | Self::Conflict(what) => what.clone(),
            Self::Broker(why) => crate::text::message(why),
            Self::Database(error) => crate::text::message(&format!("the database did not answer: {error}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Database(error) => tracing::warn!(%error, "a console query failed"),
            Self::Broker(error) => tracing::warn!(%error, "a console action could not reach RabbitMQ"),
            _ => {}
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

/// A JSON body, or its default when there is none.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(BadFilter::new("body", e.to_string())))
}

fn accepted(value: impl serde::Serialize) -> Response {
    (StatusCode::ACCEPTED, Json(value)).into_response()
}

fn who(caller: Caller) -> Who {
    Who(caller.as_str())
}

pub async fn replay_job(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let job_id = self::job_id(&job_id)?;
    let overrides: Overrides = body(&bytes)?;
    Ok(accepted(console.actions.replay(job_id, &overrides, who(caller)).await?))
}

pub async fn replay_jobs(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Query(params): Params,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let filter = JobFilter::parse(pairs(&params), Utc::now())?;
    let limit = match pairs(&params).find(|(name, _)| *name == "limit") {
        None => jobs::DEFAULT_PAGE,
        // Checked against MAX_BULK by the action.
        Some((_, value)) => value.trim().parse().unwrap_or(0),
    };
    let overrides: Overrides = body(&bytes)?;
    let replayed = console.actions.replay_matching(&filter, limit, &overrides, who(caller)).await?;
    Ok(accepted(serde_json::json!({ "replayed": replayed })))
}

/// `POST /api/jobs/{job_id}/cancel[?queued=true]`.
pub async fn cancel_job(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let job_id = self::job_id(&job_id)?;
    let queued = match pairs(&params).find(|(name, _)| *name == "queued").map(|(_, value)| value) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::BadRequest(BadFilter::new("queued", "must be true or false"))),
    };
    Ok(accepted(console.actions.cancel(job_id, queued, who(caller)).await?))
}

/// `GET /api/dead-letters?limit=N` (50 by default, at most 500).
pub async fn list_dead_letters(State(console): State<Console>, Query(params): Params) -> Result<Response, ApiError> {
    let limit = match pairs(&params).find(|(name, _)| *name == "limit") {
        None => jobs::DEFAULT_PAGE,
        Some((_, value)) => {
            value.parse().ok().filter(|limit| (1..=super::broker::MAX_LISTED).contains(limit)).ok_or_else(|| {
                BadFilter::new("limit", format!("must be a whole number from 1 to {}", super::broker::MAX_LISTED))
            })?
        }
    };
    Ok(Json(console.actions.dead_letters(limit).await?).into_response())
}

/// Which dead letters a body names: `{"ids": [...]}` or `{"all": true}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

impl Selection {
    pub fn which(self) -> Result<Which, BadFilter> {
        match (self.all, self.ids.is_empty()) {
            (true, true) => Ok(Which::All),
            (false, false) => Ok(Which::Ids(self.ids.into_iter().collect())),
            (true, false) => Err(BadFilter::new("body", "name either `ids` or `all`, not both")),
            (false, true) => {
                Err(BadFilter::new("body", "name the dead letters: `{\"ids\": [...]}` or `{\"all\": true}`"))
            }
        }
    }
}

pub async fn replay_dead_letters(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let which = body::<Selection>(&bytes)?.which()?;
    let moved = console.actions.replay_dead_letters(&which, who(caller)).await?;
    Ok(Json(serde_json::json!({ "replayed": moved })).into_response())
}

pub async fn purge_dead_letters(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let which = body::<Selection>(&bytes)?.which()?;
    Ok(Json(console.actions.purge_dead_letters(&which, who(caller)).await?).into_response())
}
