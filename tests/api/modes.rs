//! Instructor's modes (tools, json, json_schema with strict), re-ask history, and answers
//! cut off at the token limit.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent", "age": 30}"#;

fn with_mode(mode: &str) -> Value {
    let mut request = request("hero", "Make a hero");
    request["mode"] = json!(mode);
    request
}

async fn app_with(overrides: &[(&str, &str)]) -> TestApp {
    let llm = wiremock::MockServer::start().await;
    let mut env = test_env(&llm, &create_database().await);
    for (key, value) in overrides {
        env.insert((*key).to_owned(), (*value).to_owned());
    }
    spawn_app_with(instructd::config::Settings::load_from(None, env).unwrap(), llm).await
}

fn content(message: &Value) -> &str {
    message["content"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_sends_the_schema_in_a_system_message_and_reads_a_fenced_answer() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, text_completion(&format!("Here it is:\n```json\n{GOOD}\n```"))).await;
    let mut request = with_mode("json");
    request["messages"] =
        json!([{"role": "system", "content": "You invent heroes."}, {"role": "user", "content": "One"}]);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.record.unwrap()["secret_name"], "Clark Kent");
    let call = &app.llm_requests().await[0];
    assert_eq!(call["response_format"], json!({"type": "json_object"}));
    assert!(call.get("tools").is_none() && call.get("tool_choice").is_none());
    let messages = call["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "the schema joins the existing system message");
    let system = content(&messages[0]);
    assert!(system.starts_with("You invent heroes.\n\nAs a genius expert"), "{system}");
    assert!(system.contains(r#""secret_name": {"#), "the schema is in it: {system}");
    assert!(system.ends_with("Make sure to return an instance of the JSON, not the schema itself"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_re_asks_with_the_assistant_text_and_instructors_user_message() {
    let mut app = spawn_app().await;
    answer_once(&app.llm, text_completion(r#"{"name": "Superman"}"#)).await;
    answer_always(&app.llm, text_completion(GOOD)).await;

    app.publish(&with_mode("json")).await;
    let received = app.next_event().await;

    assert_eq!(received.event.attempts, 2);
    let calls = app.llm_requests().await;
    let messages = calls[1]["messages"].as_array().unwrap();
    let [.., assistant, user] = messages.as_slice() else { panic!("two messages appended") };
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(content(assistant), r#"{"name": "Superman"}"#);
    assert_eq!(user["role"], "user");
    assert_eq!(
        content(user),
        "Correct your JSON ONLY RESPONSE, based on the following errors:\nsecret_name: field required"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_json_schema_mode_sends_the_rewritten_schema() {
    let mut app = app_with(&[("INSTRUCTD__LLM__MODE", "json_schema"), ("INSTRUCTD__LLM__STRICT", "true")]).await;
    answer_always(&app.llm, text_completion(r#"{"name": "Superman", "secret_name": "Clark Kent", "age": null}"#)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    let call = &app.llm_requests().await[0];
    let format = &call["response_format"];
    assert_eq!(format["type"], "json_schema");
    assert_eq!(format["json_schema"]["name"], "Hero");
    assert_eq!(format["json_schema"]["strict"], true);
    assert_eq!(
        format["json_schema"]["schema"],
        json!({
            "properties": {
                "name": {"title": "Name", "type": "string"},
                "secret_name": {"title": "Secret Name", "type": "string"},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Age"}
            },
            "required": ["name", "secret_name", "age"], "title": "Hero", "type": "object",
            "additionalProperties": false
        })
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_tools_mode_marks_the_function_strict() {
    let mut app = app_with(&[("INSTRUCTD__LLM__STRICT", "true")]).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    app.publish(&request("hero", "Make a hero")).await;
    assert_eq!(app.next_event().await.routing_key, "job.succeeded.hero");

    let function = &app.llm_requests().await[0]["tools"][0]["function"];
    assert_eq!(function["strict"], true);
    assert_eq!(function["parameters"]["additionalProperties"], false);
    assert_eq!(function["parameters"]["required"], json!(["name", "secret_name", "age"]));
    app.stop().await;
}

/// The messages of the third call after two failed answers, with `reask_history`.
async fn third_call_messages(history: &str) -> Vec<Value> {
    let mut app = app_with(&[("INSTRUCTD__LLM__REASK_HISTORY", history)]).await;
    answer_once(&app.llm, tool_call_completion("Hero", r#"{"name": "One"}"#)).await;
    answer_once(&app.llm, tool_call_completion("Hero", r#"{"name": "Two"}"#)).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(3);

    app.publish(&request).await;
    let received = app.next_event().await;
    assert_eq!(received.event.attempts, 3);
    let messages = app.llm_requests().await[2]["messages"].as_array().unwrap().clone();
    app.stop().await;
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reask_history_all_keeps_every_failed_answer_and_last_only_the_latest() {
    let all = third_call_messages("all").await;
    assert_eq!(all.len(), 1 + 2 + 2, "the prompt, then two failed answers with their errors");

    let last = third_call_messages("last").await;
    assert_eq!(last.len(), 1 + 2, "the prompt, then the latest failed answer and its error");
    let echoed = &last[1]["tool_calls"][0]["function"]["arguments"];
    assert_eq!(echoed, r#"{"name": "Two"}"#, "the latest answer is the one kept");
}

fn cut_off(arguments: &str) -> Value {
    let mut completion = tool_call_completion("Hero", arguments);
    completion["choices"][0]["finish_reason"] = json!("length");
    completion
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_at_the_token_limit_is_re_asked_once_with_a_note() {
    let mut app = spawn_app().await;
    answer_once(&app.llm, cut_off(r#"{"name": "Super"#)).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(0);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero", "the cut-off re-ask is outside max_retries");
    assert_eq!(received.event.attempts, 2);
    let calls = app.llm_requests().await;
    let note = content(calls[1]["messages"].as_array().unwrap().last().unwrap());
    assert!(note.contains("cut off at the token limit"), "{note}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_twice_fails_the_job_with_kind_llm() {
    let mut app = spawn_app().await;
    answer_always(&app.llm, cut_off(r#"{"name": "Super"#)).await;
    let job_id = Uuid::new_v4();
    let mut request = request("hero", "Make a hero");
    request["job_id"] = json!(job_id);

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.failed.hero");
    let error = received.event.error.unwrap();
    assert_eq!(error.kind, instructd::contract::ErrorKind::Llm);
    assert!(error.message.contains("finish_reason: length"), "{}", error.message);
    assert_eq!(app.llm_requests().await.len(), 2);
    assert_eq!(app.job(job_id).await.responses.as_array().unwrap().len(), 2, "both responses are kept");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_another_function_or_no_call_at_all_is_re_asked() {
    let mut app = spawn_app().await;
    answer_once(&app.llm, tool_call_completion("Villain", GOOD)).await;
    answer_once(&app.llm, text_completion("Sure, here is a hero: Superman.")).await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;

    app.publish(&request("hero", "Make a hero")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.hero");
    assert_eq!(received.event.attempts, 3);
    let calls = app.llm_requests().await;
    let last = |i: usize| content(calls[i]["messages"].as_array().unwrap().last().unwrap()).to_owned();
    assert!(last(1).contains("the function `Villain` was called instead of `Hero`"), "{}", last(1));
    assert!(last(2).contains("no call to the function `Hero` was made"), "{}", last(2));
    app.stop().await;
}
