//! Wiring: [`Application::build`] does everything fallible that needs no other service
//! (settings are given, so tests can change them); [`Application::run_until_stopped`] owns
//! the tasks: the HTTP endpoint, the database wait and migrations, the presence heartbeat, a
//! supervisor that (re)connects to RabbitMQ, the consumer loop, the outbox relay, pruning,
//! and the drain on shutdown.
//!
//! Nothing outside can stop the daemon from starting: a database or broker that is down,
//! refusing, or not migrated yet makes it wait (and say so on `/readyz` and in the logs),
//! not exit into a crash loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::options::BasicCancelOptions;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use sea_orm_migration::MigratorTraitSelf;
use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::publisher::Destinations;
use crate::broker::{Publisher, connection, consumer, topology};
use crate::config::{Settings, redacted_url};
use crate::console::Console;
use crate::console::access::Access;
use crate::http::Health;
use crate::llm::Providers;
use crate::llm::modes::Strategies;
use crate::metrics::Metrics;
use crate::presence::{DbState, Presence};
use crate::store::{Store, StoreSettings, migration_lock};
use crate::worker::Worker;
use crate::{App, http, relay, retention, text};

pub struct Application {
    app: App,
    worker: Arc<Worker>,
    health: Arc<Health>,
    presence: Presence,
    presence_options: PgConnectOptions,
    listener: TcpListener,
    http_addr: SocketAddr,
    metrics: Metrics,
    /// The console's routes (`http.console`).
    console: Option<axum::Router>,
}

/// Connects to Postgres (without logging SQL, which could carry request contents); fails if
/// it cannot now.
pub async fn connect_database(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    connect_pool(settings, settings.database.max_connections, false, Planning::PerExecution).await
}

/// How a session's statements are planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// Each execution for its parameters, against the tables as they are now
    /// (`plan_cache_mode = force_custom_plan`): for every query whose best plan depends on the
    /// tables' sizes (the relay, retention, cancels, the console, the command line). A plan
    /// cached while a table was small would scan it long after it has grown.
    PerExecution,
    /// Once per session and statement (Postgres's default), with sequential scans off: for the
    /// batched writes only ([`crate::store::Store::with_write_pool`]), which reach rows by
    /// primary key alone. Planned per execution they spent as long planning as executing (the
    /// README's "Performance"); the plan a session caches while the tables are small is then
    /// still a primary-key probe when they are large (`tests/api/plans.rs`), where with
    /// sequential scans on it is a scan of the whole table.
    KeyProbes,
}

async fn connect_pool(
    settings: &Settings,
    max_connections: u32,
    lazy: bool,
    planning: Planning,
) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(settings.database.url.expose_secret().to_owned());
    options
        .max_connections(max_connections)
        .connect_timeout(Duration::from_secs(settings.database.connect_timeout_secs))
        .acquire_timeout(Duration::from_secs(settings.database.connect_timeout_secs))
        // sqlx pings every connection it hands out, a round trip per checkout; only one that
        // sat idle long enough for a server, proxy or firewall to have dropped it needs it.
        // (A connection that broke anyway fails its statement, which is retried.)
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(false)
        .connect_lazy(lazy);
    let ca_file = settings.database.ca_file.clone();
    options.map_sqlx_postgres_opts(move |pg| tune(pg, &ca_file, planning));
    Database::connect(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redacted_url(&settings.database.url)))
}

/// The console's own pool: two lazy connections whose statements stop after
/// [`CONSOLE_STATEMENT_TIMEOUT`], so that however many console pages are open, and however
/// large the ledger a text search reads, the workers' pool is never waiting on them.
async fn connect_console_pool(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(settings.database.url.expose_secret().to_owned());
    options
        .max_connections(2)
        .connect_timeout(Duration::from_secs(settings.database.connect_timeout_secs))
        .acquire_timeout(Duration::from_secs(settings.database.connect_timeout_secs))
        .sqlx_logging(false)
        .connect_lazy(true);
    let ca_file = settings.database.ca_file.clone();
    options.map_sqlx_postgres_opts(move |pg| {
        let timeout = format!("{}ms", CONSOLE_STATEMENT_TIMEOUT.as_millis());
        tune(pg, &ca_file, Planning::PerExecution)
            .options([("statement_timeout", timeout.as_str())])
            .application_name("instructd-console")
    });
    Database::connect(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redacted_url(&settings.database.url)))
}

impl Planning {
    /// The session settings that make it so.
    pub fn settings(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Planning::PerExecution => &[("plan_cache_mode", "force_custom_plan")],
            Planning::KeyProbes => &[("plan_cache_mode", "auto"), ("enable_seqscan", "off")],
        }
    }
}

/// The longest a console query may run.
const CONSOLE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);

/// What every instructd session sets on its connection options.
fn tune(pg: PgConnectOptions, ca_file: &str, planning: Planning) -> PgConnectOptions {
    use sqlx::ConnectOptions as _;
    let pg = pg.options(planning.settings().iter().copied()).disable_statement_logging();
    // Added to the system's roots, for sslmode=verify-ca / verify-full.
    if ca_file.is_empty() { pg } else { pg.ssl_root_cert(ca_file) }
}

/// The options of the presence session (a connection of its own, outside the pool).
fn presence_options(settings: &Settings) -> anyhow::Result<PgConnectOptions> {
    let pg: PgConnectOptions = settings
        .database
        .url
        .expose_secret()
        .parse()
        .with_context(|| format!("database.url: not a Postgres URL ({})", redacted_url(&settings.database.url)))?;
    Ok(tune(pg, &settings.database.ca_file, Planning::PerExecution).application_name("instructd-presence"))
}

/// Applies pending migrations, instructd's then the application's. Replicas that start
/// together take turns under `store::migration_lock`, polled every 250 to 500 ms (jittered).
pub async fn migrate(settings: &Settings, db: &DatabaseConnection, app: &App) -> anyhow::Result<()> {
    let session = connect_pool(settings, 1, false, Planning::PerExecution).await?;
    let mut polls =
        ConstantBuilder::new().with_delay(Duration::from_millis(250)).with_jitter().without_max_times().build();
    let mut waited = false;
    while !migration_lock::try_lock(&session).await.context("waiting for the migration lock")? {
        if !waited {
            tracing::info!("another instructd is migrating the database; waiting for it");
            waited = true;
        }
        tokio::time::sleep(polls.next().unwrap_or(Duration::from_millis(250))).await;
    }
    let migrated = app.migrator().up(db, None).await.context("applying migrations failed");
    let _ = migration_lock::unlock(&session).await;
    let _ = session.close().await;
    migrated
}

impl Application {
    /// Binds the HTTP endpoint and builds everything that needs no other service: a lazy
    /// database pool (it connects when first used), the LLM client, the store. Fails only on
    /// what waiting cannot fix (a port in use, a schema strict mode cannot express).
    pub async fn build(settings: Settings, app: App) -> anyhow::Result<Self> {
        settings.http.check_console_access()?;
        let listener = http::bind(settings.http.listen).await?;
        let http_addr = listener.local_addr()?;
        let db = connect_pool(&settings, settings.database.max_connections, true, Planning::PerExecution).await?;
        let writes = connect_pool(&settings, crate::store::WRITE_CONNECTIONS, true, Planning::KeyProbes).await?;
        let presence_options = presence_options(&settings)?;
        let registry = app.registry().clone();
        let strategies =
            Strategies::new(&registry, settings.llm.strict).map_err(|why| anyhow::anyhow!("llm.strict: {why}"))?;
        let models = std::iter::once(settings.llm.model.as_str()).chain(
            settings.llm.prices.iter().map(|price| price.model.as_str()).filter(|model| *model != settings.llm.model),
        );
        let metrics = Metrics::new(registry.names(), models);
        settings.check_fallback_entities(|entity| registry.get(entity).is_some())?;
        let llm = Providers::new(&settings, metrics.clone())?;
        let presence = Presence::new(metrics.clone());
        let store = Store::with_write_pool(
            db,
            writes,
            StoreSettings {
                worker_id: presence.worker_id(),
                takeover_after: Duration::from_secs(settings.worker.takeover_after_secs),
                max_responses_bytes: settings.limits.max_responses_bytes,
            },
        );
        let max_disconnected = Duration::from_secs(settings.broker.max_disconnected_secs);
        let worker = Worker::new(Arc::new(settings), registry, store, llm.clone(), strategies, metrics.clone());
        let health =
            Arc::new(Health::new(presence.clone(), llm, max_disconnected, worker.stop.clone(), metrics.clone()));
        let http = &worker.settings.http;
        let console = if http.console {
            let access = Access::new(&http.admin_token, http.listen.ip().is_loopback());
            let entities = worker.registry.names().collect();
            let db = connect_console_pool(&worker.settings).await?;
            Some(Console::new(db, health.clone(), access, entities, worker.settings.clone(), metrics.clone()).router())
        } else {
            None
        };
        Ok(Self {
            app,
            worker: Arc::new(worker),
            health,
            presence,
            presence_options,
            listener,
            http_addr,
            metrics,
            console,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served (`http.listen`, with the port
    /// the system chose when it was 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// This daemon's worker id (its row in the `worker` table).
    pub fn worker_id(&self) -> i64 {
        self.presence.worker_id()
    }

    /// Waits for the database (migrating it if configured), then consumes requests until
    /// `shutdown` resolves; then stops taking jobs, lets in-flight ones finish within
    /// `worker.shutdown_grace_secs`, flushes the outbox and returns, a few seconds after the
    /// grace period at the latest. Outages do not end it: it waits and reconnects.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { app, worker, health, presence, presence_options, listener, http_addr, metrics, console } = self;
        let stop = worker.stop.clone();
        // The endpoint and the heartbeat outlive the drain: /readyz says "draining"
        // meanwhile, and the jobs still finishing keep their claims.
        let http_stop = CancellationToken::new();
        let presence_stop = CancellationToken::new();
        let with_console = console.is_some();
        tracing::info!(%http_addr, worker_id = presence.worker_id(), console = with_console, "serving /healthz, /readyz and /metrics");
        let http = tokio::spawn(http::serve(listener, health.clone(), metrics.clone(), console, http_stop.clone()));
        tokio::spawn({
            let (stop, abort) = (stop.clone(), worker.abort.clone());
            let grace = Duration::from_secs(worker.settings.worker.shutdown_grace_secs);
            async move {
                shutdown.await;
                stop.cancel();
                // One deadline for the whole drain, however many parts of it wait.
                tokio::time::sleep(grace).await;
                abort.cancel();
            }
        });

        let mut background = Vec::new();
        if wait_for_database(&worker, &presence, &app).await {
            // Not before: the outbox it counts is made by the migrations.
            tokio::spawn(upkeep(worker.store.clone(), metrics, http_stop.clone()));
            let every = Duration::from_secs(worker.settings.worker.heartbeat_secs);
            background.push(tokio::spawn(presence.clone().run(presence_options, every, presence_stop.clone())));
            // Claims name this worker: none is taken before its heartbeat is written.
            if presence.wait_until_up(&stop).await {
                background.push(tokio::spawn(watch_cancels(
                    worker.clone(),
                    presence.worker_id(),
                    every,
                    presence_stop.clone(),
                )));
                background.push(tokio::spawn(retention::run(
                    worker.store.clone(),
                    worker.settings.retention.clone(),
                    worker.metrics.clone(),
                    stop.clone(),
                )));
                supervise(&worker, &health).await;
            }
        }
        presence_stop.cancel();
        for task in background {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Every heartbeat, cancels the running jobs of this worker that an operator asked to cancel
/// (`store::jobs::cancel`): each abandons its model call and ends with kind `cancelled`.
async fn watch_cancels(worker: Arc<Worker>, worker_id: i64, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while tokio::select! { _ = ticks.tick() => true, _ = stop.cancelled() => false } {
        match crate::store::jobs::cancel_requests(worker.store.db(), worker_id).await {
            Ok(job_ids) if !job_ids.is_empty() => {
                worker.cancel_running(&job_ids);
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "looking for cancelled jobs failed"),
        }
    }
}

/// Folds recorded histogram samples into buckets even when nobody scrapes, and keeps the
/// outbox backlog current, broker session or not.
async fn upkeep(store: Store, metrics: Metrics, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    while tokio::select! { _ = every.tick() => true, _ = stop.cancelled() => false } {
        metrics.run_upkeep();
        match crate::store::outbox::count_pending(store.db()).await {
            Ok(pending) => metrics.outbox_pending(pending),
            Err(error) => tracing::debug!(%error, "counting pending events failed"),
        }
    }
}

/// Waits until the database can be used: reachable and, with `database.migrate_on_start`,
/// migrated. Every failure is reported (`/readyz`, the logs) and retried with backoff, up to
/// 30 s apart. `false` if the daemon was stopped first.
async fn wait_for_database(worker: &Worker, presence: &Presence, app: &App) -> bool {
    if !worker.settings.database.migrate_on_start {
        return true;
    }
    let mut delays = backoff(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        let migrated = tokio::select! {
            migrated = migrate(&worker.settings, worker.store.db(), app) => migrated,
            _ = worker.stop.cancelled() => return false,
        };
        match migrated {
            Ok(()) => return true,
            Err(error) => {
                // The error names the URL with its password redacted, and the cause.
                presence.report(DbState::Down(text::message(&format!("{error:#}"))));
                tracing::warn!(retry_in = ?delay, "waiting for the database before starting");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = worker.stop.cancelled() => return false,
        }
    }
}

/// Delays between tries to reach a service that is down: `first`, doubling up to `max`.
/// (Without jitter: the reconnect delays are documented as these.)
pub(crate) fn backoff(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new().with_min_delay(first).with_max_delay(max).without_max_times().build()
}

/// (Re)connects to RabbitMQ with backoff until the daemon is stopped, then drains.
async fn supervise(worker: &Arc<Worker>, health: &Health) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(worker.settings.worker.concurrency as usize));
    let max_delay = Duration::from_secs(worker.settings.broker.reconnect_max_delay_secs);
    let mut delays = backoff(Duration::from_millis(500), max_delay);
    while !worker.stop.is_cancelled() {
        let session = run_session(worker, health, &tracker, &slots).await;
        health.set_broker_connected(false);
        match session {
            Ok(()) => delays = backoff(Duration::from_millis(500), max_delay),
            Err(error) => {
                let delay = delays.next().unwrap_or(max_delay);
                tracing::error!(error = format!("{error:#}"), retry_in = ?delay, "broker session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = worker.stop.cancelled() => {}
                }
            }
        }
    }
    // Jobs of a session that ended without a broker (the drain in `run_session` took the
    // others): the same deadline.
    drain(worker, &tracker).await;
}

/// One connection's worth of work: declare, consume, relay — until the connection fails
/// (error) or a shutdown is requested (then in-flight jobs drain while the connections are
/// still open, so they can ack and announce).
async fn run_session(
    worker: &Arc<Worker>,
    health: &Health,
    tracker: &TaskTracker,
    slots: &Arc<Semaphore>,
) -> anyhow::Result<()> {
    let settings = &worker.settings;
    // Connecting waits for its timeout at worst; a shutdown does not wait for it.
    let connect = async {
        let consume = connection::connect(&settings.broker, "consumer").await?;
        let publish = connection::connect(&settings.broker, "publisher").await?;
        anyhow::Ok((consume, publish))
    };
    let (consume_connection, publish_connection) = tokio::select! {
        connected = connect => connected?,
        _ = worker.stop.cancelled() => return Ok(()),
    };
    topology::declare(&publish_connection.create_channel().await?, &settings.broker)
        .await
        .context("declaring the topology failed")?;
    // Enough channels that jobs rarely wait for one to announce their event.
    let channels = usize::from(settings.worker.concurrency).clamp(1, 16);
    let destinations = Destinations {
        events_exchange: &settings.broker.events_exchange,
        dead_letter_queue: &settings.broker.dead_letter_queue,
        delay_queue: &settings.broker.delay_queue,
    };
    let publisher = Publisher::open(&publish_connection, channels, destinations, worker.metrics.clone()).await?;
    let consumers = consumer::consume_requests(&consume_connection, settings).await?;
    // Each delivery is stamped as it arrives: its hold (`worker.max_hold_secs`, under the
    // broker's consumer timeout) counts from then, not from when a slot took it (the
    // prefetch is over the concurrency, so deliveries may wait for a slot).
    let (arrived, mut arrivals) = mpsc::channel(usize::from(consumer::prefetch(settings.worker.concurrency)));
    // Any consumer ending (the broker cancelled it) ends the session, as its channel's
    // deliveries would stop.
    let consumer_ended = CancellationToken::new();
    let mut consuming = Vec::with_capacity(consumers.len());
    let mut _receiving = Vec::with_capacity(consumers.len());
    for (channel, mut consumer) in consumers {
        consuming.push((channel, consumer.tag()));
        let (arrived, ended) = (arrived.clone(), consumer_ended.clone());
        _receiving.push(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let _ended = ended.drop_guard();
            while let Some(next) = consumer.next().await {
                let failed = next.is_err();
                if arrived.send((tokio::time::Instant::now(), next)).await.is_err() || failed {
                    break;
                }
            }
        })));
    }
    drop(arrived);
    tracing::info!(
        queue = %settings.broker.request_queue,
        concurrency = settings.worker.concurrency,
        "consuming requests"
    );
    health.set_broker_connected(true);
    let session = worker.stop.child_token();
    let relay =
        tokio::spawn(relay::run(worker.store.clone(), publisher.clone(), Duration::from_secs(5), session.clone()));
    let _stop_relay = session.clone().drop_guard();

    // A dead publishing channel (the broker closed it, or its connection) ends the session
    // too, so that events and dead letters get a fresh one.
    let mut health = tokio::time::interval(Duration::from_secs(1));
    'consume: loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = worker.stop.cancelled() => break,
        };
        let delivery = loop {
            tokio::select! {
                next = arrivals.recv() => break next,
                // (Its error, if it failed, is among what it sent: the session ends with it.)
                _ = consumer_ended.cancelled() => {
                    break std::iter::from_fn(|| arrivals.try_recv().ok()).find(|(_, next)| next.is_err());
                }
                _ = health.tick() => if !publisher.is_open() {
                    anyhow::bail!("the publishing channel closed");
                },
                _ = worker.stop.cancelled() => break 'consume,
            }
        };
        match delivery {
            Some((received, Ok(delivery))) => {
                let worker = worker.clone();
                let publisher = publisher.clone();
                tracker.spawn(async move {
                    // A panic is caught here, so that it cannot strand the delivery (unacked,
                    // holding a prefetch slot until the broker's consumer timeout): it goes
                    // back to the queue, counting towards the delivery limit.
                    let acker = delivery.acker.clone();
                    if let Err(panic) = catch_panic(worker.run_job(delivery, received, &publisher, permit)).await {
                        worker.metrics.job_panicked();
                        tracing::error!(%panic, "a job panicked; its delivery goes back to the queue");
                        crate::worker::requeue_with(&acker).await;
                    }
                });
            }
            Some((_, Err(error))) => return Err(error).context("the request consumer failed"),
            None => anyhow::bail!("the broker cancelled the request consumer"),
        }
    }

    // Shutdown: no new deliveries; what was prefetched but not started is returned when
    // the channel closes.
    let cancels = futures_util::future::join_all(
        consuming.iter().map(|(channel, tag)| channel.basic_cancel(tag.clone(), BasicCancelOptions::default())),
    );
    if let Ok(cancelled) = tokio::time::timeout(Duration::from_secs(1), cancels).await
        && let Some(Err(error)) = cancelled.into_iter().find(Result::is_err)
    {
        tracing::warn!(%error, "cancelling the consumers failed");
    }
    drain(worker, tracker).await;
    session.cancel();
    // A relay pass may be waiting on a blocked broker: it is not waited for.
    relay.abort();
    let _ = relay.await;
    // What the jobs could not announce, once more, briefly (the relay sends the rest later).
    let flush = if worker.abort.is_cancelled() { Duration::from_secs(1) } else { Duration::from_secs(2) };
    match tokio::time::timeout(flush, relay::relay_pending(&worker.store, &publisher, Duration::ZERO)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "flushing the outbox failed; events stay pending for the next start"),
        Err(_) => tracing::warn!("the outbox could not be flushed in time; events stay pending for the next start"),
    }
    let close = Duration::from_millis(500);
    let channels_closed =
        futures_util::future::join_all(consuming.iter().map(|(channel, _)| channel.close(200, "shutting down".into())));
    let _ = futures_util::future::join3(
        tokio::time::timeout(close, channels_closed),
        tokio::time::timeout(close, consume_connection.close(200, "shutting down".into())),
        tokio::time::timeout(close, publish_connection.close(200, "shutting down".into())),
    )
    .await;
    Ok(())
}

/// Waits for in-flight jobs until they are done or the grace period is over (`abort`, set
/// once for the whole shutdown); then gives the interrupted ones a moment to hand their
/// deliveries back.
async fn drain(worker: &Worker, tracker: &TaskTracker) {
    tracker.close();
    if tracker.is_empty() {
        return;
    }
    tracing::info!(in_flight = tracker.len(), "waiting for in-flight jobs");
    tokio::select! {
        _ = tracker.wait() => {}
        _ = worker.abort.cancelled() => {
            tracing::warn!(left = tracker.len(), "grace period over; leaving unfinished jobs to redelivery");
            let _ = tokio::time::timeout(Duration::from_millis(1500), tracker.wait()).await;
        }
    }
}

/// Runs `job`, catching a panic: what it said, bounded, if it panicked.
/// (Not an `async fn`, whose future would hold the job's twice: as its argument, and as
/// what it awaits.)
pub fn catch_panic(job: impl Future<Output = ()>) -> impl Future<Output = Result<(), String>> {
    std::panic::AssertUnwindSafe(job).catch_unwind().map(|caught| {
        caught.map_err(|panic| {
            let said = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(not text)");
            text::message(said)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_job_is_caught_with_what_it_said() {
        assert_eq!(catch_panic(async {}).await, Ok(()));
        let caught = catch_panic(async { panic!("the {} went wrong", "thing") }).await;
        assert_eq!(caught, Err("the thing went wrong".to_owned()));
        let long = catch_panic(async { std::panic::panic_any("x".repeat(100_000)) }).await.unwrap_err();
        assert!(long.len() <= text::MAX_MESSAGE_BYTES);
    }
}
