//! The `instructd` command line: parses arguments and dispatches. All wiring lives in the
//! library (`startup.rs`), where tests can reach it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use instructd::config::{CONFIG_FILE_ENV, Settings};
use instructd::enqueue::EnqueueArgs;
use instructd::entities::Registry;
use instructd::startup::{self, Application};
use instructd::{enqueue, shutdown, telemetry};

/// Each job allocates many small, short-lived buffers (JSON, HTTP, AMQP frames) across
/// threads; glibc's malloc spent a fifth of the daemon's CPU on them (see the README's
/// "Performance").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read as it starts: a background thread hands freed pages back to the
/// system within about a second, rather than on later allocations after ten: the memory of a
/// burst (thousands of jobs whose model answered at once) does not stay resident, and the
/// peak is lower. `_RJEM_MALLOC_CONF` in the environment still overrides them.
#[unsafe(export_name = "_rjem_malloc_conf")]
#[allow(non_upper_case_globals)]
static malloc_conf: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Schema { entity } = &cli.command {
        // Needs no configuration: the schema is part of the build.
        let registry = Registry::builtin();
        let kind = registry.get(entity).with_context(|| {
            format!("unknown entity `{entity}` (known: {})", registry.names().collect::<Vec<_>>().join(", "))
        })?;
        println!("{}", serde_json::to_string_pretty(kind.schema())?);
        return Ok(ExitCode::SUCCESS);
    }
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run => {
            telemetry::init(&settings.log);
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown::signalled()).await?;
        }
        Command::Migrate => {
            telemetry::init(&settings.log);
            let db = startup::connect_database(&settings).await?;
            startup::migrate(&settings, &db).await?;
            eprintln!("migrations applied");
        }
        Command::Config => print!("{}", settings.to_redacted_toml()),
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
