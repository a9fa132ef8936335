//! The job ledger: one row per job id, claimed before generation and finished in the same
//! transaction that stores the entity. `status` is `running`, `succeeded` or `failed`.

use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "generation_job")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub job_id: Uuid,
    #[sea_orm(column_type = "Text")]
    pub entity: String,
    #[sea_orm(column_type = "Text")]
    pub status: String,
    /// LLM calls that produced an answer (first call plus re-asks).
    pub attempts: i32,
    /// The request as received.
    #[sea_orm(column_type = "JsonBinary")]
    pub request: Json,
    pub record_id: Option<Uuid>,
    /// `{"kind": …, "message": …}` when the job failed.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub error: Option<Json>,
    /// Tokens summed over every call of the job.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub usage: Option<Json>,
    /// Every raw response of the provider, in order.
    #[sea_orm(column_type = "JsonBinary")]
    pub responses: Json,
    /// Every call to the model, in order: model, start, duration, usage, finish reason, and
    /// what was wrong with the answer (the `n`th call's answer is `responses[n]`).
    #[sea_orm(column_type = "JsonBinary")]
    pub calls: Json,
    /// Identifies the worker run that holds the claim while the job is running.
    pub claim_token: Option<Uuid>,
    /// The worker (`worker.worker_id`) holding the claim while the job is running.
    pub claimed_by: Option<i64>,
    /// How often the claim was taken over from a worker that was gone (killed, frozen, cut
    /// off): the job's poison count.
    pub takeovers: i32,
    /// A claim of an older instructd, before worker heartbeats: taken over once expired.
    pub lease_expires_at: Option<DateTimeUtc>,
    /// The completion event as announced, once the job finished.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub event: Option<Json>,
    #[sea_orm(column_type = "Text", nullable)]
    pub event_routing_key: Option<String>,
    /// When an operator asked to cancel the job while it ran.
    pub cancel_requested_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
