//! The console's pages, rendered on the server (maud): the overview (`/`), the jobs list with
//! the API's filters (`/jobs`), a job (`/jobs/{job_id}`: the conversation, each attempt's
//! answer beside what was wrong with it, the record, usage, events), and the sign-in page.
//!
//! Every text a requester or a model wrote is interpolated with maud's `( … )`, which
//! escapes it: nothing from a job is ever written as markup. No script runs on any page.

use axum::Form;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, TimeDelta, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use serde_json::Value;

use super::Console;
use super::access::{Caller, SESSION_COOKIE};
use super::actions::{Overrides, Who};
use super::api::{ApiError, Params, Selection, job_id, pairs};
use super::broker::Which;
use crate::contract::ErrorKind;
use crate::store::jobs::{self, CallView, JobCounts, JobDetail, JobFilter, JobSummary, ListQuery, STATUSES};
use crate::store::outbox;

const STYLE: &str = "
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
nav{background:#1d2330;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
nav a{color:#e8ebf1;text-decoration:none;font-weight:600}nav .who{margin-left:auto;color:#9aa3b5;font-size:12px}
main{padding:1em 1.4em;max-width:1280px}h1{font-size:20px}h2{font-size:16px;margin-top:1.6em}
table{border-collapse:collapse;background:#fff;width:100%}td,th{border:1px solid #dfe3ea;padding:.35em .55em;
text-align:left;vertical-align:top}th{background:#eef1f5}pre{white-space:pre-wrap;word-break:break-word;margin:0;
font:12px/1.4 ui-monospace,monospace}.badge{padding:.1em .5em;border-radius:.7em;font-size:12px;font-weight:600}
.succeeded{background:#d9f2e0;color:#176131}.failed{background:#fbe0e0;color:#8a1c1c}.running{background:#e0e9fb;
color:#1d3f8a}.error{background:#fff4f4;border:1px solid #f0c4c4;padding:.6em}.ok{background:#f3fbf5;border:1px
solid #c4e8cf;padding:.6em}.attempt{display:grid;grid-template-columns:1fr 1fr;gap:.8em}.box{background:#fff;
border:1px solid #dfe3ea;padding:.7em;margin:.5em 0}form.filters{display:flex;flex-wrap:wrap;gap:.6em;margin:.6em 0}
.muted{color:#6b7487}dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
.role{font-weight:600;text-transform:uppercase;font-size:11px;color:#6b7487}form.inline{display:inline}";

/// A whole page around `body`.
fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · instructd" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                nav {
                    a href="/" { "instructd" }
                    a href="/jobs" { "Jobs" }
                    a href="/jobs?status=failed" { "Failed" }
                    a href="/dead-letters" { "Dead letters" }
                    a href="/api/jobs" { "API" }
                }
                main { (body) }
            }
        }
    }
}

/// A page as a response, marked not to be cached or framed.
fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    let headers = [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // No script, style only inline, images only from here: a job's text stays text.
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'",
        ),
    ];
    (status, headers, Html(layout(title, body).into_string())).into_response()
}

/// A page that says why it has nothing to show.
fn problem(error: ApiError) -> Response {
    let status = error.status();
    if let ApiError::Database(error) = &error {
        tracing::warn!(%error, "a console query failed");
    }
    page(status, "Error", html! { h1 { "Error" } p.error { (error.message()) } })
}

/// The hidden field every action's form carries: the CSRF token, for a caller who may act.
fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// What a caller who may not act sees instead of an action's button.
fn sign_in_to_act(console: &Console) -> Markup {
    html! {
        @if console.access.has_token() {
            p.muted { a href="/login" { "Sign in" } " with the admin token to act." }
        } @else {
            p.muted { "Actions need an admin token (http.admin_token_file)." }
        }
    }
}

/// The CSRF token for a caller who may act through forms, else `None`.
fn form_token(console: &Console, caller: Caller) -> Option<String> {
    match caller {
        Caller::Admin | Caller::Session => console.access.csrf_token(),
        Caller::Local => None,
    }
}

/// The refusal of a form posted without the right to act.
fn forbidden() -> Response {
    let body = html! {
        h1 { "Not allowed" }
        p.error { "This needs the admin token: " a href="/login" { "sign in" } ", then use the form again." }
    };
    page(StatusCode::FORBIDDEN, "Not allowed", body)
}

fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn badge(status: &str) -> Markup {
    html! { span class={ "badge " (status) } { (status) } }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn counts_table(counts: &JobCounts) -> Markup {
    html! {
        table {
            tr { th { "entity" } @for status in STATUSES { th { (status) } } th { "total" } }
            @for (entity, by_status) in &counts.by_entity {
                tr {
                    td { a href={ "/jobs?entity=" (entity) } { (entity) } }
                    @for status in STATUSES { td { (by_status.get(status).copied().unwrap_or(0)) } }
                    td { (by_status.values().sum::<i64>()) }
                }
            }
            tr {
                th { "all" }
                @for status in STATUSES { th { (counts.by_status.get(status).copied().unwrap_or(0)) } }
                th { (counts.total) }
            }
        }
    }
}

/// `/`: jobs by status and entity over the last hour and day, what is in flight, the
/// daemon's links to its services, and the events waiting to be published.
pub async fn overview(State(console): State<Console>) -> Response {
    let now = Utc::now();
    let since = |age: TimeDelta| JobFilter { since: Some(now - age), ..JobFilter::default() };
    let hour = jobs::count(&console.db, &since(TimeDelta::hours(1))).await;
    let day = jobs::count(&console.db, &since(TimeDelta::days(1))).await;
    let running = jobs::count_running(&console.db).await;
    let pending = outbox::count_pending(&console.db).await;
    let (hour, day, running, pending) = match (hour, day, running, pending) {
        (Ok(hour), Ok(day), Ok(running), Ok(pending)) => (hour, day, running, pending),
        (Err(error), ..) | (_, Err(error), ..) | (_, _, Err(error), _) | (.., Err(error)) => {
            return problem(error.into());
        }
    };
    let readiness = console.health.readiness();
    // The broker may be down while the database answers: the overview still shows the rest.
    let dead_letters = match console.actions.dead_letter_count().await {
        Ok(count) => html! { a href="/dead-letters" { (count) " in the dead-letter queue" } },
        Err(error) => html! { span.muted { "unknown: " (error.to_string()) } },
    };
    let body = html! {
        h1 { "Overview" }
        dl {
            dt { "In flight" } dd { a href="/jobs?status=running" { (running) " running" } }
            dt { "Broker" } dd { @if readiness.broker { "connected" } @else { "disconnected" } }
            dt { "Database" } dd { (readiness.database.describe()) }
            @if readiness.providers.len() == 1 {
                dt { "Provider circuit" } dd { (readiness.llm.as_str()) }
            } @else {
                dt { "Provider circuits" }
                dd { @for (index, (name, state)) in readiness.providers.iter().enumerate() {
                    @if index > 0 { ", " } (name) ": " (state.as_str())
                } }
            }
            dt { "Events waiting" } dd { (pending) " in the outbox" }
            dt { "Dead letters" } dd #dead-letter-count { (dead_letters) }
            @if readiness.draining { dt { "Draining" } dd { "shutting down: taking no new jobs" } }
        }
        h2 { "Last hour" }
        (counts_table(&hour))
        p { a href="/jobs?since=1h&status=failed" { "Failed in the last hour →" } }
        h2 { "Last day" }
        (counts_table(&day))
        p { a href="/jobs?since=24h&status=failed" { "Failed in the last day →" } }
    };
    page(StatusCode::OK, "Overview", body)
}

/// `/jobs`: the jobs list, with the API's filters and pages.
pub async fn jobs(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Query(params): Params,
) -> Response {
    let query = match ListQuery::parse(pairs(&params), Utc::now()) {
        Ok(query) => query,
        Err(bad) => return problem(bad.into()),
    };
    let listed = jobs::list(&console.db, &query.filter, query.after, query.limit).await;
    let counted = jobs::count(&console.db, &query.filter).await;
    let (page_of_jobs, counts) = match (listed, counted) {
        (Ok(listed), Ok(counted)) => (listed, counted),
        (Err(error), _) | (_, Err(error)) => return problem(error.into()),
    };
    // The form shows the filter as it was typed (an age stays an age).
    let typed = |name: &str| {
        params.iter().rev().find(|(param, _)| param == name).map(|(_, value)| value.as_str()).unwrap_or_default()
    };
    let next = page_of_jobs.next.as_ref().map(|after| {
        let mut link = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &params {
            if name != "after" {
                link.append_pair(name, value);
            }
        }
        format!("/jobs?{}", link.append_pair("after", after).finish())
    });
    let filter = &query.filter;
    let replay_all = {
        let mut link = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in filter.params() {
            link.append_pair(name, &value);
        }
        format!("/jobs/replay?{}", link.finish())
    };
    let body = html! {
        h1 { "Jobs" }
        form.filters method="get" action="/jobs" {
            label { "Status " select name="status" {
                option value="" { "any" }
                @for status in STATUSES { option value=(status) selected[filter.status == Some(status)] { (status) } }
            } }
            label { "Entity " select name="entity" {
                option value="" { "any" }
                @for entity in console.entities.iter() {
                    option value=(entity) selected[filter.entity.as_deref() == Some(*entity)] { (entity) }
                }
            } }
            label { "Error " select name="error_kind" {
                option value="" { "any" }
                @for kind in ErrorKind::ALL {
                    option value=(kind.as_str()) selected[filter.error_kind == Some(kind)] { (kind.as_str()) }
                }
            } }
            label { "Model " input type="text" name="model" size="14" value=(typed("model")); }
            label { "Since " select name="since" {
                option value="" { "any time" }
                @for age in ["15m", "1h", "24h", "7d", "30d"] {
                    option value=(age) selected[typed("since") == age] { (age) " ago" }
                }
            } }
            label { "Text " input type="search" name="q" size="24" value=(typed("q")) placeholder="in the request or metadata"; }
            button type="submit" { "Filter" }
        }
        p.muted {
            (counts.total) " jobs"
            @for (status, count) in &counts.by_status { " · " (count) " " (status) }
        }
        (jobs_table(&page_of_jobs.jobs))
        @if let Some(next) = next { p { a href=(next) { "Older →" } } }
        h2 { "Replay" }
        @if let Some(csrf) = form_token(&console, caller) {
            form #replay-matching method="post" action=(replay_all) {
                (csrf_field(&csrf))
                "Send every finished job of this filter again, as new jobs (newest first, at most "
                input type="number" name="limit" min="1" max=(super::actions::MAX_BULK) value=(counts.total.clamp(1, i64::from(super::actions::MAX_BULK)));
                "): "
                button type="submit" { "Replay matching jobs" }
            }
        } @else {
            (sign_in_to_act(&console))
        }
    };
    page(StatusCode::OK, "Jobs", body)
}

fn jobs_table(list: &[JobSummary]) -> Markup {
    html! {
        table #jobs {
            tr { th { "created" } th { "job" } th { "entity" } th { "status" } th { "attempts" } th { "model" } th { "error" } }
            @for job in list {
                tr {
                    td { (time(&job.created_at)) }
                    td { a href={ "/jobs/" (job.job_id) } { code { (job.job_id) } } }
                    td {
                        @if job.entity.is_empty() { span.muted { "not taken from the queue yet" } } @else { (job.entity) }
                    }
                    td { (badge(&job.status)) }
                    td { (job.attempts) }
                    td { (job.models.join(", ")) }
                    td {
                        @if let Some(error) = &job.error {
                            b { (error["kind"].as_str().unwrap_or("")) } " "
                            (crate::text::quoted_within(error["message"].as_str().unwrap_or(""), 160))
                        }
                    }
                }
            }
            @if list.is_empty() { tr { td colspan="7" .muted { "No job matches." } } }
        }
    }
}

/// `/jobs/{job_id}`: everything recorded of one job.
pub async fn job(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let job_id = match job_id(&id) {
        Ok(job_id) => job_id,
        Err(error) => return problem(error),
    };
    match jobs::get(&console.db, job_id).await {
        Ok(Some(job)) => {
            let actions = job_actions(&console, caller, &job);
            page(StatusCode::OK, &format!("Job {job_id}"), job_page(&job, actions))
        }
        Ok(None) => problem(ApiError::NotFound(format!("no job {job_id}"))),
        Err(error) => problem(error.into()),
    }
}

/// The job's buttons: cancel (a running job) or replay (a finished one), for a caller who
/// may act.
fn job_actions(console: &Console, caller: Caller, job: &JobDetail) -> Markup {
    let job_id = job.summary.job_id;
    html! {
        h2 { "Actions" }
        @if let Some(csrf) = form_token(console, caller) {
            @if job.summary.status == "running" {
                form #cancel method="post" action={ "/jobs/" (job_id) "/cancel" } {
                    (csrf_field(&csrf))
                    button type="submit" { "Cancel the job" }
                }
            } @else {
                form #replay method="post" action={ "/jobs/" (job_id) "/replay" } {
                    (csrf_field(&csrf))
                    label { "Model " input type="text" name="model" size="16" placeholder="as before"; }
                    " "
                    label { "Re-asks " input type="number" name="max_retries" min="0" size="3" placeholder="as before"; }
                    " "
                    button type="submit" { "Replay as a new job" }
                }
            }
        } @else {
            (sign_in_to_act(console))
        }
    }
}

/// The job's page, `actions` (its buttons) under its summary.
fn job_page(job: &JobDetail, actions: Markup) -> Markup {
    let summary = &job.summary;
    let usage = summary.usage.as_ref();
    let record = job.event.as_ref().and_then(|event| event.get("record")).filter(|record| !record.is_null());
    html! {
        h1 { "Job " code { (summary.job_id) } " " (badge(&summary.status)) }
        dl {
            dt { "Entity" } dd { (summary.entity) }
            dt { "Model" } dd { (summary.models.join(", ")) }
            dt { "Attempts" } dd { (summary.attempts) }
            dt { "Created" } dd { (time(&summary.created_at)) }
            dt { "Finished" } dd { @if let Some(at) = &summary.finished_at { (time(at)) } @else { "—" } }
            @if let Some(record_id) = summary.record_id { dt { "Record" } dd { code { (record_id) } } }
            @if let Some(usage) = usage {
                dt { "Tokens" } dd {
                    (usage["prompt_tokens"]) " in, " (usage["completion_tokens"]) " out"
                    @if let Some(cached) = usage.get("cached_tokens") { " (" (cached) " cached)" }
                }
                @if let Some(cost) = usage.get("cost_usd") { dt { "Cost" } dd { "$" (cost) } }
            }
            @if let Some(original) = summary.replay_of {
                dt { "Replays" } dd { a href={ "/jobs/" (original) } { code { (original) } } }
            }
            @if !job.replays.is_empty() {
                dt { "Replayed as" } dd {
                    @for replay in &job.replays {
                        a href={ "/jobs/" (replay.job_id) } { code { (replay.job_id) } } " " (badge(&replay.status)) br;
                    }
                }
            }
            @if let Some(at) = &job.cancel_requested_at { dt { "Cancel asked" } dd { (time(at)) } }
            @if job.takeovers > 0 { dt { "Taken over" } dd { (job.takeovers) " time(s)" } }
            @if let Some(worker) = job.claimed_by { dt { "Held by worker" } dd { (worker) } }
        }
        @if let Some(error) = &summary.error {
            div.error #job-error {
                b { (error["kind"].as_str().unwrap_or("error")) } ": "
                (error["message"].as_str().unwrap_or(""))
            }
        }
        (actions)
        h2 { "Conversation" }
        (conversation(&job.request))
        h2 { "Attempts" }
        @if job.calls.is_empty() { p.muted { "No call to the model." } }
        @for call in &job.calls { (attempt(call, job)) }
        @if let Some(record) = record {
            h2 { "Record" }
            div.box #record { pre { (pretty(record)) } }
        }
        h2 { "Events" }
        @if let Some(routing_key) = &job.event_routing_key { p { "Announced as " code { (routing_key) } } }
        @if !job.events.is_empty() {
            table {
                tr { th { "event" } th { "routing key" } th { "created" } th { "published" } th { "unroutable tries" } th { "last error" } }
                @for event in &job.events {
                    tr {
                        td { code { (event.event_id) } }
                        td { (event.routing_key) }
                        td { (time(&event.created_at)) }
                        td {
                            @if let Some(at) = &event.published_at { (time(at)) }
                            @else if event.abandoned_at.is_some() { "given up" }
                            @else { "pending" }
                        }
                        td { (event.attempts) }
                        td { (event.last_error.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        @if let Some(event) = &job.event { details { summary { "The event as announced" } pre { (pretty(event)) } } }
        details { summary { "The request as received" } pre { (pretty(&job.request)) } }
    }
}

/// The request's messages, each as text; an image is named, never shown.
fn conversation(request: &Value) -> Markup {
    let messages = request.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    html! {
        @for message in messages {
            div.box.message {
                div.role { (message.get("role").and_then(Value::as_str).unwrap_or("?")) }
                @match message.get("content") {
                    Some(Value::String(text)) => pre { (text) },
                    Some(Value::Array(parts)) => @for part in parts { (content_part(part)) },
                    other => pre { (other.map(pretty).unwrap_or_default()) },
                }
            }
        }
    }
}

fn content_part(part: &Value) -> Markup {
    let url = part.pointer("/image_url/url").and_then(Value::as_str);
    html! {
        @if let Some(text) = part.get("text").and_then(Value::as_str) {
            pre { (text) }
        } @else if let Some(url) = url {
            p.muted {
                "[image: "
                @if url.starts_with("data:") {
                    (url.split(',').next().unwrap_or("data:")) ", " (url.len()) " bytes"
                } @else {
                    (crate::text::quoted_within(url, 200))
                }
                "]"
            }
        } @else {
            pre { (pretty(part)) }
        }
    }
}

/// What the model answered in a raw chat completion: a tool call's arguments, the message's
/// content, or its refusal (pretty-printed when it is JSON).
pub fn answer_text(response: &Value) -> Option<String> {
    let message = response.pointer("/choices/0/message")?;
    let text = message
        .pointer("/tool_calls/0/function/arguments")
        .or_else(|| message.get("content").filter(|content| !content.is_null()))
        .or_else(|| message.get("refusal").filter(|refusal| !refusal.is_null()))?;
    let text = text.as_str().map(str::to_owned).unwrap_or_else(|| text.to_string());
    Some(match serde_json::from_str::<Value>(&text) {
        Ok(json @ (Value::Object(_) | Value::Array(_))) => pretty(&json),
        _ => text,
    })
}

fn attempt(view: &CallView, job: &JobDetail) -> Markup {
    let call = &view.call;
    let error = call.get("error").filter(|error| !error.is_null());
    let stored = error.is_none() && job.summary.status == "succeeded" && view.n == job.calls.len();
    html! {
        div.box.attempt-box id={ "attempt-" (view.n) } {
            b { "Attempt " (view.n) }
            span.muted {
                @if let Some(model) = call.get("model").and_then(Value::as_str) { " · " (model) }
                @if let Some(provider) = call.get("provider").and_then(Value::as_str) { " at " (provider) }
                @if let Some(ms) = call.get("duration_ms") { " · " (ms) " ms" }
                @if let Some(usage) = call.get("usage") {
                    " · " (usage["prompt_tokens"]) " in, " (usage["completion_tokens"]) " out"
                }
                @if let Some(reason) = call.get("finish_reason").and_then(Value::as_str) { " · finish: " (reason) }
            }
            div.attempt {
                div {
                    div.role { "Answer" }
                    @match view.response.as_ref().map(|response| (answer_text(response), response)) {
                        Some((Some(answer), _)) => pre.answer { (answer) },
                        Some((None, response)) => pre.answer { (pretty(response)) },
                        None => p.muted { "No answer." },
                    }
                }
                div {
                    @if let Some(error) = error {
                        div.role { "What was wrong" }
                        div.error.verdict {
                            b { (error["kind"].as_str().unwrap_or("error")) } ": "
                            pre { (error["message"].as_str().unwrap_or("")) }
                        }
                    } @else if stored {
                        div.role { "Verdict" }
                        div.ok.verdict { "Valid: stored." }
                    }
                }
            }
            @if let Some(response) = &view.response {
                details { summary { "Raw response" } pre { (pretty(response)) } }
            }
        }
    }
}

/// `GET /login`: where a browser gives the admin token once.
pub async fn login_form(State(console): State<Console>) -> Response {
    page(StatusCode::OK, "Sign in", login_body(&console, None))
}

fn login_body(console: &Console, problem: Option<&str>) -> Markup {
    html! {
        h1 { "Sign in" }
        @if !console.access.has_token() {
            p.error { "No admin token is configured (http.admin_token_file): nobody can sign in." }
        } @else {
            @if let Some(problem) = problem { p.error { (problem) } }
            form method="post" action="/login" {
                label { "Admin token " input type="password" name="token" autocomplete="current-password" autofocus; }
                " " button type="submit" { "Sign in" }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /login`: the admin token for a session cookie.
pub async fn login(State(console): State<Console>, Form(form): Form<LoginForm>) -> Response {
    match console.access.session_value().filter(|_| console.access.is_token(&form.token)) {
        Some(session) => {
            tracing::info!(who = "admin", "signed in to the console");
            let max_age = super::access::SESSION_MAX_AGE.as_secs();
            let cookie = format!("{SESSION_COOKIE}={session}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        None => {
            tracing::warn!("a console sign-in with a wrong token");
            page(StatusCode::UNAUTHORIZED, "Sign in", login_body(&console, Some("That is not the admin token.")))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_answer_is_read_from_a_tool_call_a_content_or_a_refusal() {
        let tool =
            json!({"choices": [{"message": {"tool_calls": [{"function": {"arguments": "{\"name\":\"Ada\"}"}}]}}]});
        assert_eq!(answer_text(&tool).unwrap(), "{\n  \"name\": \"Ada\"\n}");
        let content = json!({"choices": [{"message": {"content": "not json <b>"}}]});
        assert_eq!(answer_text(&content).unwrap(), "not json <b>");
        let refusal = json!({"choices": [{"message": {"content": null, "refusal": "no"}}]});
        assert_eq!(answer_text(&refusal).unwrap(), "no");
        assert_eq!(answer_text(&json!({"omitted": "big"})), None);
    }

    #[test]
    fn a_prompt_and_an_answer_show_as_text() {
        let hostile = "<img src=x onerror=alert(1)>";
        let markup = conversation(&json!({"messages": [{"role": "user", "content": hostile},
            {"role": "user", "content": [{"type": "text", "text": hostile},
                                          {"type": "image_url", "image_url": {"url": format!("https://x/\"{hostile}")}}]}]}))
        .into_string();
        assert!(!markup.contains("<img"), "{markup}");
        assert!(markup.contains("&lt;img src=x onerror=alert(1)&gt;"), "{markup}");
    }
}

/// A form's fields: the CSRF token, and whatever else it has.
#[derive(Debug, Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    max_retries: String,
    #[serde(default)]
    limit: String,
    /// A dead letter's id, or empty for all (with `all`).
    #[serde(default)]
    id: String,
    #[serde(default)]
    all: String,
}

impl ActionForm {
    fn overrides(&self) -> Result<Overrides, ApiError> {
        let model = Some(self.model.trim()).filter(|model| !model.is_empty()).map(str::to_owned);
        let max_retries = match self.max_retries.trim() {
            "" => None,
            text => Some(text.parse().map_err(|_| {
                ApiError::BadRequest(crate::store::jobs::BadFilter::new("max_retries", "not a whole number"))
            })?),
        };
        Ok(Overrides { model, max_retries, mode: None })
    }

    fn which(&self) -> Result<Which, ApiError> {
        let selection = Selection {
            ids: Some(self.id.trim()).filter(|id| !id.is_empty()).map(str::to_owned).into_iter().collect(),
            all: !self.all.is_empty(),
        };
        Ok(selection.which()?)
    }
}

/// `POST /jobs/{job_id}/replay`: the job sent again; then its new page.
pub async fn replay_job(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if !console.access.may_act(caller, &form.csrf) {
        return forbidden();
    }
    let replayed = async {
        let overrides = form.overrides()?;
        Ok::<_, ApiError>(console.actions.replay(job_id(&id)?, &overrides, Who(caller.as_str())).await?)
    };
    match replayed.await {
        Ok(replayed) => Redirect::to(&format!("/jobs/{}", replayed.job_id)).into_response(),
        Err(error) => problem(error),
    }
}

/// `POST /jobs/{job_id}/cancel`: the job cancelled; then its page again.
pub async fn cancel_job(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if !console.access.may_act(caller, &form.csrf) {
        return forbidden();
    }
    let cancelled = async {
        let job_id = job_id(&id)?;
        console.actions.cancel(job_id, false, Who(caller.as_str())).await?;
        Ok::<_, ApiError>(job_id)
    };
    match cancelled.await {
        Ok(job_id) => Redirect::to(&format!("/jobs/{job_id}")).into_response(),
        Err(error) => problem(error),
    }
}

/// `POST /jobs/replay?<filter>`: every finished job of the filter sent again.
pub async fn replay_jobs(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Query(params): Params,
    Form(form): Form<ActionForm>,
) -> Response {
    if !console.access.may_act(caller, &form.csrf) {
        return forbidden();
    }
    let replayed = async {
        let filter = JobFilter::parse(pairs(&params), Utc::now())?;
        let limit = form.limit.trim().parse().unwrap_or(0);
        let overrides = form.overrides()?;
        Ok::<_, ApiError>(console.actions.replay_matching(&filter, limit, &overrides, Who(caller.as_str())).await?)
    };
    match replayed.await {
        Ok(replayed) => {
            let body = html! {
                h1 { "Replayed " (replayed.len()) " job(s)" }
                table #replayed {
                    tr { th { "new job" } th { "replays" } }
                    @for job in &replayed {
                        tr {
                            td { a href={ "/jobs/" (job.job_id) } { code { (job.job_id) } } }
                            td { a href={ "/jobs/" (job.replay_of) } { code { (job.replay_of) } } }
                        }
                    }
                }
            };
            page(StatusCode::OK, "Replayed", body)
        }
        Err(error) => problem(error),
    }
}

/// `/dead-letters`: the messages in the dead-letter queue, why each is there, and the
/// buttons to move them back or delete them.
pub async fn dead_letters(State(console): State<Console>, Extension(caller): Extension<Caller>) -> Response {
    let listed = match console.actions.dead_letters(jobs::DEFAULT_PAGE).await {
        Ok(listed) => listed,
        Err(error) => return problem(error.into()),
    };
    let csrf = form_token(&console, caller);
    let button = |action: &str, id: &str, label: &str, csrf: &str| {
        html! {
            form.inline method="post" action={ "/dead-letters/" (action) } {
                (csrf_field(csrf))
                @if id.is_empty() { input type="hidden" name="all" value="1"; } @else { input type="hidden" name="id" value=(id); }
                button type="submit" { (label) }
            }
        }
    };
    let body = html! {
        h1 { "Dead letters" }
        p { (listed.total) " message(s) in the dead-letter queue"
            @if listed.total as usize > listed.dead_letters.len() { " (the first " (listed.dead_letters.len()) " shown)" } "." }
        @if let Some(csrf) = &csrf {
            @if listed.total > 0 {
                div { (button("replay", "", "Replay all", csrf)) " " (button("purge", "", "Purge all", csrf)) }
            }
        } @else {
            (sign_in_to_act(&console))
        }
        table #dead-letters {
            tr { th { "id" } th { "job" } th { "reason" } th { "size" } th { "first bytes" } @if csrf.is_some() { th { "" } } }
            @for letter in &listed.dead_letters {
                tr {
                    td { code { (letter.id) } }
                    td { @if let Some(job_id) = letter.job_id { a href={ "/jobs/" (job_id) } { code { (job_id) } } } }
                    td { (letter.reason) }
                    td { (letter.size) }
                    td { pre { (letter.first_bytes) } }
                    @if let Some(csrf) = &csrf {
                        td { (button("replay", &letter.id, "Replay", csrf)) " " (button("purge", &letter.id, "Purge", csrf)) }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, "Dead letters", body)
}

/// `POST /dead-letters/replay`: one dead letter (`id`) or all (`all`) moved back.
pub async fn replay_dead_letters(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<ActionForm>,
) -> Response {
    if !console.access.may_act(caller, &form.csrf) {
        return forbidden();
    }
    let moved =
        async { Ok::<_, ApiError>(console.actions.replay_dead_letters(&form.which()?, Who(caller.as_str())).await?) };
    match moved.await {
        Ok(_) => Redirect::to("/dead-letters").into_response(),
        Err(error) => problem(error),
    }
}

/// `POST /dead-letters/purge`: one dead letter (`id`) or all (`all`) deleted.
pub async fn purge_dead_letters(
    State(console): State<Console>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<ActionForm>,
) -> Response {
    if !console.access.may_act(caller, &form.csrf) {
        return forbidden();
    }
    let purged =
        async { Ok::<_, ApiError>(console.actions.purge_dead_letters(&form.which()?, Who(caller.as_str())).await?) };
    match purged.await {
        Ok(_) => Redirect::to("/dead-letters").into_response(),
        Err(error) => problem(error),
    }
}
