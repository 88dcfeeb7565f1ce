//! Failure, hostile input and limits (issue 4): the database going away,
//! a worker killed mid-commit, a client that stops reading, every limit,
//! and `/metrics` moving. Real processes, real signals, a real PostgreSQL
//! that the tests stop and start.

mod support;

use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(30);

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A sender that keeps `window` sends in flight over one connection and
/// retries every unacknowledged send with the same client_msg_id (after
/// errors, and on a new connection if it dropped) until all are acked.
/// Returns client_msg_id → seq.
async fn send_all(
    ws_url: String,
    user: &str,
    c: i64,
    ids: Vec<String>,
    window: usize,
    mut on_acked: impl FnMut(usize),
) -> HashMap<String, i64> {
    let mut acked: HashMap<String, i64> = HashMap::new();
    let mut ws = WsClient::connect(&ws_url, &tok(user))
        .await
        .expect("connect");
    ws.read_until_synced(T).await;
    let mut next = 0; // next id never sent on this connection
    let mut inflight: HashSet<String> = HashSet::new();
    let mut retry: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "{user}: gave up with {} acked",
            acked.len()
        );
        while inflight.len() < window && (!retry.is_empty() || next < ids.len()) {
            let id = match retry.pop() {
                Some(id) => id,
                None => {
                    next += 1;
                    ids[next - 1].clone()
                }
            };
            ws.send_json(&json!({"type":"send","conversation_id":c,"body":format!("body of {id}"),"client_msg_id":id}))
                .await;
            inflight.insert(id);
        }
        match ws.next_event(T).await {
            WsEvent::Json(v) if v["type"] == "sent" => {
                let id = v["client_msg_id"].as_str().unwrap().to_string();
                inflight.remove(&id);
                if acked.insert(id, v["seq"].as_i64().unwrap()).is_none() {
                    on_acked(acked.len());
                }
            }
            WsEvent::Json(v) if v["type"] == "error" => {
                assert_eq!(v["code"], "database_unavailable", "{v}");
                assert!(v["retry_after"].as_u64().unwrap() >= 1);
                let id = v["client_msg_id"].as_str().unwrap().to_string();
                inflight.remove(&id);
                // Back off as told (shortened: the test waits on conditions).
                tokio::time::sleep(Duration::from_millis(50)).await;
                retry.push(id);
            }
            WsEvent::Json(_) => {}
            WsEvent::Closed(_) | WsEvent::Timeout => {
                // Reconnect; everything in flight is retried.
                retry.extend(inflight.drain());
                ws = loop {
                    match WsClient::connect(&ws_url, &tok(user)).await {
                        Ok(mut w) => {
                            w.read_until_synced(T).await;
                            break w;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
            }
        }
    }
    acked
}

/// Reads events of conversation `c` until seq `upto`, checking order and
/// contiguity (dropping duplicates); returns the seqs seen once each.
async fn receive_upto(ws: &mut WsClient, c: i64, mut last: i64, upto: i64, who: &str) -> i64 {
    while last < upto {
        let v = ws
            .recv_until(Duration::from_secs(60), |v| {
                v["type"] == "event" && v["conversation_id"] == c
            })
            .await
            .unwrap_or_else(|| panic!("{who}: stalled at {last} of {upto}"));
        let s = v["seq"].as_i64().unwrap();
        assert!(s <= last + 1, "{who}: gap: {s} after {last}");
        last = last.max(s);
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_and_back_loses_nothing() {
    let db = TestDb::new_async().await;
    let mut w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let pid = w.pid();
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;

    let ids: Vec<String> = (0..1000).map(|i| format!("m{i:04}")).collect();
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let mut half_tx = Some(half_tx);
    let sender = tokio::spawn(send_all(w.ws_url(), "alice", c, ids, 16, move |n| {
        if n == 500 {
            if let Some(tx) = half_tx.take() {
                let _ = tx.send(());
            }
        }
    }));
    half_rx.await.unwrap();
    db.stop_async().await;
    let stopped_at = Instant::now();

    // /ready and /health notice within a few seconds; HTTP sends fail fast and clearly.
    let addr = w.addr();
    assert!(
        wait_until_async(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async move { http(addr, "GET", "/ready", None, None).await.status == 503 }
        )
        .await,
        "/ready never turned 503"
    );
    eprintln!(
        "database stopped; /ready 503 after {:?}",
        stopped_at.elapsed()
    );
    let h = http(addr, "GET", "/health", None, None).await;
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["status"], "unhealthy");
    assert_eq!(h.json()["database"]["connected"], false);
    let t0 = Instant::now();
    let r = http(
        addr,
        "POST",
        &format!("/v1/conversations/{c}/messages"),
        Some(&tok("alice")),
        Some(&json!({"body":"during outage","client_msg_id":"outage-1"})),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "database_unavailable");
    assert!(r.header("retry-after").is_some());
    assert!(r.json()["retry_after"].as_u64().unwrap() >= 1);
    eprintln!("a send during the outage failed in {:?}", t0.elapsed());
    // The WebSocket stays open.
    bob.send_json(&json!({"type":"ping"})).await;
    let mut bob_last = 1;
    loop {
        let v = bob.recv_json(T).await.expect("bob's connection survives");
        if v["type"] == "pong" {
            break;
        }
        if v["type"] == "event" {
            let s = v["seq"].as_i64().unwrap();
            assert!(s <= bob_last + 1, "bob: gap: {s} after {bob_last}");
            bob_last = bob_last.max(s);
        }
    }

    db.start_async().await;
    let started_at = Instant::now();
    assert!(
        wait_until_async(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async move { http(addr, "GET", "/ready", None, None).await.status == 200 }
        )
        .await
    );
    eprintln!(
        "database started; /ready 200 after {:?}",
        started_at.elapsed()
    );

    let acked = sender.await.unwrap();
    assert_eq!(acked.len(), 1000);
    let count = db
        .query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ))
        .await;
    assert_eq!(count, 1000, "exactly one event per client_msg_id");
    let mut seqs: Vec<i64> = acked.values().copied().collect();
    seqs.sort();
    assert_eq!(seqs, (2..=1001).collect::<Vec<_>>());
    receive_upto(&mut bob, c, bob_last, 1001, "bob").await;
    // The same process served throughout: no crash, no restart.
    assert!(w.is_alive());
    assert_eq!(w.pid(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_commit_keeps_every_acknowledged_send() {
    let db = TestDb::new_async().await;
    let mut w1 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w1.addr(), "alice", &["bob"]).await;
    let ids: Vec<String> = (0..600).map(|i| format!("k{i:04}")).collect();

    // Phase 1: stream sends at w1 and SIGKILL it after 200 acks.
    let mut ws = WsClient::connect(&w1.ws_url(), &tok("alice"))
        .await
        .unwrap();
    ws.read_until_synced(T).await;
    let mut acked: HashMap<String, i64> = HashMap::new();
    let mut sent = 0;
    let mut killed = false;
    while !killed {
        while sent < ids.len() && sent - acked.len() < 32 {
            ws.send_json(
                &json!({"type":"send","conversation_id":c,"body":"b","client_msg_id":ids[sent]}),
            )
            .await;
            sent += 1;
        }
        match ws.next_event(T).await {
            WsEvent::Json(v) if v["type"] == "sent" => {
                acked.insert(
                    v["client_msg_id"].as_str().unwrap().into(),
                    v["seq"].as_i64().unwrap(),
                );
                if acked.len() == 200 {
                    w1.signal(libc::SIGKILL);
                    killed = true;
                }
            }
            WsEvent::Json(_) => {}
            other => panic!("before the kill: {other:?}"),
        }
    }
    assert!(w1.wait_exit(T).is_some());
    // Every send acknowledged before the kill is in the log with its seq.
    for (id, seq) in &acked {
        let in_db = db
            .query_i64_async(&format!(
                "SELECT seq FROM events WHERE conversation_id = {c} AND sender = 'alice' AND client_msg_id = '{id}'"
            ))
            .await;
        assert_eq!(in_db, *seq, "{id}");
    }
    let before_retry = db
        .query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ))
        .await;
    eprintln!(
        "killed after {} acks with {sent} sent; {before_retry} committed",
        acked.len()
    );

    // Phase 2: a new worker; the client retries everything not acknowledged.
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let rest: Vec<String> = ids
        .iter()
        .filter(|id| !acked.contains_key(*id))
        .cloned()
        .collect();
    let acked2 = send_all(w2.ws_url(), "alice", c, rest, 32, |_| {}).await;
    let count = db
        .query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ))
        .await;
    assert_eq!(
        count, 600,
        "retries of unacknowledged sends created no duplicates"
    );
    let mut all: Vec<i64> = acked.values().chain(acked2.values()).copied().collect();
    all.sort();
    assert_eq!(all, (2..=601).collect::<Vec<_>>());
    // bob, connecting afterwards, gets all of them once, in order.
    let mut bob = WsClient::connect(&w2.ws_url(), &tok("bob")).await.unwrap();
    let backlog = bob.read_until_synced(T).await;
    let s: Vec<i64> = backlog.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(s, (1..=601).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_with_1013_and_replays_later() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--outbound-queue", "512"], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;
    let rss_before = rss_kib(w.pid());
    // bob stops reading. alice sends 20,000 events of ~1 KB (20 MB: more
    // than the kernel's socket buffers hold).
    let ids: Vec<String> = (0..20_000).map(|i| format!("s{i}")).collect();
    let body = "x".repeat(1000);
    // alice writes through a second worker whose queues are large, so that
    // only bob (on the first, with a 512-event queue) can be the slow one,
    // however busy the machine is.
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--outbound-queue", "100000"], &[]);
    let mut alice = WsClient::connect(&w2.ws_url(), &tok("alice"))
        .await
        .unwrap();
    alice.read_until_synced(T).await;
    let mut acked = 0;
    let mut sent = 0;
    while acked < ids.len() {
        while sent < ids.len() && sent - acked < 256 {
            alice.send_json(&json!({"type":"send","conversation_id":c,"body":body,"client_msg_id":ids[sent]})).await;
            sent += 1;
        }
        if let WsEvent::Json(v) = alice.next_event(T).await {
            if v["type"] == "sent" {
                acked += 1;
            }
        }
    }
    let addr = w.addr();
    assert!(
        wait_until_async(T, Duration::from_millis(50), || async move {
            metric(&metrics_of(addr).await, "tether_slow_client_closes_total") >= 1.0
        })
        .await,
        "bob was never cut"
    );
    let rss_after = rss_kib(w.pid());
    eprintln!("worker RSS: {rss_before} KiB before, {rss_after} KiB after 20,000 events to a non-reading client");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory must stay bounded: {rss_before} -> {rss_after} KiB"
    );
    // bob reads again: what was in flight, then the 1013.
    let code = bob.wait_close(Duration::from_secs(60)).await;
    assert_eq!(code, Some(1013));
    // On reconnect bob replays everything from his cursor (0), in order.
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    let backlog = bob.read_until_synced(Duration::from_secs(120)).await;
    assert_eq!(backlog.len(), 20_001);
    assert!(backlog
        .iter()
        .enumerate()
        .all(|(i, e)| e["seq"] == i as i64 + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_is_enforced_and_configurable() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &[
            "--max-frame-bytes",
            "2048",
            "--max-body-bytes",
            "100",
            "--rate-limit",
            "5",
            "--rate-burst",
            "5",
            "--max-connections",
            "4",
            "--idle-timeout-secs",
            "2",
            "--handshake-timeout-ms",
            "1000",
        ],
        &[],
    );
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let path = format!("/v1/conversations/{c}/messages");

    // Message body size: WebSocket error and HTTP 413.
    let mut a = WsClient::connect(&w.ws_url(), &tok("alice")).await.unwrap();
    a.read_until_synced(T).await;
    a.send_json(
        &json!({"type":"send","conversation_id":c,"body":"y".repeat(101),"client_msg_id":"big"}),
    )
    .await;
    let e = a.recv_until(T, |v| v["type"] == "error").await.unwrap();
    assert_eq!(
        (e["code"].as_str(), e["client_msg_id"].as_str()),
        (Some("payload_too_large"), Some("big"))
    );
    let r = http(
        w.addr(),
        "POST",
        &path,
        Some(&tok("bob")),
        Some(&json!({"body":"y".repeat(101),"client_msg_id":"big"})),
    )
    .await;
    assert_eq!(r.status, 413);

    // Per-user send rate: a burst of 5, then refused with a retry time.
    let mut refused = None;
    for i in 0..8 {
        a.send_json(
            &json!({"type":"send","conversation_id":c,"body":"r","client_msg_id":format!("r{i}")}),
        )
        .await;
        let v = a
            .recv_until(T, |v| v["type"] == "sent" || v["type"] == "error")
            .await
            .unwrap();
        if v["type"] == "error" {
            refused = Some(v);
            break;
        }
    }
    let refused = refused.expect("the rate limit never refused");
    assert_eq!(refused["code"], "rate_limited");
    assert!(refused["retry_after"].as_u64().unwrap() >= 1);
    let mut got_429 = false;
    for i in 0..8 {
        let r = http(
            w.addr(),
            "POST",
            &path,
            Some(&tok("bob")),
            Some(&json!({"body":"r","client_msg_id":format!("h{i}")})),
        )
        .await;
        if r.status == 429 {
            assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
            assert_eq!(r.json()["error"], "rate_limited");
            got_429 = true;
            break;
        }
        assert_eq!(r.status, 201);
    }
    assert!(got_429);

    // Frame size: close 1009.
    let mut big = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    big.read_until_synced(T).await;
    big.send_raw(Message::text(format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "z".repeat(4096)
    )))
    .await;
    assert_eq!(big.wait_close(T).await, Some(1009));

    // Connections per worker: 4 allowed (a is one), the fifth is refused with 503.
    let mut held = Vec::new();
    let addr = w.addr();
    wait_until_async(T, Duration::from_millis(20), || async move {
        metric(&metrics_of(addr).await, "tether_connections_open") <= 1.0
    })
    .await;
    for _ in 0..3 {
        held.push(
            WsClient::connect(&w.ws_url(), &tok("bob"))
                .await
                .expect("within the limit"),
        );
    }
    let e = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .err()
        .expect("over the limit");
    assert_eq!(e.status(), Some(503), "{e}");
    drop(held);
    drop(a);

    // Idle: a client that never answers (we do not poll it) is closed after 2 s.
    assert!(
        wait_until_async(T, Duration::from_millis(20), || async move {
            metric(&metrics_of(addr).await, "tether_connections_open") == 0.0
        })
        .await
    );
    let mut idle = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    let idle_before = metric(&metrics_of(addr).await, "tether_idle_closes_total");
    assert!(
        wait_until_async(T, Duration::from_millis(50), || async move {
            metric(&metrics_of(addr).await, "tether_idle_closes_total") > idle_before
        })
        .await,
        "the silent connection was never closed"
    );
    assert_eq!(idle.wait_close(T).await, Some(1000));

    // Slow handshake: a client trickling its request headers is dropped.
    let dropped = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = Instant::now();
        let _ = s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n");
        let mut buf = [0u8; 512];
        while started.elapsed() < Duration::from_secs(20) {
            if s.write_all(b"X").is_err() {
                return Some(started.elapsed());
            }
            match s.read(&mut buf) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => return Some(started.elapsed()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    })
    .await
    .unwrap();
    let took = dropped.expect("a trickling client was never dropped");
    eprintln!("trickling handshake dropped after {took:?}");
    // Nothing in all of this was written beyond the accepted sends.
    let msgs = db
        .query_i64_async("SELECT count(*) FROM events WHERE type = 'message.created'")
        .await;
    assert_eq!(msgs, 10, "5 WebSocket + 5 HTTP sends within the rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_never_crashes_a_worker_and_tokens_stay_out_of_logs() {
    use base64::Engine;
    let db = TestDb::new_async().await;
    let mut w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[("RUST_LOG", "debug")]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    // HS256 over any header and payload, for algorithm-confusion cases.
    let sign = |h: &str, p: &str, key: &str| -> String {
        let unsigned = format!("{}.{}", b64(h), b64(p));
        let sig = tether_protocol::auth::hs256(key.as_bytes(), unsigned.as_bytes());
        format!(
            "{unsigned}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
        )
    };
    let far = 99_999_999_999u64;
    let tokens = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none"}"#),
                b64(&format!(r#"{{"sub":"alice","exp":{far}}}"#))
            ),
        ),
        (
            "HS512 header",
            sign(
                r#"{"alg":"HS512"}"#,
                &format!(r#"{{"sub":"alice","exp":{far}}}"#),
                TEST_SECRET,
            ),
        ),
        (
            "RS256 header",
            sign(
                r#"{"alg":"RS256"}"#,
                &format!(r#"{{"sub":"alice","exp":{far}}}"#),
                TEST_SECRET,
            ),
        ),
        (
            "wrong key",
            sign(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"sub":"alice","exp":{far}}}"#),
                "wrong",
            ),
        ),
        (
            "no sub",
            sign(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"exp":{far}}}"#),
                TEST_SECRET,
            ),
        ),
        (
            "no exp",
            sign(r#"{"alg":"HS256"}"#, r#"{"sub":"alice"}"#, TEST_SECRET),
        ),
        (
            "expired",
            sign(
                r#"{"alg":"HS256"}"#,
                r#"{"sub":"alice","exp":1000}"#,
                TEST_SECRET,
            ),
        ),
        (
            "sub alphabet",
            sign(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"sub":"al ice\u0000","exp":{far}}}"#),
                TEST_SECRET,
            ),
        ),
        (
            "sub too long",
            sign(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"sub":"{}","exp":{far}}}"#, "a".repeat(65)),
                TEST_SECRET,
            ),
        ),
        (
            "exp overflow",
            sign(
                r#"{"alg":"HS256"}"#,
                r#"{"sub":"alice","exp":1e999}"#,
                TEST_SECRET,
            ),
        ),
        ("not base64", "%%%.%%%.%%%".to_string()),
    ];
    for (name, t) in &tokens {
        let r = http(w.addr(), "GET", "/v1/conversations", Some(t), None).await;
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        let e = WsClient::connect(&w.ws_url(), t)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name} upgraded"));
        assert_eq!(e.status(), Some(401), "{name}");
    }
    // A good token in the query string, and a bad one: neither reaches the log.
    let good = tok("alice");
    let mut ws = WsClient::connect(&w.ws_url(), &good).await.unwrap();
    ws.read_until_synced(T).await;

    // Hostile frames: deeply nested JSON, huge numbers, NUL bytes, long strings.
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let hostile = vec![
        nested.clone(),
        format!(
            r#"{{"type":"send","conversation_id":{c},"body":"nul\u0000byte","client_msg_id":"nul"}}"#
        ),
        format!(
            r#"{{"type":"send","conversation_id":{c},"body":"x","client_msg_id":"{}"}}"#,
            "L".repeat(5000)
        ),
        r#"{"type":"ack","conversation_id":1e400,"seq":1}"#.to_string(),
        r#"{"type":"send","conversation_id":-5,"body":"x","client_msg_id":"neg"}"#.to_string(),
        format!(
            r#"{{"type":"send","conversation_id":{c},"body":"x","client_msg_id":"ctl\u0007"}}"#
        ),
        "\u{0}\u{0}\u{0}".to_string(),
        String::new(),
    ];
    for h in &hostile {
        ws.send_raw(Message::text(h.clone())).await;
    }
    // Every one gets an error frame (a NUL byte is valid JSON but cannot be
    // stored as text, so it is refused up front).
    let mut errors = 0;
    while errors < hostile.len() {
        match ws.next_event(T).await {
            WsEvent::Json(v) if v["type"] == "error" => errors += 1,
            WsEvent::Json(v) if v["type"] == "sent" => panic!("hostile input was accepted: {v}"),
            WsEvent::Json(_) => {}
            other => panic!("connection lost on hostile input: {other:?}"),
        }
    }

    // Hostile HTTP: garbage request lines, huge headers, bad bodies.
    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\x03\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        format!("GET /v1/conversations HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "h".repeat(200_000)).into_bytes(),
        [
            format!("POST /v1/conversations/{c}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nContent-Length: 5\r\n\r\n").into_bytes(),
            vec![0xff, 0xfe, 0xfd, 0xfc, 0xfb],
        ]
        .concat(),
        format!("POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nContent-Length: {}\r\n\r\n{nested}", nested.len()).into_bytes(),
        format!("GET /v1/conversations/{c}/events?before_seq=99999999999999999999999 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\n\r\n").into_bytes(),
        format!("DELETE /v1/conversations/{c}/members/%00%ff HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\n\r\n").into_bytes(),
    ];
    for g in garbage {
        if let Ok(r) = send_request(w.addr(), &g).await {
            assert!(
                r.status >= 400,
                "{} for {:?}",
                r.status,
                String::from_utf8_lossy(&g[..g.len().min(60)])
            );
        }
    }
    // Still alive, still serving, nothing unexpected written.
    assert!(w.is_alive());
    let r = http(w.addr(), "GET", "/ready", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        db.query_i64_async("SELECT count(*) FROM events WHERE type = 'message.created'")
            .await,
        0
    );
    assert_eq!(
        db.query_i64_async("SELECT count(*) FROM conversations")
            .await,
        1
    );
    let log = w.log_contents();
    assert!(!log.contains(&good), "a token reached the log");
    for (_, t) in &tokens {
        if t.len() > 20 {
            assert!(!log.contains(t.as_str()), "a token reached the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let before = metrics_of(w.addr()).await;
    assert!(before.contains("# TYPE tether_commit_seconds histogram"));
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;
    let mut alice = WsClient::connect(&w.ws_url(), &tok("alice")).await.unwrap();
    alice.read_until_synced(T).await;
    for i in 0..10 {
        alice.send_json(&json!({"type":"send","conversation_id":c,"body":"m","client_msg_id":format!("m{i}")})).await;
    }
    receive_upto(&mut bob, c, 1, 11, "bob").await;
    alice.send_raw(Message::text("{bad")).await;
    alice.recv_until(T, |v| v["type"] == "error").await.unwrap();
    let _ = http(
        w.addr(),
        "GET",
        "/v1/conversations",
        Some("bad-token"),
        None,
    )
    .await;
    let after = metrics_of(w.addr()).await;
    for (name, at_least) in [
        ("tether_events_committed_total", 10.0),
        ("tether_commit_batches_total", 1.0),
        ("tether_deliveries_total", 20.0),
        ("tether_connections_open", 2.0),
        ("tether_connections_total", 2.0),
        ("tether_bad_frames_total", 1.0),
        ("tether_auth_failures_total", 1.0),
        ("tether_commit_seconds_count", 10.0),
        ("tether_commit_to_delivery_seconds_count", 10.0),
        ("tether_backlog_replay_events_count", 2.0),
        ("tether_db_pool_wait_seconds_count", 1.0),
        ("tether_db_up", 1.0),
    ] {
        let v = if name.ends_with("_count") {
            after
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        } else {
            metric(&after, name)
        };
        assert!(
            v >= at_least,
            "{name} = {v}, expected at least {at_least}; all metrics:\n{after}"
        );
    }
    assert!(metric(&before, "tether_events_committed_total") == 0.0);
}

/// Property test of the HTTP layer: random methods, paths, headers and
/// bodies (bounded to a few hundred cases, so it runs in CI). No request
/// gets a 500, and the worker keeps serving.
#[test]
fn random_http_requests_never_get_a_500_or_crash_the_worker() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let db = TestDb::new();
    let mut w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let addr = w.addr();
    let good = tok("alice");
    let r = http_blocking(
        addr,
        "POST",
        "/v1/conversations",
        Some(&good),
        Some(&json!({"members":["bob"]})),
    )
    .unwrap();
    assert_eq!(r.status, 201);
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("DELETE"),
        Just("PUT"),
        Just("PATCH"),
        Just("OPTIONS"),
        Just("BREW"),
    ];
    let segment = prop_oneof![
        Just("v1".to_string()),
        Just("conversations".to_string()),
        Just("1".to_string()),
        Just("members".to_string()),
        Just("messages".to_string()),
        Just("events".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("%00%ff".to_string()),
        Just("ws".to_string()),
        "[a-zA-Z0-9%._~-]{0,12}",
    ];
    let path = (
        prop::collection::vec(segment, 0..6),
        prop::option::of("[a-z_]{1,10}=[a-zA-Z0-9%-]{0,12}"),
    )
        .prop_map(|(s, q)| match q {
            Some(q) => format!("/{}?{q}", s.join("/")),
            None => format!("/{}", s.join("/")),
        });
    let auth = prop_oneof![
        Just(None),
        Just(Some(good.clone())),
        Just(Some("garbage".to_string())),
        Just(Some(token("wrong-secret", "alice"))),
    ];
    let body = prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..300),
        Just(br#"{"members":["bob"],"title":"t"}"#.to_vec()),
        Just(br#"{"body":"hi","client_msg_id":"p"}"#.to_vec()),
        Just(br#"{"user":"carol"}"#.to_vec()),
        Just(b"{\"body\":\"\\u0000\"}".to_vec()),
        "\\PC{0,200}".prop_map(String::into_bytes),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(method, path, auth, body), |(m, p, a, b)| {
            let mut req = format!(
                "{m} {p} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
                b.len()
            );
            if let Some(a) = a {
                req.push_str(&format!("Authorization: Bearer {a}\r\n"));
            }
            req.push_str("\r\n");
            let mut bytes = req.into_bytes();
            bytes.extend_from_slice(&b);
            let mut s = std::net::TcpStream::connect(addr)
                .map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(&bytes);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out);
            if let Some(status) = text.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()) {
                prop_assert!(status != 500, "500 for {m} {p}: {text}");
                prop_assert!((100..600).contains(&status));
            }
            Ok(())
        })
        .unwrap();
    assert!(w.is_alive(), "the worker died");
    assert_eq!(
        http_blocking(addr, "GET", "/ready", None, None)
            .unwrap()
            .status,
        200
    );
}
