//! # instructd
//!
//! A worker daemon that turns LLM generation requests on RabbitMQ into validated rows in
//! Postgres: Instructor + SQLModel as a service. One SeaORM model is both the table and
//! the schema the model answers in; server-owned fields (`id`) are hidden from the schema
//! and filled by a default factory.
//!
//! ## The life of one job ([`worker::Worker::run_job`])
//! 1. **receive** — [`decode`] turns the delivery into a [`decode::Job`], or a rejection
//!    that goes to the dead-letter queue with its reason;
//! 2. **claim** — [`store::Store::claim_job`] takes the job id in `generation_job`, so a
//!    redelivered or duplicate request never generates twice (a claim whose worker is gone
//!    is taken over at once: [`presence`]);
//! 3. **generate** — [`llm::generate`] calls the model in tools mode, retrying transport
//!    failures ([`llm::retry`]) while the provider's circuit allows ([`llm::circuit`]) and
//!    re-asking with the validation error;
//! 4. **validate and hydrate** — [`entities::EntityKind::hydrate`] parses the answer into
//!    the entity, filling server-owned fields;
//! 5. **store** — [`store::Store::record`] writes entity + job + event (outbox) in one
//!    transaction (shared with other jobs finishing at the same moment: [`batch`]);
//! 6. **acknowledge** (or dead-letter, defer, requeue: [`worker::disposition`] decides from
//!    how the run ended), then **announce** — the event is published with publisher
//!    confirms; [`relay`] publishes whatever was committed but not confirmed.
//!
//! ## Modules
//! - [`config`] — typed, layered settings; secrets redacted.
//! - [`telemetry`] — logs, one span per job.
//! - [`contract`] — the request and event shapes other services depend on.
//! - [`broker`] — connections, topology, consumer, publisher.
//! - [`llm`] — provider client, retry policy, circuit breaker, tools mode, re-ask loop.
//! - [`entities`] — the registry of generated entities.
//! - [`store`] — all the SQL: claims, outcomes, the outbox, presence, retention, and what a
//!   database error means.
//! - [`batch`] — group commits: concurrent jobs' writes in shared statements.
//! - [`relay`] — the outbox relay.
//! - [`presence`] — this daemon's heartbeat and session lock; the database's state.
//! - [`retention`] — pruning what is old.
//! - [`text`] — bounds on every text that leaves instructd.
//! - [`startup`] — build and run: database wait, supervisor, consumer loop, drain.
//! - [`http`] — `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`] — every exported metric, named and described in one place.
//! - [`shutdown`] — signals.
//! - [`enqueue`] — the `instructd enqueue` client.

#![forbid(unsafe_code)]
#![warn(clippy::todo, clippy::dbg_macro, clippy::await_holding_lock)]

pub mod batch;
pub mod broker;
pub mod config;
pub mod contract;
pub mod decode;
pub mod enqueue;
pub mod entities;
pub mod http;
pub mod llm;
pub mod metrics;
pub mod presence;
pub mod relay;
pub mod retention;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod worker;

/// Installs ring as the process's TLS crypto provider (reqwest and lapin both use rustls;
/// ring is chosen at build time to avoid aws-lc's C toolchain). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
