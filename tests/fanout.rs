//! Fan-out across processes: two workers (standing in for two hosts: each
//! is its own process with its own LISTEN connection) on one database.
//! Every event reaches every member whichever worker it entered by, in
//! order with no gap, also when the LISTEN connection is killed.

use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_workers_in_order_without_gaps() {
    let db = TestDb::new_async().await;
    let w1 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    let c = create_conversation(w1.addr(), "u0", &users[1..]).await;

    // Clients alternate between the workers; writers too.
    let mut readers = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let url = if i % 2 == 0 { w1.ws_url() } else { w2.ws_url() };
        let mut ws = WsClient::connect(&url, &tok(u)).await.expect("connect");
        ws.read_until_synced(T).await;
        readers.push((u.clone(), ws));
    }
    // 300 messages, each user sending through the worker it is on, all
    // concurrently: seq assignment interleaves the two workers' commits.
    const PER: usize = 50;
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let url = if i % 2 == 0 { w2.ws_url() } else { w1.ws_url() };
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = WsClient::connect(&url, &token(TEST_SECRET, &u)).await.expect("connect");
            ws.read_until_synced(T).await;
            for k in 0..PER {
                ws.send_json(&json!({"type":"send","conversation_id":c,"body":format!("{u}:{k}"),"client_msg_id":format!("{u}:{k}")}))
                    .await;
            }
            for _ in 0..PER {
                let v = ws.recv_until(T, |v| v["type"] == "sent" || v["type"] == "error").await.expect("ack");
                assert_eq!(v["type"], "sent", "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want: HashMap<i64, i64> = [(c, 1 + (users.len() * PER) as i64)].into();
    for (u, ws) in readers.iter_mut() {
        // Their backlog was seq 1 (conversation.created).
        let mut last = HashMap::from([(c, 1)]);
        read_until_seqs(ws, &mut last, &want, u, T).await;
    }
    assert_eq!(
        db.query_i64_async("SELECT count(*) FROM events WHERE type = 'message.created'")
            .await,
        (users.len() * PER) as i64
    );
    // Both workers did commit some of them, and read the rest from the log.
    for w in [&w1, &w2] {
        let m = http(w.addr(), "GET", "/metrics", None, None).await.body;
        let committed = metric(&m, "tether_events_committed_total");
        assert!(committed > 0.0, "{} committed nothing", w.worker_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listen_connection_loses_nothing() {
    let db = TestDb::new_async().await;
    let w1 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w1.addr(), "alice", &["bob"]).await;
    // bob reads on w2; alice writes on w1, so everything bob gets came
    // through w2's LISTEN connection or its catch-up reads.
    let mut bob = WsClient::connect(&w2.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;
    let mut alice = WsClient::connect(&w1.ws_url(), &tok("alice"))
        .await
        .unwrap();
    alice.read_until_synced(T).await;
    let listen_of_w2 = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'tether-listen {}'",
        w2.worker_id()
    );
    let mut last = HashMap::from([(c, 1)]);
    for round in 0..5 {
        for k in 0..40 {
            alice
                .send_json(&json!({"type":"send","conversation_id":c,"body":"x","client_msg_id":format!("r{round}k{k}")}))
                .await;
            if k == 20 {
                let killed = db.query_i64_async(&listen_of_w2).await;
                assert!(killed <= 1);
            }
        }
        for _ in 0..40 {
            let v = alice
                .recv_until(T, |v| v["type"] == "sent")
                .await
                .expect("sent");
            assert!(v["seq"].as_i64().is_some());
        }
        let want: HashMap<i64, i64> = [(c, 1 + 40 * (round + 1))].into();
        read_until_seqs(&mut bob, &mut last, &want, "bob", T).await;
    }
    // The reconnects happened and were counted.
    let m = http(w2.addr(), "GET", "/metrics", None, None).await.body;
    assert!(metric(&m, "tether_listener_reconnects_total") >= 1.0, "{m}");
}
