//! The console and its JSON API (`/api/jobs…`, `/jobs…`), against jobs the daemon really ran,
//! each answer checked against `docs/openapi.json`; and `instructd jobs`, the same from the
//! command line.

use instructd::startup::Application;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const GOOD: &str = r#"{"name": "Superman", "secret_name": "Clark Kent"}"#;

/// A validator of `docs/openapi.json`'s schema `name`, its `$ref`s resolved in the document.
pub(crate) fn openapi(name: &str) -> jsonschema::Validator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let document: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let root = json!({"$ref": format!("#/components/schemas/{name}"), "components": document["components"]});
    jsonschema::validator_for(&root).expect("the document's schemas compile")
}

/// GETs `path` of the API: the status and the JSON, which must be what the OpenAPI document
/// says it is (`schema`, or `Error` for an error).
async fn api(app: &TestApp, path: &str, schema: &str) -> (u16, Value) {
    let (status, body) = app.get(path).await;
    let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    let schema = if status == 200 { schema } else { "Error" };
    let errors: Vec<String> =
        openapi(schema).iter_errors(&body).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{path}: not a {schema}: {errors:?}\n{body:#}");
    (status, body)
}

fn ids(page: &Value) -> Vec<String> {
    page["jobs"].as_array().unwrap().iter().map(|job| job["job_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_jobs_attempts_show_each_answer_beside_what_was_wrong_with_it() {
    let mut app = spawn_app().await;
    answer_once(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman"}"#)).await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman", "secret_name": "C", "age": "old"}"#))
        .await;
    let mut request = request("hero", "Make a new superhero");
    request["max_retries"] = json!(1);

    app.publish(&request).await;
    let job_id = app.next_event().await.event.job_id;

    let (status, job) = api(&app, &format!("/api/jobs/{job_id}"), "JobDetail").await;
    assert_eq!(status, 200);
    assert_eq!(
        (job["status"].as_str(), job["entity"].as_str(), job["attempts"].as_i64()),
        (Some("failed"), Some("hero"), Some(2))
    );
    assert_eq!(job["models"], json!(["fake-model"]));
    assert_eq!(job["error"]["kind"], "validation");
    assert_eq!(job["request"]["messages"], request["messages"]);
    let calls = job["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["call"]["error"], json!({"kind": "validation", "message": "secret_name: field required"}));
    assert_eq!(
        calls[1]["call"]["error"],
        json!({"kind": "validation", "message": r#"age: must be an integer, got "old""#})
    );
    for call in calls {
        assert_eq!(call["call"]["model"], "fake-model");
        assert_eq!(call["call"]["finish_reason"], "tool_calls");
        assert!(call["call"]["usage"]["total_tokens"].as_u64().unwrap() > 0, "{call}");
        assert!(call["call"]["duration_ms"].is_u64() && call["call"]["started_at"].is_string(), "{call}");
    }
    let answer =
        |n: usize| calls[n]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].clone();
    assert_eq!(answer(0), r#"{"name": "Superman"}"#, "each call beside its own raw answer");
    assert_eq!(answer(1), r#"{"name": "Superman", "secret_name": "C", "age": "old"}"#);
    assert_eq!(job["event"]["job_id"], job_id.to_string());
    assert_eq!(job["event_routing_key"], "job.failed.hero");
    assert_eq!(job["events"][0]["routing_key"], "job.failed.hero");

    // Without a token, only a loopback name is answered (no DNS rebinding).
    let rebound = reqwest::Client::new()
        .get(format!("http://{}/api/jobs/{job_id}", app.http_addr))
        .header(reqwest::header::HOST, "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::FORBIDDEN);

    let (status, page) = app.get(&format!("/jobs/{job_id}")).await;
    assert_eq!(status, 200);
    for shown in [
        "Attempt 1",
        "Attempt 2",
        "secret_name: field required",
        "age: must be an integer, got &quot;old&quot;",
        "Make a new superhero",
        "no valid answer after 2 attempt(s)",
    ] {
        assert!(page.contains(shown), "the job's page shows {shown:?}:\n{page}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_newest_first_by_every_filter_one_page_after_another() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.llm.allowed_models = vec!["other-model".into()];
    let mut app = spawn_app_with(settings, llm).await;
    Mock::given(method("POST"))
        .and(body_string_contains("FAILME"))
        .respond_with(ResponseTemplate::new(200).set_body_json(tool_call_completion("Hero", r#"{"name": "X"}"#)))
        .with_priority(1)
        .mount(&app.llm)
        .await;
    answer_always(&app.llm, tool_call_completion("Hero", GOOD)).await;
    let tag = format!("Tag-{}", Uuid::new_v4().simple());
    let mut first = request("hero", "Make a hero");
    first["metadata"] = json!({"batch": tag});
    let mut failing = request("hero", "FAILME please");
    failing["max_retries"] = json!(0);
    let unknown = request("no_such_entity", "Make one");
    let mut other_model = request("hero", "Make a hero");
    other_model["model"] = json!("other-model");
    // One after another: each is created after the one before.
    let mut jobs = Vec::new();
    for request in [&first, &failing, &unknown, &other_model] {
        app.publish(request).await;
        jobs.push(app.next_event().await.event.job_id.to_string());
    }
    let [j1, j2, j3, j4] = [&jobs[0], &jobs[1], &jobs[2], &jobs[3]].map(String::clone);

    let list = async |query: &str| {
        let (status, page) = api(&app, &format!("/api/jobs{query}"), "JobPage").await;
        assert_eq!(status, 200, "{query}: {page}");
        ids(&page)
    };
    assert_eq!(list("").await, [j4.as_str(), j3.as_str(), j2.as_str(), j1.as_str()]);
    assert_eq!(list("?status=failed").await, [j3.as_str(), j2.as_str()]);
    assert_eq!(list("?status=succeeded&entity=hero").await, [j4.as_str(), j1.as_str()]);
    assert_eq!(list("?error_kind=validation").await, [j2.as_str()]);
    assert_eq!(list("?error_kind=invalid_request").await, [j3.as_str()]);
    assert_eq!(list("?entity=no_such_entity").await, [j3.as_str()]);
    assert_eq!(list("?model=other-model").await, [j4.as_str()]);
    assert_eq!(list("?model=fake-model").await, [j2.as_str(), j1.as_str()], "the rejected job called no model");
    assert_eq!(list(&format!("?q={}", tag.to_lowercase())).await, [j1.as_str()], "text in the metadata, any case");
    assert_eq!(list("?q=FAILME").await, [j2.as_str()], "text in a message");
    assert_eq!(list("?q=%25").await, Vec::<String>::new(), "`%` is itself, not a pattern");
    assert_eq!(list("?since=1h&status=").await.len(), 4, "an age; an empty parameter does not filter");
    let (_, second) = api(&app, &format!("/api/jobs/{j2}"), "JobDetail").await;
    let created = second["created_at"].as_str().unwrap().to_owned();
    assert_eq!(list(&format!("?since={created}")).await, [j4.as_str(), j3.as_str(), j2.as_str()]);
    assert_eq!(list(&format!("?until={created}")).await, [j1.as_str()]);

    // Pages: keyset, no job twice, none left out.
    let (_, page) = api(&app, "/api/jobs?limit=3", "JobPage").await;
    assert_eq!(ids(&page), [j4.as_str(), j3.as_str(), j2.as_str()]);
    let next = page["next"].as_str().expect("a next page").to_owned();
    let (_, page) = api(&app, &format!("/api/jobs?limit=3&after={next}"), "JobPage").await;
    assert_eq!(ids(&page), [j1.as_str()]);
    assert!(page["next"].is_null());

    let (status, counts) = api(&app, "/api/jobs/counts?status=running", "JobCounts").await;
    assert_eq!(status, 200);
    assert_eq!(
        counts,
        json!({"total": 4, "by_status": {"failed": 2, "succeeded": 2},
               "by_entity": {"hero": {"failed": 1, "succeeded": 2}, "no_such_entity": {"failed": 1}}})
    );
    let (_, counts) = api(&app, "/api/jobs/counts?error_kind=validation", "JobCounts").await;
    assert_eq!(counts["total"], 1);

    for (query, parameter) in [
        ("/api/jobs?status=done", "status: "),
        ("/api/jobs?limit=0", "limit: "),
        ("/api/jobs?limit=201", "limit: "),
        ("/api/jobs?after=zz", "after: "),
        ("/api/jobs?since=yesterday", "since: "),
        ("/api/jobs/counts?error_kind=oops", "error_kind: "),
        ("/api/jobs/not-a-uuid", "job_id: "),
    ] {
        let (status, error) = api(&app, query, "Error").await;
        assert_eq!(status, 400, "{query}");
        assert!(error["error"].as_str().unwrap().starts_with(parameter), "{query}: {error}");
    }
    let (status, _) = api(&app, &format!("/api/jobs/{}", Uuid::new_v4()), "Error").await;
    assert_eq!(status, 404);

    // The console's list, with the same filter.
    let (status, html) = app.get("/jobs?status=failed&since=24h").await;
    assert_eq!(status, 200);
    assert!(html.contains(&j2) && html.contains(&j3) && !html.contains(&j1) && !html.contains(&j4), "{html}");
    let (status, html) = app.get("/jobs?limit=2").await;
    assert_eq!(status, 200);
    assert!(html.contains("Older →"), "a link to the next page: {html}");
    let (status, html) = app.get("/").await;
    assert_eq!(status, 200);
    assert!(html.contains("Last hour") && html.contains("no_such_entity"), "{html}");
    let (status, _) = app.get("/jobs?status=done").await;
    assert_eq!(status, 400);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_in_a_prompt_and_in_answers_shows_as_text() {
    let mut app = spawn_app().await;
    let hostile = "<img src=x onerror=alert(1)>";
    answer_once(
        &app.llm,
        tool_call_completion("Hero", r#"{"name": "<b>x</b>", "secret_name": "s", "age": "<i>old</i>"}"#),
    )
    .await;
    answer_always(
        &app.llm,
        tool_call_completion("Hero", r#"{"name": "<script>alert(1)</script>", "secret_name": "s"}"#),
    )
    .await;
    let mut request = request("hero", hostile);
    request["metadata"] = json!({"note": "</pre><script>alert(2)</script>"});

    app.publish(&request).await;
    let received = app.next_event().await;
    assert_eq!(received.routing_key, "job.succeeded.hero");

    let client = reqwest::Client::new();
    let url = format!("http://{}/jobs/{}", app.http_addr, received.event.job_id);
    let response = client.get(url).send().await.unwrap();
    let policy = response.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
    assert!(policy.starts_with("default-src 'none'"), "no script may run: {policy}");
    let page = response.text().await.unwrap();
    for markup in ["<img src=x", "<script>alert", "<b>x</b>", "<i>old</i>", "</pre><script>"] {
        assert!(!page.contains(markup), "{markup:?} is markup on the page:\n{page}");
    }
    for text in [
        "&lt;img src=x onerror=alert(1)&gt;",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "got &quot;&lt;i&gt;old&lt;/i&gt;&quot;",
        "&lt;/pre&gt;&lt;script&gt;alert(2)&lt;/script&gt;",
    ] {
        assert!(page.contains(text), "{text:?} shows as text:\n{page}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_listener_beyond_loopback_every_console_call_needs_the_admin_token() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.http.listen = "0.0.0.0:0".parse().unwrap();
    let token = "console-test-token-0123456789";
    settings.http.admin_token = SecretString::from(token);
    let app = spawn_app_with(settings, llm).await;
    let base = format!("http://127.0.0.1:{}", app.http_addr.port());
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let get = async |path: &str, header: Option<(reqwest::header::HeaderName, String)>| {
        let mut request = client.get(format!("{base}{path}"));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        request.send().await.unwrap()
    };

    // The probes stay open.
    assert_eq!(get("/healthz", None).await.status(), StatusCode::OK);
    let refused = get("/api/jobs", None).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.text().await.unwrap().contains("admin token"));
    let wrong = Some((AUTHORIZATION, "Bearer not-the-token-at-all".to_owned()));
    assert_eq!(get("/api/jobs", wrong).await.status(), StatusCode::UNAUTHORIZED);
    let bearer = Some((AUTHORIZATION, format!("Bearer {token}")));
    assert_eq!(get("/api/jobs", bearer).await.status(), StatusCode::OK);

    // A browser: sent to sign in, signed in with the token, then let through by its cookie.
    let page = get("/jobs", None).await;
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(page.headers()[LOCATION], "/login");
    assert_eq!(get("/login", None).await.status(), StatusCode::OK);
    let sign_in = async |token: &str| {
        let body = url::form_urlencoded::Serializer::new(String::new()).append_pair("token", token).finish();
        let form = "application/x-www-form-urlencoded";
        client.post(format!("{base}/login")).header(CONTENT_TYPE, form).body(body).send().await.unwrap()
    };
    assert_eq!(sign_in("wrong-token-wrong-token").await.status(), StatusCode::UNAUTHORIZED);
    let signed_in = sign_in(token).await;
    assert_eq!(signed_in.status(), StatusCode::SEE_OTHER);
    let cookie = signed_in.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains(token), "the cookie is not the token: {cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    assert_eq!(get("/jobs", Some((COOKIE, session.clone()))).await.status(), StatusCode::OK);
    assert_eq!(get("/", Some((COOKIE, session))).await.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_an_open_console_beyond_loopback_without_a_token() {
    let llm = wiremock::MockServer::start().await;
    let database = create_database().await;
    let _database = Leftovers::database(&database);
    let mut settings = test_settings(&llm, &database).await;
    settings.http.listen = "0.0.0.0:0".parse().unwrap();

    let error = Application::build(settings.clone(), instructd::heroes::app()).await.err().expect("refused");
    let error = format!("{error:#}");
    assert!(error.starts_with("http.admin_token_file: not set, and http.listen (0.0.0.0:0)"), "{error}");
    assert!(error.contains("http.console = false"), "{error}");

    // Without the console, only the probes are served there: nothing to protect.
    settings.http.console = false;
    let app = spawn_app_with(settings, llm).await;
    assert_eq!(http_get(&format!("http://127.0.0.1:{}/api/jobs", app.http_addr.port())).await.unwrap().0, 404);
    assert_eq!(http_get(&format!("http://127.0.0.1:{}/healthz", app.http_addr.port())).await.unwrap().0, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instructd_jobs_lists_and_shows_what_the_api_does() {
    let mut app = spawn_app().await;
    // An answer that would clear a terminal, quoted in the validation error.
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "X", "secret_name": "s", "age": "\u001b[2J"}"#))
        .await;
    let mut request = request("hero", "Make a hero");
    request["max_retries"] = json!(0);
    app.publish(&request).await;
    let job_id = app.next_event().await.event.job_id.to_string();
    let jobs = async |args: &[&str]| {
        app.instructd_command()
            .env("INSTRUCTD__DATABASE__URL", app.settings.database.url.expose_secret())
            .arg("jobs")
            .args(args)
            .output()
            .await
            .expect("instructd runs")
    };

    let listed = jobs(&["list", "--status", "failed", "--since", "1h"]).await;
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let stdout = String::from_utf8(listed.stdout).unwrap();
    let line = stdout.lines().find(|line| line.contains(&job_id)).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("hero") && line.contains("failed") && line.contains("validation: "), "{line}");
    assert!(!stdout.contains('\u{1b}'), "no terminal escape reaches the terminal: {stdout:?}");

    let listed = jobs(&["list", "--json", "--limit", "1"]).await;
    let page: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(openapi("JobPage").is_valid(&page), "{page}");
    assert_eq!(ids(&page), [job_id.as_str()]);

    let shown = jobs(&["show", &job_id]).await;
    assert!(shown.status.success());
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let (_, api) = api(&app, &format!("/api/jobs/{job_id}"), "JobDetail").await;
    assert_eq!(shown, api, "the command line shows what the API does");

    let refused = jobs(&["list", "--status", "done"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--status: `done` is not running, succeeded or failed"));
    let unknown = jobs(&["show", &Uuid::new_v4().to_string()]).await;
    assert_eq!(unknown.status.code(), Some(1));
    app.stop().await;
}
