//! Integration tests against a real RabbitMQ and a real PostgreSQL on loopback (started
//! by `scripts/services.sh`), with the LLM faked at the HTTP level by wiremock so that the
//! real async-openai client, HTTP, retries and timeouts run.

// The helpers (a daemon per test, the fake provider) are the workspace's `testkit` crate.
use testkit as helpers;
use testkit::https_provider;

mod batching;
mod browser;
mod cli;
mod console;
mod console_actions;
mod content_parts;
mod contract_docs;
mod cost;
mod dead_letters;
mod enqueue;
mod fallback;
mod generation;
mod hostile;
mod idempotency;
mod modes;
mod operating;
mod outages;
mod plans;
mod retention;
mod retries;
mod security;
mod takeover;
mod teams;
mod tls;
mod traces;
