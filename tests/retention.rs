//! Retention against real processes: `--retention-max-events` and
//! `--retention-days` prune the log in the background (one worker at a
//! time), REST pages and backlogs start at the horizon, a member behind it
//! gets `truncated` and then everything from there gap-free, and history
//! pruned under a connection whose membership changed meanwhile ends that
//! connection (1013) instead of skipping the user's own `member.left`.

use serde_json::{json, Value};
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);

async fn send(addr: std::net::SocketAddr, user: &str, c: i64, id: &str) -> Value {
    send_message(addr, user, c, id).await.1
}

async fn horizon_reaches(db: &TestDb, c: i64, horizon: i64) -> bool {
    let sql = format!("SELECT horizon_seq FROM conversations WHERE id = {c}");
    wait_until_async(T, Duration::from_millis(50), || async {
        db.query_i64_async(&sql).await == horizon
    })
    .await
}

/// Every frame up to `synced`, `hello` excluded.
async fn frames_until_synced(ws: &mut WsClient) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let v = ws.recv_json(T).await.expect("a frame before synced");
        match v["type"].as_str() {
            Some("synced") => return frames,
            Some("hello") => {}
            _ => frames.push(v),
        }
    }
}

/// The frames as `truncated@S` and seqs.
fn shape(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| match f["type"].as_str() {
            Some("truncated") => format!("truncated@{}", f["from_seq"]),
            Some("event") => f["seq"].to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn seqs(from: i64, to: i64) -> Vec<String> {
    (from..=to).map(|s| s.to_string()).collect()
}

async fn page(addr: std::net::SocketAddr, user: &str, c: i64, query: &str) -> (Vec<i64>, bool) {
    let r = http(
        addr,
        "GET",
        &format!("/v1/conversations/{c}/events?{query}"),
        Some(&tok(user)),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let seqs = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    (seqs, v["more"].as_bool().unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_events_prunes_and_a_member_behind_gets_truncated_then_the_rest() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--retention-max-events", "5", "--prune-interval-secs", "1"],
        &[],
    );
    let a = w.addr();
    let c = create_conversation(a, "alice", &["bob"]).await;
    for i in 1..=19 {
        send(a, "alice", c, &format!("m{i}")).await;
    }
    // seq 1 is conversation.created, 2..=20 the messages: 5 are kept.
    assert!(horizon_reaches(&db, c, 15).await, "never pruned to 15");
    assert_eq!(
        db.query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c}"
        ))
        .await,
        5
    );
    assert_eq!(
        metric(&metrics_of(a).await, "tether_pruned_events_total"),
        15.0
    );

    // Bob, cursor 0: truncated, then 16..=20 gap-free.
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .expect("bob");
    let frames = frames_until_synced(&mut bob).await;
    let mut want = vec!["truncated@16".to_string()];
    want.extend(seqs(16, 20));
    assert_eq!(shape(&frames), want);
    assert_eq!(frames[0]["conversation_id"], c);
    assert_eq!(
        metric(&metrics_of(a).await, "tether_truncations_total"),
        1.0
    );

    // REST pages start at the horizon, in both directions.
    assert_eq!(
        page(a, "bob", c, "after_seq=0&limit=50").await,
        ((16..=20).collect(), false)
    );
    assert_eq!(
        page(a, "bob", c, "limit=50").await,
        ((16..=20).rev().collect(), false)
    );

    // Live delivery goes on; pruning behind an up-to-date connection
    // tells it nothing.
    bob.send_json(&json!({"type": "ack", "conversation_id": c, "seq": 20}))
        .await;
    for i in 20..=29 {
        send(a, "alice", c, &format!("m{i}")).await;
    }
    assert_eq!(receive_upto(&mut bob, c, 20, 30, "bob").await, 30);
    assert!(horizon_reaches(&db, c, 25).await, "never pruned to 25");
    let extra = bob.recv_json(Duration::from_millis(1500)).await;
    assert!(
        extra.is_none(),
        "nothing more for an up-to-date member: {extra:?}"
    );

    // Idempotency keys live as long as their events (README): a retry of
    // a pruned message is a new one; of a kept one, the same.
    let (status, kept) = send_message(a, "alice", c, "m29").await;
    assert_eq!((status, kept["seq"].as_i64()), (200, Some(30)));
    let (status, pruned) = send_message(a, "alice", c, "m1").await;
    assert_eq!((status, pruned["seq"].as_i64()), (201, Some(31)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_days_prunes_only_what_is_older() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--retention-days", "1", "--prune-interval-secs", "1"],
        &[],
    );
    let a = w.addr();
    let c = create_conversation(a, "alice", &["bob"]).await;
    for i in 1..=10 {
        send(a, "alice", c, &format!("m{i}")).await;
    }
    // Nothing is a day old: nothing goes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        db.query_i64_async(&format!(
            "SELECT horizon_seq FROM conversations WHERE id = {c}"
        ))
        .await,
        0
    );
    // Seqs 1..=6 become two days old.
    db.execute_async(&format!(
        "UPDATE events SET created_at = now() - interval '2 days'
         WHERE conversation_id = {c} AND seq <= 6"
    ))
    .await;
    assert!(horizon_reaches(&db, c, 6).await, "never pruned to 6");
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .expect("bob");
    let frames = frames_until_synced(&mut bob).await;
    let mut want = vec!["truncated@7".to_string()];
    want.extend(seqs(7, 11));
    assert_eq!(shape(&frames), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_prune_each_event_once() {
    let db = TestDb::new_async().await;
    let tether = ClusterProc::spawn_with(
        &db.url(),
        TEST_SECRET,
        2,
        &["--retention-max-events", "10", "--prune-interval-secs", "1"],
        &[],
    );
    let a = tether.addr();
    let mut convs = Vec::new();
    for _ in 0..3 {
        convs.push(create_conversation(a, "alice", &["bob"]).await);
    }
    for i in 0..120 {
        for c in &convs {
            send(a, "alice", *c, &format!("m{i}")).await;
        }
    }
    for c in &convs {
        assert!(horizon_reaches(&db, *c, 111).await, "{c} never pruned");
    }
    // Both workers' counters (the host's /metrics merges them, each at
    // most a second old) add up to exactly what was deleted.
    let pruned = || async {
        metrics_of(a)
            .await
            .lines()
            .filter(|l| l.starts_with("tether_pruned_events_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(
        wait_until_async(T, Duration::from_millis(100), || async {
            pruned().await == 3.0 * 111.0
        })
        .await,
        "pruned counters: {}",
        pruned().await
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(pruned().await, 3.0 * 111.0, "counted once each");
    assert_eq!(db.query_i64_async("SELECT count(*) FROM events").await, 30);
}

/// History pruned between a connection's memberships read and its
/// backlog read: with the membership unbroken, `truncated` and the rest;
/// with the user removed and added back meanwhile, the connection ends
/// (1013), and the reconnect starts at the new membership.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pruned_under_a_connection_never_skips_a_membership_change() {
    let db = TestDb::new_async().await;
    let hold = tempfile::tempdir().expect("tempdir");
    let dir = hold.path().to_string_lossy().to_string();
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--retention-max-events", "5", "--prune-interval-secs", "1"],
        &[
            ("TETHER_FAULT_HOLD_SUBSCRIBE_DIR", dir.as_str()),
            ("TETHER_FAULT_HOLD_SUBSCRIBE_USER", "bob"),
            ("TETHER_FAULT_NO_RECENT_CACHE", "1"),
        ],
    );
    let a = w.addr();
    let held = |user: &'static str| {
        let dir = hold.path().to_path_buf();
        move || {
            std::fs::read_dir(&dir)
                .map(|entries| {
                    entries.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("held-{user}-"))
                    })
                })
                .unwrap_or(false)
        }
    };
    let c = create_conversation(a, "alice", &["bob"]).await;
    // Retention keeps 5: pruning starts only once there are more.
    for i in 2..=5 {
        send(a, "alice", c, &format!("m{i}")).await;
    }

    // 1. Unbroken membership: truncated, then the rest.
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .expect("bob");
    assert!(wait_until(T, Duration::from_millis(10), held("bob")));
    for i in 6..=20 {
        send(a, "alice", c, &format!("m{i}")).await;
    }
    assert!(horizon_reaches(&db, c, 15).await, "never pruned to 15");
    std::fs::write(hold.path().join("release"), b"").expect("release");
    let frames = frames_until_synced(&mut bob).await;
    // The memberships were read at seq 5; the backlog read found 1..=15
    // gone; events above 5 come from the dispatcher's backfill.
    assert_eq!(shape(&frames[..1]), ["truncated@16"]);
    let last = frames
        .iter()
        .filter(|f| f["type"] == "event")
        .map(|f| f["seq"].as_i64().unwrap())
        .fold(15, |last, s| {
            assert_eq!(s, last + 1, "gap-free from 16: {frames:?}");
            s
        });
    assert_eq!(receive_upto(&mut bob, c, last, 20, "bob").await, 20);
    bob.close(1000).await;

    // 2. Removed and added back while held: the pruned range holds the
    //    member.left, so the connection ends instead.
    std::fs::remove_file(hold.path().join("release")).expect("hold again");
    for entry in std::fs::read_dir(hold.path()).unwrap().flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .expect("bob");
    assert!(wait_until(T, Duration::from_millis(10), held("bob")));
    let r = http(
        a,
        "DELETE",
        &format!("/v1/conversations/{c}/members/bob"),
        Some(&tok("alice")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    send(a, "alice", c, "secret").await; // seq 22: not bob's to see
    let r = http(
        a,
        "POST",
        &format!("/v1/conversations/{c}/members"),
        Some(&tok("alice")),
        Some(&json!({"user": "bob"})),
    )
    .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    // bob back at 23; more traffic so that 21..=23 are pruned.
    for i in 24..=30 {
        send(a, "alice", c, &format!("m{i}")).await;
    }
    assert!(horizon_reaches(&db, c, 25).await, "never pruned to 25");
    std::fs::write(hold.path().join("release"), b"").expect("release");
    loop {
        match bob.next_event(T).await {
            WsEvent::Json(v) => {
                // The memberships read before the hold put bob below
                // horizon 15, with his membership unbroken then.
                assert!(
                    v["type"] != "truncated" || v["from_seq"].as_i64().unwrap() <= 16,
                    "skipped a membership change: {v}"
                );
                assert!(
                    v["type"] != "event" || v["seq"].as_i64().unwrap() <= 20,
                    "an event past the pruned member.left: {v}"
                );
            }
            WsEvent::Closed(code) => {
                assert_eq!(code, Some(1013));
                break;
            }
            WsEvent::Timeout => panic!("bob's connection was neither truncated nor closed"),
        }
    }
    // The reconnect starts at the new membership (since_join history).
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .expect("bob");
    let frames = frames_until_synced(&mut bob).await;
    let mut want = vec!["truncated@26".to_string()];
    want.extend(seqs(26, 30));
    assert_eq!(shape(&frames), want);
}
