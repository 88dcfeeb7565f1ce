//! The Server-Sent Events transport, end to end: real `tether-worker`
//! processes, a throwaway PostgreSQL, a raw streaming HTTP client
//! ([`SseClient`]) that sees every event, comment and end of stream.
//!
//! - `GET /v1/sse`: `retry:`, hello, the backlog (each event with `id:
//!   conversation:seq`), synced, live; Bearer and `?token=`; pings (a
//!   comment in a `ping` event);
//! - one-time tickets: accepted once, on any worker; reuse (also on
//!   another worker), expiry, forgery and garbage refused;
//! - `POST .../cursor`: forward only, never past the last seq, 404 for a
//!   non-member, bad bodies refused; the next stream replays from it;
//! - a removed member's stream gets their `member.left` and nothing after;
//! - connection limits count streams with WebSockets, and a closed stream
//!   gives its place back at once; a drain ends a stream with `event:
//!   draining`; a stream that is not read is cut (memory stays flat) and
//!   replays later;
//! - a worker SIGKILLed under a subscriber while messages are sent:
//!   nothing acknowledged is lost, no gap, no reorder.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tether_testkit::*;
use tether_worker::tickets::{now_ms, TicketKey};

const T: Duration = Duration::from_secs(20);

async fn post(addr: SocketAddr, user: &str, path: &str, body: Value) -> HttpResponse {
    http(addr, "POST", path, Some(&tok(user)), Some(&body)).await
}

async fn send(addr: SocketAddr, user: &str, c: i64, body: &str) -> i64 {
    let r = post(
        addr,
        user,
        &format!("/v1/conversations/{c}/messages"),
        json!({ "body": body }),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["seq"].as_i64().unwrap()
}

async fn stream(addr: SocketAddr, user: &str) -> SseClient {
    SseClient::connect(addr, "/v1/sse", Some(&tok(user)))
        .await
        .unwrap_or_else(|e| panic!("stream of {user}: {e:?}"))
}

async fn ticket(addr: SocketAddr, user: &str) -> String {
    let r = post(addr, user, "/v1/sse/tickets", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["expires_in"], 30);
    r.json()["ticket"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_stream_gets_hello_backlog_synced_then_live() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    for i in 0..3 {
        send(w.addr(), "alice", c, &format!("m{i}")).await;
    }
    let mut bob = stream(w.addr(), "bob").await;
    assert_eq!(bob.header("content-type"), Some("text/event-stream"));
    let backlog = bob.read_until_synced(T).await;
    assert_eq!(
        bob.retry,
        Some(1000),
        "EventSource comes back within a second"
    );
    let hello = bob.hello.clone().unwrap();
    assert_eq!(
        (hello["user"].clone(), hello["worker"].clone()),
        (json!("bob"), json!(w.worker_id()))
    );
    assert_eq!(event_seqs(&backlog), [1, 2, 3, 4]);
    assert_eq!(backlog[0]["event"], "conversation.created");
    assert_eq!(backlog[3]["body"], "m2");
    // Live, with the WebSocket's event JSON.
    let seq = send(w.addr(), "alice", c, "live").await;
    // (Presence and other signals may come first.)
    let ev = loop {
        match bob.next_event(T).await {
            SseRead::Event(e) if e.event == "event" => break e,
            SseRead::Event(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        (ev.event.as_str(), ev.id.clone()),
        ("event", Some(format!("{c}:{seq}")))
    );
    let v = ev.json();
    assert_eq!(
        (v["type"].clone(), v["body"].clone(), v["sender"].clone()),
        (json!("event"), json!("live"), json!("alice"))
    );
    // `?token=` works too (for tools), and the same stream follows.
    let path = format!("/v1/sse?token={}", tok("bob"));
    let mut again = SseClient::connect(w.addr(), &path, None).await.unwrap();
    assert_eq!(
        event_seqs(&again.read_until_synced(T).await),
        [1, 2, 3, 4, 5]
    );
    // No token, a bad token: 401 before any stream.
    for (path, token) in [
        ("/v1/sse", None),
        ("/v1/sse", Some("x.y.z")),
        ("/v1/sse?token=nope", None),
    ] {
        let e = SseClient::connect(w.addr(), path, token)
            .await
            .err()
            .unwrap();
        assert_eq!(e.0, 401, "{path} {token:?}: {e:?}");
    }
}

#[tokio::test]
async fn a_quiet_stream_gets_comment_pings() {
    let db = TestDb::new_async().await;
    // Pings every min(15 s, idle/2): 1 s here.
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--idle-timeout-secs", "2"], &[]);
    let mut bob = stream(w.addr(), "bob").await;
    bob.read_until_synced(T).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut pings = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match bob.next_event(left).await {
            SseRead::Event(e) if e.event == "ping" => {
                assert_eq!(e.json()["type"], "ping");
                pings += 1;
            }
            SseRead::Timeout => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        pings >= 2 && bob.comments >= 2,
        "{pings} pings, {} comments in 5 s",
        bob.comments
    );
}

#[tokio::test]
async fn tickets_open_one_stream_once_on_any_worker() {
    let db = TestDb::new_async().await;
    let w1 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w1.addr(), "alice", &["bob"]).await;
    let t = ticket(w1.addr(), "bob").await;
    assert!(!t.contains("bob"), "the user is not readable in the URL");
    // Issued on w1, used on w2: accepted, as bob.
    let mut s = SseClient::connect(w2.addr(), &format!("/v1/sse?ticket={t}"), None)
        .await
        .unwrap();
    assert_eq!(event_seqs(&s.read_until_synced(T).await), [1]);
    assert_eq!(s.hello.as_ref().unwrap()["user"], "bob");
    send(w1.addr(), "alice", c, "hi").await;
    assert!(s.recv_until(T, |v| v["body"] == "hi").await.is_some());
    // Used again, on either worker: refused.
    for w in [&w1, &w2] {
        let e = SseClient::connect(w.addr(), &format!("/v1/sse?ticket={t}"), None)
            .await
            .err()
            .unwrap();
        assert_eq!(e.0, 401, "{e:?}");
        assert!(e.1.contains("already used"), "{e:?}");
    }
    // Expired, forged (another key), altered, garbage: refused.
    let key = TicketKey::derive(TEST_SECRET.as_bytes());
    let id = "00112233445566778899aabbccddeeff";
    let expired = key.issue_raw(id, "bob", now_ms() - 1);
    let forged = TicketKey::derive(b"not the server's secret, 32 bytes").issue_raw(
        id,
        "bob",
        now_ms() + 30_000,
    );
    let good = key.issue_raw(id, "bob", now_ms() + 30_000);
    let altered = good.replacen("0011", "1011", 1);
    for (what, t) in [
        ("expired", expired.as_str()),
        ("forged", forged.as_str()),
        ("altered", altered.as_str()),
        ("garbage", "%00%ff..."),
        ("empty", ""),
    ] {
        let e = SseClient::connect(w1.addr(), &format!("/v1/sse?ticket={t}"), None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} ticket accepted"));
        assert_eq!(e.0, 401, "{what}: {e:?}");
    }
    // A well-signed ticket is good once even when made outside POST.
    assert!(
        SseClient::connect(w1.addr(), &format!("/v1/sse?ticket={good}"), None)
            .await
            .is_ok()
    );
    // Tickets need a token; GET is not how to get one.
    let r = http(w1.addr(), "POST", "/v1/sse/tickets", None, Some(&json!({}))).await;
    assert_eq!(r.status, 401);
    let r = http(w1.addr(), "GET", "/v1/sse/tickets", Some(&tok("bob")), None).await;
    assert_eq!(r.status, 405);
    // A used record outlives nothing it must: the table holds ids only.
    let used = db
        .query_i64_async("SELECT count(*) FROM sse_tickets_used")
        .await;
    assert_eq!(used, 2);
}

#[tokio::test]
async fn the_cursor_moves_forward_only_and_the_next_stream_replays_from_it() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    for i in 0..4 {
        send(w.addr(), "alice", c, &format!("m{i}")).await;
    }
    let path = format!("/v1/conversations/{c}/cursor");
    let cursor = |r: HttpResponse| (r.status, r.json()["cursor"].clone());
    assert_eq!(
        cursor(post(w.addr(), "bob", &path, json!({"seq": 3})).await),
        (200, json!(3))
    );
    // Never back.
    assert_eq!(
        cursor(post(w.addr(), "bob", &path, json!({"seq": 2})).await),
        (200, json!(3))
    );
    // Never past the last seq (5).
    let r = post(w.addr(), "bob", &path, json!({"seq": 6})).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (422, json!("invalid_seq"))
    );
    // Bad bodies.
    for body in [
        json!({}),
        json!({"seq": "3"}),
        json!({"seq": -1}),
        json!({"seq": 1.5}),
        json!([3]),
    ] {
        let r = post(w.addr(), "bob", &path, body.clone()).await;
        assert!(
            r.status == 422 || r.status == 400,
            "{body}: {} {}",
            r.status,
            r.body
        );
    }
    let r = http_raw(w.addr(), "POST", &path, Some(&tok("bob")), b"{not json").await;
    assert_eq!(r.status, 400);
    // Non-members and conversations that do not exist: 404 alike.
    let r = post(w.addr(), "carol", &path, json!({"seq": 1})).await;
    assert_eq!(r.status, 404);
    let r = post(
        w.addr(),
        "bob",
        "/v1/conversations/999/cursor",
        json!({"seq": 1}),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = post(
        w.addr(),
        "bob",
        "/v1/conversations/x/cursor",
        json!({"seq": 1}),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = post(w.addr(), "bob", &path, json!({"seq": 1})).await;
    assert_eq!(cursor(r), (200, json!(3)));
    // The stream replays from cursor + 1.
    let mut bob = stream(w.addr(), "bob").await;
    assert_eq!(event_seqs(&bob.read_until_synced(T).await), [4, 5]);
    assert_eq!(
        cursor(post(w.addr(), "bob", &path, json!({"seq": 5})).await),
        (200, json!(5))
    );
    let mut bob = stream(w.addr(), "bob").await;
    assert!(bob.read_until_synced(T).await.is_empty());
}

#[tokio::test]
async fn a_removed_members_stream_gets_nothing_after_member_left() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut bob = stream(w.addr(), "bob").await;
    bob.read_until_synced(T).await;
    send(w.addr(), "alice", c, "before").await;
    assert!(bob.recv_until(T, |v| v["body"] == "before").await.is_some());
    let r = http(
        w.addr(),
        "DELETE",
        &format!("/v1/conversations/{c}/members/bob"),
        Some(&tok("alice")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    send(w.addr(), "alice", c, "SECRET").await;
    // A later conversation with bob: its event comes after the secret.
    let marker = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut seen = Vec::new();
    while let Some(v) = bob.recv_until(T, |_| true).await {
        seen.push(v.clone());
        if v["conversation_id"] == marker {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|v| v["event"] == "member.left" && v["user"] == "bob"),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|v| v["body"] == "SECRET"), "{seen:?}");
    assert_eq!(seen.last().unwrap()["conversation_id"], marker, "{seen:?}");
    // And bob can move no cursor there, nor replay it.
    let r = post(
        w.addr(),
        "bob",
        &format!("/v1/conversations/{c}/cursor"),
        json!({"seq": 1}),
    )
    .await;
    assert_eq!(r.status, 404);
    let mut again = stream(w.addr(), "bob").await;
    let backlog = again.read_until_synced(T).await;
    assert!(
        backlog.iter().all(|v| v["conversation_id"] == marker),
        "{backlog:?}"
    );
}

#[tokio::test]
async fn streams_count_with_websockets_and_a_drain_ends_them() {
    let db = TestDb::new_async().await;
    let mut w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--max-connections-per-user", "2"],
        &[],
    );
    let (_ws, _) = ws_connect(&w, "bob").await;
    let mut s = stream(w.addr(), "bob").await;
    s.read_until_synced(T).await;
    let e = SseClient::connect(w.addr(), "/v1/sse", Some(&tok("bob")))
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, 429, "{e:?}");
    let e = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status(), Some(429));
    // A ticket is not burnt by a refused stream: it fails before the use.
    let t = ticket(w.addr(), "bob").await;
    let e = SseClient::connect(w.addr(), &format!("/v1/sse?ticket={t}"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, 429);
    // Others are unaffected.
    let mut carol = stream(w.addr(), "carol").await;
    carol.read_until_synced(T).await;
    let m = metrics_of(w.addr()).await;
    assert_eq!(
        metric(&m, "tether_sse_streams_total"),
        2.0,
        "bob's and carol's"
    );
    assert!(metric(&m, "tether_connections_refused_total") >= 3.0);
    // Drain: `event: draining`, then the end of the stream.
    assert!(w.signal(libc::SIGTERM));
    let mut last = None;
    loop {
        match s.next_event(T).await {
            SseRead::Event(e) => last = Some(e),
            SseRead::Ended => break,
            SseRead::Timeout => panic!("the stream did not end on drain"),
        }
    }
    let last = last.expect("draining");
    assert_eq!(last.event, "draining");
    assert!(w.wait_exit_async(T).await.is_some());
}

/// Reads one event of conversation `c` into `last`, checking there is no
/// gap and no reorder (repeats are dropped); `None` when the stream ended.
async fn next_seq(s: &mut SseClient, c: i64, last: &mut i64) -> Option<()> {
    loop {
        match s.next_event(T).await {
            SseRead::Event(e) if e.event == "event" => {
                let v = e.json();
                if v["conversation_id"] != c {
                    continue;
                }
                let seq = v["seq"].as_i64().unwrap();
                assert!(seq <= *last + 1, "gap: {seq} after {last}");
                *last = (*last).max(seq);
                return Some(());
            }
            SseRead::Event(_) => {}
            SseRead::Ended => return None,
            SseRead::Timeout => panic!("stalled at {last}"),
        }
    }
}

#[tokio::test]
async fn a_worker_killed_under_a_subscriber_loses_nothing_acknowledged() {
    let db = TestDb::new_async().await;
    let mut w1 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let (a1, a2) = (w1.addr(), w2.addr());
    let c = create_conversation(a1, "alice", &["bob"]).await;
    const N: usize = 300;
    // The sender: to w1 while it lives, then to w2, retrying each
    // unanswered send with the same client_msg_id. Half-way it waits for
    // the kill, so the kill certainly falls while it sends.
    let (killed_tx, mut killed_rx) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(async move {
        let mut acked = HashMap::new();
        let mut target = a1;
        let mut moved_at = None;
        for i in 0..N {
            if i == N / 2 {
                let _ = killed_rx.wait_for(|k| *k).await;
            }
            let id = format!("k{i:04}");
            let body = json!({"body": format!("m{i}"), "client_msg_id": id});
            loop {
                let path = format!("/v1/conversations/{c}/messages");
                let bytes = serde_json::to_vec(&body).unwrap();
                match try_http_raw(
                    target,
                    "POST",
                    &path,
                    Some(&tok("alice")),
                    None,
                    Some(&bytes),
                )
                .await
                {
                    Ok(r) if r.status == 201 || r.status == 200 => {
                        acked.insert(id, r.json()["seq"].as_i64().unwrap());
                        break;
                    }
                    _ => {
                        moved_at.get_or_insert(i);
                        target = a2;
                    }
                }
            }
        }
        (acked, moved_at)
    });
    // The subscriber, on w1: acks over HTTP every 25 events.
    let mut bob = stream(a1, "bob").await;
    let mut last = 0;
    for v in bob.read_until_synced(T).await {
        let seq = v["seq"].as_i64().unwrap();
        assert_eq!(seq, last + 1, "the backlog is contiguous");
        last = seq;
    }
    while last < 60 {
        next_seq(&mut bob, c, &mut last)
            .await
            .expect("the stream ended early");
        if last % 25 == 0 {
            post(
                a1,
                "bob",
                &format!("/v1/conversations/{c}/cursor"),
                json!({"seq": last}),
            )
            .await;
        }
    }
    assert!(w1.signal(libc::SIGKILL));
    assert!(w1.wait_exit_async(T).await.is_some());
    killed_tx.send_replace(true);
    // The stream ends (whatever was in flight may or may not arrive).
    while next_seq(&mut bob, c, &mut last).await.is_some() {}
    let before = last;
    // Reconnect to the survivor; replay from the cursor, drop repeats.
    let mut bob = stream(a2, "bob").await;
    for v in bob.read_until_synced(T).await {
        let seq = v["seq"].as_i64().unwrap();
        assert!(seq <= last + 1, "gap in the backlog: {seq} after {last}");
        last = last.max(seq);
    }
    let (acked, moved_at) = sender.await.unwrap();
    let moved_at = moved_at.expect("sends went on after the kill");
    let top = acked.values().copied().max().unwrap();
    while last < top {
        next_seq(&mut bob, c, &mut last)
            .await
            .expect("the stream ended");
    }
    // Every send acknowledged has its own seq, all of them delivered.
    assert_eq!(acked.len(), N);
    let mut seqs: Vec<i64> = acked.values().copied().collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), N, "one event per client_msg_id");
    assert_eq!(top, N as i64 + 1);
    eprintln!(
        "killed with {before} delivered, the sender moved at send {moved_at}; \
         all {N} acknowledged sends arrived in order"
    );
    let in_db = db
        .query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c}"
        ))
        .await;
    assert_eq!(in_db, N as i64 + 1);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_read_is_cut_and_replays_later() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--outbound-queue", "64"], &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut bob = stream(w.addr(), "bob").await;
    bob.read_until_synced(T).await;
    let rss_before = rss_kib(w.pid());
    // bob stops reading; alice sends 5,000 events of ~4 KB (20 MB: more
    // than the kernel's socket buffers hold), through a second worker with
    // large queues, so that only bob can be the slow one.
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--outbound-queue", "100000"], &[]);
    let mut alice = WsClient::connect(&w2.ws_url(), &tok("alice"))
        .await
        .unwrap();
    alice.read_until_synced(T).await;
    const N: usize = 5_000;
    let body = "x".repeat(4000);
    let (mut sent, mut acked) = (0, 0);
    while acked < N {
        while sent < N && sent - acked < 256 {
            alice
                .send_json(&json!({"type":"send","conversation_id":c,"body":body,"client_msg_id":format!("s{sent}")}))
                .await;
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
    eprintln!("worker RSS: {rss_before} KiB before, {rss_after} KiB after {N} events of 4 KB to a stream not read");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory must stay bounded: {rss_before} -> {rss_after} KiB"
    );
    // bob reads again: what was in flight (in order, no gap), then the end.
    let mut last = 1;
    loop {
        match bob.next_event(Duration::from_secs(60)).await {
            SseRead::Event(e) if e.event == "event" => {
                let seq = e.json()["seq"].as_i64().unwrap();
                assert_eq!(seq, last + 1, "in order, no gap, before the cut");
                last = seq;
            }
            // Pings, presence.
            SseRead::Event(_) => {}
            SseRead::Ended => break,
            SseRead::Timeout => panic!("the stream was not ended"),
        }
    }
    assert!(last < N as i64 + 1, "bob was cut before the end ({last})");
    // On reconnect bob replays everything from his cursor (0), in order.
    let mut bob = stream(w.addr(), "bob").await;
    let backlog = bob.read_until_synced(Duration::from_secs(120)).await;
    assert_eq!(event_seqs(&backlog), (1..=N as i64 + 1).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stream_the_client_closes_gives_its_place_back_at_once() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--max-connections-per-user", "1"],
        &[],
    );
    let mut s = stream(w.addr(), "bob").await;
    s.read_until_synced(T).await;
    drop(s);
    // Well before the first ping (15 s) could find the client gone: the
    // worker notices the connection close itself.
    let started = std::time::Instant::now();
    loop {
        match SseClient::connect(w.addr(), "/v1/sse", Some(&tok("bob"))).await {
            Ok(_) => break,
            Err((429, _)) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("after {:?}: {e:?}", started.elapsed()),
        }
    }
    eprintln!("the place came back after {:?}", started.elapsed());
}

/// Reads until an event named `name` whose data satisfies `pred`.
async fn next_named(s: &mut SseClient, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        match s.next_event(T).await {
            SseRead::Event(e) if e.event == name => {
                let v = e.json();
                assert_eq!(v["type"], name, "the event is named by the frame's type");
                if pred(&v) {
                    return v;
                }
            }
            SseRead::Event(_) => {}
            other => panic!("waiting for {name}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_typing_and_read_receipts_ride_the_stream() {
    let db = TestDb::new_async().await;
    let args = ["--presence-grace-secs", "2", "--presence-lease-secs", "3"];
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &args, &[]);
    let c = create_conversation(w.addr(), "alice", &["bob"]).await;
    let mut bob = stream(w.addr(), "bob").await;
    bob.read_until_synced(T).await;
    // A stream counts as being online.
    let mut alice = stream(w.addr(), "alice").await;
    alice.read_until_synced(T).await;
    next_named(&mut bob, "presence", |v| {
        v["user"] == "alice" && v["status"] == "online"
    })
    .await;
    // Typing over HTTP reaches the other member's stream.
    let path = format!("/v1/conversations/{c}/typing");
    let r = post(w.addr(), "alice", &path, json!({})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let v = next_named(&mut bob, "typing", |v| v["user"] == "alice").await;
    assert_eq!(v["conversation_id"], c);
    // Not for non-members, nor for conversations that do not exist.
    assert_eq!(
        post(w.addr(), "mallory", &path, json!({})).await.status,
        404
    );
    let r = post(w.addr(), "alice", "/v1/conversations/999/typing", json!({})).await;
    assert_eq!(r.status, 404);
    // A cursor moved over HTTP is a read receipt.
    let seq = send(w.addr(), "alice", c, "read me").await;
    let r = post(
        w.addr(),
        "bob",
        &format!("/v1/conversations/{c}/cursor"),
        json!({"seq": seq}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = next_named(&mut alice, "read", |v| v["user"] == "bob").await;
    assert_eq!(
        (v["conversation_id"].clone(), v["seq"].clone()),
        (json!(c), json!(seq))
    );
}

#[tokio::test]
async fn streams_count_against_the_per_address_limit() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--max-connections-per-ip", "2"],
        &[],
    );
    // Everyone here is 127.0.0.1: one WebSocket and one stream fill it.
    let (_alice, _) = ws_connect(&w, "alice").await;
    let mut bob = stream(w.addr(), "bob").await;
    bob.read_until_synced(T).await;
    let e = SseClient::connect(w.addr(), "/v1/sse", Some(&tok("carol")))
        .await
        .err()
        .unwrap();
    assert_eq!(e.0, 429, "{e:?}");
    assert!(e.1.contains("address"), "{e:?}");
    drop(bob);
    // The stream's place is given back when it closes.
    let started = std::time::Instant::now();
    while let Err(e) = SseClient::connect(w.addr(), "/v1/sse", Some(&tok("carol"))).await {
        assert!(e.0 == 429 && started.elapsed() < T, "{e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
