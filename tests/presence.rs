//! Presence, typing and read receipts against real processes, with a
//! short grace period (2 s) and lease (3 s): across two workers, through
//! a worker SIGKILL (never shown offline when the user comes straight
//! back; offline within the documented bound when they do not), a clean
//! close (offline after the grace period, not before), a reconnect storm
//! (one `online`), across two hosts, and nothing for non-members.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(2);
const LEASE: Duration = Duration::from_secs(3);
const PRESENCE_ARGS: &[&str] = &["--presence-grace-secs", "2", "--presence-lease-secs", "3"];

/// Connects `user` and reads through `synced`, until it lands on a worker
/// `accept` agrees to; returns the client and its worker.
async fn connect_where(
    ws_url: &str,
    user: &str,
    accept: impl Fn(&str) -> bool,
) -> (WsClient, String) {
    for _ in 0..100 {
        let mut ws = WsClient::connect(ws_url, &tok(user))
            .await
            .expect("connect");
        ws.read_until_synced(T).await;
        let w = ws.hello.as_ref().unwrap()["worker"]
            .as_str()
            .unwrap()
            .to_string();
        if accept(&w) {
            return (ws, w);
        }
        ws.close(1000).await;
    }
    panic!("{user} never landed on a wanted worker");
}

fn is_presence(v: &Value, c: i64, user: &str, status: &str) -> bool {
    v["type"] == "presence"
        && v["conversation_id"] == c
        && v["user"] == user
        && v["status"] == status
}

/// Waits for `user`'s status in `c` on `ws`, returning how long it took.
async fn await_presence(ws: &mut WsClient, c: i64, user: &str, status: &str) -> Duration {
    let t0 = Instant::now();
    ws.recv_until(T, |v| is_presence(v, c, user, status))
        .await
        .unwrap_or_else(|| panic!("no presence {user} {status} in {c}"));
    t0.elapsed()
}

/// Reads `ws` for `d`; the presence frames about `user` seen.
async fn presence_during(ws: &mut WsClient, user: &str, d: Duration) -> Vec<Value> {
    let deadline = Instant::now() + d;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return seen;
        }
        match ws.next_event(left).await {
            WsEvent::Json(v) if v["type"] == "presence" && v["user"] == user => seen.push(v),
            WsEvent::Json(_) => {}
            WsEvent::Timeout => return seen,
            WsEvent::Closed(c) => panic!("closed ({c:?}) while watching presence"),
        }
    }
}

/// The pid of the one worker of the supervisor at `addr`.
async fn worker_pid(addr: std::net::SocketAddr) -> i32 {
    let h = http(addr, "GET", "/health", None, None).await.json();
    h["pid"].as_i64().expect("/health says its pid") as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_typing_and_receipts_across_workers_and_a_worker_kill() {
    let db = TestDb::new_async().await;
    // Two supervisors of one worker each: alice's worker (under `home`)
    // and bob's (under `away`) are different processes for sure.
    let home = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 1, PRESENCE_ARGS, &[]);
    let away = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 1, PRESENCE_ARGS, &[]);
    let a = home.addr();
    let c = create_conversation(a, "alice", &["bob"]).await;

    let (mut alice, _) = connect_where(&home.ws_url(), "alice", |_| true).await;
    let (mut bob, _) = connect_where(&away.ws_url(), "bob", |_| true).await;

    // bob sees alice online (in his burst after synced, or as a change).
    await_presence(&mut bob, c, "alice", "online").await;
    await_presence(&mut alice, c, "bob", "online").await;

    // The REST view: both online, with read positions.
    let r = http(
        a,
        "GET",
        &format!("/v1/conversations/{c}/presence"),
        Some(&tok("bob")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let members = r.json()["members"].clone();
    let status: Vec<(String, String)> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        status,
        [
            ("alice".to_string(), "online".to_string()),
            ("bob".to_string(), "online".to_string())
        ]
    );
    assert!(members[0]["last_seen"].is_string());

    // Typing crosses workers; a second one within 2 s is not forwarded.
    alice
        .send_json(&json!({"type": "typing", "conversation_id": c}))
        .await;
    let t = bob
        .recv_until(T, |v| v["type"] == "typing")
        .await
        .expect("typing");
    assert_eq!(
        (t["conversation_id"].as_i64(), t["user"].as_str()),
        (Some(c), Some("alice"))
    );
    alice
        .send_json(&json!({"type": "typing", "conversation_id": c}))
        .await;
    assert!(
        bob.recv_until(Duration::from_millis(1200), |v| v["type"] == "typing")
            .await
            .is_none(),
        "typing twice within 2 s"
    );

    // bob reads: alice gets a receipt.
    let r = http(
        a,
        "POST",
        &format!("/v1/conversations/{c}/messages"),
        Some(&tok("alice")),
        Some(&json!({"body": "hi", "client_msg_id": "m1"})),
    )
    .await;
    assert_eq!(r.status, 201);
    recv_event(&mut bob, |e| e["seq"] == 2).await;
    bob.send_json(&json!({"type": "ack", "conversation_id": c, "seq": 2}))
        .await;
    let read = alice
        .recv_until(T, |v| v["type"] == "read")
        .await
        .expect("a read receipt");
    assert_eq!(
        (
            read["conversation_id"].as_i64(),
            read["user"].as_str(),
            read["seq"].as_i64()
        ),
        (Some(c), Some("bob"), Some(2))
    );

    // alice's worker is SIGKILLed; she comes straight back (to the other
    // host, the first that answers): bob never sees her offline, even
    // after grace + lease.
    unsafe { libc::kill(worker_pid(a).await, libc::SIGKILL) };
    assert!(alice.wait_close(T).await.is_none() || alice.is_closed());
    let mut alice = loop {
        match WsClient::connect(&away.ws_url(), &tok("alice")).await {
            Ok(mut ws) => {
                ws.read_until_synced(T).await;
                break ws;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let flicker = presence_during(&mut bob, "alice", GRACE + LEASE + Duration::from_secs(2)).await;
    assert!(
        flicker.iter().all(|v| v["status"] != "offline"),
        "alice flickered offline: {flicker:?}"
    );

    // alice closes: offline after the grace period, not before.
    alice.close(1000).await;
    let took = await_presence(&mut bob, c, "alice", "offline").await;
    assert!(
        took >= GRACE,
        "offline after {took:?}, before the grace period"
    );
    assert!(
        took <= GRACE + LEASE + Duration::from_secs(2),
        "offline only after {took:?}"
    );

    // A storm: 20 connections of alice at once, over both workers: one
    // `online`.
    let storm: Vec<_> = (0..20)
        .map(|i| {
            let url = if i % 2 == 0 {
                home.ws_url()
            } else {
                away.ws_url()
            };
            tokio::spawn(async move {
                let mut ws = WsClient::connect(&url, &tok("alice")).await.expect("storm");
                ws.read_until_synced(T).await;
                ws
            })
        })
        .collect();
    let mut storm_clients = Vec::new();
    for s in storm {
        storm_clients.push(s.await.unwrap());
    }
    let seen = presence_during(&mut bob, "alice", Duration::from_secs(3)).await;
    let online: Vec<_> = seen.iter().filter(|v| v["status"] == "online").collect();
    assert_eq!(online.len(), 1, "one online for a storm: {seen:?}");

    // Killed and never back: offline within grace + lease (+ a tick),
    // not before the grace period.
    for ws in &mut storm_clients {
        ws.close(1000).await;
    }
    drop(storm_clients);
    // home's worker was replaced after the first kill; alice on it again.
    let mut home = home;
    home.wait_ready(T).expect("home ready again");
    let (mut alice, _) = connect_where(&home.ws_url(), "alice", |_| true).await;
    let _ = presence_during(&mut bob, "alice", Duration::from_millis(1500)).await;
    unsafe { libc::kill(worker_pid(a).await, libc::SIGKILL) };
    let _ = alice.wait_close(T).await;
    let t0 = Instant::now();
    let offline = bob
        .recv_until(T, |v| is_presence(v, c, "alice", "offline"))
        .await;
    let took = t0.elapsed();
    if offline.is_none() {
        let state = db
            .with_client(|cl| {
                let p: Vec<String> = cl
                    .query("SELECT user_id || ' ' || online || ' ' || (now() - last_seen)::text FROM presence", &[])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let l: Vec<String> = cl
                    .query("SELECT user_id || ' ' || holder || ' ' || (expires_at - now())::text FROM presence_leases", &[])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                format!("presence {p:?}\nleases {l:?}")
            });
        panic!(
            "alice never offline after her worker died:\n{state}\n{}",
            home.log_tail(40)
        );
    }
    assert!(
        took >= GRACE - Duration::from_millis(100),
        "offline after {took:?}"
    );
    assert!(
        took <= GRACE + LEASE + Duration::from_secs(2),
        "offline only after {took:?}"
    );
    let m = metrics_of(a).await;
    assert!(m.contains("tether_presence_changes_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_cross_hosts() {
    let db = TestDb::new_async().await;
    let host_a = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 1, PRESENCE_ARGS, &[]);
    let host_b = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 1, PRESENCE_ARGS, &[]);
    let c = create_conversation(host_a.addr(), "alice", &["bob"]).await;
    let mut bob = WsClient::connect(&host_b.ws_url(), &tok("bob"))
        .await
        .expect("bob");
    bob.read_until_synced(T).await;
    let mut alice = WsClient::connect(&host_a.ws_url(), &tok("alice"))
        .await
        .expect("alice");
    alice.read_until_synced(T).await;
    await_presence(&mut bob, c, "alice", "online").await;
    alice
        .send_json(&json!({"type": "typing", "conversation_id": c}))
        .await;
    let t = bob
        .recv_until(T, |v| v["type"] == "typing")
        .await
        .expect("typing across hosts");
    assert_eq!(t["user"], "alice");
    alice.close(1000).await;
    let took = await_presence(&mut bob, c, "alice", "offline").await;
    assert!(took >= GRACE, "offline after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_see_no_presence_and_cannot_type() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, PRESENCE_ARGS, &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let (mut mallory, _) = ws_connect(&w, "mallory").await;
    mallory
        .send_json(&json!({"type": "typing", "conversation_id": c}))
        .await;
    let e = mallory
        .recv_until(T, |v| v["type"] == "error")
        .await
        .expect("an error");
    assert_eq!(e["code"], "not_found");
    for (who, id) in [
        ("mallory", c.to_string()),
        ("alice", "999999".to_string()),
        ("alice", "x".to_string()),
    ] {
        let r = http(
            w.addr(),
            "GET",
            &format!("/v1/conversations/{id}/presence"),
            Some(&tok(who)),
            None,
        )
        .await;
        assert_eq!(r.status, 404, "{who} {id}: {}", r.body);
    }
    for bad in [
        json!({"type": "typing"}),
        json!({"type": "typing", "conversation_id": "one"}),
        json!({"type": "typing", "conversation_id": -1}),
    ] {
        mallory.send_json(&bad).await;
        let e = mallory
            .recv_until(T, |v| v["type"] == "error")
            .await
            .expect("an error");
        assert_eq!(e["code"], "invalid_field", "{bad}");
    }
    // alice and bob come and go: mallory hears nothing of it.
    let (_alice, _) = ws_connect(&w, "alice").await;
    let seen = presence_during(&mut mallory, "alice", Duration::from_secs(2)).await;
    assert!(seen.is_empty(), "{seen:?}");
    // A forged signal (not authenticated) changes nothing.
    db.execute_async(
        "SELECT pg_notify('tether_signals', E'a 1 00\\np 0 2026-01-01T00:00:00Z alice')",
    )
    .await;
    let (mut bob, _) = ws_connect(&w, "bob").await;
    let seen = presence_during(&mut bob, "alice", Duration::from_secs(2)).await;
    assert!(
        seen.iter().all(|v| v["status"] == "online"),
        "a forged signal was believed: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_stop_at_their_member_limit() {
    let db = TestDb::new_async().await;
    let mut args = PRESENCE_ARGS.to_vec();
    args.extend(["--read-receipts-max-members", "1"]);
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &args, &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let (mut alice, _) = ws_connect(&w, "alice").await;
    let (mut bob, _) = ws_connect(&w, "bob").await;
    // Typing still goes (its limit is --presence-push-max-members)...
    bob.send_json(&json!({"type": "typing", "conversation_id": c}))
        .await;
    alice
        .recv_until(T, |v| v["type"] == "typing")
        .await
        .expect("typing in a conversation of 2");
    // ...but bob's ack gives alice no receipt in a conversation of 2 > 1;
    // the REST view has it.
    bob.send_json(&json!({"type": "ack", "conversation_id": c, "seq": 1}))
        .await;
    let sql =
        format!("SELECT cursor_seq FROM members WHERE conversation_id = {c} AND user_id = 'bob'");
    assert!(
        wait_until_async(T, Duration::from_millis(20), || async {
            db.query_i64_async(&sql).await == 1
        })
        .await
    );
    assert!(
        alice
            .recv_until(Duration::from_secs(2), |v| v["type"] == "read")
            .await
            .is_none(),
        "a receipt above the limit"
    );
    let r = http(
        w.addr(),
        "GET",
        &format!("/v1/conversations/{c}/presence"),
        Some(&tok("alice")),
        None,
    )
    .await;
    let bob_row = r.json()["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == "bob")
        .cloned()
        .unwrap();
    assert_eq!(bob_row["read_seq"], 1);
}
