//! `instructd enqueue`: publishes generation requests the way any other service would
//! (default exchange, routing key `instructd.requests`, persistent JSON, confirmed) and,
//! with `--wait`, waits for their completion events on a private reply queue.

use std::collections::HashSet;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::broker::publisher::{json_properties, short};
use crate::broker::{connection, topology};
use crate::config::Settings;
use crate::contract::{ChatMessage, CompletionEvent, JobStatus, Mode};

/// What to enqueue.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("conversation").required(true).args(["prompt", "messages_file"])))]
pub struct EnqueueArgs {
    /// The entity to generate (e.g. `hero`).
    #[arg(long)]
    pub entity: String,
    /// The user message.
    #[arg(long)]
    pub prompt: Option<String>,
    /// The conversation as a JSON array of `{"role": …, "content": …}` (`-` reads stdin),
    /// instead of --prompt.
    #[arg(long, value_name = "FILE", conflicts_with = "system")]
    pub messages_file: Option<PathBuf>,
    /// An optional system message, sent before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// An image for the model to look at, sent with --prompt as a data: URL (PNG, JPEG, GIF
    /// or WebP, by its extension); repeat for several.
    #[arg(long, value_name = "FILE", requires = "prompt")]
    pub image: Vec<PathBuf>,
    /// The model; defaults to `llm.model`.
    #[arg(long)]
    pub model: Option<String>,
    /// Re-asks after a validation error; capped by `llm.max_retries`.
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// How the schema is sent: tools, json or json_schema; defaults to `llm.mode`.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<Mode>,
    /// The job id (idempotency key); a new UUID by default.
    #[arg(long, conflicts_with = "count")]
    pub job_id: Option<Uuid>,
    /// JSON echoed back in the completion event.
    #[arg(long, value_parser = parse_json)]
    pub metadata: Option<Value>,
    /// How many requests to enqueue, each with its own job id.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Wait for the completion events and print them (JSON; one line each when --count > 1),
    /// with a progress bar on a terminal. Exit 1 if a job failed, 2 on time-out, 3 if the
    /// requests could not be enqueued.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to wait for all events, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

fn parse_mode(text: &str) -> Result<Mode, String> {
    serde_json::from_value(Value::String(text.to_owned())).map_err(|_| "expected tools, json or json_schema".to_owned())
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// How `instructd enqueue` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enqueued (and, with --wait, every job succeeded).
    Succeeded,
    /// With --wait: at least one job failed.
    Failed,
    /// With --wait: not every event arrived in time.
    TimedOut,
}

/// The conversation of the request: --messages-file, or --system and --prompt.
pub fn conversation(args: &EnqueueArgs) -> anyhow::Result<Vec<Value>> {
    if let Some(path) = &args.messages_file {
        let text = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading the messages from stdin")?;
            text
        } else {
            std::fs::read_to_string(path).with_context(|| format!("--messages-file {}", path.display()))?
        };
        // Checked here with the contract's own type, so a mistake is reported now rather
        // than dead-lettered later.
        let messages: Vec<ChatMessage> = serde_json::from_str(&text)
            .with_context(|| format!("--messages-file {}: not a JSON array of chat messages", path.display()))?;
        if messages.is_empty() {
            bail!("--messages-file {}: no messages", path.display());
        }
        return Ok(messages.iter().map(|m| serde_json::to_value(m).expect("messages serialize")).collect());
    }
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    let prompt = args.prompt.as_deref().unwrap_or_default();
    if args.image.is_empty() {
        messages.push(json!({"role": "user", "content": prompt}));
    } else {
        let mut parts = vec![json!({"type": "text", "text": prompt})];
        for path in &args.image {
            parts.push(json!({"type": "image_url", "image_url": {"url": data_url(path)?}}));
        }
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(messages)
}

/// The image at `path` as a `data:image/<type>;base64,…` URL.
fn data_url(path: &Path) -> anyhow::Result<String> {
    use base64::Engine as _;
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let media = match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => bail!("--image {}: not a .png, .jpg, .jpeg, .gif or .webp file", path.display()),
    };
    let bytes = std::fs::read(path).with_context(|| format!("--image {}", path.display()))?;
    Ok(format!("data:{media};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
}

/// The request body for one job, as the contract shapes it.
pub fn request_body(args: &EnqueueArgs, messages: &[Value], job_id: Uuid) -> Value {
    let mut request = json!({"job_id": job_id, "entity": args.entity, "messages": messages});
    if let Some(model) = &args.model {
        request["model"] = json!(model);
    }
    if let Some(max_retries) = args.max_retries {
        request["max_retries"] = json!(max_retries);
    }
    if let Some(mode) = args.mode {
        request["mode"] = json!(mode);
    }
    if let Some(metadata) = &args.metadata {
        request["metadata"] = metadata.clone();
    }
    request
}

/// Publishes the requests; with `--wait` prints their completion events.
pub async fn enqueue(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<Outcome> {
    let messages = conversation(&args)?;
    let connection = connection::connect(&settings.broker, "enqueue").await?;
    let channel = connection.create_channel().await?;
    topology::declare(&channel, &settings.broker).await.context("declaring the topology failed")?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;

    // Declared before publishing, so that no event can arrive before anyone listens.
    let replies = if args.wait {
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "instructd-enqueue".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        Some((queue.name().clone(), consumer))
    } else {
        None
    };

    // Published back to back; the confirms are awaited together.
    let mut job_ids = Vec::with_capacity(args.count as usize);
    let mut confirms = Vec::with_capacity(args.count as usize);
    for _ in 0..args.count {
        let job_id = args.job_id.unwrap_or_else(Uuid::new_v4);
        let body = serde_json::to_vec(&request_body(&args, &messages, job_id))?;
        let mut properties = json_properties().with_message_id(short(&job_id.to_string()));
        if let Some((queue, _)) = &replies {
            properties = properties.with_reply_to(queue.clone()).with_correlation_id(short(&job_id.to_string()));
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                short(&settings.broker.request_queue),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &body,
                properties,
            )
            .await?;
        job_ids.push(job_id);
        confirms.push(confirm);
    }
    for confirm in confirms {
        match confirm.await? {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(returned)) => bail!("a request was not routed: {}", returned.reply_text),
            Confirmation::Nack(_) => bail!("the broker refused a request (is the queue full?)"),
            Confirmation::NotRequested => unreachable!("the channel is in confirm mode"),
        }
    }
    eprintln!("enqueued {} job(s)", job_ids.len());

    let Some((_, mut replies)) = replies else {
        for job_id in &job_ids {
            println!("{}", json!({"job_id": job_id}));
        }
        close(connection).await;
        return Ok(Outcome::Succeeded);
    };

    let mut waiting: HashSet<Uuid> = job_ids.iter().copied().collect();
    let progress = progress_bar(waiting.len());
    let mut failed = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    while !waiting.is_empty() {
        let delivery = match tokio::time::timeout_at(deadline, replies.next()).await {
            Err(_) => break,
            Ok(None) => bail!("the reply queue was closed"),
            Ok(Some(delivery)) => delivery?,
        };
        let event: CompletionEvent =
            serde_json::from_slice(&delivery.data).context("a reply is not a completion event")?;
        // A job's event may come twice (at least once); print it once.
        if !waiting.remove(&event.job_id) {
            continue;
        }
        if event.status != JobStatus::Succeeded {
            failed += 1;
        }
        let printed =
            if job_ids.len() == 1 { serde_json::to_string_pretty(&event) } else { serde_json::to_string(&event) };
        progress.suspend(|| println!("{}", printed.expect("events serialize")));
        progress.inc(1);
    }
    progress.finish_and_clear();
    close(connection).await;
    let succeeded = job_ids.len() as u64 - failed - waiting.len() as u64;
    if job_ids.len() > 1 || !waiting.is_empty() {
        eprintln!("{succeeded} succeeded, {failed} failed, {} without an event", waiting.len());
    }
    if !waiting.is_empty() {
        for job_id in &waiting {
            eprintln!("no completion event for job {job_id} within {}s", args.timeout);
        }
        return Ok(Outcome::TimedOut);
    }
    Ok(if failed > 0 { Outcome::Failed } else { Outcome::Succeeded })
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (CI, pipes).
fn progress_bar(total: usize) -> ProgressBar {
    if total < 2 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} jobs [{bar:30}] {elapsed} (eta {eta})")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn close(connection: Connection) {
    let _ = connection.close(200, "done".into()).await;
}
