//! `instructd enqueue`: publishes a generation request the way any other service would
//! (default exchange, routing key `instructd.requests`, persistent JSON, confirmed) and,
//! with `--wait`, waits for its completion event on a private reply queue.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::broker::publisher::{json_properties, short};
use crate::broker::{connection, topology};
use crate::config::Settings;
use crate::contract::{CompletionEvent, JobStatus};

/// What to enqueue.
#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// The entity to generate (e.g. `hero`).
    #[arg(long)]
    pub entity: String,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// An optional system message, sent before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// The model; defaults to `llm.model`.
    #[arg(long)]
    pub model: Option<String>,
    /// Re-asks after a validation error; capped by `llm.max_retries`.
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// The job id (idempotency key); a new UUID by default.
    #[arg(long)]
    pub job_id: Option<Uuid>,
    /// JSON echoed back in the completion event.
    #[arg(long, value_parser = parse_json)]
    pub metadata: Option<Value>,
    /// Wait for the completion event and print it; exit non-zero if the job failed.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to wait, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// The request body `args` describe, as the contract shapes it.
pub fn request_body(args: &EnqueueArgs, job_id: Uuid) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": args.prompt}));
    let mut request = json!({"job_id": job_id, "entity": args.entity, "messages": messages});
    if let Some(model) = &args.model {
        request["model"] = json!(model);
    }
    if let Some(max_retries) = args.max_retries {
        request["max_retries"] = json!(max_retries);
    }
    if let Some(metadata) = &args.metadata {
        request["metadata"] = metadata.clone();
    }
    request
}

/// Publishes the request; with `--wait` prints the completion event. Returns whether the
/// job succeeded (always `true` without `--wait`).
pub async fn enqueue(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<bool> {
    let connection = connection::connect(&settings.broker, "enqueue").await?;
    let channel = connection.create_channel().await?;
    topology::declare(&channel, &settings.broker).await.context("declaring the topology failed")?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;

    let job_id = args.job_id.unwrap_or_else(Uuid::new_v4);
    let request = request_body(&args, job_id);

    let mut properties = json_properties().with_message_id(short(&job_id.to_string()));
    // Declared before publishing, so the event cannot arrive before anyone listens.
    let replies = if args.wait {
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        properties = properties.with_reply_to(queue.name().clone()).with_correlation_id(short(&job_id.to_string()));
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "instructd-enqueue".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        Some(consumer)
    } else {
        None
    };

    let body = serde_json::to_vec(&request)?;
    let confirm = channel
        .basic_publish(
            "".into(),
            short(&settings.broker.request_queue),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(returned)) => bail!("the request was not routed: {}", returned.reply_text),
        Confirmation::Nack(_) => bail!("the broker refused the request (is the queue full?)"),
        Confirmation::NotRequested => unreachable!("the channel is in confirm mode"),
    }
    eprintln!("enqueued job {job_id}");

    let Some(mut replies) = replies else {
        println!("{}", json!({"job_id": job_id}));
        return Ok(true);
    };
    let timeout = Duration::from_secs(args.timeout);
    let event = tokio::time::timeout(timeout, async {
        while let Some(delivery) = replies.next().await {
            let delivery = delivery?;
            let event: CompletionEvent =
                serde_json::from_slice(&delivery.data).context("a reply is not a completion event")?;
            if event.job_id == job_id {
                return anyhow::Ok(event);
            }
        }
        bail!("the reply queue was closed")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no completion event for job {job_id} within {timeout:?}"))??;
    println!("{}", serde_json::to_string_pretty(&event)?);
    close(connection).await;
    Ok(event.status == JobStatus::Succeeded)
}

async fn close(connection: Connection) {
    let _ = connection.close(200, "done".into()).await;
}
