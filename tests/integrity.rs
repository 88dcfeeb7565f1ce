//! Delivery integrity under attack, end to end: real `tether-worker`
//! processes, a throwaway PostgreSQL, real WebSocket.
//!
//! - a member removed while their connection subscribes gets their
//!   `member.left` and nothing after it (the race made certain by a
//!   test-only hold between the memberships read and the subscribe), from
//!   the recent-frames cache and from the log;
//! - notifications carry no authority: a role with only CONNECT forges and
//!   garbles NOTIFY payloads; nobody sees forged content, the real event
//!   arrives everywhere, fan-out keeps working;
//! - a LISTEN thread that stops makes the worker unhealthy, unready, and
//!   exit (the supervisor replaces it);
//! - roles (owner, admin, member; 403) and history visibility;
//! - a repair waiting for the database ends on drain (1001) and on the
//!   client closing.

use serde_json::{json, Value};
#[cfg(feature = "fault-injection")]
use std::path::Path;
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(20);

async fn post(addr: std::net::SocketAddr, user: &str, path: &str, body: Value) -> HttpResponse {
    http(addr, "POST", path, Some(&tok(user)), Some(&body)).await
}

async fn send(addr: std::net::SocketAddr, user: &str, c: i64, body: &str) -> i64 {
    let r = post(
        addr,
        user,
        &format!("/v1/conversations/{c}/messages"),
        json!({ "body": body }),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["seq"].as_i64().expect("seq")
}

async fn connect_synced(ws_url: &str, user: &str) -> WsClient {
    let mut c = WsClient::connect(ws_url, &tok(user))
        .await
        .expect("connect");
    c.read_until_synced(T).await;
    c
}

#[cfg(feature = "fault-injection")]
fn held_file_exists(dir: &Path, user: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("held-{user}-"))
            })
        })
        .unwrap_or(false)
}

/// Every event frame `c` receives until (and including) one matching
/// `until`.
async fn events_until(c: &mut WsClient, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = c
            .recv_json(T)
            .await
            .unwrap_or_else(|| panic!("stream ended or timed out; got {got:?}"));
        if v["type"] == "event" {
            let done = until(&v);
            got.push(v);
            if done {
                return got;
            }
        }
    }
}

/// bob's connection reads its memberships, bob is removed and a secret is
/// sent (and delivered to carol), then bob's connection subscribes with
/// the position it read before the removal.
#[cfg(feature = "fault-injection")]
async fn removed_while_subscribing(extra_env: &[(&str, &str)]) {
    let db = TestDb::new_async().await;
    let hold = tempfile::tempdir().expect("tempdir");
    let dir = hold.path().to_string_lossy().to_string();
    let mut env = vec![
        ("TETHER_FAULT_HOLD_SUBSCRIBE_DIR", dir.as_str()),
        ("TETHER_FAULT_HOLD_SUBSCRIBE_USER", "bob"),
    ];
    env.extend_from_slice(extra_env);
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &env);
    let c = create_conversation(w.addr(), "alice", &["bob", "carol"]).await;
    let mut carol = connect_synced(&w.ws_url(), "carol").await;

    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob"))
        .await
        .expect("connect");
    assert!(
        wait_until_async(T, Duration::from_millis(10), || async {
            held_file_exists(hold.path(), "bob")
        })
        .await,
        "bob's connection never reached the hold"
    );
    let r = http(
        w.addr(),
        "DELETE",
        &format!("/v1/conversations/{c}/members/bob"),
        Some(&tok("alice")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    send(w.addr(), "alice", c, "SECRET-1").await;
    // The dispatcher is past the removal: carol has the secret.
    events_until(&mut carol, |v| v["body"] == "SECRET-1").await;
    std::fs::write(hold.path().join("release"), b"").expect("release");

    bob.read_until_synced(T).await;
    send(w.addr(), "alice", c, "SECRET-2").await;
    events_until(&mut carol, |v| v["body"] == "SECRET-2").await;
    // Bring bob back: his member.joined is in order on his connection, so
    // everything before it has been written by the time it arrives.
    let r = post(
        w.addr(),
        "alice",
        &format!("/v1/conversations/{c}/members"),
        json!({"user": "bob"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = events_until(&mut bob, |v| {
        v["event"] == "member.joined" && v["user"] == "bob"
    })
    .await;
    let left = seen
        .iter()
        .position(|v| v["event"] == "member.left" && v["user"] == "bob")
        .unwrap_or_else(|| panic!("bob never got his member.left: {seen:?}"));
    let after: Vec<&Value> = seen[left + 1..seen.len() - 1].iter().collect();
    assert!(
        after.is_empty(),
        "bob received events after his member.left: {after:?}"
    );
    assert!(
        seen.iter()
            .all(|v| !v["body"].as_str().unwrap_or("").starts_with("SECRET")),
        "a removed member saw a secret: {seen:?}"
    );
    // And live delivery works again for him.
    send(w.addr(), "alice", c, "welcome back").await;
    events_until(&mut bob, |v| v["body"] == "welcome back").await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_while_subscribing_gets_nothing_after_member_left_from_the_cache() {
    removed_while_subscribing(&[]).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_while_subscribing_gets_nothing_after_member_left_from_the_log() {
    // No recent-frames cache: the dispatcher sends a Backfill, and the
    // connection reads the range from the log itself.
    removed_while_subscribing(&[("TETHER_FAULT_NO_RECENT_CACHE", "1")]).await;
}

/// A connection to the test database as a role with only CONNECT.
fn intruder(db: &TestDb) -> postgres::Client {
    db.execute(
        "DO $$ BEGIN CREATE ROLE intruder LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    let url = db.url().replace("://postgres@", "://intruder@");
    std::thread::spawn(move || postgres::Client::connect(&url, postgres::NoTls))
        .join()
        .expect("connect thread")
        .expect("the intruder connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_notifications_change_nothing() {
    let db = TestDb::new_async().await;
    let w1 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let w2 = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let c = create_conversation(w1.addr(), "alice", &["bob", "carol"]).await;
    let mut bob = connect_synced(&w2.ws_url(), "bob").await;
    let mut carol = connect_synced(&w1.ws_url(), "carol").await;

    // The intruder listens, captures a real payload, and forges.
    let mut client = intruder(&db);
    let mut evil = tokio::task::spawn_blocking(move || {
        client
            .batch_execute("LISTEN tether_events")
            .expect("LISTEN");
        client
    })
    .await
    .expect("listen");
    let real = send(w1.addr(), "alice", c, "real-1").await;
    events_until(&mut bob, |v| v["body"] == "real-1").await;
    let (client, captured) = tokio::task::spawn_blocking(move || {
        use postgres::fallible_iterator::FallibleIterator;
        let n = evil
            .notifications()
            .timeout_iter(Duration::from_secs(10))
            .next()
            .expect("notification stream")
            .expect("a notification");
        let payload = n.payload().to_string();
        (evil, payload)
    })
    .await
    .expect("capture");
    evil = client;
    assert!(
        captured.starts_with("a "),
        "payloads are sealed: {captured:?}"
    );
    assert!(captured.contains("real-1"));

    let next = real + 1;
    let forged_event = json!([{
        "conversation_id": c, "seq": next, "event": "message.created",
        "sender": "alice", "created_at": "2026-01-01T00:00:00.000000Z",
        "body": "FORGED", "client_msg_id": "forged-1"
    }]);
    let mut payloads = vec![
        // A forged event for the next seq, unsealed.
        format!("e {c} {next}\nx {forged_event}\n"),
        // The captured payload with its content changed (seal kept).
        captured
            .replace("real-1", "FORGED")
            .replace(&format!("\"seq\":{real}"), &format!("\"seq\":{next}")),
        // A forged membership line: make mallory follow the conversation.
        format!("m {c} 1 mallory\ne {c} 1\n"),
    ];
    for junk in [
        "x",
        "e",
        "x [",
        "*",
        "e 99999999999999999999999 1",
        "e -5 -5",
        "m 1 2",
        "a 1 zz\nx []",
    ] {
        payloads.push(junk.to_string());
    }
    payloads.push("é#".repeat(2300));
    let sent = tokio::task::spawn_blocking(move || {
        for p in &payloads {
            evil.execute("SELECT pg_notify('tether_events', $1)", &[p])
                .expect("the intruder may NOTIFY");
        }
        payloads.len()
    })
    .await
    .expect("notify");
    assert_eq!(sent, 12);

    // The real event at that seq arrives with its real body on both
    // workers, and fan-out keeps working both ways.
    let seq = send(w1.addr(), "alice", c, "real-2").await;
    assert_eq!(seq, next);
    for client in [&mut bob, &mut carol] {
        let got = events_until(client, |v| v["seq"] == next).await;
        assert_eq!(got.last().unwrap()["body"], "real-2");
        assert!(got.iter().all(|v| v["body"] != "FORGED"), "{got:?}");
    }
    send(w2.addr(), "bob", c, "from w2").await;
    for client in [&mut bob, &mut carol] {
        let got = events_until(client, |v| v["body"] == "from w2").await;
        assert!(got.iter().all(|v| v["body"] != "FORGED"), "{got:?}");
    }
    // The log holds exactly the real events, and both workers live on.
    let n = db
        .query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND body = 'FORGED'"
        ))
        .await;
    assert_eq!(n, 0);
    for w in [&w1, &w2] {
        let r = http(w.addr(), "GET", "/health", None, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["fanout"]["listening"], true);
        let m = metrics_of(w.addr()).await;
        assert!(
            metric(&m, "tether_notifications_unauthenticated_total") >= 10.0,
            "every forged or garbage payload counted on {}",
            w.worker_id()
        );
    }
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_listen_thread_stops_goes_unhealthy_and_exits() {
    let db = TestDb::new_async().await;
    let mut w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let r = http(w.addr(), "GET", "/health", None, None).await;
    assert_eq!(r.json()["fanout"]["listening"], true);
    db.execute_async("SELECT pg_notify('tether_events', 'tether-fault: panic the LISTEN thread')")
        .await;
    // From a load balancer's side: not ready (503 naming the fan-out while
    // it drains, then nothing listening), and the process is gone with a
    // failure status, for the supervisor to replace.
    let addr = w.addr();
    assert!(
        wait_until_async(T, Duration::from_millis(5), || async move {
            match try_http_raw(addr, "GET", "/ready", None, None, None).await {
                Ok(r) => r.status == 503 && r.json()["checks"]["fanout"] == false,
                Err(_) => true,
            }
        })
        .await,
        "/ready kept answering 200 after the LISTEN thread stopped"
    );
    let status = w.wait_exit_async(T).await.expect("the worker exits");
    assert_eq!(status.code(), Some(1), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_may_remove_and_promote() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let a = w.addr();
    let c = create_conversation(a, "alice", &["bob", "carol"]).await;
    let members = format!("/v1/conversations/{c}/members");
    let member = |u: &str| format!("/v1/conversations/{c}/members/{u}");
    let del = |who: &'static str, u: &str| {
        let path = member(u);
        async move { http(a, "DELETE", &path, Some(&tok(who)), None).await }
    };
    let patch = |who: &'static str, u: &str, role: &str| {
        let path = member(u);
        let body = json!({ "role": role });
        async move { http(a, "PATCH", &path, Some(&tok(who)), Some(&body)).await }
    };

    // A member may add members, but not admins, and may not remove others.
    assert_eq!(
        post(a, "bob", &members, json!({"user": "dave"}))
            .await
            .status,
        200
    );
    let r = post(a, "bob", &members, json!({"user": "erin", "role": "admin"})).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, json!("forbidden"))
    );
    let r = del("bob", "carol").await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, json!("forbidden"))
    );
    // Only the owner makes admins; the owner's role does not change.
    let r = post(
        a,
        "alice",
        &members,
        json!({"user": "frank", "role": "admin"}),
    )
    .await;
    assert_eq!((r.status, r.json()["role"].clone()), (200, json!("admin")));
    assert_eq!(patch("carol", "bob", "admin").await.status, 403);
    assert_eq!(patch("alice", "alice", "member").await.status, 403);
    assert_eq!(patch("alice", "bob", "owner").await.status, 422);
    assert_eq!(patch("alice", "nobody", "admin").await.status, 404);
    // An admin removes members, not the owner.
    assert_eq!(del("frank", "dave").await.status, 200);
    assert_eq!(del("frank", "alice").await.status, 403);
    // Non-members get 404 for everything.
    assert_eq!(del("zed", "carol").await.status, 404);
    assert_eq!(patch("zed", "carol", "admin").await.status, 404);
    assert_eq!(
        post(a, "zed", &members, json!({"user": "x"})).await.status,
        404
    );
    // Anyone may leave.
    assert_eq!(del("carol", "carol").await.status, 200);
    // bob (joined at creation) becomes an admin; frank joined later. When
    // the owner leaves, the earliest-joined admin (bob) owns it.
    let r = patch("alice", "bob", "admin").await;
    assert_eq!((r.status, r.json()["changed"].clone()), (200, json!(true)));
    let r = del("alice", "alice").await;
    assert_eq!(
        (r.status, r.json()["new_owner"].clone()),
        (200, json!("bob"))
    );
    let r = http(
        a,
        "GET",
        &format!("/v1/conversations/{c}/events?after_seq=0"),
        Some(&tok("bob")),
        None,
    )
    .await;
    let events = r.json()["events"].as_array().unwrap().clone();
    let tail: Vec<(Value, Value, Value)> = events
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|e| (e["event"].clone(), e["user"].clone(), e["role"].clone()))
        .collect();
    assert_eq!(
        tail,
        vec![
            (json!("member.left"), json!("alice"), Value::Null),
            (json!("member.role"), json!("bob"), json!("owner")),
        ]
    );
    // The new owner has the owner's rights; alice has none.
    assert_eq!(patch("bob", "frank", "member").await.status, 200);
    assert_eq!(del("alice", "bob").await.status, 404);
    let r = http(a, "GET", "/v1/conversations", Some(&tok("bob")), None).await;
    assert_eq!(r.json()["conversations"][0]["role"], "owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_members_see_from_their_join_unless_history_is_shared() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    let a = w.addr();
    let mut convs = Vec::new();
    for history in [None, Some("shared")] {
        let mut body = json!({"members": ["bob"], "title": "h"});
        if let Some(h) = history {
            body["history"] = json!(h);
        }
        let r = post(a, "alice", "/v1/conversations", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.json()["history"], history.unwrap_or("since_join"));
        let c = r.json()["id"].as_i64().unwrap();
        send(a, "alice", c, "before-1").await;
        send(a, "bob", c, "before-2").await;
        let r = post(
            a,
            "alice",
            &format!("/v1/conversations/{c}/members"),
            json!({"user": "carol"}),
        )
        .await;
        assert_eq!(r.status, 200);
        send(a, "alice", c, "after").await;
        convs.push(c);
    }
    let bodies = |events: &Value| -> Vec<String> {
        events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["event"].as_str().unwrap(),
                    e["body"].as_str().or(e["user"].as_str()).unwrap_or("")
                )
            })
            .collect()
    };
    let page = |c: i64, q: &'static str| async move {
        let r = http(
            a,
            "GET",
            &format!("/v1/conversations/{c}/events{q}"),
            Some(&tok("carol")),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        bodies(&r.json()["events"])
    };
    // since_join: from carol's own member.joined, both directions.
    let since = convs[0];
    assert_eq!(
        page(since, "?after_seq=0").await,
        ["member.joined:carol", "message.created:after"]
    );
    assert_eq!(
        page(since, "").await,
        ["message.created:after", "member.joined:carol"]
    );
    assert_eq!(page(since, "?before_seq=4").await, Vec::<String>::new());
    // shared: everything.
    let shared = convs[1];
    assert_eq!(page(shared, "?after_seq=0").await.len(), 5);
    // The WebSocket backlog starts at her join too.
    let mut carol = WsClient::connect(&w.ws_url(), &tok("carol")).await.unwrap();
    let backlog = carol.read_until_synced(T).await;
    let of_since: Vec<&Value> = backlog
        .iter()
        .filter(|e| e["conversation_id"] == since)
        .collect();
    assert_eq!(of_since.len(), 2, "{of_since:?}");
    assert!(of_since
        .iter()
        .all(|e| e["body"] != "before-1" && e["body"] != "before-2"));
    let r = http(a, "GET", "/v1/conversations", Some(&tok("carol")), None).await;
    let list = r.json()["conversations"].as_array().unwrap().clone();
    assert_eq!(
        list.iter()
            .map(|c| c["history"].clone())
            .collect::<Vec<_>>(),
        [json!("since_join"), json!("shared")]
    );
    // Bad settings are refused.
    let r = post(
        a,
        "alice",
        "/v1/conversations",
        json!({"history": "everything"}),
    )
    .await;
    assert_eq!(r.status, 422);
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_waiting_for_the_database_ends_on_drain_and_on_close() {
    let db = TestDb::new_async().await;
    let hold = tempfile::tempdir().expect("tempdir");
    let dir = hold.path().to_string_lossy().to_string();
    let mut w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--drain-ms", "8000"],
        &[
            ("TETHER_FAULT_HOLD_SUBSCRIBE_DIR", dir.as_str()),
            ("TETHER_FAULT_NO_RECENT_CACHE", "1"),
        ],
    );
    let c = create_conversation(w.addr(), "alice", &["bob", "carol", "dave"]).await;
    std::fs::write(hold.path().join("release"), b"").expect("release");
    let mut carol = connect_synced(&w.ws_url(), "carol").await;
    // bob and dave have seen seq 1, so their next connect has no backlog
    // to read: what they miss comes as a repair.
    for u in ["bob", "dave"] {
        let mut ws = connect_synced(&w.ws_url(), u).await;
        ws.send_json(&json!({"type": "ack", "conversation_id": c, "seq": 1}))
            .await;
        let sql = format!(
            "SELECT cursor_seq FROM members WHERE conversation_id = {c} AND user_id = '{u}'"
        );
        assert!(
            wait_until_async(T, Duration::from_millis(20), || async {
                db.query_i64_async(&sql).await == 1
            })
            .await,
            "{u}'s ack was not written"
        );
        ws.close(1000).await;
    }
    std::fs::remove_file(hold.path().join("release")).expect("hold again");
    // bob and dave read their memberships, then wait at the hold.
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    let mut dave = WsClient::connect(&w.ws_url(), &tok("dave")).await.unwrap();
    for u in ["bob", "dave"] {
        assert!(
            wait_until_async(T, Duration::from_millis(10), || async {
                held_file_exists(hold.path(), u)
            })
            .await
        );
    }
    send(w.addr(), "alice", c, "while held").await;
    events_until(&mut carol, |v| v["body"] == "while held").await;
    // The database goes; bob and dave subscribe behind the dispatcher and
    // must read the missing event from the log: they wait.
    db.stop_async().await;
    std::fs::write(hold.path().join("release"), b"").expect("release");
    let addr = w.addr();
    let open = || async move { metric(&metrics_of(addr).await, "tether_connections_open") };
    // dave leaves while his repair waits: his connection ends.
    dave.close(1000).await;
    assert!(
        wait_until_async(T, Duration::from_millis(20), || async {
            open().await == 2.0
        })
        .await,
        "dave's connection did not end while waiting for the database"
    );
    // SIGTERM: bob's waiting repair ends with 1001 well within the drain.
    assert!(w.signal(libc::SIGTERM));
    assert_eq!(bob.wait_close(Duration::from_secs(5)).await, Some(1001));
    assert!(w.wait_exit_async(T).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_offered_as_a_subprotocol_authenticates_and_tether_v1_is_echoed() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    create_conversation(w.addr(), "alice", &["bob"]).await;
    let (mut bob, chosen) = WsClient::connect_with_subprotocol(&w.ws_url(), &tok("bob"))
        .await
        .expect("the subprotocol token is accepted");
    assert_eq!(chosen.as_deref(), Some("tether.v1"));
    let backlog = bob.read_until_synced(T).await;
    assert_eq!(bob.hello.as_ref().unwrap()["user"], "bob");
    assert_eq!(backlog.len(), 1);
    // A bad token offered that way is refused before the upgrade.
    match WsClient::connect_with_subprotocol(&w.ws_url(), "not.a.token").await {
        Ok(_) => panic!("a bad subprotocol token was accepted"),
        Err(e) => assert!(e.to_string().contains("401"), "{e}"),
    }
}
