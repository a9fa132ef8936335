//! `instructd enqueue`, the real binary, against a running daemon.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::{MockServer, ResponseTemplate};

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_enqueues_many_jobs_and_wait_prints_every_event() {
    let app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    let output = app
        .instructd_command()
        .args(["enqueue", "--entity", "hero", "--prompt", "Make a hero", "--count", "5", "--wait", "--timeout", "60"])
        .output()
        .await
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let events: Vec<Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 5, "one line per job");
    assert!(events.iter().all(|e| e["status"] == "succeeded"));
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e["job_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "each job has its own id");
    assert!(stderr.contains("5 succeeded, 0 failed, 0 without an event"), "{stderr}");
    assert_eq!(app.heroes().await.len(), 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_file_is_the_conversation_and_a_failed_job_exits_one() {
    let app = spawn_app().await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "No secret"}"#)).await;
    let file = std::env::temp_dir().join(format!("instructd-messages-{}.json", uuid::Uuid::new_v4()));
    let conversation = json!([
        {"role": "system", "content": "You invent heroes."},
        {"role": "user", "content": "One from Gotham."},
        {"role": "assistant", "content": "Which decade?"},
        {"role": "user", "content": "The eighties."}
    ]);
    std::fs::write(&file, conversation.to_string()).unwrap();

    let output = app
        .instructd_command()
        .args(["enqueue", "--entity", "hero", "--max-retries", "0", "--wait", "--timeout", "60"])
        .arg("--messages-file")
        .arg(&file)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&file);

    assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
    let event: Value = serde_json::from_slice(&output.stdout).expect("the event is printed");
    assert_eq!(event["status"], "failed");
    assert_eq!(event["error"]["kind"], "validation");
    let calls = app.llm_requests().await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["messages"], conversation, "the file is the conversation, in order");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_past_the_timeout_exits_two() {
    let llm = MockServer::start().await;
    let slow =
        ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", GOOD)).set_delay(Duration::from_secs(20));
    respond_always(&llm, slow).await;
    let settings = test_settings(&llm, &create_database().await).await;
    let app = spawn_app_with(settings, llm).await;

    let output = app
        .instructd_command()
        .args(["enqueue", "--entity", "hero", "--prompt", "Make a hero", "--wait", "--timeout", "1"])
        .output()
        .await
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no completion event for job"), "{stderr}");
    app.stop().await;
}
