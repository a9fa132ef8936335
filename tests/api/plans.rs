//! The batched writes' plans (`startup::Planning::KeyProbes`). Their sessions keep the plan
//! of each statement rather than planning every execution (which cost as much as executing:
//! the README's "Performance"); the danger of a kept plan is one made while the tables were
//! small, a scan of the whole table, still used when they are large. With the write pool's
//! settings the kept plans probe the primary key at any size; with Postgres's defaults alone
//! (the control, which shows that this test can fail) they scan.
//!
//! Each case: a session on a fresh database runs the claim and outcome statements on a few
//! small batches (so that Postgres settles on a plan it keeps), the tables then grow by
//! 100,000 rows (autovacuum off on them, so no ANALYZE steps in to invalidate the plan), and
//! the plan the session now uses for the next batch is read with `EXPLAIN EXECUTE`.

use instructd::startup::Planning;
use instructd::store::claims::CLAIM_BATCH_SQL;
use instructd::store::outcomes::FINISH_BATCH_SQL;
use migration::MigratorTrait;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Leftovers, create_database};

/// The worker id the claims are made as.
const WORKER: i64 = 7;

#[tokio::test]
async fn the_write_sessions_kept_plans_probe_the_primary_key_after_the_tables_grow() {
    let plans = kept_plans(Planning::KeyProbes.settings()).await;
    for plan in [&plans.claim, &plans.finish] {
        assert!(!plan.contains("Seq Scan on generation_job"), "a scan of the job table:\n{plan}");
        assert!(plan.contains("Index Scan using generation_job_pkey"), "no primary-key probe:\n{plan}");
    }
}

#[tokio::test]
async fn with_postgres_defaults_the_plan_kept_from_small_tables_scans_them_when_large() {
    let plans = kept_plans(&[("plan_cache_mode", "auto")]).await;
    assert!(plans.claim.contains("Seq Scan on generation_job"), "the control found no scan:\n{}", plans.claim);
    assert!(plans.finish.contains("Seq Scan on generation_job"), "the control found no scan:\n{}", plans.finish);
}

/// ANALYZE (autovacuum's, under load) gathers no statistics on the JSON columns of the job
/// ledger and the outbox, which no plan reads and which cost it sorts of sampled `jsonb`
/// values; the scalar columns keep theirs (migration `no_statistics_on_json`).
#[tokio::test]
async fn analyze_skips_the_json_columns_and_keeps_the_scalar_ones() {
    let url = create_database().await;
    let mut database = Leftovers::database(&url);
    let db = Database::connect(url.as_str()).await.expect("the test database is reachable");
    migration::Migrator::up(&db, None).await.expect("migrations apply");
    db.execute_unprepared(
        "INSERT INTO generation_job (job_id, entity, status, request, error, usage, responses, calls, event)
         SELECT gen_random_uuid(), 'hero', 'succeeded', jsonb_build_object('prompt', g), '{}', '{}',
                jsonb_build_array(g), jsonb_build_array(g), jsonb_build_object('n', g)
           FROM generate_series(1, 300) g;
         INSERT INTO event_outbox (event_id, job_id, routing_key, correlation_id, payload)
         SELECT gen_random_uuid(), job_id, 'job.succeeded.hero', '', event FROM generation_job;
         ANALYZE generation_job, event_outbox",
    )
    .await
    .unwrap();
    let columns = |sql: &str| {
        let db = &db;
        let sql = sql.to_owned();
        async move {
            let rows = db.query_all_raw(Statement::from_string(DbBackend::Postgres, sql)).await.unwrap();
            let mut names: Vec<String> = rows.iter().map(|row| row.try_get_by_index(0).unwrap()).collect();
            names.sort();
            names
        }
    };
    let json = "SELECT tablename || '.' || attname FROM pg_stats
                 WHERE schemaname = current_schema() AND tablename IN ('generation_job', 'event_outbox')";
    let with_statistics = columns(json).await;
    assert!(
        with_statistics.contains(&"generation_job.status".to_owned()),
        "scalar columns keep theirs: {with_statistics:?}"
    );
    assert!(with_statistics.contains(&"event_outbox.routing_key".to_owned()), "{with_statistics:?}");
    let json_columns = columns(
        "SELECT attrelid::regclass::text || '.' || attname FROM pg_attribute
          WHERE attrelid IN ('generation_job'::regclass, 'event_outbox'::regclass)
            AND atttypid = 'jsonb'::regtype AND NOT attisdropped",
    )
    .await;
    assert_eq!(json_columns.len(), 7, "the JSON columns: {json_columns:?}");
    let analyzed: Vec<&String> = json_columns.iter().filter(|column| with_statistics.contains(column)).collect();
    assert!(analyzed.is_empty(), "JSON columns with statistics: {analyzed:?}");
    let _ = db.close().await;
    database.delete().await;
}

struct Plans {
    claim: String,
    finish: String,
}

/// The plans a session with `settings` uses for the batched claim and outcome statements once
/// the tables have grown, after a few small batches while they were small.
async fn kept_plans(settings: &'static [(&'static str, &'static str)]) -> Plans {
    let url = create_database().await;
    let mut database = Leftovers::database(&url);
    let admin = Database::connect(url.as_str()).await.expect("the test database is reachable");
    migration::Migrator::up(&admin, None).await.expect("migrations apply");
    for table in ["generation_job", "event_outbox"] {
        admin.execute_unprepared(&format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).await.unwrap();
    }

    let mut options = ConnectOptions::new(url.clone());
    options.max_connections(1).sqlx_logging(false);
    options.map_sqlx_postgres_opts(move |pg| pg.options(settings.iter().copied()));
    let session = Database::connect(options).await.expect("the test database is reachable");
    session
        .execute_unprepared(&format!("PREPARE claim(bigint, text, bigint, float8) AS {CLAIM_BATCH_SQL}"))
        .await
        .expect("the claim statement prepares");
    session
        .execute_unprepared(&format!("PREPARE finish(bigint, text) AS {FINISH_BATCH_SQL}"))
        .await
        .expect("the outcome statement prepares");

    // More than the five executions after which Postgres may keep a generic plan.
    for _ in 0..8 {
        let jobs = new_jobs(10);
        run(&session, &claim(&jobs), "").await;
        run(&session, &finish(&jobs), "").await;
    }

    admin
        .execute_unprepared(
            "INSERT INTO generation_job (job_id, entity, status, attempts, request)
             SELECT gen_random_uuid(), 'hero', 'succeeded', 1, '{}'::jsonb FROM generate_series(1, 100000);
             INSERT INTO event_outbox (event_id, job_id, routing_key, correlation_id, payload)
             SELECT gen_random_uuid(), gen_random_uuid(), 'job.succeeded', 'c', '{}'::jsonb
               FROM generate_series(1, 100000)",
        )
        .await
        .expect("the tables grow");

    let jobs = new_jobs(64);
    let claim_plan = run(&session, &claim(&jobs), "EXPLAIN ").await;
    run(&session, &claim(&jobs), "").await;
    let finish_plan = run(&session, &finish(&jobs), "EXPLAIN ").await;
    // The plans explained are ones the session kept, not made for these parameters.
    let kept = session
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT name, generic_plans FROM pg_prepared_statements WHERE name IN ('claim', 'finish')",
        ))
        .await
        .expect("the session's statements are listed");
    assert_eq!(kept.len(), 2);
    for row in kept {
        let name: String = row.try_get_by_index(0).unwrap();
        let generic: i64 = row.try_get_by_index(1).unwrap();
        assert!(generic > 0, "the session planned `{name}` for each execution: nothing kept to test");
    }

    let _ = session.close().await;
    let _ = admin.close().await;
    database.delete().await;
    Plans { claim: claim_plan, finish: finish_plan }
}

/// A job id and a claim token for each of `count` new jobs (the token the claim statement
/// is given is the one the outcome statement must match).
fn new_jobs(count: usize) -> Vec<(Uuid, Uuid)> {
    (0..count).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect()
}

fn claim(jobs: &[(Uuid, Uuid)]) -> String {
    let rows: Vec<_> = jobs
        .iter()
        .map(|(job_id, token)| json!({"job_id": job_id, "entity": "hero", "request": {}, "token": token}))
        .collect();
    format!("EXECUTE claim({}, {}, {WORKER}, 30)", jobs.len(), literal(&json!(rows).to_string()))
}

fn finish(jobs: &[(Uuid, Uuid)]) -> String {
    let rows: Vec<_> = jobs
        .iter()
        .map(|(job_id, token)| {
            json!({"job_id": job_id, "token": token, "status": "succeeded", "attempts": 1, "usage": {},
                   "responses": [], "calls": [], "event_id": Uuid::new_v4(), "routing_key": "job.succeeded",
                   "correlation_id": job_id.to_string(), "payload": {"status": "succeeded"}})
        })
        .collect();
    format!("EXECUTE finish({}, {})", jobs.len(), literal(&json!(rows).to_string()))
}

/// `text` as an SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Runs `statement` (prefixed with `explain`) and returns the text of its first column's rows,
/// one per line: the plan, for an `EXPLAIN`.
async fn run(session: &DatabaseConnection, statement: &str, explain: &str) -> String {
    if explain.is_empty() {
        session.execute_unprepared(statement).await.expect("the statement runs");
        return String::new();
    }
    let rows = session
        .query_all_raw(Statement::from_string(DbBackend::Postgres, format!("{explain}{statement}")))
        .await
        .expect("the plan is explained");
    rows.iter().map(|row| row.try_get_by_index::<String>(0).expect("a plan line")).collect::<Vec<_>>().join("\n")
}
