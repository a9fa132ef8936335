//! What the daemon prints: never a secret, at any log level.

use std::time::Duration;

use crate::helpers::chat_completions;
use serde_json::json;
use wiremock::ResponseTemplate;

use crate::support::*;

const LONG: Duration = Duration::from_secs(120);
/// `test_env`'s API key.
const KEY: &str = "sk-test-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_at_any_level_shows_the_api_key() {
    // Trace level for every crate, in both formats; the provider echoes the key in its error.
    for format in ["json", "pretty"] {
        let mut scenario = Scenario::new(
            if format == "json" { "secrets-json" } else { "secrets-pretty" },
            Duration::ZERO,
            &[("INSTRUCTD__LOG__FORMAT", format), ("INSTRUCTD__LOG__LEVEL", "trace")],
        )
        .await;
        let echoing = ResponseTemplate::new(401)
            .set_body_json(json!({"error": {"message": format!("Incorrect API key: {KEY}")}}));
        chat_completions(echoing).with_priority(1).mount(&scenario.llm).await;
        let mut daemon = scenario.start();
        let ids = scenario.enqueue(3).await;
        let (_, announced) = scenario.collect_events(&ids, LONG).await;
        assert_eq!(announced, 3);
        stop_gracefully(&mut daemon, Duration::from_secs(30)).await;

        let log = std::fs::read_to_string(scenario.log_path(1)).unwrap();
        assert!(log.contains("TRACE") || log.contains("\"level\":\"TRACE\""), "the log is at trace level");
        assert!(log.contains("401"), "the provider's failure is logged");
        assert!(!log.contains(KEY), "{format} log shows the API key");
        assert_eq!(
            scenario.count("SELECT count(*) FROM generation_job WHERE error::text LIKE '%sk-test-key%'").await,
            Some(0)
        );
    }
}

/// Recognisable secrets: none of them may appear in anything the daemon prints or sends.
const DB_PASSWORD: &str = "Pg-Secret-4f1c9e";
const MQ_PASSWORD: &str = "Mq-Secret-8b2d7a";

/// Everything `output` printed, as text.
fn printed(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [KEY, DB_PASSWORD, MQ_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows a secret ({secret}):\n{text}");
    }
}

/// `url` with its password replaced by `password`.
fn with_password(url: &str, password: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_password(Some(password)).unwrap();
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_failure_on_any_side_prints_no_secret() {
    let mut scenario = Scenario::new("auth-failures", Duration::ZERO, &[("INSTRUCTD__LOG__LEVEL", "debug")]).await;
    // The key comes from a file, as in production; the provider echoes it in its 401.
    let key_file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("auth-failures-api-key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    scenario.env.remove("INSTRUCTD__LLM__API_KEY");
    scenario.env.insert("INSTRUCTD__LLM__API_KEY_FILE".into(), key_file.to_str().unwrap().into());
    let wrong_db = with_password(&scenario.database_url, DB_PASSWORD);
    let wrong_mq = with_password(&crate::helpers::broker_url(), MQ_PASSWORD);
    let run = |args: &[&str], overrides: &[(&str, &str)]| {
        let mut command = crate::helpers::instructd_binary();
        command.args(args).envs(&scenario.env).stdin(std::process::Stdio::null());
        for (key, value) in overrides {
            command.env(key, value);
        }
        command.output().expect("instructd runs")
    };

    // `instructd config` with every secret set says where they came from, never what.
    let config = run(&["config"], &[("INSTRUCTD__DATABASE__URL", &wrong_db), ("INSTRUCTD__BROKER__URL", &wrong_mq)]);
    assert!(config.status.success());
    let text = printed(&config);
    assert!(text.contains(&format!("llm.api_key: file {}", key_file.display())), "{text}");
    assert_no_secret("instructd config", &text);

    // Postgres refuses the password: `migrate` fails, saying so without it.
    let output = run(&["migrate"], &[("INSTRUCTD__DATABASE__URL", &wrong_db)]);
    assert!(!output.status.success(), "migrate with a wrong database password fails");
    let text = printed(&output);
    assert!(text.contains("password authentication failed"), "migrate: {text}");
    assert!(text.contains(":***@"), "migrate shows the URL redacted: {text}");
    assert_no_secret("instructd migrate (database refused)", &text);

    // RabbitMQ refuses the password: `enqueue` fails, and the daemon keeps retrying.
    let output = run(&["enqueue", "--entity", "hero", "--prompt", "x"], &[("INSTRUCTD__BROKER__URL", &wrong_mq)]);
    assert_eq!(output.status.code(), Some(3), "nothing was enqueued");
    assert_no_secret("instructd enqueue (broker refused)", &printed(&output));
    // The daemon waits (an orchestrator's crash loop would not help), says why, and stops
    // cleanly.
    scenario.env.insert("INSTRUCTD__DATABASE__URL".into(), wrong_db.clone());
    let mut daemon = scenario.start();
    let log_path = scenario.log_path(1);
    let refused = wait_until(LONG, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        std::future::ready(log.matches("password authentication failed").count() >= 2)
    })
    .await;
    assert!(refused, "the daemon logs the database's refusal, and retries");
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains(":***@"), "the URL is shown redacted: {log}");
    assert_no_secret("the daemon's log (database refused)", &log);
    scenario.env.insert("INSTRUCTD__DATABASE__URL".into(), scenario.database_url.clone());
    scenario.env.insert("INSTRUCTD__BROKER__URL".into(), wrong_mq.clone());
    let mut daemon = scenario.start();
    let log_path = scenario.log_path(2);
    let refused = wait_until(LONG, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        std::future::ready(log.matches("ACCESS_REFUSED").count() >= 2)
    })
    .await;
    assert!(refused, "the daemon logs the broker's refusal, and retries");
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    assert_no_secret("the daemon's log (broker refused)", &std::fs::read_to_string(&log_path).unwrap());

    // The provider refuses the key and echoes it: not in the log, the events or the rows.
    scenario.env.insert("INSTRUCTD__BROKER__URL".into(), crate::helpers::broker_url());
    let echoing =
        ResponseTemplate::new(401).set_body_json(json!({"error": {"message": format!("Incorrect API key: {KEY}")}}));
    chat_completions(echoing).with_priority(1).mount(&scenario.llm).await;
    let mut daemon = scenario.start();
    let ids = scenario.enqueue(2).await;
    let mut bodies = String::new();
    for _ in &ids {
        use futures_util::StreamExt;
        let delivery = tokio::time::timeout(LONG, scenario.events.next()).await.expect("an event").unwrap().unwrap();
        bodies.push_str(&String::from_utf8_lossy(&delivery.data));
    }
    stop_gracefully(&mut daemon, Duration::from_secs(30)).await;
    assert!(bodies.contains("\"kind\":\"llm\"") && bodies.contains("401"), "{bodies}");
    assert!(bodies.contains("Incorrect API key: [redacted]"), "the provider's message is kept, redacted: {bodies}");
    assert_no_secret("the events", &bodies);
    let log = std::fs::read_to_string(scenario.log_path(3)).unwrap();
    assert!(log.contains("401"));
    assert_no_secret("the daemon's log (provider refused)", &log);
    let leaked = format!(
        "SELECT count(*) FROM generation_job WHERE concat(error::text, responses::text, request::text) LIKE '%{KEY}%'"
    );
    assert_eq!(scenario.count(&leaked).await, Some(0));
}
