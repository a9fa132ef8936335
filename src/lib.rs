//! # instructd
//!
//! A worker daemon that turns LLM generation requests on RabbitMQ into validated rows in
//! Postgres: Instructor + SQLModel as a service. One SeaORM model is both the table and
//! the schema the model answers in; server-owned fields (`id`) are hidden from the schema and
//! filled by a default factory.
//!
//! ## Your own entities
//! An application is instructd's daemon and command line around entities of its own: declare
//! each as a SeaORM entity whose `Model` implements [`Generate`], add the migrations of their
//! tables, and hand both to [`App`]. This is a whole binary (`notes run`, `notes migrate`,
//! `notes schema note`, `notes enqueue --entity note --prompt …`):
//!
//! ```no_run
//! mod note {
//!     use sea_orm::entity::prelude::*;
//!     use serde::{Deserialize, Serialize};
//!
//!     /// A note: the row, and the schema the model is sent (`notes schema note`). Its doc
//!     /// comments are for Rust readers (`#[instructd::model]`); the model reads
//!     /// `#[schemars(description = …)]`, and is held to every constraint it is shown.
//!     #[instructd::model]
//!     #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, schemars::JsonSchema)]
//!     #[sea_orm(table_name = "note")]
//!     #[schemars(rename = "Note", transform = instructd::schema::pydantic_style)]
//!     pub struct Model {
//!         /// Server-owned: hidden from the model, filled by a default factory.
//!         #[sea_orm(primary_key, auto_increment = false)]
//!         #[serde(skip_deserializing, default = "Uuid::new_v4")]
//!         #[schemars(skip)]
//!         pub id: Uuid,
//!         #[sea_orm(column_type = "Text")]
//!         #[schemars(length(min = 1, max = 80), description = "A short title")]
//!         pub title: String,
//!         #[sea_orm(column_type = "Text")]
//!         pub body: String,
//!     }
//!
//!     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
//!     pub enum Relation {}
//!
//!     impl ActiveModelBehavior for ActiveModel {}
//!
//!     impl instructd::Generate for Model {
//!         fn record_id(&self) -> Uuid {
//!             self.id
//!         }
//!     }
//! }
//!
//! // Its table, from its declaration (or write the DDL yourself in a migration of your own).
//! struct Migrator;
//!
//! impl sea_orm_migration::MigratorTrait for Migrator {
//!     fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
//!         vec![Box::new(instructd::CreateTable::<note::Entity>::named("m20261201_000001_create_note"))]
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     instructd::App::new().entity::<note::Entity>("note").migrations::<Migrator>().main()
//! }
//! ```
//!
//! The `instructd` binary is that, with the SQLModel tutorial's `hero` and `team`
//! ([`heroes::app`]).
//!
//! The `jemalloc` feature (on by default) makes jemalloc the process's allocator, as the
//! daemon is measured with; turn it off to bring your own `#[global_allocator]`.
//!
//! ## The life of one job (`Worker::run_job`)
//! 1. **receive** — `decode` turns the delivery into a `decode::Job`, or a rejection
//!    that goes to the dead-letter queue with its reason;
//! 2. **claim** — `store::Store::claim_job` takes the job id in `generation_job`, so a
//!    redelivered or duplicate request never generates twice (a claim whose worker is gone
//!    is taken over at once: `presence`);
//! 3. **generate** — `llm::generate` calls the model in tools mode, retrying transport
//!    failures (`llm::retry`) while the provider's circuit allows (`llm::circuit`) and
//!    re-asking with the validation error;
//! 4. **validate and hydrate** — `EntityKind::hydrate` checks the answer against the schema
//!    the model was sent, listing every violation (`validation`), parses it into the entity,
//!    runs the entity's own rules and fills server-owned fields;
//! 5. **store** — `store::Store::record` writes entity + job + event (outbox) in one
//!    transaction (shared with other jobs finishing at the same moment: `batch`);
//! 6. **acknowledge** (or dead-letter, defer, requeue: `worker::disposition` decides from
//!    how the run ended), then **announce** — the event is published with publisher
//!    confirms; `relay` publishes whatever was committed but not confirmed.
//!
//! ## Inside (for instructd's own developers; not part of the API)
//! - `config` — typed, layered settings; secrets redacted.
//! - `telemetry` — logs, one span per job.
//! - `contract` — the request and event shapes other services depend on.
//! - `job` — what a job is, as `decode`, `llm`, `store` and `broker` share it (the record, the
//!   call trace, the event to publish), so that they need not import each other.
//! - `broker` — connections, topology, consumer, publisher.
//! - `llm` — provider client, retry policy, circuit breaker, tools mode, re-ask loop.
//! - `entities` — the registry of generated entities.
//! - `store` — all the SQL: claims, outcomes, the outbox, presence, retention, and what a
//!   database error means.
//! - `batch` — group commits: concurrent jobs' writes in shared statements.
//! - `relay` — the outbox relay.
//! - `presence` — this daemon's heartbeat and session lock; the database's state.
//! - `retention` — pruning what is old.
//! - `text` — bounds on every text that leaves instructd.
//! - `startup` — build and run: database wait, supervisor, consumer loop, drain.
//! - `http` — `/healthz`, `/readyz`, `/metrics`, and the console's routes beside them.
//! - `console` — the console and its JSON API: jobs, their calls and events, for operators;
//!   who may read and who may act. `jobs_cli` is the same from the command line.
//! - `metrics` — every exported metric, named and described in one place.
//! - `shutdown` — signals.
//! - `enqueue` — the `instructd enqueue` client.

// The workspace's lints are in its Cargo.toml; the public API is documented, item by item.
#![warn(missing_docs)]

#[cfg(feature = "jemalloc")]
mod allocator;
mod app;
pub mod heroes;

pub use app::{App, CreateTable};
pub use entity::{Generate, InsertFuture, schema};
pub use instructd_macros::model;

// The daemon's parts, public for instructd's own tests and benchmark only: not part of the
// API, and free to change.
#[doc(hidden)]
pub mod batch;
#[doc(hidden)]
pub mod broker;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod console;
#[doc(hidden)]
pub mod contract;
#[doc(hidden)]
pub mod decode;
#[doc(hidden)]
pub mod enqueue;
#[doc(hidden)]
pub mod entities;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod job;
#[doc(hidden)]
pub mod jobs_cli;
#[doc(hidden)]
pub mod llm;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod presence;
#[doc(hidden)]
pub mod relay;
#[doc(hidden)]
pub mod retention;
#[doc(hidden)]
pub mod shutdown;
#[doc(hidden)]
pub mod startup;
#[doc(hidden)]
pub mod store;
#[doc(hidden)]
pub mod telemetry;
#[doc(hidden)]
pub mod text;
#[doc(hidden)]
pub mod validation;
#[doc(hidden)]
pub mod worker;

#[doc(hidden)]
/// Installs ring as the process's TLS crypto provider (reqwest and lapin both use rustls;
/// ring is chosen at build time to avoid aws-lc's C toolchain). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
