//! Completion events waiting to be published: written in the transaction that finishes a
//! job, marked `published_at` only after the broker confirmed them.

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "event_outbox")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: Uuid,
    pub job_id: Uuid,
    #[sea_orm(column_type = "Text")]
    pub routing_key: String,
    #[sea_orm(column_type = "Text")]
    pub correlation_id: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub reply_to: Option<String>,
    #[sea_orm(column_type = "JsonBinary")]
    pub payload: Json,
    pub created_at: DateTimeUtc,
    /// Set once the broker confirmed the event (and routed it to a queue).
    pub published_at: Option<DateTimeUtc>,
    /// Tries that came back unroutable.
    pub attempts: i32,
    /// When the relay tries an unroutable event again.
    pub next_attempt_at: Option<DateTimeUtc>,
    /// Why the event is still pending.
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    /// Set when an event that stayed unroutable for `retention.unroutable_events` was given up.
    pub abandoned_at: Option<DateTimeUtc>,
    /// The job's W3C trace context, sent in the event's AMQP headers.
    #[sea_orm(column_type = "Text", nullable)]
    pub traceparent: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub tracestate: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
