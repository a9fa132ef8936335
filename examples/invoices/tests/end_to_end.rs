//! The `invoices` binary end to end, as an operator runs it: real RabbitMQ and Postgres, the
//! LLM faked over HTTP (the services of instructd's `scripts/services.sh`).

use std::path::Path;

use serde_json::{Value, json};
use testkit::{TestApp, answer_always, answer_once, request, spawn_binary, tool_call_completion};
use uuid::Uuid;

async fn spawn_invoices() -> TestApp {
    spawn_binary(Path::new(env!("CARGO_BIN_EXE_invoices"))).await
}

fn invoice(vendor: &str, total_cents: i64, lines: &[(&str, i64, i64)]) -> String {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(description, quantity, unit_price_cents)| {
            json!({"description": description, "quantity": quantity, "unit_price_cents": unit_price_cents})
        })
        .collect();
    json!({
        "vendor": vendor, "currency": "EUR", "issued_on": "2026-11-30", "due_on": null,
        "total_cents": total_cents, "line_items": lines
    })
    .to_string()
}

/// The last message of the `index`th call to the model: the re-ask, after a first call.
async fn reask(app: &TestApp, index: usize) -> String {
    let calls = app.llm_requests().await;
    calls[index]["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_and_its_lines_are_stored_in_one_go_with_server_ids_and_announced() {
    let mut app = spawn_invoices().await;
    let answer = invoice("ACME GmbH", 2_500, &[("Widgets", 2, 1_000), ("Shipping", 1, 500)]);
    answer_always(&app.llm, tool_call_completion("Invoice", &answer)).await;
    let request = request("invoice", "ACME GmbH, 30 Nov 2026: 2 widgets at 10 EUR, shipping 5 EUR, total 25 EUR");
    let job_id: Uuid = request["job_id"].as_str().unwrap().parse().unwrap();

    app.publish(&request).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.invoice");
    let record = received.event.record.expect("the invoice");
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["currency"], "EUR");
    assert_eq!(record["issued_on"], "2026-11-30");
    let lines = record["line_items"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|line| line["invoice_id"] == id.as_str() && line["id"].is_string()));
    let stored = format!(
        "SELECT count(*) FROM invoice WHERE id = '{id}' AND vendor = 'ACME GmbH' AND currency = 'EUR' \
         AND issued_on = '2026-11-30' AND due_on IS NULL AND total_cents = 2500"
    );
    assert_eq!(app.count(&stored).await, 1);
    assert_eq!(app.count(&format!("SELECT count(*) FROM invoice_line WHERE invoice_id = '{id}'")).await, 2);
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM generation_job WHERE job_id = '{job_id}' AND record_id = '{id}'"))
            .await,
        1
    );
    // The model was sent the invoice's schema as its tool.
    let tool = &app.llm_requests().await[0]["tools"][0]["function"];
    assert_eq!(tool["name"], "Invoice");
    assert_eq!(tool["parameters"]["$defs"]["LineItem"]["properties"]["quantity"]["minimum"], 1);
    // The application runs on the allocator and options instructd is measured with: jemalloc's
    // background thread (`background_thread:true`) runs in its process.
    let pid = app.daemon_pid().expect("the daemon is a process");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .collect();
    assert!(threads.iter().any(|name| name.trim() == "jemalloc_bg_thd"), "{threads:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_breaking_three_constraints_gets_one_re_ask_listing_all_three() {
    let mut app = spawn_invoices().await;
    let broken: Value = json!({
        "vendor": "", "currency": "JPY", "issued_on": "2026-11-30", "total_cents": 0,
        "line_items": [{"description": "Nothing", "quantity": 0, "unit_price_cents": 0}]
    });
    answer_once(&app.llm, tool_call_completion("Invoice", &broken.to_string())).await;
    answer_always(&app.llm, tool_call_completion("Invoice", &invoice("ACME", 100, &[("Thing", 1, 100)]))).await;

    app.publish(&request("invoice", "An invoice from ACME")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.invoice");
    assert_eq!(received.event.attempts, 2, "one re-ask for all three");
    let reask = reask(&app, 1).await;
    for violation in [
        "vendor: must not be empty",
        r#"currency: must be one of "EUR", "USD", "GBP", got "JPY""#,
        "line_items[0].quantity: must be at least 1, got 0",
    ] {
        assert!(reask.lines().any(|line| line == violation), "{violation:?} is not a line of {reask}");
    }
    assert_eq!(app.count("SELECT count(*) FROM invoice").await, 1, "only the valid answer is stored");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_that_do_not_add_up_to_the_total_are_re_asked_with_the_difference() {
    let mut app = spawn_invoices().await;
    let wrong = invoice("ACME", 1_000, &[("Widgets", 3, 500)]);
    answer_once(&app.llm, tool_call_completion("Invoice", &wrong)).await;
    answer_always(&app.llm, tool_call_completion("Invoice", &invoice("ACME", 1_500, &[("Widgets", 3, 500)]))).await;

    app.publish(&request("invoice", "3 widgets at 5 EUR")).await;
    let received = app.next_event().await;

    assert_eq!(received.routing_key, "job.succeeded.invoice");
    assert_eq!(received.event.attempts, 2);
    let reask = reask(&app, 1).await;
    assert!(reask.contains("total_cents: the line items add up to 1500, 500 more than total_cents (1000)"), "{reask}");
    assert_eq!(app.count("SELECT count(*) FROM invoice WHERE total_cents = 1500").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM invoice_line").await, 1);
    app.stop().await;
}

#[test]
fn the_schema_is_what_pydantic_prints_for_the_python_model() {
    let output =
        testkit::binary(Path::new(env!("CARGO_BIN_EXE_invoices"))).args(["schema", "invoice"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).expect("the schema is JSON");
    // tests/pydantic/invoice.py printed it.
    let pydantic: Value =
        serde_json::from_str(include_str!("pydantic/invoice.schema.json")).expect("pydantic's schema is JSON");
    assert_eq!(printed, pydantic);
}
