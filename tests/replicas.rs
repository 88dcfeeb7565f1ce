//! Read replicas for history, with a real streaming replica
//! (`pg_basebackup -R`): REST pages and backlogs are served by the replica
//! while it has every event they need, and by the primary while it lags;
//! with the replica's replay paused (`pg_wal_replay_pause()`) and writes
//! going on, no page and no backlog misses an event.

use serde_json::{json, Value};
use std::time::Duration;
use tether_pgcluster::{PgCluster, PgOptions};
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);

fn query_i64(url: &str, statement: &str) -> Option<i64> {
    let (url, statement) = (url.to_string(), statement.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).ok()?;
        c.query_one(statement.as_str(), &[]).ok().map(|r| r.get(0))
    })
    .join()
    .unwrap()
}

fn execute(url: &str, statement: &str) {
    let (url, statement) = (url.to_string(), statement.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute(&statement).unwrap();
    })
    .join()
    .unwrap()
}

async fn page_seqs(addr: std::net::SocketAddr, c: i64, query: &str) -> Vec<i64> {
    let r = http(
        addr,
        "GET",
        &format!("/v1/conversations/{c}/events?{query}"),
        Some(&tok("bob")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e: &Value| e["seq"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_comes_from_the_replica_only_when_it_is_complete() {
    let (primary, replica) = tokio::task::spawn_blocking(|| {
        let primary = PgCluster::start_temp(PgOptions {
            fsync: false,
            max_connections: 100,
            port: None,
        })
        .expect("primary");
        let replica = primary.start_standby("tether_replica").expect("replica");
        (primary, replica)
    })
    .await
    .unwrap();
    let (p_url, r_url) = (primary.url(), replica.url());
    let w = WorkerProc::spawn(&p_url, TEST_SECRET, &["--read-database-url", &r_url], &[]);
    let a = w.addr();
    let c = create_conversation(a, "alice", &["bob"]).await;
    for i in 0..50 {
        let path = format!("/v1/conversations/{c}/messages");
        let r = http(
            a,
            "POST",
            &path,
            Some(&tok("alice")),
            Some(&json!({"body": format!("m{i}")})),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    let replica_at = |seq: i64| {
        let r_url = r_url.clone();
        move || {
            query_i64(
                &r_url,
                &format!("SELECT last_seq FROM conversations WHERE id = {c}"),
            ) == Some(seq)
        }
    };
    assert!(
        wait_until(T, Duration::from_millis(20), replica_at(51)),
        "the replica never caught up"
    );
    let reads = |name: &'static str| async move { metric(&metrics_of(a).await, name) };

    // Caught up: the replica serves the page.
    let before = reads("tether_history_reads_replica_total").await;
    assert_eq!(
        page_seqs(a, c, "after_seq=0&limit=200").await,
        (1..=51).collect::<Vec<_>>()
    );
    assert!(reads("tether_history_reads_replica_total").await > before);

    // The replica stops replaying; writes go on.
    execute(&r_url, "SELECT pg_wal_replay_pause()");
    for i in 50..70 {
        let path = format!("/v1/conversations/{c}/messages");
        let r = http(
            a,
            "POST",
            &path,
            Some(&tok("alice")),
            Some(&json!({"body": format!("m{i}")})),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    assert_eq!(
        query_i64(
            &r_url,
            &format!("SELECT last_seq FROM conversations WHERE id = {c}")
        ),
        Some(51),
        "the replica is behind"
    );
    let primary_reads = reads("tether_history_reads_primary_total").await;
    // No page misses an event: both directions, served by the primary.
    assert_eq!(
        page_seqs(a, c, "after_seq=45&limit=200").await,
        (46..=71).collect::<Vec<_>>()
    );
    assert_eq!(page_seqs(a, c, "limit=5").await, vec![71, 70, 69, 68, 67]);
    assert!(reads("tether_history_reads_primary_total").await >= primary_reads + 2.0);
    // Nor does a backlog.
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    let backlog = bob.read_until_synced(T).await;
    let seqs: Vec<i64> = backlog.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=71).collect::<Vec<_>>());

    // Replay resumes: the replica serves again once it has it all.
    execute(&r_url, "SELECT pg_wal_replay_resume()");
    assert!(wait_until(T, Duration::from_millis(20), replica_at(71)));
    let before = reads("tether_history_reads_replica_total").await;
    assert_eq!(
        page_seqs(a, c, "after_seq=0&limit=200").await,
        (1..=71).collect::<Vec<_>>()
    );
    assert!(reads("tether_history_reads_replica_total").await > before);
    drop((primary, replica));
}
