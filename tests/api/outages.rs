//! Outages pause work; they do not fail it, lose it, spin on it or stop the daemon: a
//! provider that goes away (its circuit opens, jobs wait and are deferred past their
//! deadline, every one succeeds once it is back), a database that is down at start-up,
//! has no tables yet, or turns read-only.

use std::time::Duration;

use migration::MigratorTrait;
use sea_orm::{ConnectionTrait, Database};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;

fn deferred(metrics: &str, reason: &str) -> f64 {
    metric_sample(metrics, "instructd_deliveries_deferred_total", &[("reason", reason)]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_pauses_the_jobs_and_every_one_succeeds_once_it_is_back() {
    let llm = MockServer::start().await;
    answer_always(&llm, tool_call_completion("Hero", GOOD)).await;
    // The provider is reached through a proxy that resets every connection while cut.
    let provider = Proxy::start(*llm.address()).await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.llm.base_url = format!("http://{}/v1", provider.addr);
    settings.llm.circuit_failures = 3;
    settings.llm.request_timeout_secs = 1;
    settings.llm.job_timeout_secs = 3;
    settings.broker.defer_secs = 1;
    provider.cut();
    let mut app = spawn_app_with(settings, llm).await;

    let jobs = 12;
    for n in 0..jobs {
        app.publish(&request("hero", &format!("Make hero {n}"))).await;
    }
    // The circuit opens; jobs that reach their deadline while it is open are moved to the
    // delay queue, not failed.
    let open = wait_for(|| async { app.get("/readyz").await.1.contains(r#""llm":"open""#) }).await;
    assert!(open, "the circuit opens: {}", app.get("/readyz").await.1);
    let paused = wait_for(|| async { deferred(&app.get("/metrics").await.1, "provider") >= 4.0 }).await;
    assert!(paused, "jobs past their deadline are deferred:\n{}", app.get("/metrics").await.1);
    assert!(app.try_next_event(Duration::ZERO).await.is_none(), "no job failed");
    // One call per probe, not one per job per backoff.
    let calls = provider.refused();
    assert!(calls <= 30, "{calls} calls during the outage");

    provider.restore();
    for _ in 0..jobs {
        let received = app.next_event().await;
        assert_eq!(received.routing_key, "job.succeeded.hero", "{:?}", received.event.error);
    }
    assert_eq!(app.llm_requests().await.len(), jobs, "one call each once the provider is back");
    assert_eq!(app.count("SELECT count(*) FROM hero").await, jobs as i64, "none doubled");
    let metrics = app.get("/metrics").await.1;
    assert_eq!(metric_sample(&metrics, "instructd_jobs_total", &[("entity", "hero"), ("outcome", "llm")]), Some(0.0));
    assert!(app.get("/readyz").await.1.contains(r#""llm":"closed""#));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_in_five_failing_fails_no_job() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let llm = MockServer::start().await;
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let good = tool_call_completion("Hero", GOOD);
    // One call in five fails: a 500, or a 429 that says to come back in a second.
    let flaky = move |_: &wiremock::Request| match calls.fetch_add(1, Ordering::SeqCst) % 10 {
        0 => ResponseTemplate::new(500),
        5 => ResponseTemplate::new(429).insert_header("retry-after", "1"),
        _ => ResponseTemplate::new(200).set_body_json(good.clone()),
    };
    Mock::given(method("POST")).and(path("/v1/chat/completions")).respond_with(flaky).mount(&llm).await;
    let settings = test_settings(&llm, &create_database().await).await;
    let mut app = spawn_app_with(settings, llm).await;

    let jobs = 40;
    for n in 0..jobs {
        app.publish(&request("hero", &format!("Make hero {n}"))).await;
    }
    for _ in 0..jobs {
        let received = app.next_event_within(Duration::from_secs(60)).await;
        assert_eq!(received.routing_key, "job.succeeded.hero", "{:?}", received.event.error);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_at_start_up_is_waited_for_not_exited_on() {
    let llm = MockServer::start().await;
    answer_always(&llm, tool_call_completion("Hero", GOOD)).await;
    let direct = create_database().await;
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    postgres.cut();
    let mut url = url::Url::parse(&direct).unwrap();
    url.set_port(Some(postgres.addr.port())).unwrap();
    let mut settings = test_settings(&llm, url.as_str()).await;
    settings.database.connect_timeout_secs = 2;
    let db = Database::connect(direct.as_str()).await.unwrap();
    let mut app = spawn_app_unready(settings, llm, db).await;

    let waiting = wait_for(|| async {
        let (status, body) = app.get("/readyz").await;
        status == 503 && body.contains(r#""database":"down: "#)
    })
    .await;
    assert!(waiting, "not ready, and says why: {}", app.get("/readyz").await.1);
    assert_eq!(app.get("/healthz").await.0, 200, "alive: restarting would not help");
    app.publish(&request("hero", "Make a hero")).await;

    postgres.restore();
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    assert_eq!(app.get("/readyz").await.0, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_its_tables_is_reported_and_waited_for_until_it_is_migrated() {
    let llm = MockServer::start().await;
    answer_always(&llm, tool_call_completion("Hero", GOOD)).await;
    let url = create_database().await;
    let mut settings = test_settings(&llm, &url).await;
    settings.database.migrate_on_start = false;
    let db = Database::connect(url.as_str()).await.unwrap();
    let mut app = spawn_app_unready(settings, llm, db).await;

    let refusing = wait_for(|| async {
        let (status, body) = app.get("/readyz").await;
        status == 503 && body.contains("refusing writes") && body.contains("does not exist")
    })
    .await;
    assert!(refusing, "{}", app.get("/readyz").await.1);
    assert_eq!(app.get("/healthz").await.0, 200);
    app.publish(&request("hero", "Make a hero")).await;
    assert!(app.try_next_event(Duration::from_secs(2)).await.is_none());
    assert!(app.llm_requests().await.is_empty(), "nothing is taken before the database can hold it");

    migration::Migrator::up(&app.db, None).await.unwrap();
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_pauses_jobs_without_dead_lettering_or_redelivering_them() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let url = secrecy::ExposeSecret::expose_secret(&app.settings.database.url).to_owned();
    let name = url.rsplit('/').next().unwrap().to_owned();
    let admin = Database::connect(admin_database_url().as_str()).await.unwrap();
    // Read-only for every new session (a standby after a failover), and its sessions
    // dropped so that the daemon's come back read-only.
    let set_read_only = |on: bool| {
        let admin = admin.clone();
        let name = name.clone();
        async move {
            let setting =
                if on { "SET default_transaction_read_only = on" } else { "RESET default_transaction_read_only" };
            admin.execute_unprepared(&format!("ALTER DATABASE {name} {setting}")).await.unwrap();
            admin
                .execute_unprepared(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                ))
                .await
                .unwrap();
        }
    };
    set_read_only(true).await;
    let refusing = wait_for(|| async { app.get("/readyz").await.1.contains("refusing writes") }).await;
    assert!(refusing, "{}", app.get("/readyz").await.1);

    let jobs = 8;
    for n in 0..jobs {
        app.publish(&request("hero", &format!("Make hero {n}"))).await;
    }
    assert!(app.try_next_event(Duration::from_secs(3)).await.is_none(), "nothing is decided meanwhile");
    set_read_only(false).await;
    for _ in 0..jobs {
        assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    }
    assert_eq!(app.message_count(&app.settings.broker.dead_letter_queue).await, 0, "nothing dead-lettered");
    let metrics = app.get("/metrics").await.1;
    let internal = [("entity", "hero"), ("outcome", "internal")];
    assert_eq!(metric_sample(&metrics, "instructd_jobs_total", &internal), Some(0.0));
    assert_eq!(app.llm_requests().await.len(), jobs, "no job was generated twice");
    let _ = admin.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_provider_keeps_failing_for_longer_than_give_up_after_fails_with_kind_llm() {
    let llm = MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    // Alone, its own failures open the circuit: without a bound it would be deferred forever.
    settings.llm.circuit_failures = 1;
    settings.llm.request_timeout_secs = 1;
    settings.llm.job_timeout_secs = 2;
    settings.llm.give_up_after_secs = 2;
    let mut app = spawn_app_with(settings, llm).await;
    respond_always(&app.llm, ResponseTemplate::new(503).set_body_string("upstream overloaded")).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, instructd::contract::ErrorKind::Llm);
    assert!(error.message.contains("llm.give_up_after_secs"), "{}", error.message);
    assert!(error.message.contains("upstream overloaded"), "{}", error.message);
    app.stop().await;
}
