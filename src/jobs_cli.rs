//! `instructd jobs list|show|replay|cancel` and `instructd dlq list|replay|purge`: the console on the
//! command line, through the same queries ([`crate::store::jobs`]) and actions
//! ([`crate::console::actions`]), with the same filters as the API.

use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::config::Settings;
use crate::console::actions::{ActionError, Actions, Overrides, Who};
use crate::console::broker::{MAX_LISTED, Which};
use crate::contract::Mode;
use crate::metrics::Metrics;
use crate::startup;
use crate::store::jobs::{self, Cancel, ListQuery};

/// `instructd jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first: one line each, or a page of the API's JSON with --json.
    List(ListArgs),
    /// Show everything recorded of one job (the API's JSON): the request, each call with its
    /// raw answer and what was wrong with it, the record, the events.
    Show { job_id: Uuid },
    /// Cancel jobs: a running one abandons its model call (at its worker's next heartbeat) and
    /// ends with kind `cancelled`; one waiting for its delivery ends now.
    Cancel {
        #[arg(required = true)]
        job_ids: Vec<Uuid>,
        /// Also a job id with no job yet, whose request is still in the queue: it ends, without
        /// a call, when a worker takes it.
        #[arg(long)]
        queued: bool,
    },
    /// Send jobs again as new jobs (a new id each; the request records which job it replays),
    /// and print the new ids. A running job is not replayed.
    Replay {
        /// The jobs to replay.
        #[arg(required = true)]
        job_ids: Vec<Uuid>,
        /// A model from llm.allowed_models instead of the job's.
        #[arg(long)]
        model: Option<String>,
        /// Re-asks instead of the job's (at most llm.max_retries).
        #[arg(long)]
        max_retries: Option<u32>,
        /// How the schema is sent instead of the job's: tools, json or json_schema.
        #[arg(long, value_parser = parse_mode)]
        mode: Option<Mode>,
    },
}

/// `instructd dlq …`: the dead-letter queue.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters (left in the queue): id, job, size, reason.
    List {
        /// At most this many (1 to 500).
        #[arg(long, default_value_t = jobs::DEFAULT_PAGE)]
        limit: u32,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the request queue, without the broker's delivery headers; a
    /// JSON request gets a new job id and records the one it had (`replay_of`).
    Replay(Selected),
    /// Delete dead letters.
    Purge(Selected),
}

/// Which dead letters: their ids (from `dlq list`), or all.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
pub struct Selected {
    ids: Vec<String>,
    #[arg(long)]
    all: bool,
}

impl Selected {
    fn which(self) -> Which {
        if self.all { Which::All } else { Which::Ids(self.ids.into_iter().collect()) }
    }
}

fn parse_mode(text: &str) -> Result<Mode, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| "expected tools, json or json_schema".to_owned())
}

/// Who the log says acted.
const WHO: Who = Who("command line");

fn actions(settings: &Settings, db: sea_orm::DatabaseConnection, entities: Vec<&'static str>) -> Actions {
    Actions::new(db, std::sync::Arc::new(settings.clone()), Metrics::new([], []), entities)
}

fn failed(error: ActionError) -> anyhow::Error {
    match error {
        ActionError::BadRequest(bad) => anyhow::anyhow!("--{}: {}", bad.parameter.replace('_', "-"), bad.problem),
        other => other.into(),
    }
}

/// The API's filters (`GET /api/jobs`).
#[derive(Debug, Args)]
pub struct ListArgs {
    /// running, succeeded or failed.
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    entity: Option<String>,
    /// A model any of the job's calls went to, or its request named.
    #[arg(long)]
    model: Option<String>,
    /// invalid_request, validation, refused, llm, internal or cancelled.
    #[arg(long)]
    error_kind: Option<String>,
    /// Created at or after: an RFC 3339 time, or an age (15m, 1h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Created before: an RFC 3339 time, or an age.
    #[arg(long)]
    until: Option<String>,
    /// Text in the request (its messages, its metadata), case-insensitive.
    #[arg(long = "search", short = 'q')]
    text: Option<String>,
    /// At most this many jobs (1 to 200).
    #[arg(long, default_value_t = jobs::DEFAULT_PAGE)]
    limit: u32,
    /// The page after this cursor (a previous page's `next`).
    #[arg(long)]
    after: Option<String>,
    /// Print the page as the API's JSON (with `next`).
    #[arg(long)]
    json: bool,
}

impl ListArgs {
    fn params(&self) -> Vec<(&'static str, String)> {
        let limit = self.limit.to_string();
        [
            ("status", &self.status),
            ("entity", &self.entity),
            ("model", &self.model),
            ("error_kind", &self.error_kind),
            ("since", &self.since),
            ("until", &self.until),
            ("q", &self.text),
            ("after", &self.after),
            ("limit", &Some(limit)),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|value| (name, value)))
        .collect()
    }
}

/// Runs `instructd jobs …`: 0 when it printed what was asked, 1 for an unknown job.
pub async fn run(settings: &Settings, command: JobsCommand, entities: Vec<&'static str>) -> anyhow::Result<ExitCode> {
    let db = startup::connect_database(settings).await?;
    match command {
        JobsCommand::List(args) => {
            let params = args.params();
            let query = ListQuery::parse(params.iter().map(|(name, value)| (*name, value.as_str())), Utc::now())
                .map_err(|bad| anyhow::anyhow!("--{}: {}", bad.parameter.replace('_', "-"), bad.problem))?;
            let page = jobs::list(&db, &query.filter, query.after, query.limit).await.context("listing jobs")?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                for job in &page.jobs {
                    println!("{}", line(job));
                }
                if let Some(next) = &page.next {
                    eprintln!("more: --after {next}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Replay { job_ids, model, max_retries, mode } => {
            let actions = actions(settings, db, entities);
            let overrides = Overrides { model, max_retries, mode };
            for job_id in job_ids {
                let replayed = actions.replay(job_id, &overrides, WHO).await.map_err(failed)?;
                println!("{}\treplays {job_id}", replayed.job_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Cancel { job_ids, queued } => {
            let actions = actions(settings, db, entities);
            for job_id in job_ids {
                let cancel = actions.cancel(job_id, queued, WHO).await.map_err(failed)?;
                let what = match cancel {
                    Cancel::Requested => "cancelling: its worker abandons it at its next heartbeat",
                    Cancel::Queued => "cancelled: it ends, without a call, when a worker takes it from the queue",
                    _ => "cancelled",
                };
                println!("{job_id}\t{what}");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { job_id } => match jobs::get(&db, job_id).await.context("reading the job")? {
            Some(job) => {
                println!("{}", serde_json::to_string_pretty(&job)?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no job {job_id}");
                Ok(ExitCode::from(1))
            }
        },
    }
}

/// Runs `instructd dlq …`.
pub async fn run_dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let db = startup::connect_database(settings).await?;
    let actions = actions(settings, db, Vec::new());
    match command {
        DlqCommand::List { limit, json } => {
            if !(1..=MAX_LISTED).contains(&limit) {
                anyhow::bail!("--limit: must be a whole number from 1 to {MAX_LISTED}");
            }
            let listed = actions.dead_letters(limit).await.map_err(failed)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                for letter in &listed.dead_letters {
                    let job = letter.job_id.map(|id| id.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{}",
                        printable(&format!("{}  {job:<36}  {:>7}  {}", letter.id, letter.size, letter.reason))
                    );
                }
                eprintln!("{} dead letter(s) in all", listed.total);
            }
        }
        DlqCommand::Replay(selected) => {
            for moved in actions.replay_dead_letters(&selected.which(), WHO).await.map_err(failed)? {
                let job = moved.job_id.map(|id| id.to_string()).unwrap_or_else(|| "-".into());
                println!("{}\t{job}", moved.id);
            }
        }
        DlqCommand::Purge(selected) => {
            let purged = actions.purge_dead_letters(&selected.which(), WHO).await.map_err(failed)?;
            for id in &purged.ids {
                println!("{id}");
            }
            eprintln!("{} dead letter(s) purged", purged.count);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `line` without control characters: what a request, a model or a publisher wrote cannot
/// move the cursor or colour the terminal.
fn printable(line: &str) -> String {
    line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// One job on one line: when, id, entity, status, attempts, and why it failed. What a
/// request or a model wrote is printed without its control characters (no terminal escape
/// sequences, no line breaks).
fn line(job: &jobs::JobSummary) -> String {
    let error = job
        .error
        .as_ref()
        .map(|error| {
            let message = crate::text::quoted_within(error["message"].as_str().unwrap_or(""), 100);
            format!("{}: {}", error["kind"].as_str().unwrap_or(""), message)
        })
        .unwrap_or_default();
    let line = format!(
        "{}  {}  {:<10} {:<9} {:>2}  {}",
        job.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
        job.job_id,
        job.entity,
        job.status,
        job.attempts,
        error
    );
    printable(&line)
}
