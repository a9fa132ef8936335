//! A daemon as a child process, and polls on the database.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use instructd::config::Settings;
use instructd::contract::CompletionEvent;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::json;
use tokio::process::{Child, Command};
use uuid::Uuid;
use wiremock::{MockServer, ResponseTemplate};

pub use crate::helpers::wait_until;
use crate::helpers::{
    Leftovers, broker_url, create_database, instructd_binary, listen, respond_always, test_env, tool_call_completion,
};

/// One scenario: a database, names, a slow fake LLM, and the daemon's environment.
pub struct Scenario {
    pub env: HashMap<String, String>,
    pub settings: Settings,
    pub database_url: String,
    /// The fake model the daemon calls.
    pub llm: MockServer,
    pub channel: Channel,
    pub events: Consumer,
    _connection: Connection,
    runs: u32,
    name: &'static str,
    /// Deletes the scenario's queues, exchange and database when it ends.
    _leftovers: Leftovers,
}

impl Scenario {
    /// `llm_delay` is how long each model call takes; `overrides` are extra settings.
    pub async fn new(name: &'static str, llm_delay: Duration, overrides: &[(&str, &str)]) -> Self {
        let llm = MockServer::start().await;
        let answer = tool_call_completion("Hero", r#"{"name": "Chaos", "secret_name": "Monkey"}"#);
        respond_always(&llm, ResponseTemplate::new(200).set_body_json(answer).set_delay(llm_delay)).await;
        let database_url = create_database().await;
        let mut env = test_env(&llm, &database_url);
        env.insert("INSTRUCTD__LOG__FORMAT".into(), "json".into());
        for (key, value) in overrides {
            env.insert((*key).to_owned(), (*value).to_owned());
        }
        let settings = Settings::load_from(None, env.clone()).expect("valid settings");
        let (connection, channel, events) = Self::connect(&settings).await;
        let leftovers = Leftovers::of(&settings);
        Self {
            env,
            settings,
            database_url,
            llm,
            channel,
            events,
            _connection: connection,
            runs: 0,
            name,
            _leftovers: leftovers,
        }
    }

    /// The test's side: a confirm-mode channel, the topology, and a queue bound to every event.
    async fn connect(settings: &Settings) -> (Connection, Channel, Consumer) {
        let connection = Connection::connect(&broker_url(), ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        instructd::broker::topology::declare(&channel, &settings.broker).await.unwrap();
        let events = listen(&channel, &settings.broker.events_exchange, "#").await;
        (connection, channel, events)
    }

    /// Reconnects the test's side after a broker restart took its connection and its
    /// (exclusive) event queue; events are unroutable until this binds a new one.
    pub async fn reconnect(&mut self) {
        let (connection, channel, events) = Self::connect(&self.settings).await;
        (self._connection, self.channel, self.events) = (connection, channel, events);
    }

    /// Where run `n` of the scenario logs.
    pub fn log_path(&self, run: u32) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-logs").join(format!("{}-{run}.log", self.name))
    }

    /// The address run `n` serves /metrics on (it listens on a port the system chose, and
    /// logs it).
    pub async fn http_addr(&self, run: u32) -> std::net::SocketAddr {
        let mut found = None;
        let logged = wait_until(Duration::from_secs(60), || {
            let text = std::fs::read_to_string(self.log_path(run)).unwrap_or_default();
            found = text.lines().find_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                value["http_addr"].as_str()?.parse().ok()
            });
            std::future::ready(found.is_some())
        })
        .await;
        assert!(logged, "run {run} logs its HTTP address");
        found.unwrap()
    }

    /// Starts `instructd run`; its logs go to `target/tmp/chaos-logs/<scenario>-<n>.log`.
    pub fn start(&mut self) -> Child {
        self.runs += 1;
        let path = self.log_path(self.runs);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let log = std::fs::File::create(path).unwrap();
        let mut command = Command::from(instructd_binary());
        command
            .arg("run")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("instructd starts")
    }

    /// How many calls the fake model has received.
    pub async fn llm_calls(&self) -> usize {
        self.llm.received_requests().await.map(|r| r.len()).unwrap_or_default()
    }

    /// Publishes `n` hero requests; returns their job ids.
    pub async fn enqueue(&self, n: usize) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let job_id = Uuid::new_v4();
            let body =
                json!({"job_id": job_id, "entity": "hero", "messages": [{"role": "user", "content": "Make a hero"}]});
            self.channel
                .basic_publish(
                    "".into(),
                    self.settings.broker.request_queue.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &serde_json::to_vec(&body).unwrap(),
                    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            ids.push(job_id);
        }
        ids
    }

    /// Runs a counting query on a fresh connection (the pool may span a Postgres restart);
    /// `None` while the database cannot answer.
    pub async fn count(&self, sql: &str) -> Option<i64> {
        let db = Database::connect(self.database_url.as_str()).await.ok()?;
        let row = db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql)).await.ok()??;
        let count = row.try_get_by_index(0).ok();
        let _ = db.close().await;
        count
    }

    /// Waits until `sql` counts at least `at_least`, for at most `patience`.
    pub async fn wait_for_count(&self, sql: &str, at_least: i64, patience: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let last = self.count(sql).await;
            if let Some(n) = last.filter(|n| *n >= at_least) {
                return n;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{sql}` stayed at {last:?}, below {at_least}, for {patience:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads events until every id in `ids` has one; returns (events read, distinct jobs).
    pub async fn collect_events(&mut self, ids: &[Uuid], patience: Duration) -> (usize, usize) {
        use futures_util::StreamExt;
        let wanted: HashSet<Uuid> = ids.iter().copied().collect();
        let mut seen = HashSet::new();
        let mut total = 0;
        let deadline = tokio::time::Instant::now() + patience;
        while !wanted.is_subset(&seen) {
            let next = tokio::time::timeout_at(deadline, self.events.next()).await;
            let delivery = next
                .unwrap_or_else(|_| panic!("only {} of {} jobs announced", seen.len(), wanted.len()))
                .expect("the event consumer is open")
                .expect("readable event");
            let event: CompletionEvent = serde_json::from_slice(&delivery.data).unwrap();
            total += 1;
            seen.insert(event.job_id);
        }
        (total, seen.len())
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("the child is running");
    let status = std::process::Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

/// Runs `rabbitmqctl` with `args`, panicking on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl runs");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value `rabbitmqctl <listing> -q --no-table-headers <name column> <column>` shows for
/// the row named `name` (e.g. a queue's `messages`), if there is such a row.
pub fn rabbitmq_listing(listing: &str, name_column: &str, column: &str, name: &str) -> Option<String> {
    let table = rabbitmqctl(&[listing, "-q", "--no-table-headers", name_column, column]);
    table.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(name)).then(|| fields.next().unwrap_or_default().to_owned())
    })
}

/// Sends SIGTERM and asserts the daemon exits 0 within `patience`.
pub async fn stop_gracefully(daemon: &mut Child, patience: Duration) {
    signal(daemon, "TERM");
    let status = tokio::time::timeout(patience, daemon.wait()).await.expect("the daemon exits in time").unwrap();
    assert!(status.success(), "the daemon exits 0 on SIGTERM: {status}");
}

/// The first PostgreSQL cluster, as `pg_ctlcluster` names it (`15 main`).
pub fn pg_cluster() -> (String, String) {
    let output = std::process::Command::new("pg_lsclusters").arg("--no-header").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace();
    (fields.next().unwrap().to_owned(), fields.next().unwrap().to_owned())
}

pub const SUCCEEDED: &str = "SELECT count(*) FROM generation_job WHERE status = 'succeeded'";
pub const ROWS: &str = "SELECT count(*) FROM hero";
pub const STORED_JOBS: &str = "SELECT count(DISTINCT j.job_id) FROM generation_job j JOIN hero h ON h.id = j.record_id";
pub const PENDING_EVENTS: &str = "SELECT count(*) FROM event_outbox WHERE published_at IS NULL";
