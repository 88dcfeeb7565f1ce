//! Limits and hostile input against a real worker: every limit enforced
//! and configurable, hostile requests and frames that never crash a worker
//! (nor put a token in its log), random HTTP that never gets a 500, and
//! `/metrics` counters that move.

use serde_json::json;

use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);

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
