//! Who may do what, and what bad input gets, against a real worker: 401
//! for every kind of bad token (HTTP and upgrade), 404 for non-members
//! with nothing written, error frames for bad frames with the connection
//! and everyone else unaffected, and keyset pages that stay consistent
//! while events arrive.

use serde_json::json;
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_and_non_members_see_nothing() {
    use base64::Engine;
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(r#"{"sub":"alice","exp":99999999999}"#)
    );
    let bad_sig = token("some-other-secret", "alice");
    let expired = expired_token(TEST_SECRET, "alice", 60);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("garbage", Some("not.a.jwt".into())),
        ("bad signature", Some(bad_sig)),
        ("expired", Some(expired)),
        ("alg none", Some(alg_none)),
    ];
    let path = format!("/v1/conversations/{c}/messages");
    for (name, t) in &cases {
        let r = http(
            w.addr(),
            "POST",
            &path,
            t.as_deref(),
            Some(&json!({"body":"x","client_msg_id":"x"})),
        )
        .await;
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert_eq!(r.json()["error"], "unauthorized");
        let r = http(w.addr(), "GET", "/v1/conversations", t.as_deref(), None).await;
        assert_eq!(r.status, 401, "{name}");
        let url = match t {
            Some(t) => format!("{}?token={t}", w.ws_url()),
            None => w.ws_url(),
        };
        let e = WsClient::connect_url(&url)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: upgraded"));
        assert_eq!(e.status(), Some(401), "{name}: {e}");
    }
    // The header form works for the upgrade too.
    assert!(WsClient::connect_with_header(&w.ws_url(), &tok("alice"))
        .await
        .is_ok());

    // mallory is authenticated but not a member: 404, nothing written.
    let m = tok("mallory");
    let r = http(
        w.addr(),
        "POST",
        &path,
        Some(&m),
        Some(&json!({"body":"x","client_msg_id":"x"})),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = http(
        w.addr(),
        "GET",
        &format!("/v1/conversations/{c}/events"),
        Some(&m),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = http(
        w.addr(),
        "POST",
        &format!("/v1/conversations/{c}/members"),
        Some(&m),
        Some(&json!({"user":"mallory"})),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = http(
        w.addr(),
        "DELETE",
        &format!("/v1/conversations/{c}/members/bob"),
        Some(&m),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = http(
        w.addr(),
        "GET",
        "/v1/conversations/999999/events",
        Some(&m),
        None,
    )
    .await;
    assert_eq!(
        r.status, 404,
        "unknown conversations look the same as foreign ones"
    );
    let (mut ws, backlog) = ws_connect(&w, "mallory").await;
    assert!(backlog.is_empty());
    ws.send_json(&json!({"type":"send","conversation_id":c,"body":"x","client_msg_id":"m1"}))
        .await;
    let e = ws.recv_until(T, |v| v["type"] == "error").await.unwrap();
    assert_eq!(
        (e["code"].as_str(), e["client_msg_id"].as_str()),
        (Some("not_found"), Some("m1"))
    );
    let r = http(w.addr(), "GET", "/v1/conversations", Some(&m), None).await;
    assert_eq!(r.json()["conversations"], json!([]));
    assert_eq!(db.query_i64_async("SELECT count(*) FROM events").await, 1);
    assert_eq!(
        db.query_i64_async("SELECT count(*) FROM members WHERE user_id = 'mallory'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_change_nothing() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let (mut alice, _) = ws_connect(&w, "alice").await;
    let (mut bob, _) = ws_connect(&w, "bob").await;
    let bad: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "bad_frame"),
        (Message::text("[1,2,3]"), "unknown_type"),
        (Message::text(r#"{"type":"explode"}"#), "unknown_type"),
        (
            Message::text(
                r#"{"type":"send","conversation_id":"one","body":"x","client_msg_id":"b1"}"#,
            ),
            "invalid_field",
        ),
        (
            Message::text(r#"{"type":"send","conversation_id":1,"body":7,"client_msg_id":"b2"}"#),
            "invalid_field",
        ),
        (
            Message::text(r#"{"type":"send","conversation_id":1,"body":"x"}"#),
            "invalid_field",
        ),
        (
            Message::text(r#"{"type":"ack","conversation_id":1,"seq":99999999999999999999999}"#),
            "invalid_field",
        ),
        (
            Message::text(r#"{"type":"ack","conversation_id":1,"seq":-3}"#),
            "invalid_field",
        ),
        (Message::binary(vec![0u8, 159, 146, 150]), "bad_frame"),
    ];
    for (m, code) in bad {
        let shown = format!("{m:?}");
        alice.send_raw(m).await;
        let e = alice
            .recv_until(T, |v| v["type"] == "error")
            .await
            .unwrap_or_else(|| panic!("no error for {shown}"));
        assert_eq!(e["code"], code, "{shown}: {e}");
    }
    // An ack beyond what was delivered, and one for a foreign conversation.
    alice
        .send_json(&json!({"type":"ack","conversation_id":c,"seq":500}))
        .await;
    let e = alice.recv_until(T, |v| v["type"] == "error").await.unwrap();
    assert_eq!(e["code"], "invalid_seq");
    alice
        .send_json(&json!({"type":"ack","conversation_id":c + 100,"seq":1}))
        .await;
    let e = alice.recv_until(T, |v| v["type"] == "error").await.unwrap();
    assert_eq!(e["code"], "not_found");
    // The connection still works, and so does everyone else's.
    alice.send_json(&json!({"type":"ping"})).await;
    alice
        .recv_until(T, |v| v["type"] == "pong")
        .await
        .expect("pong");
    alice
        .send_json(&json!({"type":"send","conversation_id":c,"body":"ok","client_msg_id":"ok1"}))
        .await;
    let got = recv_event(&mut bob, |v| v["seq"] == 2).await;
    assert_eq!(got["body"], "ok");
    assert_eq!(db.query_i64_async("SELECT count(*) FROM events").await, 2);
    assert_eq!(
        db.query_i64_async("SELECT max(cursor_seq) FROM members")
            .await,
        0
    );

    // HTTP: malformed JSON, invalid UTF-8, wrong types → 400/422, nothing written.
    let path = format!("/v1/conversations/{c}/messages");
    let a = tok("alice");
    for (body, status) in [
        (&b"{oops"[..], 400),
        (&b"\xff\xfe{\"body\":1}"[..], 400),
        (&br#"{"body":5,"client_msg_id":"z"}"#[..], 422),
        (&br#"{"body":"x","client_msg_id":7}"#[..], 422),
        (&br#"["body"]"#[..], 400),
    ] {
        let r = http_raw(w.addr(), "POST", &path, Some(&a), body).await;
        assert_eq!(
            r.status,
            status,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            r.body
        );
        assert!(r.json()["error"].is_string());
    }
    let big = "x".repeat(64 * 1024 + 1);
    let r = http(
        w.addr(),
        "POST",
        &path,
        Some(&a),
        Some(&json!({"body": big, "client_msg_id":"big"})),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(db.query_i64_async("SELECT count(*) FROM events").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyset_pages_stay_consistent_while_events_arrive() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation::<&str>(w.addr(), "alice", &[]).await;
    let a = tok("alice");
    let send = |i: usize| {
        let a = a.clone();
        let addr = w.addr();
        async move {
            let r = http(
                addr,
                "POST",
                &format!("/v1/conversations/{c}/messages"),
                Some(&a),
                Some(&json!({"body": format!("p{i}"), "client_msg_id": format!("p{i}")})),
            )
            .await;
            assert_eq!(r.status, 201);
        }
    };
    for i in 0..99 {
        send(i).await;
    }
    // 100 events: seq 1 (created) .. 100.
    // Backward (newest first) pages of 10, inserting between page reads.
    let mut seen = Vec::new();
    let mut before: Option<i64> = None;
    let mut extra = 1000;
    loop {
        let q = match before {
            Some(b) => format!("/v1/conversations/{c}/events?before_seq={b}&limit=10"),
            None => format!("/v1/conversations/{c}/events?limit=10"),
        };
        let r = http(w.addr(), "GET", &q, Some(&a), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.json();
        let s = event_seqs(page["events"].as_array().unwrap());
        assert!(
            s.windows(2).all(|p| p[0] == p[1] + 1),
            "newest first, contiguous: {s:?}"
        );
        seen.extend(s);
        send(extra).await;
        extra += 1;
        match page["next_before_seq"].as_i64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (1..=100).rev().collect::<Vec<_>>(),
        "no drift, no duplicates"
    );

    // Forward pages from the start see the old events and the new ones, once each.
    let mut forward = Vec::new();
    let mut after = 0;
    loop {
        let r = http(
            w.addr(),
            "GET",
            &format!("/v1/conversations/{c}/events?after_seq={after}&limit=7"),
            Some(&a),
            None,
        )
        .await;
        let page = r.json();
        forward.extend(event_seqs(page["events"].as_array().unwrap()));
        if forward.len() == 50 {
            send(extra).await;
            extra += 1;
        }
        match page["next_after_seq"].as_i64() {
            Some(s) => after = s,
            None => break,
        }
    }
    let total = db
        .query_i64_async(&format!(
            "SELECT max(seq) FROM events WHERE conversation_id = {c}"
        ))
        .await;
    assert_eq!(forward, (1..=total).collect::<Vec<_>>());

    // The pages are served by the primary key index.
    let plan = db.with_client(move |cl| {
        cl.batch_execute("SET enable_seqscan = off").unwrap();
        let rows = cl
            .query(
                &format!("EXPLAIN SELECT seq FROM events WHERE conversation_id = {c} AND seq < 50 ORDER BY seq DESC LIMIT 10"),
                &[],
            )
            .unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
    });
    assert!(plan.contains("events_pkey"), "{plan}");
    // Bad parameters are 400.
    let r = http(
        w.addr(),
        "GET",
        &format!("/v1/conversations/{c}/events?before_seq=abc"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(r.status, 400);
}
