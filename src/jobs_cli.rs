//! `instructd jobs list|show`: the console's jobs list and job page on the command line,
//! through the same queries ([`crate::store::jobs`]) and with the same filters as the API.

use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::config::Settings;
use crate::startup;
use crate::store::jobs::{self, ListQuery};

/// `instructd jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first: one line each, or a page of the API's JSON with --json.
    List(ListArgs),
    /// Show everything recorded of one job (the API's JSON): the request, each call with its
    /// raw answer and what was wrong with it, the record, the events.
    Show { job_id: Uuid },
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
    /// invalid_request, validation, refused, llm or internal.
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
pub async fn run(settings: &Settings, command: JobsCommand) -> anyhow::Result<ExitCode> {
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
    line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}
