//! The command line: `schema` and `config`, run as the real binary.

use serde_json::Value;

use crate::helpers::instructd_binary;

/// The seed's schema, as Instructor sends it for the Python `Hero` model.
const SEED_SCHEMA: &str = r#"
{"properties": {"name": {"title": "Name", "type": "string"},
                "secret_name": {"title": "Secret Name", "type": "string"},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null, "title": "Age"}},
 "required": ["name", "secret_name"], "title": "Hero", "type": "object"}
"#;

fn instructd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    instructd_binary().args(args).envs(env.iter().copied()).output().expect("instructd runs")
}

#[test]
fn schema_hero_prints_exactly_the_seed_schema() {
    let output = instructd(&["schema", "hero"], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).expect("the schema is JSON");
    let seed: Value = serde_json::from_str(SEED_SCHEMA).unwrap();
    assert_eq!(printed, seed);
    // Byte for byte, keys in the seed's order (serde_json keeps the order it read).
    assert_eq!(serde_json::to_string(&printed).unwrap(), serde_json::to_string(&seed).unwrap());
}

#[test]
fn schema_team_nests_its_heroes_and_shows_the_teams_constraints() {
    let output = instructd(&["schema", "team"], &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let team: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(team["title"], "Team");
    assert_eq!(team["required"], serde_json::json!(["name", "headquarters", "heroes"]));
    let heroes = &team["properties"]["heroes"];
    assert_eq!((heroes["minItems"].as_u64(), heroes["maxItems"].as_u64()), (Some(1), Some(10)));
    assert_eq!(heroes["items"]["$ref"], "#/$defs/Hero");
    let age = &team["$defs"]["Hero"]["properties"]["age"]["anyOf"][0];
    assert_eq!((age["minimum"].as_i64(), age["maximum"].as_i64()), (Some(0), Some(150)));
    for hidden in ["id", "team_id"] {
        assert!(team["properties"].get(hidden).is_none() && team["$defs"]["Hero"]["properties"].get(hidden).is_none());
    }
}

#[test]
fn schema_of_an_unknown_entity_fails_and_lists_the_known_ones() {
    let output = instructd(&["schema", "no_such_entity"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown entity `no_such_entity` (known: hero, team)"));
}

#[test]
fn config_shows_environment_overrides_and_redacts_secrets() {
    let output = instructd(
        &["config"],
        &[
            ("INSTRUCTD__WORKER__CONCURRENCY", "3"),
            ("INSTRUCTD__LLM__MODEL", "gpt-4o"),
            ("OPENAI_API_KEY", "sk-live-do-not-print"),
            ("INSTRUCTD__DATABASE__URL", "postgres://app:hunter2@db.internal:5432/app"),
        ],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    let config: toml::Table = printed.parse().expect("config prints TOML");
    assert_eq!(config["worker"]["concurrency"].as_integer(), Some(3));
    assert_eq!(config["llm"]["model"].as_str(), Some("gpt-4o"));
    assert_eq!(config["llm"]["api_key"].as_str(), Some("[redacted]"));
    assert_eq!(config["database"]["url"].as_str(), Some("postgres://app:***@db.internal:5432/app"));
    assert!(!printed.contains("sk-live-do-not-print") && !printed.contains("hunter2"), "{printed}");
}

#[test]
fn a_bad_config_value_stops_start_up_naming_the_key() {
    let output = instructd(&["run"], &[("INSTRUCTD__WORKER__CONCURRENCY", "lots")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("worker.concurrency"), "{stderr}");
}

#[test]
fn a_bad_messages_file_is_refused_before_anything_is_published() {
    let file = std::env::temp_dir().join(format!("instructd-bad-messages-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, r#"[{"role": "tool", "content": "x"}]"#).unwrap();
    // No broker at this address: the file must be refused before any connection is tried.
    let output = instructd(
        &["enqueue", "--entity", "hero", "--messages-file", file.to_str().unwrap()],
        &[("INSTRUCTD__BROKER__URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
    );
    let _ = std::fs::remove_file(&file);
    assert_eq!(output.status.code(), Some(3), "nothing was enqueued");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--messages-file") && stderr.contains("tool"), "{stderr}");
}

#[test]
fn enqueue_needs_a_prompt_or_a_messages_file() {
    let output = instructd(&["enqueue", "--entity", "hero"], &[]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--prompt"));
}
