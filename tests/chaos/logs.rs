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
