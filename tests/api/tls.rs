//! TLS to RabbitMQ and Postgres, verified against a CA file from the configuration. Needs
//! the listeners `scripts/tls-services.sh` sets up: amqps on 5671 and Postgres with ssl on,
//! both with a certificate for `localhost` signed by a CA it generates.

use std::path::PathBuf;

use instructd::config::Settings;
use wiremock::MockServer;

use crate::helpers::*;

fn test_ca() -> PathBuf {
    let dir = std::env::var("INSTRUCTD_TLS_DIR").unwrap_or_else(|_| "/var/lib/instructd-tls".to_owned());
    let ca = PathBuf::from(dir).join("ca.pem");
    assert!(ca.is_file(), "{} is missing: run scripts/tls-services.sh", ca.display());
    ca
}

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
