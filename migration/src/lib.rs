//! Schema migrations, applied by `instructd migrate` (and by `instructd run` when
//! `database.migrate_on_start` is true).
//!
//! [`instructd`] lists the tables instructd itself owns (jobs, the outbox, workers); every
//! application built on it runs them first, in the same migration table as its own entities'.
//! [`Heroes`] creates the tables of the built-in `hero` and `team` entities.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_create_hero;
mod m20261124_000002_create_generation_job;
mod m20261124_000003_create_event_outbox;
mod m20261124_000004_outbox_retry_backoff;
mod m20261124_000005_create_team;
mod m20261130_000006_worker_presence_and_retention;
mod m20261201_000007_job_calls;
mod m20261201_000008_event_trace_context;
mod m20261202_000009_no_statistics_on_json;

/// The migrations of instructd's own tables, in the order they apply.
pub fn instructd() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20261124_000002_create_generation_job::Migration),
        Box::new(m20261124_000003_create_event_outbox::Migration),
        Box::new(m20261124_000004_outbox_retry_backoff::Migration),
        Box::new(m20261130_000006_worker_presence_and_retention::Migration),
        Box::new(m20261201_000007_job_calls::Migration),
        Box::new(m20261201_000008_event_trace_context::Migration),
        Box::new(m20261202_000009_no_statistics_on_json::Migration),
    ]
}

/// The tables of the built-in entities, `hero` and `team`.
pub struct Heroes;

#[async_trait::async_trait]
impl MigratorTrait for Heroes {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261124_000001_create_hero::Migration), Box::new(m20261124_000005_create_team::Migration)]
    }
}

/// Every migration of the `instructd` binary (its own tables and the built-in entities'), for
/// the stand-alone sea-orm-migration CLI.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        instructd().into_iter().chain(Heroes::migrations()).collect()
    }
}
