//! Failover with real PostgreSQL processes: a primary with a synchronous
//! streaming standby (`pg_basebackup -R`), a worker given both hosts
//! (`target_session_attrs=read-write`). The primary crashes mid-stream;
//! once `/ready` says 503 the standby is promoted, and its inherited
//! `synchronous_standby_names` cleared (else the new primary waits forever
//! for a standby it no longer has), as a failover tool would. Every
//! retried send lands exactly once, a member gets every event in order,
//! and `/ready` is 200 again.

use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_pgcluster::{PgCluster, PgOptions};
use tether_testkit::*;

const T: Duration = Duration::from_secs(60);
const SENDS: u64 = 400;

fn sql(url: &str, statement: &str) -> Result<u64, postgres::Error> {
    let (url, statement) = (url.to_string(), statement.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
        c.execute(statement.as_str(), &[])
    })
    .join()
    .unwrap()
}

fn query_i64(url: &str, statement: &str) -> Option<i64> {
    let (url, statement) = (url.to_string(), statement.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).ok()?;
        c.query_one(statement.as_str(), &[]).ok().map(|r| r.get(0))
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_dies_the_standby_is_promoted_and_nothing_acknowledged_is_lost() {
    // Durable clusters: synchronous replication means nothing without
    // synchronous_commit (which the test template turns off).
    let (mut primary, mut standby) = tokio::task::spawn_blocking(|| {
        let opts = PgOptions {
            fsync: true,
            max_connections: 100,
            port: None,
        };
        let primary = PgCluster::start_temp(opts).expect("primary");
        let standby = primary.start_standby("tether_standby").expect("standby");
        (primary, standby)
    })
    .await
    .unwrap();
    let (p_url, s_url) = (primary.url(), standby.url());
    sql(
        &p_url,
        "ALTER SYSTEM SET synchronous_standby_names = 'tether_standby'",
    )
    .unwrap();
    sql(&p_url, "SELECT pg_reload_conf()").unwrap();
    assert!(
        wait_until(T, Duration::from_millis(50), || query_i64(
            &p_url,
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
        ) == Some(1)),
        "the standby never became synchronous"
    );
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let w = WorkerProc::spawn(&both, TEST_SECRET, &[], &[]);
    let addr = w.addr();
    let c = create_conversation(addr, "alice", &["bob"]).await;
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;

    // /ready, watched throughout.
    let saw_unready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (saw, stop) = (saw_unready.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = try_http_raw(addr, "GET", "/ready", None, None, None).await {
                    if r.status == 503 {
                        saw.store(true, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // 400 sends, each retried with its client_msg_id until acknowledged.
    let acked = Arc::new(AtomicU64::new(0));
    let sender = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut retries = 0u64;
            for i in 0..SENDS {
                let body = json!({"body": format!("m{i}"), "client_msg_id": format!("k{i}")});
                loop {
                    let path = format!("/v1/conversations/{c}/messages");
                    match try_http_raw(
                        addr,
                        "POST",
                        &path,
                        Some(&tok("alice")),
                        Some("application/json"),
                        Some(body.to_string().as_bytes()),
                    )
                    .await
                    {
                        Ok(r) if r.status == 200 || r.status == 201 => break,
                        _ => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                    }
                }
                acked.fetch_add(1, Ordering::Relaxed);
            }
            retries
        })
    };
    assert!(
        wait_until_async(T, Duration::from_millis(10), || {
            let n = acked.load(Ordering::Relaxed);
            async move { n >= 100 }
        })
        .await
    );
    // The primary crashes mid-stream.
    tokio::task::spawn_blocking(move || {
        primary.crash();
        primary
    })
    .await
    .map(drop)
    .unwrap();
    assert!(
        wait_until_async(T, Duration::from_millis(20), || {
            let saw = saw_unready.load(Ordering::Relaxed);
            async move { saw }
        })
        .await,
        "/ready never said 503 while the database was gone"
    );
    // The operator's failover: promote, and stop waiting for a standby
    // that no longer exists.
    let standby_url = s_url.clone();
    // The new primary lives until the end of the test, then is stopped and
    // removed (dropped off the runtime: stopping it blocks).
    let new_primary = tokio::task::spawn_blocking(move || {
        standby.promote().expect("promote");
        sql(&standby_url, "ALTER SYSTEM RESET synchronous_standby_names").unwrap();
        sql(&standby_url, "SELECT pg_reload_conf()").unwrap();
        standby
    })
    .await
    .unwrap();

    let retries = sender.await.unwrap();
    eprintln!("failover: {SENDS} sends acknowledged, {retries} retries");
    let mut w = w;
    w.wait_ready(T).expect("/ready is 200 again");
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();

    // Exactly once, in the new primary.
    let n = query_i64(
        &s_url,
        &format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ),
    );
    assert_eq!(n, Some(SENDS as i64));
    let distinct = query_i64(
        &s_url,
        &format!("SELECT count(DISTINCT client_msg_id) FROM events WHERE conversation_id = {c}"),
    );
    assert_eq!(distinct, Some(SENDS as i64));
    // bob got every event once, in order, on the same connection.
    let mut last = 1;
    while last < SENDS as i64 + 1 {
        let v = bob
            .recv_until(T, |v| v["type"] == "event")
            .await
            .unwrap_or_else(|| panic!("bob stalled after seq {last}"));
        assert_eq!(v["seq"].as_i64(), Some(last + 1), "in order, once: {v}");
        last += 1;
    }
    drop(w);
    tokio::task::spawn_blocking(move || drop(new_primary))
        .await
        .unwrap();
}
