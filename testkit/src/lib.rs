//! instructd's test helpers, shared by its test suites, its benchmark and the example
//! applications' tests. `spawn_app()`: a daemon on its own fresh database, its own randomly
//! named queues and exchange, and a wiremock fake of the chat-completions API; plus a
//! test-side AMQP channel to publish requests and read events and dead letters.
//!
//! Needs the services of `scripts/services.sh` (or `INSTRUCTD_TEST_ADMIN_DATABASE_URL` and
//! `INSTRUCTD_TEST_BROKER_URL`).

#![allow(missing_docs)]

pub mod https_provider;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use instructd::config::Settings;
use instructd::contract::CompletionEvent;
use instructd::startup::Application;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, EntityTrait, Statement};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Where the tests' Postgres role can create databases; overridable for other setups.
pub fn admin_database_url() -> String {
    std::env::var("INSTRUCTD_TEST_ADMIN_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://instructd:instructd@127.0.0.1:5432/postgres".to_owned())
}

pub fn broker_url() -> String {
    std::env::var("INSTRUCTD_TEST_BROKER_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// How long a test waits for something that should happen: generous, because a loaded
/// 2-core machine is slow, and never a sleep — every wait returns as soon as it can.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct TestApp {
    pub settings: Settings,
    /// Deletes the test's queues, exchange and database when the test ends, even by a panic.
    leftovers: Leftovers,
    /// Where the daemon serves /healthz, /readyz and /metrics.
    pub http_addr: std::net::SocketAddr,
    pub llm: MockServer,
    pub db: DatabaseConnection,
    pub channel: Channel,
    events: Consumer,
    daemon: Daemon,
    _connection: Connection,
}

/// The daemon under test: a task of the test's process, or an application's binary.
enum Daemon {
    InProcess { stop: Option<oneshot::Sender<()>>, task: Option<tokio::task::JoinHandle<anyhow::Result<()>>> },
    Process(tokio::process::Child),
}

/// How [`spawn_daemon`] starts the daemon.
enum Launch {
    InProcess,
    /// `run` of this binary, configured by the environment.
    Binary(std::path::PathBuf, HashMap<String, String>),
}

/// Settings for one test: fresh names, the fake LLM, fast retries.
pub async fn test_settings(llm: &MockServer, database_url: &str) -> Settings {
    Settings::load_from(None, test_env(llm, database_url)).expect("test settings are valid")
}

/// The environment that configures a daemon for one test (in-process or a child process).
pub fn test_env(llm: &MockServer, database_url: &str) -> HashMap<String, String> {
    let suffix = Uuid::new_v4().simple().to_string();
    [
        ("INSTRUCTD__DATABASE__URL", database_url.to_owned()),
        ("INSTRUCTD__DATABASE__MAX_CONNECTIONS", "4".to_owned()),
        ("INSTRUCTD__BROKER__URL", broker_url()),
        ("INSTRUCTD__BROKER__REQUEST_QUEUE", format!("test.{suffix}.requests")),
        ("INSTRUCTD__BROKER__EVENTS_EXCHANGE", format!("test.{suffix}.events")),
        ("INSTRUCTD__BROKER__DEAD_LETTER_QUEUE", format!("test.{suffix}.dlq")),
        ("INSTRUCTD__BROKER__DELAY_QUEUE", format!("test.{suffix}.delay")),
        ("INSTRUCTD__LLM__BASE_URL", format!("{}/v1", llm.uri())),
        ("INSTRUCTD__LLM__API_KEY", "sk-test-key-0123456789".to_owned()),
        ("INSTRUCTD__LLM__MODEL", "fake-model".to_owned()),
        ("INSTRUCTD__LLM__TRANSPORT_MIN_DELAY_MS", "10".to_owned()),
        ("INSTRUCTD__LLM__TRANSPORT_MAX_DELAY_SECS", "1".to_owned()),
        // An open circuit probes the fake provider at least every 2 s.
        ("INSTRUCTD__LLM__CIRCUIT_MAX_OPEN_SECS", "2".to_owned()),
        ("INSTRUCTD__WORKER__CONCURRENCY", "4".to_owned()),
        ("INSTRUCTD__WORKER__SHUTDOWN_GRACE_SECS", "10".to_owned()),
        ("INSTRUCTD__HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The real `instructd` binary, with no configuration inherited from the developer's
/// environment (`INSTRUCTD__*`, `INSTRUCTD_CONFIG`, `OPENAI_API_KEY`).
pub fn instructd_binary() -> std::process::Command {
    binary(&built_binary("instructd"))
}

/// The binary `name` that cargo built beside the running test (cargo's
/// `CARGO_BIN_EXE_<name>` is only known to the package's own tests, at compile time).
pub fn built_binary(name: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(format!("NEXTEST_BIN_EXE_{name}")) {
        return path.into();
    }
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let test = std::env::current_exe().expect("the test knows its path");
    let profile = test.parent().and_then(std::path::Path::parent).expect("the test runs from target/<profile>/deps");
    let binary = profile.join(name);
    assert!(binary.exists(), "{} is not built", binary.display());
    binary
}

/// `program` with no configuration inherited from the developer's environment
/// (`INSTRUCTD__*`, `INSTRUCTD_CONFIG`, `OPENAI_API_KEY`).
pub fn binary(program: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command.env_remove("OPENAI_API_KEY").env_remove("INSTRUCTD_CONFIG");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("INSTRUCTD__")) {
        command.env_remove(key);
    }
    command
}

/// Creates an empty database and returns its URL.
pub async fn create_database() -> String {
    let admin_url = admin_database_url();
    let admin = Database::connect(admin_url.as_str()).await.expect("the tests' Postgres is reachable");
    let name = format!("instructd_test_{}", Uuid::new_v4().simple());
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("can create a test database");
    let _ = admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').expect("the admin URL names a database");
    format!("{base}/{name}")
}

pub async fn spawn_app() -> TestApp {
    let llm = MockServer::start().await;
    let settings = test_settings(&llm, &create_database().await).await;
    spawn_app_with(settings, llm).await
}

pub async fn spawn_app_with(settings: Settings, llm: MockServer) -> TestApp {
    spawn_app_listening(settings, llm, "#").await
}

/// Like [`spawn_app_with`], with the test's event queue bound to the events exchange with
/// `binding` only.
pub async fn spawn_app_listening(settings: Settings, llm: MockServer, binding: &str) -> TestApp {
    spawn_daemon(settings, llm, binding, None, Launch::InProcess).await
}

/// Like [`spawn_app`], with the daemon an application's binary (`program run`, as an operator
/// starts it) rather than instructd's `hero` and `team` in the test's process.
pub async fn spawn_binary(program: &std::path::Path) -> TestApp {
    spawn_binary_with(program, &[]).await
}

/// Like [`spawn_binary`], with `extra` variables in the daemon's environment.
pub async fn spawn_binary_with(program: &std::path::Path, extra: &[(&str, String)]) -> TestApp {
    let llm = MockServer::start().await;
    let mut env = test_env(&llm, &create_database().await);
    env.extend(extra.iter().map(|(name, value)| ((*name).to_owned(), value.clone())));
    let settings = Settings::load_from(None, env.clone()).expect("test settings are valid");
    spawn_daemon(settings, llm, "#", None, Launch::Binary(program.to_owned(), env)).await
}

/// Like [`spawn_app_with`], without waiting for the daemon's database, which the test reads
/// through `db` (a way in of its own, for when the daemon's is cut or not ready).
pub async fn spawn_app_unready(settings: Settings, llm: MockServer, db: DatabaseConnection) -> TestApp {
    spawn_daemon(settings, llm, "#", Some(db), Launch::InProcess).await
}

async fn spawn_daemon(
    settings: Settings,
    llm: MockServer,
    binding: &str,
    db: Option<DatabaseConnection>,
    launch: Launch,
) -> TestApp {
    init_test_logs();
    // Declare the topology and bind a queue to the events before the daemon runs, so no
    // event can be published before the test listens.
    let connection = Connection::connect(&broker_url(), ConnectionProperties::default()).await.expect("RabbitMQ is up");
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    instructd::broker::topology::declare(&channel, &settings.broker).await.unwrap();
    let events = listen(&channel, &settings.broker.events_exchange, binding).await;

    let leftovers = Leftovers::of(&settings);
    let (http_addr, daemon) = match launch {
        Launch::InProcess => {
            let app = Application::build(settings.clone(), instructd::heroes::app()).await.expect("the app builds");
            let http_addr = app.http_addr();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(app.run_until_stopped(async move {
                let _ = stopped.await;
            }));
            (http_addr, Daemon::InProcess { stop: Some(stop), task: Some(task) })
        }
        Launch::Binary(program, env) => start_binary(&program, env).await,
    };
    let db = match db {
        Some(db) => db,
        None => {
            // The daemon's own way in (TLS and its CA file included).
            let db = instructd::startup::connect_database(&settings).await.unwrap();
            // The daemon migrates its database before it works: wait for that (its heartbeat
            // is written once it has), so that tests may read the tables at once.
            let ready = wait_for(|| async {
                let (_, body) = http_get(&format!("http://{http_addr}/readyz")).await.unwrap_or_default();
                body.contains(r#""database":"up""#)
            })
            .await;
            assert!(ready, "the daemon's database is ready");
            db
        }
    };
    TestApp { settings, leftovers, http_addr, llm, db, channel, events, daemon, _connection: connection }
}

/// A server-named queue bound to `exchange` with `binding`, and a consumer on it.
pub async fn listen(channel: &Channel, exchange: &str, binding: &str) -> Consumer {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.name().clone(),
            format!("test-{}", Uuid::new_v4()).into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// A received event with its routing key and AMQP properties.
pub struct Received {
    pub routing_key: String,
    /// The message body as sent.
    pub body: Vec<u8>,
    pub event: CompletionEvent,
    pub properties: BasicProperties,
}

pub async fn next_message(consumer: &mut Consumer) -> Received {
    next_message_within(consumer, PATIENCE).await
}

pub async fn next_message_within(consumer: &mut Consumer, patience: Duration) -> Received {
    let delivery = tokio::time::timeout(patience, consumer.next())
        .await
        .expect("a message arrives in time")
        .expect("the consumer is open")
        .expect("the delivery is readable");
    Received {
        routing_key: delivery.routing_key.to_string(),
        event: serde_json::from_slice(&delivery.data).expect("the message is a completion event"),
        body: delivery.data,
        properties: delivery.properties,
    }
}

pub fn request(entity: &str, prompt: &str) -> Value {
    json!({
        "job_id": Uuid::new_v4(),
        "entity": entity,
        "messages": [{"role": "user", "content": prompt}],
        "metadata": {"trace": "abc", "n": 1}
    })
}

impl TestApp {
    /// Publishes a raw body to the request queue as any service would.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                self.settings.broker.request_queue.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    pub async fn publish(&self, request: &Value) {
        let properties = BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
        self.publish_raw(&serde_json::to_vec(request).unwrap(), properties).await;
    }

    /// The next completion event on the events exchange.
    pub async fn next_event(&mut self) -> Received {
        self.next_event_within(PATIENCE).await
    }

    /// The next completion event, waiting at most `patience`.
    pub async fn next_event_within(&mut self, patience: Duration) -> Received {
        next_message_within(&mut self.events, patience).await
    }

    /// The next completion event if one arrives within `patience` (to check that none does).
    pub async fn try_next_event(&mut self, patience: Duration) -> Option<Received> {
        let delivery = tokio::time::timeout(patience, self.events.next()).await.ok()?;
        let delivery = delivery.expect("the consumer is open").expect("the delivery is readable");
        Some(Received {
            routing_key: delivery.routing_key.to_string(),
            event: serde_json::from_slice(&delivery.data).expect("the message is a completion event"),
            body: delivery.data,
            properties: delivery.properties,
        })
    }

    /// The next dead letter, polled with `basic.get` until one arrives.
    pub async fn next_dead_letter(&self) -> lapin::message::BasicGetMessage {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let message = self
                .channel
                .basic_get(self.settings.broker.dead_letter_queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            if let Some(message) = message {
                return message;
            }
            assert!(tokio::time::Instant::now() < deadline, "no dead letter arrived in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ready messages left on the request queue.
    pub async fn queued_requests(&self) -> u32 {
        self.message_count(&self.settings.broker.request_queue).await
    }

    /// Ready messages on `queue`.
    pub async fn message_count(&self, queue: &str) -> u32 {
        self.peek(queue).await.message_count()
    }

    /// Consumers of the request queue.
    pub async fn request_consumers(&self) -> u32 {
        self.peek(&self.settings.broker.request_queue).await.consumer_count()
    }

    /// `queue` as the broker reports it (a passive declare).
    async fn peek(&self, queue: &str) -> lapin::Queue {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    pub async fn heroes(&self) -> Vec<entity::hero::Model> {
        entity::hero::Entity::find().all(&self.db).await.unwrap()
    }

    pub async fn job(&self, job_id: Uuid) -> entity::generation_job::Model {
        entity::generation_job::Entity::find_by_id(job_id).one(&self.db).await.unwrap().expect("the job has a row")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let row = self.db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await.unwrap().unwrap();
        row.try_get_by_index(0).unwrap()
    }

    /// The bodies of every request the fake LLM received, in order.
    pub async fn llm_requests(&self) -> Vec<Value> {
        self.llm
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).expect("the LLM request is JSON"))
            .collect()
    }

    /// Signals the daemon to stop (SIGTERM, or as SIGTERM would), without waiting for it.
    pub fn begin_shutdown(&mut self) {
        match &mut self.daemon {
            Daemon::InProcess { stop, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
            Daemon::Process(child) => {
                if let Some(pid) = child.id() {
                    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                }
            }
        }
    }

    /// The daemon's process id, when it is a binary ([`spawn_binary`]).
    pub fn daemon_pid(&self) -> Option<u32> {
        match &self.daemon {
            Daemon::Process(child) => child.id(),
            Daemon::InProcess { .. } => None,
        }
    }

    /// GETs `path` on the daemon's HTTP endpoint: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.http_addr)).await.expect("the endpoint answers")
    }

    /// `instructd` (the real binary) configured for this test's broker names.
    pub fn instructd_command(&self) -> tokio::process::Command {
        let broker = &self.settings.broker;
        let mut command = tokio::process::Command::from(instructd_binary());
        command
            .env("INSTRUCTD__BROKER__URL", broker_url())
            .env("INSTRUCTD__BROKER__REQUEST_QUEUE", &broker.request_queue)
            .env("INSTRUCTD__BROKER__EVENTS_EXCHANGE", &broker.events_exchange)
            .env("INSTRUCTD__BROKER__DEAD_LETTER_QUEUE", &broker.dead_letter_queue)
            .env("INSTRUCTD__BROKER__DELAY_QUEUE", &broker.delay_queue)
            .env("INSTRUCTD__LOG__LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Stops the daemon as SIGTERM would and waits for it to return (a binary: exit 0).
    pub async fn stop(mut self) {
        self.begin_shutdown();
        match &mut self.daemon {
            Daemon::InProcess { task, .. } => {
                if let Some(task) = task.take() {
                    tokio::time::timeout(PATIENCE, task).await.expect("the daemon stops in time").unwrap().unwrap();
                }
            }
            Daemon::Process(child) => {
                let status = tokio::time::timeout(PATIENCE, child.wait()).await.expect("the daemon stops in time");
                assert!(status.unwrap().success(), "the daemon exits 0 on SIGTERM");
            }
        }
        self.clean_up().await;
    }

    /// Deletes what the test created, so a developer's broker and database do not fill up.
    async fn clean_up(&mut self) {
        let _ = self.db.clone().close().await;
        self.leftovers.delete().await;
    }
}

/// Starts `program run` with `env` and JSON logs, and returns where it serves HTTP (read from
/// its log, as it binds port 0). Its log goes on to the test's stderr.
async fn start_binary(program: &std::path::Path, env: HashMap<String, String>) -> (std::net::SocketAddr, Daemon) {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut command = tokio::process::Command::from(binary(program));
    command
        .arg("run")
        .envs(env)
        .env("INSTRUCTD__LOG__FORMAT", "json")
        .env("INSTRUCTD__LOG__LEVEL", "info")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap_or_else(|error| panic!("{} starts: {error}", program.display()));
    let mut log = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let serving = async {
        while let Some(line) = log.next_line().await.expect("the daemon's log is readable") {
            eprintln!("{line}");
            let entry: Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(addr) = entry["fields"]["http_addr"].as_str().or(entry["http_addr"].as_str()) {
                return addr.parse().expect("http_addr is an address");
            }
        }
        panic!("the daemon exited before serving HTTP");
    };
    let http_addr = tokio::time::timeout(PATIENCE, serving).await.expect("the daemon serves HTTP in time");
    tokio::spawn(async move {
        while let Ok(Some(line)) = log.next_line().await {
            eprintln!("{line}");
        }
    });
    (http_addr, Daemon::Process(child))
}

/// What a test created on the shared broker and database: its queues, its exchange and its
/// database. Deleted by [`Leftovers::delete`], or when dropped (a test that panicked), so that
/// a developer's broker and database do not fill up.
pub struct Leftovers {
    queues: Vec<String>,
    exchange: String,
    database: Option<String>,
}

impl Leftovers {
    pub fn of(settings: &Settings) -> Self {
        let broker = &settings.broker;
        let mut leftovers = Self::database(secrecy::ExposeSecret::expose_secret(&settings.database.url));
        leftovers.queues =
            vec![broker.request_queue.clone(), broker.dead_letter_queue.clone(), broker.delay_queue.clone()];
        leftovers.exchange = broker.events_exchange.clone();
        leftovers
    }

    /// Only the database at `url` (one [`create_database`] made), for a test that uses it
    /// without a daemon: hold it for as long as the test runs.
    pub fn database(url: &str) -> Self {
        let name = url.rsplit_once('/').map(|(_, name)| name.split('?').next().unwrap_or(name).to_owned());
        Self {
            queues: Vec::new(),
            exchange: String::new(),
            database: name.filter(|name| name.starts_with("instructd_test_")),
        }
    }

    /// Deletes them (once).
    pub async fn delete(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchange = std::mem::take(&mut self.exchange);
        if !(queues.is_empty() && exchange.is_empty())
            && let Ok(connection) = Connection::connect(&broker_url(), ConnectionProperties::default()).await
            && let Ok(channel) = connection.create_channel().await
        {
            for queue in queues {
                let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
            }
            if !exchange.is_empty() {
                let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
            }
            let _ = connection.close(200, "test over".into()).await;
        }
        if let Some(name) = self.database.take() {
            drop_database(&name).await;
        }
    }
}

/// Drops the database `name` (one [`create_database`] made), whoever is still connected.
///
/// `WITH (FORCE)` ends the other sessions, but not an autovacuum worker (a superuser's
/// process, which the tests' role may not signal): the drop fails while one runs, as it
/// may on a database that a run filled. A plain `DROP DATABASE` cancels autovacuum itself,
/// so it is tried next, a few times.
pub async fn drop_database(name: &str) {
    let Ok(admin) = Database::connect(admin_database_url().as_str()).await else { return };
    let mut drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    for _ in 0..10 {
        if admin.execute_unprepared(&drop).await.is_ok() {
            break;
        }
        drop = format!("DROP DATABASE IF EXISTS {name}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = admin.close().await;
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if self.queues.is_empty() && self.database.is_none() {
            return;
        }
        let mut rest = Leftovers {
            queues: std::mem::take(&mut self.queues),
            exchange: std::mem::take(&mut self.exchange),
            database: self.database.take(),
        };
        // Drop cannot await, and may run on a runtime's thread: a thread and a runtime of its own.
        let deleting = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                runtime.block_on(rest.delete());
            }
        });
        let _ = deleting.join();
    }
}

/// GETs `url`: status and body.
pub async fn http_get(url: &str) -> reqwest::Result<(u16, String)> {
    // reqwest is built without a default TLS provider: the process installs one.
    instructd::install_crypto_provider();
    let response = reqwest::get(url).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// The value of the series `name{labels…}` in a Prometheus text exposition.
pub fn metric_sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        if !(rest.is_empty() || rest.starts_with('{')) {
            return None;
        }
        labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse().ok())?
    })
}

/// Polls `condition` every 50 ms for at most [`PATIENCE`]; whether it came to hold.
pub async fn wait_for<F, Fut>(condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until(PATIENCE, condition).await
}

/// Polls `condition` every 50 ms for at most `patience`; whether it came to hold.
pub async fn wait_until<F, Fut>(patience: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A chat completion whose answer is a call of `function` with `arguments`.
pub fn tool_call_completion(function: &str, arguments: &str) -> Value {
    let call = json!({
        "id": format!("call_{}", Uuid::new_v4().simple()),
        "type": "function",
        "function": {"name": function, "arguments": arguments}
    });
    completion(json!({"role": "assistant", "content": null, "tool_calls": [call]}), "tool_calls")
}

/// A chat completion whose answer is the text `content` (the JSON modes).
pub fn text_completion(content: &str) -> Value {
    completion(json!({"role": "assistant", "content": content}), "stop")
}

/// A chat completion of one choice, `message`, costing 100 + 20 tokens.
fn completion(message: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "fake-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    })
}

/// The fake LLM answers every call with `body`.
pub async fn answer_always(llm: &MockServer, body: Value) {
    respond_always(llm, ResponseTemplate::new(200).set_body_json(body)).await;
}

/// The fake LLM responds to every call with `response` (an error status, a delay…).
pub async fn respond_always(llm: &MockServer, response: ResponseTemplate) {
    chat_completions(response).mount(llm).await;
}

/// A mock of the chat-completions endpoint that responds with `response`.
pub fn chat_completions(response: ResponseTemplate) -> Mock {
    Mock::given(method("POST")).and(path("/v1/chat/completions")).respond_with(response)
}

/// The fake LLM answers the next call with `body`, before any `answer_always` mock.
pub async fn answer_once(llm: &MockServer, body: Value) {
    respond_once(llm, ResponseTemplate::new(200).set_body_json(body)).await;
}

/// The fake LLM responds to the next call with `response`, before any `answer_always` mock.
pub async fn respond_once(llm: &MockServer, response: ResponseTemplate) {
    chat_completions(response).up_to_n_times(1).with_priority(1).mount(llm).await;
}

fn init_test_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        instructd::telemetry::init(&instructd::config::LogSettings {
            format: instructd::config::LogFormat::Pretty,
            level: "info,instructd=debug,sqlx=warn".to_owned(),
        });
    }
}

/// A TCP proxy to `target` that a test can cut: while cut, each connection is accepted and
/// closed at once, and the connections it carried are closed.
/// Stands in for a provider or a database that goes away and comes back.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    state: std::sync::Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    open: std::sync::atomic::AtomicBool,
    /// Connections attempted while cut.
    refused: std::sync::atomic::AtomicUsize,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(ProxyState {
            open: true.into(),
            refused: 0.into(),
            cuts: tokio::sync::watch::channel(0).0,
        });
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !state.open.load(Ordering::SeqCst) {
                        state.refused.fetch_add(1, Ordering::SeqCst);
                        drop(inbound);
                        continue;
                    }
                    let mut cut = state.cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Self { addr, state, task }
    }

    /// From now on, connections are reset, and those open are closed.
    pub fn cut(&self) {
        self.state.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.state.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.state.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections attempted while cut.
    pub fn refused(&self) -> usize {
        self.state.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
