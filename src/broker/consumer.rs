//! Consuming the request queue with a prefetch equal to the worker's concurrency, so the
//! broker never hands this process more jobs than it will run at once.

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use crate::config::Settings;

/// Opens a channel with `worker.concurrency` prefetch and starts consuming requests.
pub async fn consume_requests(connection: &Connection, settings: &Settings) -> lapin::Result<(Channel, Consumer)> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(settings.worker.concurrency, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            settings.broker.request_queue.as_str().into(),
            format!("instructd-{}", uuid::Uuid::new_v4()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}
