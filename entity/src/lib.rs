//! SeaORM entities of instructd. A generated entity's `Model` is at once the table row
//! and the LLM's response schema (the Instructor + SQLModel pattern): it derives
//! `DeriveEntityModel` for the table, `JsonSchema` for what the model is sent, and
//! `Deserialize` for parsing the model's answer, with server-owned fields (`id`) skipped
//! from the schema and filled by a default factory.
//!
//! Adding an entity: one file here implementing [`Generate`], one migration, and one line
//! in instructd's registry (`src/entities.rs`).

pub mod event_outbox;
pub mod generation_job;
pub mod hero;
pub mod schema;
pub mod team;

use std::future::Future;
use std::pin::Pin;

use schemars::JsonSchema;
use sea_orm::{DatabaseTransaction, DbErr};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// A model that an LLM can generate: its JSON schema is what the model is sent, and its
/// `Deserialize` impl parses the model's answer.
pub trait Generate: JsonSchema + DeserializeOwned + Serialize + Send + Sync + 'static {
    /// Checks the rules a schema cannot express: cross-field rules (the lines of an invoice
    /// add up to its total), once the answer has met every constraint of its schema
    /// (`#[schemars(length(min = 1), range(min = 0))]` and the like, which are both shown
    /// to the model and enforced). The error text is sent back to the model in a re-ask: one
    /// line per violation, each naming its field (`total_cents: …`).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// The primary key the server generated for this record.
    fn record_id(&self) -> Uuid;

    /// Adjusts the generated schema once definitions are in place (the root schema, as the
    /// model is sent it).
    fn finish_schema(_schema: &mut serde_json::Value) {}

    /// Fills what the server owns beyond the default factories, once the answer is parsed
    /// (a child row's foreign key to its parent, say).
    fn hydrate(&mut self) {}

    /// Inserts the rows that come with this one (a team's heroes), after it, in the same
    /// transaction.
    fn insert_children<'a>(&'a self, _txn: &'a DatabaseTransaction) -> InsertFuture<'a> {
        Box::pin(async { Ok(()) })
    }
}

/// What [`Generate::insert_children`] returns.
pub type InsertFuture<'a> = Pin<Box<dyn Future<Output = Result<(), DbErr>> + Send + 'a>>;
