//! [`App`]: the entities an instructd application generates and the migrations of their
//! tables, and the command line that runs it (`run`, `migrate`, `schema`, `enqueue`,
//! `config`, `jobs`, `dlq`).

use std::ffi::OsString;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use entity::Generate;
use sea_orm::{DbErr, EntityTrait, IntoActiveModel, Schema};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, MigratorTraitSelf, SchemaManager};

use crate::config::{CONFIG_FILE_ENV, Settings};
use crate::enqueue::{self, EnqueueArgs};
use crate::entities::Registry;
use crate::jobs_cli::{self, DlqCommand, JobsCommand};
use crate::startup::{self, Application};
use crate::{shutdown, telemetry};

/// An instructd application: the entities it generates, by the name requests use, and the
/// migrations that create their tables. [`App::main`] is its whole command line.
///
/// instructd's own tables (jobs, the outbox, workers) are migrated first, always; an
/// application's migrations follow, in the order they were added, recorded in the same
/// table (`seaql_migrations`). A database belongs to one application: another's binary
/// refuses to migrate it (sea-orm names the applied migrations it does not know, and applies
/// nothing).
#[derive(Clone, Default)]
pub struct App {
    registry: Registry,
    migrations: Vec<MigrationList>,
}

/// A sea-orm-migration `Migrator`'s list of migrations (`MigratorTrait::migrations`).
type MigrationList = fn() -> Vec<Box<dyn MigrationTrait>>;

impl App {
    /// An application that generates nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Generates the SeaORM entity `E` for requests that name it `name` (`"entity":
    /// "invoice"`). Its `Model` is the schema the model is sent and the row stored; see
    /// [`Generate`].
    ///
    /// # Panics
    /// If `name` is taken, is `unknown` (the routing keys' word for an entity nobody declared),
    /// or is not made of lowercase ASCII letters, digits and `_` (it is a word of the events'
    /// routing keys, `job.succeeded.<name>`, and a metrics label); or if `E`'s schema is not a
    /// valid JSON schema (a `regex` pattern the validator cannot compile, say).
    pub fn entity<E>(mut self, name: &'static str) -> Self
    where
        E: EntityTrait,
        E::Model: Generate + IntoActiveModel<E::ActiveModel>,
        E::ActiveModel: Send,
    {
        let word = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        assert!(word, "entity name `{name}`: use lowercase ASCII letters, digits and `_`");
        assert!(name != "unknown", "entity name `unknown` is taken by instructd (undeclared entities' routing key)");
        assert!(self.registry.get(name).is_none(), "entity name `{name}` is declared twice");
        self.registry = self.registry.with::<E>(name);
        self
    }

    /// Adds the migrations of `M` (a sea-orm-migration `Migrator` listing this application's
    /// own tables), applied after instructd's and those added before, all recorded in
    /// `seaql_migrations` (`M::migration_table_name` is not used).
    pub fn migrations<M: MigratorTrait>(mut self) -> Self {
        self.migrations.push(M::migrations);
        self
    }

    /// Runs the command line (`std::env::args`) on a multi-threaded Tokio runtime, and returns
    /// the exit code: meant to be `main`'s whole body.
    pub fn main(self) -> ExitCode {
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("error: cannot start the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(self.run_cli(std::env::args_os()))
    }

    /// Runs the command line given as `args` (the program's name first), on the caller's
    /// runtime.
    pub async fn run_cli<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        #[cfg(feature = "jemalloc")]
        crate::allocator::keep_options();
        let mut args = args.into_iter().map(Into::into).peekable();
        // `invoices --help` says `invoices`, not `instructd`.
        let name = args
            .peek()
            .and_then(|program| Path::new(program).file_stem())
            .and_then(|stem| stem.to_str())
            .unwrap_or("instructd")
            .to_owned();
        // Once per process: clap keeps a command's name as `&'static str`.
        let name: &'static str = Box::leak(name.into_boxed_str());
        let parsed = Cli::command().name(name).try_get_matches_from(args).and_then(|m| Cli::from_arg_matches(&m));
        let cli = match parsed {
            Ok(cli) => cli,
            Err(error) => {
                let _ = error.print();
                return if error.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
            }
        };
        match self.dispatch(cli).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn dispatch(self, cli: Cli) -> anyhow::Result<ExitCode> {
        if let Command::Schema { entity } = &cli.command {
            // Needs no configuration: the schema is part of the build.
            let kind = self.registry.get(entity).with_context(|| {
                let known = self.registry.names().collect::<Vec<_>>().join(", ");
                format!("unknown entity `{entity}` (known: {known})")
            })?;
            println!("{}", serde_json::to_string_pretty(kind.schema())?);
            return Ok(ExitCode::SUCCESS);
        }
        let settings = Settings::load(cli.config.as_deref())?;
        match cli.command {
            Command::Run => {
                let traces = telemetry::init_with_traces(&settings.log, &settings.telemetry)?;
                let ran = match Application::build(settings, self).await {
                    Ok(app) => app.run_until_stopped(shutdown::signalled()).await,
                    Err(error) => Err(error),
                };
                traces.shutdown();
                ran?;
            }
            Command::Migrate => {
                telemetry::init(&settings.log);
                let db = startup::connect_database(&settings).await?;
                startup::migrate(&settings, &db, &self).await?;
                eprintln!("migrations applied");
            }
            Command::Config => print!("{}", settings.to_redacted_toml()),
            Command::Jobs(command) => {
                telemetry::init(&settings.log);
                return jobs_cli::run(&settings, command, self.registry.names().collect()).await;
            }
            Command::Dlq(command) => {
                telemetry::init(&settings.log);
                return jobs_cli::run_dlq(&settings, command).await;
            }
            Command::Enqueue(args) => {
                telemetry::init(&settings.log);
                match enqueue::enqueue(&settings, *args).await {
                    Ok(enqueue::Outcome::Succeeded) => {}
                    Ok(enqueue::Outcome::Failed) => return Ok(ExitCode::from(1)),
                    Ok(enqueue::Outcome::TimedOut) => return Ok(ExitCode::from(2)),
                    // Nothing (or not everything) was enqueued: not the same as a failed job.
                    Err(error) => {
                        eprintln!("error: {error:#}");
                        return Ok(ExitCode::from(3));
                    }
                }
            }
            Command::Schema { .. } => unreachable!("handled above"),
        }
        Ok(ExitCode::SUCCESS)
    }

    #[doc(hidden)]
    /// The registry of this application's entities (for instructd's own tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every migration, instructd's first, as one sea-orm-migration migrator.
    pub(crate) fn migrator(&self) -> Migrations<'_> {
        Migrations(&self.migrations)
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entities: Vec<&str> = self.registry.names().collect();
        f.debug_struct("App").field("entities", &entities).field("migrators", &self.migrations.len()).finish()
    }
}

impl<E> std::fmt::Debug for CreateTable<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateTable").field("name", &self.name).field("entity", &std::any::type_name::<E>()).finish()
    }
}

/// The migrations of an [`App`], instructd's own first.
pub(crate) struct Migrations<'a>(&'a [MigrationList]);

impl MigratorTraitSelf for Migrations<'_> {
    fn migrations(&self) -> Vec<Box<dyn MigrationTrait>> {
        migration::instructd().into_iter().chain(self.0.iter().flat_map(|migrations| migrations())).collect()
    }
}

/// A migration that creates the table of the SeaORM entity `E` from its declaration, with no
/// hand-written DDL: its columns and their types, its primary key, the foreign keys of its
/// `belongs_to` relations, and an index on each `#[sea_orm(indexed)]` column (SeaORM's
/// `Schema::create_table_from_entity`), and first the types of its Postgres enum columns.
/// The table is created as the entity is declared when the migration runs: use it for an
/// entity's first version, and a migration of your own (`ALTER TABLE …`) for each change
/// after it, as a fresh database runs them all. In a `Migrator`'s list:
/// `Box::new(CreateTable::<invoice::Entity>::named("m20261201_000001_create_invoice"))` (see
/// the crate's example).
pub struct CreateTable<E> {
    name: &'static str,
    entity: PhantomData<fn() -> E>,
}

impl<E> CreateTable<E> {
    /// The migration called `name`, as it is recorded once applied: never rename it.
    pub fn named(name: &'static str) -> Self {
        Self { name, entity: PhantomData }
    }
}

impl<E> MigrationName for CreateTable<E> {
    fn name(&self) -> &str {
        self.name
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl<E: EntityTrait + Default> MigrationTrait for CreateTable<E> {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        for enumeration in schema.create_enum_from_entity(E::default()) {
            manager.create_type(enumeration).await?;
        }
        manager.create_table(schema.create_table_from_entity(E::default())).await?;
        for index in schema.create_index_from_entity(E::default()) {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(sea_orm::sea_query::Table::drop().table(E::default()).to_owned()).await
    }
}

/// Turns LLM generation requests on RabbitMQ into validated rows in Postgres.
#[derive(Debug, Parser)]
#[command(name = "instructd", version, about)]
struct Cli {
    /// A TOML file layered over the defaults (environment variables still win).
    #[arg(long, global = true, env = CONFIG_FILE_ENV)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker daemon until SIGTERM or SIGINT.
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the JSON schema the model is sent for an entity.
    Schema {
        /// The entity's name (e.g. `hero`).
        entity: String,
    },
    /// Publish generation requests; with --wait, print their completion events.
    Enqueue(Box<EnqueueArgs>),
    /// Print the effective configuration, secrets redacted.
    Config,
    /// List, show, replay and cancel jobs: what the console shows and does.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// List, replay and purge the dead-letter queue's messages.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "entity name `hero` is declared twice")]
    fn a_name_declared_twice_is_refused() {
        let _ = App::new().entity::<entity::hero::Entity>("hero").entity::<entity::team::Entity>("hero");
    }

    #[test]
    #[should_panic(expected = "entity name `job.hero`: use lowercase ASCII letters")]
    fn a_name_that_is_not_one_routing_key_word_is_refused() {
        let _ = App::new().entity::<entity::hero::Entity>("job.hero");
    }

    #[test]
    #[should_panic(expected = "entity name `unknown` is taken")]
    fn the_routing_keys_unknown_is_not_an_entity_name() {
        let _ = App::new().entity::<entity::hero::Entity>("unknown");
    }

    #[test]
    fn instructd_tables_are_migrated_before_the_applications() {
        let app = crate::heroes::app();
        let names: Vec<String> = app.migrator().migrations().iter().map(|m| m.name().to_owned()).collect();
        assert_eq!(
            names,
            [
                "m20261124_000002_create_generation_job",
                "m20261124_000003_create_event_outbox",
                "m20261124_000004_outbox_retry_backoff",
                "m20261130_000006_worker_presence_and_retention",
                "m20261201_000007_job_calls",
                "m20261201_000008_event_trace_context",
                "m20261202_000009_no_statistics_on_json",
                "m20261124_000001_create_hero",
                "m20261124_000005_create_team",
            ]
        );
        assert_eq!(format!("{app:?}"), r#"App { entities: ["hero", "team"], migrators: 1 }"#);
    }
}
