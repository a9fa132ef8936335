//! The console in a real browser: Debian's headless Chromium, driven over the W3C WebDriver
//! protocol (Debian's ChromeDriver) by the small client below. What an operator does: sign in,
//! filter the failed jobs, open one, read both attempts and what was wrong with each, replay
//! it, watch the new job succeed; and a page full of hostile text that stays text.
//!
//! `scripts/test.sh` installs `chromium` and `chromium-driver`. With
//! `INSTRUCTD_SCREENSHOTS=docs` the test saves the job page it reads as
//! `docs/console-job.png` (the README's picture); otherwise under `target/screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;

use base64::Engine;
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const TOKEN: &str = "browser-test-token-0123456789";

/// A ChromeDriver and the headless Chromium session it drives; both end with it.
struct Browser {
    driver: tokio::process::Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
    _profile: TempDir,
}

/// A directory removed when dropped (Chromium's profile).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn which(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|path| path.is_file()));
    found.unwrap_or_else(|| {
        panic!("`{program}` is not installed: `apt-get install chromium chromium-driver` (scripts/test.sh does)")
    })
}

impl Browser {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = tokio::process::Command::new(which("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        assert!(
            wait_for(|| async {
                http.get(format!("{base}/status")).send().await.is_ok_and(|r| r.status().is_success())
            })
            .await,
            "chromedriver answers"
        );
        let profile = TempDir(std::env::temp_dir().join(format!("instructd-chromium-{}", Uuid::new_v4())));
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,1500",
        ];
        let mut args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.0.display()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": which("chromium"), "args": args},
        }}});
        let created: Value =
            http.post(format!("{base}/session")).json(&capabilities).send().await.unwrap().json().await.unwrap();
        let id = created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_owned();
        Self { driver, http, session: format!("{base}/session/{id}"), _profile: profile }
    }

    async fn command(&self, verb: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(verb, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        answer["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.command(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.command(reqwest::Method::GET, path, None).await
    }

    async fn open(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// The first element matching `css`; panics if there is none.
    async fn find(&self, css: &str) -> String {
        let found = self.post("/element", json!({"using": "css selector", "value": css})).await;
        let id = found.as_object().and_then(|element| element.values().next()).and_then(Value::as_str);
        id.unwrap_or_else(|| panic!("no element {css}: {found}")).to_owned()
    }

    async fn count(&self, css: &str) -> usize {
        let found = self.post("/elements", json!({"using": "css selector", "value": css})).await;
        found.as_array().map(Vec::len).unwrap_or(0)
    }

    async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.get(&format!("/element/{element}/text")).await.as_str().unwrap_or_default().to_owned()
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.post(&format!("/element/{element}/click"), json!({})).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.post(&format!("/element/{element}/value"), json!({"text": text})).await;
    }

    async fn url(&self) -> String {
        self.get("/url").await.as_str().unwrap_or_default().to_owned()
    }

    /// The page's address once `arrived` holds for it (a click on a form's button returns
    /// before the browser has navigated, on a loaded machine well before), or after 30 s
    /// the address it is still at, for the assertion to show.
    async fn url_when(&self, arrived: impl Fn(&str) -> bool) -> String {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let url = self.url().await;
            if arrived(&url) || std::time::Instant::now() > give_up {
                return url;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The text of an open JavaScript dialog (`alert(…)`), if one is open.
    async fn alert(&self) -> Option<String> {
        self.get("/alert/text").await.as_str().map(str::to_owned)
    }

    /// Saves the page as `name`.png: under docs/ with `INSTRUCTD_SCREENSHOTS=docs`, else under
    /// target/screenshots/.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = match std::env::var("INSTRUCTD_SCREENSHOTS").as_deref() {
            Ok("docs") => root.join("docs"),
            _ => root.join("target/screenshots"),
        };
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        path
    }

    async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_failed_job_reads_its_attempts_and_replays_it_into_a_success() {
    let llm = wiremock::MockServer::start().await;
    let mut settings = test_settings(&llm, &create_database().await).await;
    settings.http.admin_token = SecretString::from(TOKEN);
    settings.llm.allowed_models = vec!["large-model".into()];
    let mut app = spawn_app_with(settings, llm).await;
    // The large model answers well; the default one forgets a field, then breaks the age.
    Mock::given(method("POST"))
        .and(body_string_contains("large-model"))
        .respond_with(ResponseTemplate::new(200).set_body_json(tool_call_completion(
            "Hero",
            r#"{"name": "Spider-Man", "secret_name": "Peter Parker", "age": 17}"#,
        )))
        .with_priority(1)
        .mount(&app.llm)
        .await;
    answer_once(&app.llm, tool_call_completion("Hero", r#"{"name": "Spider-Man"}"#)).await;
    answer_once(
        &app.llm,
        tool_call_completion("Hero", r#"{"name": "Spider-Man", "secret_name": "Peter Parker", "age": "seventeen"}"#),
    )
    .await;
    answer_always(&app.llm, tool_call_completion("Hero", r#"{"name": "Superman", "secret_name": "Clark Kent"}"#)).await;
    let mut failing = request("hero", "Make a hero who swings between buildings");
    failing["max_retries"] = json!(1);
    app.publish(&failing).await;
    let failed = app.next_event().await.event.job_id;
    app.publish(&request("hero", "Make a flying hero")).await;
    let succeeded = app.next_event().await.event.job_id;
    let console = format!("http://{}", app.http_addr);
    let browser = Browser::start().await;

    // Sign in: the replay button needs the admin token.
    browser.open(&format!("{console}/login")).await;
    browser.type_into("input[name=token]", TOKEN).await;
    browser.click("form button[type=submit]").await;
    let overview = format!("{console}/");
    assert_eq!(browser.url_when(|url| url == overview).await, overview, "signed in, on the overview");

    // The jobs list, filtered to the failed ones with the form.
    browser.open(&format!("{console}/jobs")).await;
    browser.click("select[name=status] option[value=failed]").await;
    browser.click("form.filters button[type=submit]").await;
    assert!(browser.url_when(|url| url.contains("status=failed")).await.contains("status=failed"));
    let listed = browser.text("table#jobs").await;
    assert!(listed.contains(&failed.to_string()) && !listed.contains(&succeeded.to_string()), "{listed}");

    // The failed job: both attempts, each answer beside what was wrong with it.
    browser.click(&format!("a[href='/jobs/{failed}']")).await;
    let failed_page = format!("{console}/jobs/{failed}");
    assert_eq!(browser.url_when(|url| url == failed_page).await, failed_page);
    assert_eq!(browser.count(".attempt-box").await, 2);
    let first = browser.text("#attempt-1").await;
    assert!(first.contains(r#""name": "Spider-Man""#) && first.contains("secret_name: field required"), "{first}");
    let second = browser.text("#attempt-2").await;
    assert!(second.contains(r#"age: must be an integer, got "seventeen""#), "{second}");
    assert!(browser.text("#job-error").await.starts_with("validation: no valid answer after 2 attempt(s)"));
    let picture = browser.screenshot("console-job").await;
    assert!(std::fs::metadata(&picture).unwrap().len() > 10_000, "a real picture: {}", picture.display());

    // Replay it on the large model, and watch the new job succeed.
    browser.type_into("form#replay input[name=model]", "large-model").await;
    browser.click("form#replay button[type=submit]").await;
    let replayed = browser.url_when(|url| url != failed_page).await;
    let new: Uuid =
        replayed.rsplit('/').next().unwrap().parse().unwrap_or_else(|_| panic!("on the new job: {replayed}"));
    assert_ne!(new, failed);
    let event = app.next_event().await;
    assert_eq!((event.event.job_id, event.routing_key.as_str()), (new, "job.succeeded.hero"));
    browser.open(&format!("{console}/jobs/{new}")).await;
    assert_eq!(browser.text("h1 .badge").await, "succeeded");
    assert!(browser.text("#record").await.contains("Peter Parker"));
    assert!(browser.text("dl").await.contains(&failed.to_string()), "the new job names the one it replays");
    browser.quit().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_from_a_requester_and_a_model_stays_text_in_the_browser() {
    let mut app = spawn_app().await;
    let prompt = "<img src=x onerror=alert(1)><script>alert(2)</script>";
    let name = "<img src=y onerror=alert(3)>";
    let answer = json!({"name": name, "secret_name": "</pre><script>alert(4)</script>"}).to_string();
    answer_always(&app.llm, tool_call_completion("Hero", &answer)).await;
    let mut request = request("hero", prompt);
    request["metadata"] = json!({"note": "<svg onload=alert(5)>"});
    app.publish(&request).await;
    let job_id = app.next_event().await.event.job_id;
    let browser = Browser::start().await;

    for path in [format!("/jobs/{job_id}"), "/jobs".to_owned(), "/".to_owned(), format!("/jobs?q={}", "%3Cimg")] {
        browser.open(&format!("http://{}{path}", app.http_addr)).await;
        assert_eq!(browser.alert().await, None, "{path}: no script ran");
        assert_eq!(browser.count("main img, main script, main svg").await, 0, "{path}: no markup from a job");
    }
    browser.open(&format!("http://{}/jobs/{job_id}", app.http_addr)).await;
    assert_eq!(browser.text(".message pre").await, prompt, "the prompt shows as the requester wrote it");
    let record = browser.text("#record").await;
    assert!(record.contains(name) && record.contains("</pre><script>alert(4)</script>"), "{record}");
    assert_eq!(browser.alert().await, None);
    browser.quit().await;
    app.stop().await;
}
