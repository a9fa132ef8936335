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

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// A model that an LLM can generate: its JSON schema is what the model is sent, and its
/// `Deserialize` impl parses the model's answer.
pub trait Generate: JsonSchema + DeserializeOwned + Serialize + Send + Sync + 'static {
    /// Checks what the type cannot express (ranges, non-empty strings). The error text is
    /// sent back to the model in a re-ask, so it should name the field and the problem.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// The primary key the server generated for this record.
    fn record_id(&self) -> Uuid;
}
