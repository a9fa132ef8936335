//! TLS to RabbitMQ, Postgres and the provider, verified against CA files from the
//! configuration. Needs the listeners `scripts/tls-services.sh` sets up: amqps on 5671 and
//! Postgres with ssl on, both with a certificate for `localhost` signed by a CA it generates
//! (which the tests' HTTPS provider serves too).

use std::sync::Arc;

use bytes::Bytes;
use instructd::config::Settings;
use wiremock::MockServer;

use crate::helpers::*;
use crate::https_provider::{HttpsProvider, json_response, test_ca};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_talks_verified_tls_to_rabbitmq_and_postgres_with_a_ca_file() {
    let ca = test_ca();
    let llm = MockServer::start().await;
    let database_url = create_database().await.replace("@127.0.0.1:", "@localhost:") + "?sslmode=verify-full";
    let mut env = test_env(&llm, &database_url);
    env.insert("INSTRUCTD__BROKER__URL".into(), "amqps://guest:guest@localhost:5671/%2f".into());

    // The test CA is in no system store: without the CA file, neither side is trusted.
    let untrusted = Settings::load_from(None, env.clone()).unwrap();
    let Err(broker) = instructd::broker::connection::connect(&untrusted.broker, "tls-test").await else {
        panic!("RabbitMQ was trusted without the CA file");
    };
    assert!(format!("{broker:#}").contains("certificate"), "{broker:#}");
    let Err(database) = instructd::startup::connect_database(&untrusted).await else {
        panic!("Postgres was trusted without the CA file");
    };
    assert!(format!("{database:#}").contains("certificate"), "{database:#}");

    for key in ["INSTRUCTD__BROKER__CA_FILE", "INSTRUCTD__DATABASE__CA_FILE"] {
        env.insert(key.into(), ca.to_str().unwrap().into());
    }
    let settings = Settings::load_from(None, env).unwrap();
    let mut app = spawn_app_with(settings, llm).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Locke", "secret_name": "Key"}"#)).await;

    app.publish(&request("hero", "Make a hero")).await;
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    assert_eq!(app.heroes().await.len(), 1);
    // amqps:// on 5671 is TLS only; on the Postgres side, every session of this database is.
    let sessions =
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE datname = current_database()";
    assert!(app.count(&format!("{sessions} AND ssl")).await >= 2, "the daemon's and the test's sessions");
    assert_eq!(app.count(&format!("{sessions} AND NOT ssl")).await, 0);
    app.stop().await;
}

#[test]
fn a_ca_file_that_is_missing_or_would_verify_nothing_stops_start_up_naming_the_key() {
    let ca = test_ca();
    let ca = ca.to_str().unwrap();
    let cases = [
        (vec![("INSTRUCTD__BROKER__CA_FILE", "/nonexistent/ca.pem")], "broker.ca_file: no such file"),
        (vec![("INSTRUCTD__BROKER__CA_FILE", ca)], "broker.ca_file: needs an amqps:// broker.url"),
        (vec![("INSTRUCTD__LLM__CA_FILE", "/nonexistent/ca.pem")], "llm.ca_file: no such file"),
        (
            vec![("INSTRUCTD__LLM__CA_FILE", ca), ("INSTRUCTD__LLM__BASE_URL", "http://localhost:8080/v1")],
            "llm.ca_file: needs an https:// llm.base_url",
        ),
        (vec![("INSTRUCTD__LLM__STREAMS_PER_CONNECTION", "0")], "llm.streams_per_connection: must be at least 1"),
        (
            vec![("INSTRUCTD__DATABASE__CA_FILE", ca)],
            "database.ca_file: needs sslmode=verify-full (or verify-ca) in database.url",
        ),
        (
            vec![
                ("INSTRUCTD__DATABASE__CA_FILE", ca),
                ("INSTRUCTD__DATABASE__URL", "postgres://u:p@localhost/db?sslmode=require"),
            ],
            "database.ca_file: needs sslmode=verify-full",
        ),
    ];
    for (env, expected) in cases {
        let env = env.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        let err = Settings::load_from(None, env).unwrap_err();
        assert!(format!("{err:#}").contains(expected), "{err:#}");
    }
}

/// Hosted providers speak HTTP/2 over TLS and cap the concurrent streams of a connection
/// (commonly at 100 to 256); hyper sends one client's calls over one HTTP/2 connection, where
/// those past the cap wait. The provider here allows 2 streams a connection and answers no
/// call before all the jobs' calls are in: a call held back behind a full connection would
/// never come, and no job would finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_an_http2_provider_are_spread_over_connections_within_its_stream_cap() {
    const JOBS: usize = 8;
    let all_in = Arc::new(tokio::sync::Barrier::new(JOBS));
    let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
    let answer =
        Bytes::from(tool_call_completion("Hero", r#"{"name": "Streamer", "secret_name": "Multiplex"}"#).to_string());
    let provider = HttpsProvider::start(2, {
        let (all_in, versions) = (all_in.clone(), versions.clone());
        move |request: hyper::Request<Bytes>| {
            let (all_in, versions, answer) = (all_in.clone(), versions.clone(), answer.clone());
            async move {
                versions.lock().unwrap().push(request.version());
                all_in.wait().await;
                json_response(answer)
            }
        }
    })
    .await;
    let unused = MockServer::start().await;
    let mut env = test_env(&unused, &create_database().await);
    for (key, value) in [
        ("INSTRUCTD__LLM__BASE_URL", provider.base_url()),
        ("INSTRUCTD__LLM__CA_FILE", test_ca().to_str().unwrap().to_owned()),
        ("INSTRUCTD__LLM__STREAMS_PER_CONNECTION", "2".to_owned()),
        ("INSTRUCTD__WORKER__CONCURRENCY", JOBS.to_string()),
    ] {
        env.insert(key.into(), value);
    }
    let mut app = spawn_app_with(Settings::load_from(None, env).unwrap(), unused).await;

    for n in 0..JOBS {
        app.publish(&request("hero", &format!("Make hero {n}"))).await;
    }
    for _ in 0..JOBS {
        assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");
    }

    let versions = versions.lock().unwrap().clone();
    assert_eq!(versions, vec![hyper::Version::HTTP_2; JOBS], "every call went over HTTP/2");
    assert!(provider.connections() >= JOBS / 2, "{} connections for {JOBS} calls", provider.connections());
    assert_eq!(provider.http2_connections(), provider.connections());
    app.stop().await;
}
