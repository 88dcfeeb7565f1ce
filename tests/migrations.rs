//! Versioned migrations against real databases: a database built by the
//! first release's `schema.sql` (tests/fixtures/schema-2026-11-26.sql),
//! with data in it, is recognised and upgraded by a new worker (history
//! replays, old idempotency keys still deduplicate, new sends work, the
//! creator is the owner); migrations build exactly the documented
//! `schema.sql`; hosts migrating at once apply each migration once;
//! `tether migrate` does it and exits. Also: every per-conversation table
//! and unique index is keyed by `conversation_id` first (sharding).

use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(20);

/// A new, empty database in the test cluster; its URL.
fn empty_database(db: &TestDb, name: &str) -> String {
    db.execute(&format!("CREATE DATABASE {name}"));
    let url = db.url();
    let (base, _) = url.rsplit_once('/').expect("a database URL");
    format!("{base}/{name}")
}

fn connect(url: &str) -> postgres::Client {
    let url = url.to_string();
    std::thread::spawn(move || postgres::Client::connect(&url, postgres::NoTls).unwrap())
        .join()
        .unwrap()
}

/// Runs `f` with a client off any tokio thread.
fn with<R: Send + 'static>(
    url: &str,
    f: impl FnOnce(&mut postgres::Client) -> R + Send + 'static,
) -> R {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        f(&mut c)
    })
    .join()
    .unwrap()
}

fn fixture() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/schema-2026-11-26.sql"),
    )
    .expect("the fixture")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_release_database_is_upgraded_in_place() {
    let db = TestDb::new_async().await;
    let url = empty_database(&db, "legacy");
    // The first release's schema, and data as it wrote it.
    with(&url, move |c| {
        c.batch_execute(&fixture()).unwrap();
        c.batch_execute(
            r#"INSERT INTO conversations (id, title, created_by, last_seq) VALUES (1, 'old', 'alice', 3);
               INSERT INTO members (conversation_id, user_id, cursor_seq, joined_seq)
                   VALUES (1, 'alice', 3, 1), (1, 'bob', 0, 1);
               INSERT INTO events (conversation_id, seq, type, sender, payload)
                   VALUES (1, 1, 'conversation.created', 'alice', '{"title":"old","members":["alice","bob"]}');
               INSERT INTO events (conversation_id, seq, type, sender, body, client_msg_id)
                   VALUES (1, 2, 'message.created', 'alice', 'old-1', 'm-1'),
                          (1, 3, 'message.created', 'bob', 'old-2', 'm-2');
               SELECT setval(pg_get_serial_sequence('conversations', 'id'), 1);"#,
        )
        .unwrap();
    });
    let w = WorkerProc::spawn(&url, TEST_SECRET, &[], &[]);
    let versions: Vec<(i32, String)> = with(&url, |c| {
        c.query(
            "SELECT version, name FROM schema_migrations ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    });
    assert_eq!(
        versions,
        [
            (1, "initial".to_string()),
            (2, "roles_and_history".to_string()),
            (3, "retention".to_string()),
            (4, "presence".to_string()),
            (5, "sse_tickets".to_string())
        ]
    );
    // History replays.
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    let backlog = bob.read_until_synced(T).await;
    let bodies: Vec<_> = backlog.iter().map(|e| e["body"].clone()).collect();
    assert_eq!(bodies, [json!(null), json!("old-1"), json!("old-2")]);
    // An old idempotency key still deduplicates; a new send gets seq 4.
    let path = "/v1/conversations/1/messages";
    let r = http(
        w.addr(),
        "POST",
        path,
        Some(&tok("alice")),
        Some(&json!({"body":"again","client_msg_id":"m-1"})),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["seq"].clone(), r.json()["body"].clone()),
        (200, json!(2), json!("old-1"))
    );
    let r = http(
        w.addr(),
        "POST",
        path,
        Some(&tok("alice")),
        Some(&json!({"body":"new","client_msg_id":"m-3"})),
    )
    .await;
    assert_eq!((r.status, r.json()["seq"].clone()), (201, json!(4)));
    let got = bob
        .recv_until(T, |v| v["type"] == "event" && v["seq"] == 4)
        .await;
    assert_eq!(got.unwrap()["body"], "new");
    // The creator is the owner; history is since_join.
    let r = http(
        w.addr(),
        "PATCH",
        "/v1/conversations/1/members/bob",
        Some(&tok("alice")),
        Some(&json!({"role":"admin"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        w.addr(),
        "GET",
        "/v1/conversations",
        Some(&tok("alice")),
        None,
    )
    .await;
    assert_eq!(r.json()["conversations"][0]["role"], "owner");
    assert_eq!(r.json()["conversations"][0]["history"], "since_join");
}

/// Columns, indexes and constraints of a database's public schema.
fn catalog(url: &str) -> Vec<String> {
    with(url, |c| {
        let mut out = Vec::new();
        for r in c
            .query(
                "SELECT table_name::text, column_name::text, data_type::text,
                        coalesce(column_default, ''), is_nullable::text
                 FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name <> 'schema_migrations'
                 ORDER BY 1, 2",
                &[],
            )
            .unwrap()
        {
            out.push(format!(
                "column {}.{} {} default {:?} null {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4)
            ));
        }
        for r in c
            .query(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'
                 AND tablename <> 'schema_migrations' ORDER BY indexname",
                &[],
            )
            .unwrap()
        {
            out.push(r.get::<_, String>(0));
        }
        for r in c
            .query(
                "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE connamespace = 'public'::regnamespace
                   AND conrelid::regclass::text <> 'schema_migrations' ORDER BY 1",
                &[],
            )
            .unwrap()
        {
            out.push(format!(
                "constraint {} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1)
            ));
        }
        out
    })
}

#[test]
fn migrations_build_exactly_the_documented_schema() {
    let db = TestDb::new();
    let documented = empty_database(&db, "documented");
    let migrated = empty_database(&db, "migrated");
    with(&documented, |c| {
        c.batch_execute(tether_worker::store::SCHEMA_SQL).unwrap()
    });
    let applied = with(&migrated, |c| {
        tether_worker::store::migrate::migrate(c).unwrap()
    });
    assert_eq!(applied, [1, 2, 3, 4, 5]);
    assert_eq!(catalog(&documented), catalog(&migrated));
}

#[test]
fn hosts_migrating_at_once_apply_each_migration_once() {
    let db = TestDb::new();
    let url = empty_database(&db, "racing");
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = connect(&url);
                tether_worker::store::migrate::migrate(&mut c).expect("migrate")
            })
        })
        .collect();
    let mut applied: Vec<i32> = runs.into_iter().flat_map(|t| t.join().unwrap()).collect();
    applied.sort();
    assert_eq!(
        applied,
        [1, 2, 3, 4, 5],
        "each migration applied by exactly one host"
    );
}

#[test]
fn tether_migrate_applies_and_exits() {
    let db = TestDb::new();
    let url = empty_database(&db, "pipeline");
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["migrate", "--database-url", &url])
        .env_remove("TETHER_SECRET")
        .output()
        .expect("tether migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied [1, 2, 3, 4, 5]"));
    let again = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("tether migrate");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date (version 5)"));
}

#[test]
fn every_per_conversation_key_starts_with_conversation_id() {
    let db = TestDb::new();
    let keys: Vec<(String, String)> = db.with_client(|c| {
        c.query(
            "SELECT t.relname::text, pg_get_indexdef(i.indexrelid)
             FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = 'public' AND (i.indisunique OR i.indisprimary)
               AND t.relname IN ('members', 'events')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    });
    assert!(keys.len() >= 3, "{keys:?}");
    for (table, def) in keys {
        let cols = def.split_once('(').map(|(_, c)| c).unwrap_or_default();
        assert!(
            cols.trim_start().starts_with("conversation_id"),
            "{table}: {def} is not keyed by conversation_id first"
        );
    }
}
