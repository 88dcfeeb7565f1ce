//! The worker on its own, end to end: a real `tether-worker` process, a
//! throwaway PostgreSQL, real HTTP and WebSocket.
//!
//! Covers issue 2's list: live delivery, the offline queue and cursors,
//! concurrent writers with reconnecting readers, idempotency, access
//! control, bad frames, and keyset pagination.

mod support;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(20);

/// Connects `user` and reads through `synced`; returns the client and the
/// backlog's events.
async fn connect(w: &WorkerProc, user: &str) -> (WsClient, Vec<Value>) {
    let mut c = WsClient::connect(&w.ws_url(), &tok(user))
        .await
        .expect("connect");
    let backlog = c.read_until_synced(T).await;
    (c, backlog)
}

/// Reads frames until `pred` holds for an event frame; panics on timeout.
async fn recv_event(c: &mut WsClient, pred: impl Fn(&Value) -> bool) -> Value {
    c.recv_until(T, |v| v["type"] == "event" && pred(v))
        .await
        .expect("expected event did not arrive")
}

fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_over_websocket_and_http() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;

    let (mut alice, _) = connect(&w, "alice").await;
    let (mut bob, backlog) = connect(&w, "bob").await;
    assert_eq!(
        backlog.len(),
        1,
        "bob's backlog is the conversation.created event"
    );
    assert_eq!(backlog[0]["event"], "conversation.created");
    assert_eq!(alice.hello.as_ref().unwrap()["user"], "alice");

    alice
        .send_json(&json!({"type":"send","conversation_id":c,"body":"hi bob","client_msg_id":"a1"}))
        .await;
    let sent = alice
        .recv_until(T, |v| v["type"] == "sent")
        .await
        .expect("sent");
    assert_eq!(sent["seq"], 2);
    assert_eq!(sent["client_msg_id"], "a1");
    let got = recv_event(&mut bob, |v| v["seq"] == 2).await;
    assert_eq!(got["body"], "hi bob");
    assert_eq!(got["sender"], "alice");
    assert_eq!(got["event"], "message.created");
    assert_eq!(got["conversation_id"], c);

    // The HTTP send path delivers to WebSocket members too.
    let r = http(
        w.addr(),
        "POST",
        &format!("/v1/conversations/{c}/messages"),
        Some(&tok("alice")),
        Some(&json!({"body":"via http","client_msg_id":"a2"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["seq"], 3);
    let got = recv_event(&mut bob, |v| v["seq"] == 3).await;
    assert_eq!(got["body"], "via http");

    // Membership changes are events too, and a new member starts at them.
    let r = http(
        w.addr(),
        "POST",
        &format!("/v1/conversations/{c}/members"),
        Some(&tok("bob")),
        Some(&json!({"user":"carol"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let joined = recv_event(&mut bob, |v| v["seq"] == 4).await;
    assert_eq!(joined["event"], "member.joined");
    assert_eq!(joined["user"], "carol");
    let (_carol, carol_backlog) = connect(&w, "carol").await;
    assert_eq!(
        seqs(&carol_backlog),
        vec![4],
        "carol's cursor starts just before her member.joined"
    );

    // A connected user added to a conversation receives it live from the join on.
    let c2 = create_conversation::<&str>(w.addr(), "alice", &[]).await;
    let r = http(
        w.addr(),
        "POST",
        &format!("/v1/conversations/{c2}/members"),
        Some(&tok("alice")),
        Some(&json!({"user":"bob"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = recv_event(&mut bob, |v| v["conversation_id"] == c2).await;
    assert_eq!(
        (j["seq"].as_i64(), j["event"].as_str()),
        (Some(2), Some("member.joined"))
    );
    alice
        .send_json(
            &json!({"type":"send","conversation_id":c2,"body":"welcome","client_msg_id":"w1"}),
        )
        .await;
    let m = recv_event(&mut bob, |v| v["conversation_id"] == c2 && v["seq"] == 3).await;
    assert_eq!(m["body"], "welcome");

    // Removal: bob sees his own member.left, then nothing more of c2.
    let r = http(
        w.addr(),
        "DELETE",
        &format!("/v1/conversations/{c2}/members/bob"),
        Some(&tok("alice")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let left = recv_event(&mut bob, |v| v["conversation_id"] == c2).await;
    assert_eq!(
        (left["seq"].as_i64(), left["event"].as_str()),
        (Some(4), Some("member.left"))
    );
    alice
        .send_json(
            &json!({"type":"send","conversation_id":c2,"body":"secret","client_msg_id":"w2"}),
        )
        .await;
    alice
        .recv_until(T, |v| v["type"] == "sent" && v["client_msg_id"] == "w2")
        .await
        .expect("sent w2");
    // A later message in c (which bob still belongs to) arrives; c2's does not.
    alice
        .send_json(
            &json!({"type":"send","conversation_id":c,"body":"still here","client_msg_id":"a3"}),
        )
        .await;
    let next = recv_event(&mut bob, |_| true).await;
    assert_eq!(
        next["conversation_id"], c,
        "bob must not receive c2 after leaving: {next}"
    );
    assert_eq!(next["body"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_then_cursor_resume() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let (mut alice, _) = connect(&w, "alice").await;
    for i in 0..100 {
        alice
            .send_json(&json!({"type":"send","conversation_id":c,"body":format!("m{i}"),"client_msg_id":format!("k{i}")}))
            .await;
    }
    let mut acked = 0;
    while acked < 100 {
        let v = alice
            .recv_until(T, |v| v["type"] == "sent")
            .await
            .expect("sent");
        assert!(v["seq"].as_i64().unwrap() >= 2);
        acked += 1;
    }

    // bob was offline: he gets everything, in order, then synced.
    let (mut bob, backlog) = connect(&w, "bob").await;
    assert_eq!(seqs(&backlog), (1..=101).collect::<Vec<_>>());
    for (i, e) in backlog[1..].iter().enumerate() {
        assert_eq!(e["body"], format!("m{i}"), "messages in send order");
    }
    // Ack the 50th message (seq 51) and wait until the cursor is durable.
    bob.send_json(&json!({"type":"ack","conversation_id":c,"seq":51}))
        .await;
    let sql =
        format!("SELECT cursor_seq FROM members WHERE conversation_id = {c} AND user_id = 'bob'");
    assert!(
        wait_until_async(T, Duration::from_millis(20), || {
            let db = db.clone();
            let sql = sql.clone();
            async move { db.query_i64_async(&sql).await == 51 }
        })
        .await,
        "cursor never reached 51"
    );
    // Cursors never move backwards.
    bob.send_json(&json!({"type":"ack","conversation_id":c,"seq":10}))
        .await;
    bob.send_json(&json!({"type":"ping"})).await;
    bob.recv_until(T, |v| v["type"] == "pong")
        .await
        .expect("pong");
    drop(bob);

    let (_bob, backlog) = connect(&w, "bob").await;
    assert_eq!(
        seqs(&backlog),
        (52..=101).collect::<Vec<_>>(),
        "exactly the 51st..100th messages"
    );
    assert_eq!(db.query_i64_async(&sql).await, 51);

    // The conversation list shows last seq and unread count.
    let r = http(
        w.addr(),
        "GET",
        "/v1/conversations",
        Some(&tok("bob")),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let conv = &r.json()["conversations"][0];
    assert_eq!(
        (conv["last_seq"].as_i64(), conv["unread"].as_i64()),
        (Some(101), Some(50))
    );
}

/// A tiny deterministic PRNG (xorshift), so the "random" reconnects are
/// reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_reconnecting_readers_see_every_seq_once() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 200;
    const READERS: usize = 4;
    let total = (WRITERS * PER_WRITER) as i64;
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let mut members: Vec<String> = (0..WRITERS).map(|i| format!("writer{i}")).collect();
    members.extend((0..READERS).map(|i| format!("reader{i}")));
    let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let c = create_conversation(w.addr(), "owner", &member_refs).await;
    let last_seq = total + 1; // seq 1 is conversation.created

    let mut readers = Vec::new();
    for r in 0..READERS {
        let ws_url = w.ws_url();
        readers.push(tokio::spawn(async move {
            let user = format!("reader{r}");
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (r as u64 + 1));
            let mut last = 0i64; // highest seq seen
            let mut reconnects = 0;
            while last < last_seq {
                let mut ws = WsClient::connect(&ws_url, &token(TEST_SECRET, &user))
                    .await
                    .expect("connect");
                let budget = 50 + rng.next(400);
                let mut seen_here = 0;
                loop {
                    let Some(v) = ws.recv_json(T).await else {
                        panic!("{user}: stalled at seq {last}");
                    };
                    if v["type"] != "event" {
                        continue;
                    }
                    let s = v["seq"].as_i64().unwrap();
                    assert!(s <= last + 1, "{user}: gap: got seq {s} after {last}");
                    if s == last + 1 {
                        last = s;
                    }
                    seen_here += 1;
                    if seen_here % 97 == 0 {
                        ws.send_json(&json!({"type":"ack","conversation_id":c,"seq":last}))
                            .await;
                    }
                    if last >= last_seq || seen_here >= budget {
                        break;
                    }
                }
                reconnects += 1;
            }
            (last, reconnects)
        }));
    }

    let mut writers = Vec::new();
    for i in 0..WRITERS {
        let ws_url = w.ws_url();
        writers.push(tokio::spawn(async move {
            let user = format!("writer{i}");
            let mut ws = WsClient::connect(&ws_url, &token(TEST_SECRET, &user)).await.expect("connect");
            ws.read_until_synced(T).await;
            let mut acked = HashSet::new();
            let mut sent = 0;
            // Keep up to 16 sends in flight.
            while acked.len() < PER_WRITER {
                while sent < PER_WRITER && sent - acked.len() < 16 {
                    ws.send_json(&json!({"type":"send","conversation_id":c,"body":format!("{user}-{sent}"),"client_msg_id":format!("{user}-{sent}")}))
                        .await;
                    sent += 1;
                }
                let v = ws
                    .recv_until(T, |v| v["type"] == "sent" || v["type"] == "error")
                    .await
                    .expect("sent");
                assert_eq!(v["type"], "sent", "{user}: {v}");
                acked.insert(v["client_msg_id"].as_str().unwrap().to_string());
            }
        }));
    }
    for wr in writers {
        wr.await.expect("writer");
    }
    for r in readers {
        let (last, reconnects) = r.await.expect("reader");
        assert_eq!(last, last_seq);
        assert!(reconnects >= 1);
    }
    let count = db
        .query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ))
        .await;
    assert_eq!(count, total);
    let max = db
        .query_i64_async(&format!(
            "SELECT max(seq) FROM events WHERE conversation_id = {c}"
        ))
        .await;
    assert_eq!(max, last_seq, "seqs are 1..N with no gap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_msg_id_twice_makes_one_event() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let path = format!("/v1/conversations/{c}/messages");
    let body = json!({"body":"once","client_msg_id":"dup-1"});
    let first = http(w.addr(), "POST", &path, Some(&tok("alice")), Some(&body)).await;
    let second = http(w.addr(), "POST", &path, Some(&tok("alice")), Some(&body)).await;
    assert_eq!((first.status, second.status), (201, 200));
    assert_eq!(first.json()["seq"], second.json()["seq"]);
    assert_eq!(first.json()["created_at"], second.json()["created_at"]);

    let (mut alice, _) = connect(&w, "alice").await;
    for _ in 0..2 {
        alice
            .send_json(&json!({"type":"send","conversation_id":c,"body":"ws once","client_msg_id":"dup-2"}))
            .await;
    }
    let a = alice.recv_until(T, |v| v["type"] == "sent").await.unwrap();
    let b = alice.recv_until(T, |v| v["type"] == "sent").await.unwrap();
    assert_eq!(a["seq"], b["seq"]);
    assert_eq!(
        (a["duplicate"].as_bool(), b["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    // The HTTP key sent again over WebSocket: the first result again.
    alice
        .send_json(
            &json!({"type":"send","conversation_id":c,"body":"once","client_msg_id":"dup-1"}),
        )
        .await;
    let again = alice.recv_until(T, |v| v["type"] == "sent").await.unwrap();
    assert_eq!(again["seq"], first.json()["seq"]);
    // Another sender may use the same key: it is per sender.
    let other = http(w.addr(), "POST", &path, Some(&tok("bob")), Some(&body)).await;
    assert_eq!(other.status, 201);
    assert_eq!(
        db.query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ))
        .await,
        3
    );
}

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
    let (mut ws, backlog) = connect(&w, "mallory").await;
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
    let (mut alice, _) = connect(&w, "alice").await;
    let (mut bob, _) = connect(&w, "bob").await;
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
        let s = seqs(page["events"].as_array().unwrap());
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
        forward.extend(seqs(page["events"].as_array().unwrap()));
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
