//! Wiring: [`Application::build`] does everything fallible at start-up (settings are given,
//! so tests can change them); [`Application::run_until_stopped`] owns the tasks: a
//! supervisor that (re)connects to RabbitMQ, the consumer loop, the outbox relay, the HTTP
//! endpoint, and the drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use metrics_exporter_prometheus::PrometheusHandle;
use migration::MigratorTrait;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Publisher, connection, consumer, topology};
use crate::config::{Settings, redacted_url};
use crate::entities::Registry;
use crate::http::Health;
use crate::llm::LlmClient;
use crate::llm::modes::Strategies;
use crate::store::Store;
use crate::worker::Worker;
use crate::{http, metrics, relay};

pub struct Application {
    worker: Arc<Worker>,
    health: Arc<Health>,
    listener: TcpListener,
    http_addr: SocketAddr,
    metrics: PrometheusHandle,
}

/// Connects to Postgres (without logging SQL, which could carry request contents).
pub async fn connect_database(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    connect_pool(settings, settings.database.max_connections).await
}

async fn connect_pool(settings: &Settings, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(settings.database.url.expose_secret().to_owned());
    options
        .max_connections(max_connections)
        .connect_timeout(Duration::from_secs(settings.database.connect_timeout_secs))
        .acquire_timeout(Duration::from_secs(settings.database.connect_timeout_secs))
        // sqlx pings every connection it hands out, a round trip per checkout; only one that
        // sat idle long enough for a server, proxy or firewall to have dropped it needs it.
        // (A connection that broke anyway fails its statement, which is retried.)
        .test_before_acquire_if_idle_for(Duration::from_secs(30))
        .sqlx_logging(false);
    let ca_file = settings.database.ca_file.clone();
    options.map_sqlx_postgres_opts(move |pg| {
        // Plan each statement for its parameters, against the tables as they are now. A
        // plan cached while a table was small would scan it (or an index full of dead
        // entries) long after it has grown; the few statements instructd runs are cheap
        // to plan.
        let pg = pg.options([("plan_cache_mode", "force_custom_plan")]);
        // Added to the system's roots, for sslmode=verify-ca / verify-full.
        if ca_file.is_empty() { pg } else { pg.ssl_root_cert(&ca_file) }
    });
    Database::connect(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redacted_url(&settings.database.url)))
}

/// The advisory lock that serialises migrations ("instrucd" in ASCII).
const MIGRATION_LOCK: i64 = 0x696e_7374_7275_6364;

/// Applies pending migrations. Replicas that start together (a Deployment's pods, the
/// migration Job) take turns under a Postgres advisory lock, held by a session of its own:
/// without it they race to create the same tables and all but one fail.
pub async fn migrate(settings: &Settings, db: &DatabaseConnection) -> anyhow::Result<()> {
    let lock = connect_pool(settings, 1).await?;
    // A transaction pins its connection (the pool cannot recycle it mid-migration), and a
    // transaction-level lock ends with it, even if this process dies.
    let holder = lock.begin().await?;
    holder
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [MIGRATION_LOCK.into()],
        ))
        .await
        .context("waiting for the migration lock")?;
    let migrated = migration::Migrator::up(db, None).await.context("applying migrations failed");
    let _ = holder.commit().await;
    let _ = lock.close().await;
    migrated
}

impl Application {
    /// Binds the HTTP endpoint, connects to the database, migrates it if configured, and
    /// builds the LLM client.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = http::bind(settings.http.listen).await?;
        let http_addr = listener.local_addr()?;
        let db = connect_database(&settings).await?;
        if settings.database.migrate_on_start {
            migrate(&settings, &db).await?;
        }
        let registry = Registry::builtin();
        let strategies =
            Strategies::new(&registry, settings.llm.strict).map_err(|why| anyhow::anyhow!("llm.strict: {why}"))?;
        let metrics = metrics::install(registry.names());
        let llm = LlmClient::new(&settings.llm, settings.llm_max_concurrency())?;
        let stop = CancellationToken::new();
        let max_disconnected = Duration::from_secs(settings.broker.max_disconnected_secs);
        let health = Arc::new(Health::new(db.clone(), max_disconnected, stop.clone()));
        // Twice the slots: an announcement is short (a confirm and a batched mark), but must not
        // become what jobs wait for.
        let announcing = Arc::new(Semaphore::new(2 * usize::from(settings.worker.concurrency)));
        let worker = Worker {
            settings: Arc::new(settings),
            registry,
            store: Store::new(db),
            llm,
            strategies,
            stop,
            abort: CancellationToken::new(),
            announcing,
        };
        Ok(Self { worker: Arc::new(worker), health, listener, http_addr, metrics })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served (`http.listen`, with the port
    /// the system chose when it was 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Consumes requests until `shutdown` resolves, then stops taking jobs, lets in-flight
    /// ones finish within `worker.shutdown_grace_secs`, flushes the outbox and returns.
    /// Broker outages do not end it: it reconnects with backoff.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { worker, health, listener, http_addr, metrics } = self;
        let stop = worker.stop.clone();
        // The endpoint outlives the drain, so that /readyz says "draining" meanwhile.
        let http_stop = CancellationToken::new();
        tracing::info!(%http_addr, "serving /healthz, /readyz and /metrics");
        let http = tokio::spawn(http::serve(listener, health.clone(), metrics.clone(), http_stop.clone()));
        tokio::spawn({
            // Folds recorded histogram samples into buckets even when nobody scrapes, and
            // keeps the outbox backlog current, broker session or not.
            let http_stop = http_stop.clone();
            let store = worker.store.clone();
            async move {
                let mut upkeep = tokio::time::interval(Duration::from_secs(5));
                while tokio::select! { _ = upkeep.tick() => true, _ = http_stop.cancelled() => false } {
                    metrics.run_upkeep();
                    match relay::count_pending(&store).await {
                        Ok(pending) => crate::metrics::outbox_pending(pending),
                        Err(error) => tracing::debug!(%error, "counting pending events failed"),
                    }
                }
            }
        });
        tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                stop.cancel();
            }
        });
        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(worker.settings.worker.concurrency as usize));
        let max_delay = Duration::from_secs(worker.settings.broker.reconnect_max_delay_secs);
        let mut delay = Duration::from_millis(500);
        while !stop.is_cancelled() {
            let session = run_session(&worker, &health, &tracker, &slots).await;
            health.set_broker_connected(false);
            match session {
                Ok(()) => delay = Duration::from_millis(500),
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), retry_in = ?delay, "broker session ended; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => {}
                    }
                    delay = (delay * 2).min(max_delay);
                }
            }
        }
        drain(&worker, &tracker).await;
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("stopped");
        Ok(())
    }
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
    let consume_connection = connection::connect(&settings.broker, "consumer").await?;
    let publish_connection = connection::connect(&settings.broker, "publisher").await?;
    topology::declare(&publish_connection.create_channel().await?, &settings.broker)
        .await
        .context("declaring the topology failed")?;
    // Enough channels that jobs rarely wait for one to announce their event.
    let channels = usize::from(settings.worker.concurrency).clamp(1, 16);
    let publisher = Publisher::open(
        &publish_connection,
        channels,
        &settings.broker.events_exchange,
        &settings.broker.dead_letter_queue,
    )
    .await?;
    let (channel, mut consumer) = consumer::consume_requests(&consume_connection, settings).await?;
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
                next = consumer.next() => break next,
                _ = health.tick() => if !publisher.is_open() {
                    anyhow::bail!("the publishing channel closed");
                },
                _ = worker.stop.cancelled() => break 'consume,
            }
        };
        match delivery {
            Some(Ok(delivery)) => {
                let worker = worker.clone();
                let publisher = publisher.clone();
                tracker.spawn(async move {
                    worker.run_job(delivery, &publisher, permit).await;
                });
            }
            Some(Err(error)) => return Err(error).context("the request consumer failed"),
            None => anyhow::bail!("the broker cancelled the request consumer"),
        }
    }

    // Shutdown: no new deliveries; what was prefetched but not started is returned when
    // the channel closes.
    if let Err(error) = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await {
        tracing::warn!(%error, "cancelling the consumer failed");
    }
    drain(worker, tracker).await;
    session.cancel();
    let _ = relay.await;
    match relay::relay_pending(&worker.store, &publisher, Duration::ZERO).await {
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "flushing the outbox failed; events stay pending for the next start"),
    }
    let _ = channel.close(200, "shutting down".into()).await;
    let _ = consume_connection.close(200, "shutting down".into()).await;
    let _ = publish_connection.close(200, "shutting down".into()).await;
    Ok(())
}

/// Waits for in-flight jobs for at most the grace period; the rest are abandoned and their
/// requests redelivered.
async fn drain(worker: &Worker, tracker: &TaskTracker) {
    tracker.close();
    if tracker.is_empty() {
        return;
    }
    let grace = Duration::from_secs(worker.settings.worker.shutdown_grace_secs);
    tracing::info!(in_flight = tracker.len(), ?grace, "waiting for in-flight jobs");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(left = tracker.len(), "grace period over; leaving unfinished jobs to redelivery");
        worker.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
}
