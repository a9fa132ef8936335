//! Schema migrations of instructd, applied by `instructd migrate` (and by `instructd run`
//! when `database.migrate_on_start` is true). Adding an entity adds one migration here.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_create_hero;
mod m20261124_000002_create_generation_job;
mod m20261124_000003_create_event_outbox;
mod m20261124_000004_outbox_retry_backoff;
mod m20261124_000005_create_team;
mod m20261130_000006_worker_presence_and_retention;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_create_hero::Migration),
            Box::new(m20261124_000002_create_generation_job::Migration),
            Box::new(m20261124_000003_create_event_outbox::Migration),
            Box::new(m20261124_000004_outbox_retry_backoff::Migration),
            Box::new(m20261124_000005_create_team::Migration),
            Box::new(m20261130_000006_worker_presence_and_retention::Migration),
        ]
    }
}
