//! instructd against the least work its path needs, in the conditions users run it in.
//!
//! `cargo bench --bench throughput` (see the README's "Performance"). For each scenario
//! (`latency_ms@concurrency`, by default `0@64 200@256 5000@10000`), each way to Postgres (TLS,
//! as Debian's and every managed Postgres offers it, and plain TCP) and each way the work
//! arrives (a window, and a backlog), against the real local RabbitMQ and Postgres and an
//! in-process fake chat-completions server that answers after `latency_ms`:
//! - **ceiling**: the least work the durable path needs, in this process: consume a request
//!   from the same kind of quorum queue with the same prefetch, one autocommit INSERT of it
//!   (a prepared statement, on a pool of plain driver connections as many as the daemon's),
//!   one confirmed publish of an event, ack; no LLM, no claim, no outbox;
//! - **instructd**: the real `instructd run` binary, with `worker.concurrency` = concurrency.
//!
//! Both are driven alike. **window**: 2 × concurrency requests outstanding (a new one is
//! published as each event arrives), so the worker never starves and the queue stays short;
//! **backlog**: every request is queued before the worker starts (a backfill, or a daemon
//! restarted after an outage), and the rate is taken from when it started consuming (the
//! daemon ready) to the last event.
//! Printed per run: jobs/s, p50 / p99 publish-to-event latency; for instructd also CPU-ms per
//! job (utime + stime of the daemon over the run), peak RSS (VmHWM) and RSS at each quarter of
//! the run (growth). `--soak N` adds one long run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

// The tests' helpers: the same admin database, broker URL and event queue as the tests use.
use testkit::{self as helpers, https_provider};

use helpers::{broker_url, create_database, listen};

#[derive(Debug, Parser)]
#[command(about = "instructd against the ceiling of its own stack")]
struct Args {
    /// Scenarios as `latency_ms@concurrency`.
    #[arg(long, value_delimiter = ',', default_values = ["0@64", "200@256", "5000@10000"])]
    scenarios: Vec<String>,
    /// Ways to Postgres: `tls` (sslmode=require) and `plain` (sslmode=disable).
    #[arg(long, value_delimiter = ',', default_values = ["tls", "plain"])]
    postgres: Vec<Transport>,
    /// How the work arrives: `window` (2 × concurrency outstanding) and `backlog` (all of it
    /// queued before the worker starts).
    #[arg(long, value_delimiter = ',', default_values = ["window", "backlog"])]
    modes: Vec<Mode>,
    /// Jobs per run; default: max(16000, 8 × concurrency) (a run of seconds, not one), or 2 × concurrency from 2,000 in
    /// flight on.
    #[arg(long)]
    jobs: Option<usize>,
    /// Also run this many jobs through instructd at the first scenario's settings, to show
    /// whether its memory grows (e.g. 20000).
    #[arg(long)]
    soak: Option<usize>,
    /// Skip the ceiling runs.
    #[arg(long)]
    no_ceiling: bool,
    /// Print, at every 5% of an instructd run's events, the seconds since the worker started
    /// and the model calls made by then: where a run's time goes (at 5 s @ 10,000, two waves
    /// of calls, and how long each takes to finish).
    #[arg(long)]
    timeline: bool,
    /// The fake provider: `https`, as hosted providers serve (TLS, HTTP/2 by ALPN, at most
    /// 100 streams a connection), or `http`, plain HTTP/1.1 (a model server on the host).
    #[arg(long, value_enum, default_value_t = Provider::Https)]
    provider: Provider,
    /// Run this executable in the daemon's place (with the same arguments and environment),
    /// e.g. a script that profiles it; it must `exec` the daemon, whose pid the figures read.
    #[arg(long, default_value = env!("CARGO_BIN_EXE_instructd"))]
    daemon: std::path::PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    latency: Duration,
    concurrency: usize,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (latency, concurrency) =
            s.split_once('@').ok_or_else(|| format!("`{s}`: expected latency_ms@concurrency"))?;
        let latency = latency.parse::<u64>().map_err(|e| format!("`{s}`: latency: {e}"))?;
        let concurrency = concurrency.parse::<usize>().map_err(|e| format!("`{s}`: concurrency: {e}"))?;
        if concurrency == 0 || concurrency > usize::from(u16::MAX) {
            return Err(format!("`{s}`: concurrency must be 1 to {}", u16::MAX));
        }
        Ok(Scenario { latency: Duration::from_millis(latency), concurrency })
    }
}

/// How the fake provider is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Provider {
    Https,
    Http,
}

/// How the daemon and the ceiling reach Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Tls,
    Plain,
}

impl Transport {
    fn sslmode(self) -> &'static str {
        match self {
            Transport::Tls => "require",
            Transport::Plain => "disable",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tls => "TLS",
            Transport::Plain => "plain",
        })
    }
}

/// How the work arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Window,
    Backlog,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Window => "window",
            Mode::Backlog => "backlog",
        })
    }
}

/// One run's conditions.
#[derive(Debug, Clone, Copy)]
struct Case {
    scenario: Scenario,
    transport: Transport,
    mode: Mode,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {}, {}", self.scenario, self.mode, self.transport)
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms LLM @ {}", self.latency.as_millis(), self.concurrency)
    }
}

/// What one run measured.
struct Run {
    jobs: usize,
    /// Jobs the rate counts (all of them): in a window from the first publish to the last
    /// event, in a backlog from when the worker started consuming to the last event.
    counted: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// For instructd: the daemon's CPU-seconds over the run, peak RSS and RSS samples (KiB).
    process: Option<ProcessFigures>,
}

struct ProcessFigures {
    cpu_seconds: f64,
    peak_rss_kib: u64,
    /// RSS when a quarter, half, three quarters and all of the events were in.
    rss_at_quarters_kib: [u64; 4],
}

impl Run {
    fn jobs_per_sec(&self) -> f64 {
        self.counted as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).copied().unwrap_or_default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    instructd::install_crypto_provider();
    let scenarios: Vec<Scenario> =
        args.scenarios.iter().map(|s| s.parse()).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?;
    let mut llm = FakeLlm::start(args.provider).await?;
    llm.timeline = args.timeline;
    println!("instructd throughput benchmark: {} CPUs, binary {}", num_cpus(), args.daemon.display());
    let mut rows = Vec::new();
    for scenario in &scenarios {
        let jobs = args.jobs.unwrap_or_else(|| {
            if scenario.concurrency >= 2000 { 2 * scenario.concurrency } else { (8 * scenario.concurrency).max(16_000) }
        });
        llm.set_latency(scenario.latency);
        for &mode in &args.modes {
            for &transport in &args.postgres {
                let case = Case { scenario: *scenario, transport, mode };
                let ceiling = if args.no_ceiling {
                    None
                } else {
                    let run = run_ceiling(case, jobs).await?;
                    report(&format!("ceiling   {case}"), &run);
                    Some(run)
                };
                let instructd = run_instructd(&args.daemon, case, jobs, &llm).await?;
                report(&format!("instructd {case}"), &instructd);
                rows.push((case, ceiling, instructd));
            }
        }
    }
    if let (Some(jobs), Some(first)) = (args.soak, scenarios.first()) {
        llm.set_latency(first.latency);
        let case = Case { scenario: *first, transport: args.postgres[0], mode: Mode::Window };
        let soak = run_instructd(&args.daemon, case, jobs, &llm).await?;
        report(&format!("soak      {case}, {jobs} jobs"), &soak);
    }
    print_table(&rows);
    Ok(())
}

fn report(label: &str, run: &Run) {
    let mut line = format!(
        "{label}: {} jobs in {:.2} s = {:.0} jobs/s, p50 {} ms, p99 {} ms",
        run.jobs,
        run.elapsed.as_secs_f64(),
        run.jobs_per_sec(),
        run.percentile(0.50).as_millis(),
        run.percentile(0.99).as_millis()
    );
    if let Some(p) = &run.process {
        line.push_str(&format!(
            ", {:.2} CPU-ms/job, peak RSS {:.1} MB, RSS by quarter {}",
            p.cpu_seconds * 1000.0 / run.jobs as f64,
            mib(p.peak_rss_kib),
            p.rss_at_quarters_kib.map(|kib| format!("{:.1}", mib(kib))).join(" → ") + " MB"
        ));
    }
    println!("{line}");
}

fn print_table(rows: &[(Case, Option<Run>, Run)]) {
    println!();
    println!(
        "| scenario | arrival | Postgres | ceiling jobs/s | instructd jobs/s | vs ceiling | vs concurrency ÷ latency | p50 ms | p99 ms | CPU-ms/job | peak RSS MB |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (case, ceiling, run) in rows {
        let scenario = case.scenario;
        let ceiling_rate = ceiling.as_ref().map(Run::jobs_per_sec);
        let vs_ceiling = ceiling_rate.map_or("–".to_owned(), |c| format!("{:.0}%", 100.0 * run.jobs_per_sec() / c));
        let ideal = if scenario.latency.is_zero() {
            "–".to_owned()
        } else {
            let ideal = scenario.concurrency as f64 / scenario.latency.as_secs_f64();
            let bound = ceiling_rate.map_or(ideal, |c| ideal.min(c));
            format!("{:.0}% of {:.0}", 100.0 * run.jobs_per_sec() / bound, bound)
        };
        let process = run.process.as_ref().expect("instructd runs measure the process");
        println!(
            "| {scenario} | {} | {} | {} | {:.0} | {vs_ceiling} | {ideal} | {} | {} | {:.2} | {:.1} |",
            case.mode,
            case.transport,
            ceiling_rate.map_or("–".to_owned(), |c| format!("{c:.0}")),
            run.jobs_per_sec(),
            run.percentile(0.50).as_millis(),
            run.percentile(0.99).as_millis(),
            process.cpu_seconds * 1000.0 / run.jobs as f64,
            mib(process.peak_rss_kib),
        );
    }
    // TLS against plain, run for run.
    println!();
    for (case, _, tls) in rows.iter().filter(|(case, _, _)| case.transport == Transport::Tls) {
        let plain = rows.iter().find(|(other, _, _)| {
            other.transport == Transport::Plain
                && other.mode == case.mode
                && other.scenario.latency == case.scenario.latency
                && other.scenario.concurrency == case.scenario.concurrency
        });
        if let Some((_, _, plain)) = plain {
            println!(
                "TLS / plain, {}, {}: {:.0}%",
                case.scenario,
                case.mode,
                100.0 * tls.jobs_per_sec() / plain.jobs_per_sec()
            );
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

// ---------------------------------------------------------------------------------------
// The environment: a database and names of one's own, as the tests have.

struct Names {
    database_url: String,
    request_queue: String,
    events_exchange: String,
    dead_letter_queue: String,
    delay_queue: String,
}

async fn fresh_names(transport: Transport) -> anyhow::Result<Names> {
    let suffix = Uuid::new_v4().simple().to_string();
    Ok(Names {
        database_url: format!("{}?sslmode={}", create_database().await, transport.sslmode()),
        request_queue: format!("bench.{suffix}.requests"),
        events_exchange: format!("bench.{suffix}.events"),
        dead_letter_queue: format!("bench.{suffix}.dlq"),
        delay_queue: format!("bench.{suffix}.delay"),
    })
}

fn settings_for(names: &Names, llm: Option<&FakeLlm>, scenario: Scenario) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("INSTRUCTD__DATABASE__URL", names.database_url.clone()),
        ("INSTRUCTD__BROKER__URL", broker_url()),
        ("INSTRUCTD__BROKER__REQUEST_QUEUE", names.request_queue.clone()),
        ("INSTRUCTD__BROKER__EVENTS_EXCHANGE", names.events_exchange.clone()),
        ("INSTRUCTD__BROKER__DEAD_LETTER_QUEUE", names.dead_letter_queue.clone()),
        ("INSTRUCTD__BROKER__DELAY_QUEUE", names.delay_queue.clone()),
        ("INSTRUCTD__LLM__API_KEY", "sk-bench".to_owned()),
        ("INSTRUCTD__LLM__MODEL", "bench-model".to_owned()),
        ("INSTRUCTD__WORKER__CONCURRENCY", scenario.concurrency.to_string()),
        ("INSTRUCTD__LOG__LEVEL", "warn".to_owned()),
        ("INSTRUCTD__LOG__FORMAT", "json".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(llm) = llm {
        env.insert("INSTRUCTD__LLM__BASE_URL".into(), llm.base_url.clone());
        if let Some(ca) = &llm.ca_file {
            env.insert("INSTRUCTD__LLM__CA_FILE".into(), ca.clone());
        }
    }
    // Settings to try (e.g. INSTRUCTD__DATABASE__MAX_CONNECTIONS=32) reach both runs.
    env.extend(std::env::vars().filter(|(key, _)| key.starts_with("INSTRUCTD__")));
    env
}

/// Declares the contract's topology under `names` and binds a queue of the driver's own to
/// every event; returns the driver's connection, a channel to publish on, and the events.
async fn driver(names: &Names, scenario: Scenario) -> anyhow::Result<(Connection, Channel, Consumer)> {
    let env = settings_for(names, None, scenario);
    let settings = instructd::config::Settings::load_from(None, env)?;
    let connection = Connection::connect(&broker_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    instructd::broker::topology::declare(&channel, &settings.broker).await?;
    let events_channel = connection.create_channel().await?;
    let events = listen(&events_channel, &names.events_exchange, "#").await;
    Ok((connection, channel, events))
}

/// A request as the driver publishes it: its `metadata.sent_ns` (since `origin`) comes back in
/// the event, for the latency.
fn request_body(origin: Instant) -> Vec<u8> {
    let body = json!({
        "job_id": Uuid::new_v4(),
        "entity": "hero",
        "messages": [{"role": "user", "content": "Make a new superhero"}],
        "metadata": {"sent_ns": origin.elapsed().as_nanos() as u64},
    });
    serde_json::to_vec(&body).expect("serializable")
}

fn request_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// A backlog: publishes `jobs` requests at once and waits until the broker confirmed them
/// all, before any worker starts.
async fn prefill(channel: &Channel, queue: &str, jobs: usize, origin: Instant) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &request_body(origin),
                request_properties(),
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        confirm.await?;
    }
    Ok(())
}

/// What a run puts on the worker.
struct Load {
    jobs: usize,
    mode: Mode,
    /// Requests outstanding in a window.
    window: usize,
    /// What `metadata.sent_ns` counts from.
    origin: Instant,
    /// In a backlog: when the worker started consuming (the rate counts from there).
    started: Instant,
    /// The fake provider's count of calls and its value when the run began, when the run
    /// prints its timeline.
    timeline: Option<(Arc<AtomicUsize>, usize)>,
}

/// Collects `jobs` events. In a window, keeps `window` requests outstanding meanwhile (a new
/// one is published as each event arrives); in a backlog, the requests are already queued
/// ([`prefill`]). `at_quarter(q)` runs once q quarters of the events are in (1 to 4).
/// Latency is from publish to event, read from the `metadata.sent_ns` the event echoes.
/// Returns the span the rate is taken over, the jobs it counts, and the latencies.
async fn drive(
    channel: Channel,
    mut events: Consumer,
    request_queue: &str,
    load: Load,
    mut at_quarter: impl FnMut(usize),
) -> anyhow::Result<(Duration, usize, Vec<Duration>)> {
    let Load { jobs, mode, window, origin, started: consuming, timeline } = load;
    let permits = Arc::new(Semaphore::new(if mode == Mode::Window { window.min(jobs) } else { 0 }));
    let queue = request_queue.to_owned();
    let publisher = {
        let permits = permits.clone();
        let publishes = if mode == Mode::Window { jobs } else { 0 };
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..publishes {
                permits.acquire().await.expect("never closed").forget();
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &request_body(origin),
                        request_properties(),
                    )
                    .await?;
            }
            // Handed back, not dropped: closing the channel would discard publishes that
            // are still queued in the client.
            anyhow::Ok((channel, start))
        })
    };
    let mut latencies = Vec::with_capacity(jobs);
    let mut last = origin;
    while latencies.len() < jobs {
        let delivery = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .map_err(|_| anyhow::anyhow!("no event for 120 s after {} of {jobs}", latencies.len()))?
            .ok_or_else(|| anyhow::anyhow!("the event consumer closed"))??;
        last = Instant::now();
        let event: Value = serde_json::from_slice(&delivery.data)?;
        anyhow::ensure!(event["status"] == "succeeded", "a job failed: {event}");
        let sent = event["metadata"]["sent_ns"].as_u64().ok_or_else(|| anyhow::anyhow!("no sent_ns in {event}"))?;
        latencies.push(last.duration_since(origin).saturating_sub(Duration::from_nanos(sent)));
        if let Some((calls, before)) = &timeline
            && (latencies.len() == 1 || latencies.len() % (jobs / 20).max(1) == 0)
        {
            eprintln!(
                "  {:>7.3} s: {:>6} events, {:>6} model calls",
                last.duration_since(consuming).as_secs_f64(),
                latencies.len(),
                calls.load(Ordering::Relaxed) - before
            );
        }
        if let Some(quarter) = (1..=4).find(|q| latencies.len() == jobs * q / 4) {
            at_quarter(quarter);
        }
        permits.add_permits(1);
    }
    let (channel, started) = publisher.await??;
    let _ = channel.close(200, "done".into()).await;
    Ok(match mode {
        Mode::Window => (last.duration_since(started), jobs, latencies),
        Mode::Backlog => (last.duration_since(consuming), jobs, latencies),
    })
}

// ---------------------------------------------------------------------------------------
// instructd

async fn run_instructd(daemon: &std::path::Path, case: Case, jobs: usize, llm: &FakeLlm) -> anyhow::Result<Run> {
    let names = fresh_names(case.transport).await?;
    let run = instructd_under(daemon, &names, case, jobs, llm).await;
    clean_up(&names).await;
    run
}

async fn instructd_under(
    daemon: &std::path::Path,
    names: &Names,
    case: Case,
    jobs: usize,
    llm: &FakeLlm,
) -> anyhow::Result<Run> {
    let scenario = case.scenario;
    let (connection, channel, events) = driver(names, scenario).await?;
    let origin = Instant::now();
    if case.mode == Mode::Backlog {
        prefill(&channel, &names.request_queue, jobs, origin).await?;
    }
    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut env = settings_for(names, Some(llm), scenario);
    env.insert("INSTRUCTD__HTTP__LISTEN".into(), http.to_string());
    // The fake provider serves every run of the benchmark: its count goes on from run to run.
    let calls_before = llm.calls.load(Ordering::Relaxed);
    let mut daemon = tokio::process::Command::new(daemon)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = daemon.id().expect("running");
    wait_ready(http).await?;

    let cpu_before = cpu_seconds(pid)?;
    let mut rss_at_quarters = [0; 4];
    let timeline = llm.timeline.then(|| (llm.calls.clone(), calls_before));
    let load =
        Load { jobs, mode: case.mode, window: 2 * scenario.concurrency, origin, started: Instant::now(), timeline };
    let (elapsed, counted, latencies) = drive(channel, events, &names.request_queue, load, |quarter| {
        rss_at_quarters[quarter - 1] = status_kib(pid, "VmRSS");
    })
    .await?;
    let cpu_seconds = cpu_seconds(pid)? - cpu_before;
    let figures =
        ProcessFigures { cpu_seconds, peak_rss_kib: status_kib(pid, "VmHWM"), rss_at_quarters_kib: rss_at_quarters };
    let kill = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    anyhow::ensure!(kill.success(), "could not signal the daemon");
    let status = tokio::time::timeout(Duration::from_secs(60), daemon.wait()).await??;
    anyhow::ensure!(status.success(), "the daemon exited with {status}");
    close(connection).await;
    Ok(Run { jobs, counted, elapsed, latencies, process: Some(figures) })
}

/// Deletes the run's queues, exchange and database, so that runs do not pile up quorum
/// queues on the broker (which slows a single node down) or databases on the server.
/// Runs whether the run succeeded or not.
async fn clean_up(names: &Names) {
    if let Ok(connection) = Connection::connect(&broker_url(), ConnectionProperties::default()).await {
        if let Ok(channel) = connection.create_channel().await {
            for queue in [&names.request_queue, &names.dead_letter_queue, &names.delay_queue] {
                let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
            }
            let _ = channel.exchange_delete(names.events_exchange.as_str().into(), Default::default()).await;
        }
        close(connection).await;
    }
    if let Some((_, name)) = names.database_url.split('?').next().and_then(|url| url.rsplit_once('/')) {
        helpers::drop_database(name).await;
    }
}

/// Closes a connection, or gives up on it after a few seconds (the run is over either way).
async fn close(connection: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "done".into())).await;
}

/// Waits until the daemon reports ready, which it does as it starts consuming. Polled every
/// 5 ms: a backlog's rate counts from here, and the daemon works meanwhile (polled every
/// 100 ms, up to 100 ms of its work — some 2% of a 0 ms @ 64 run — went uncounted).
async fn wait_ready(http: SocketAddr) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..12_000 {
        if let Ok(response) = client.get(format!("http://{http}/readyz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("the daemon did not become ready within 60 s")
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The ceiling

async fn run_ceiling(case: Case, jobs: usize) -> anyhow::Result<Run> {
    let names = fresh_names(case.transport).await?;
    let run = ceiling_under(&names, case, jobs).await;
    clean_up(&names).await;
    run
}

/// The least work the durable path needs per request: read it from the queue, store it (one
/// autocommit INSERT, a prepared statement), publish a confirmed event, ack. Whatever
/// instructd does beyond that (parse and validate, the claim, the model call, the job row and
/// the outbox, the published mark) is its own cost.
async fn ceiling_under(names: &Names, case: Case, jobs: usize) -> anyhow::Result<Run> {
    let scenario = case.scenario;
    let (connection, channel, events) = driver(names, scenario).await?;
    let settings = instructd::config::Settings::load_from(None, settings_for(names, None, scenario))?;
    // Plain driver connections, as many as the daemon's pool, over the same transport.
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .connect(&names.database_url)
        .await?;
    sqlx::query("CREATE TABLE ceiling (id uuid PRIMARY KEY, request jsonb NOT NULL)").execute(&db).await?;
    let origin = Instant::now();
    if case.mode == Mode::Backlog {
        prefill(&channel, &names.request_queue, jobs, origin).await?;
    }

    // Separate connections to consume and to publish, as instructd has.
    let consume = Connection::connect(&broker_url(), ConnectionProperties::default()).await?;
    let publish = Connection::connect(&broker_url(), ConnectionProperties::default()).await?;
    // The daemon's prefetch on as many channels as it uses, and as many jobs at once as it runs.
    let mut consumers = Vec::new();
    for prefetch in instructd::broker::consumer::channel_prefetches(scenario.concurrency as u16) {
        let consume_channel = consume.create_channel().await?;
        consume_channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        consumers.push(
            consume_channel
                .basic_consume(
                    names.request_queue.as_str().into(),
                    format!("ceiling-{}", consumers.len()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
        );
    }
    let mut requests = futures_util::stream::select_all(consumers);
    let slots = Arc::new(Semaphore::new(scenario.concurrency));
    let started = Instant::now();
    let publish_channel = publish.create_channel().await?;
    publish_channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let exchange = names.events_exchange.clone();
    let worker = tokio::spawn(async move {
        loop {
            let slot = slots.clone().acquire_owned().await?;
            let Some(delivery) = requests.next().await else { break };
            let delivery = delivery?;
            let (db, channel, exchange) = (db.clone(), publish_channel.clone(), exchange.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let request: Value = serde_json::from_slice(&delivery.data)?;
                let job_id = request["job_id"].as_str().unwrap_or_default().to_owned();
                sqlx::query("INSERT INTO ceiling (id, request) VALUES ($1::uuid, $2::jsonb)")
                    .bind(&job_id)
                    .bind(std::str::from_utf8(&delivery.data)?)
                    .execute(&db)
                    .await?;
                let event = json!({"job_id": job_id, "status": "succeeded", "metadata": request["metadata"]});
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "job.succeeded.hero".into(),
                        BasicPublishOptions::default(),
                        &serde_json::to_vec(&event)?,
                        BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2),
                    )
                    .await?
                    .await?;
                delivery.ack(BasicAckOptions::default()).await?;
                anyhow::Ok(())
            });
        }
        anyhow::Ok(())
    });
    let load = Load { jobs, mode: case.mode, window: 2 * scenario.concurrency, origin, started, timeline: None };
    let (elapsed, counted, latencies) = drive(channel, events, &names.request_queue, load, |_| {}).await?;
    worker.abort();
    for connection in [consume, publish, connection] {
        close(connection).await;
    }
    Ok(Run { jobs, counted, elapsed, latencies, process: None })
}

// ---------------------------------------------------------------------------------------
// The fake LLM: a chat-completions endpoint that answers one valid Hero after a delay.

/// The fake chat-completions provider: it answers every call with the same tool call, after
/// the scenario's latency.
struct FakeLlm {
    base_url: String,
    /// The CA of the HTTPS provider's certificate.
    ca_file: Option<String>,
    latency_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The calls it has received.
    calls: Arc<AtomicUsize>,
    /// Whether runs print their timeline (`--timeline`).
    timeline: bool,
    /// Serves while it lives.
    _https: Option<https_provider::HttpsProvider>,
}

impl FakeLlm {
    async fn start(provider: Provider) -> anyhow::Result<Self> {
        use axum::http::header::CONTENT_TYPE;
        let arguments = json!({"name": "Bench", "secret_name": "Mark", "age": 30}).to_string();
        let body = bytes::Bytes::from(serde_json::to_vec(&json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1,
            "model": "bench-model",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": null, "tool_calls": [{
                    "id": "call_bench", "type": "function", "function": {"name": "Hero", "arguments": arguments}
                }]},
                "finish_reason": "tool_calls"
            }],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
        }))?);
        let latency_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = latency_ms.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let received = calls.clone();
        let wait = move || {
            received.fetch_add(1, Ordering::Relaxed);
            let delay = Duration::from_millis(delay.load(std::sync::atomic::Ordering::Relaxed));
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
        };
        if provider == Provider::Https {
            let https = https_provider::HttpsProvider::start(100, move |_request| {
                let (wait, body) = (wait.clone(), body.clone());
                async move {
                    wait().await;
                    https_provider::json_response(body)
                }
            })
            .await;
            let ca_file = https_provider::test_ca().to_string_lossy().into_owned();
            return Ok(Self {
                base_url: https.base_url(),
                ca_file: Some(ca_file),
                latency_ms,
                calls,
                timeline: false,
                _https: Some(https),
            });
        }
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let (wait, body) = (wait.clone(), body.clone());
                async move {
                    wait().await;
                    ([(CONTENT_TYPE, "application/json")], body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            base_url: format!("http://{addr}/v1"),
            ca_file: None,
            latency_ms,
            calls,
            timeline: false,
            _https: None,
        })
    }

    fn set_latency(&self, latency: Duration) {
        self.latency_ms.store(latency.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}
