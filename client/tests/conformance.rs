//! The SDK conformance scenarios of docs/SDK.md that concern consumption
//! and configuration, run by the Rust client against a real
//! `tether-worker` and a throwaway PostgreSQL (the JS SDK runs the same
//! list in clients/js/test/conformance.test.js):
//!
//! - resume after a partial consume: an app that consumed 100 of 300
//!   events and quit resumes at exactly event 101 (auto and manual acks);
//! - slow consumer: a backlog larger than the event channel does not
//!   deadlock a pending send, and every event still arrives once, in order;
//! - configuration errors fail fast; a refused connection says why;
//! - typed REST answers, forward paging, back-filling a gap;
//! - drain (SIGTERM, 1001): reconnect (with the same, still valid token),
//!   nothing lost or repeated;
//! - token refresh: an expired token replaced through the callback.

mod common;

use common::*;
use std::time::Duration;
use tether_client::rest::RestError;
use tether_client::{Client, ClientError, ClientEvent, ClientOptions, ConnState, Page, Rest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_consumed_100_of_300_events_resumes_at_101() {
    let pg = start_db();
    let w = start_worker(&pg, "w1").await;
    let alice = Rest::new(&w.base_url(), token("alice"));
    let conv = conversation_with(&alice, &["bob", "carol"], 300).await;

    // Auto-ack: what next_event() returned counts as consumed, nothing more
    // (the other 200 events sit in the channel when the app quits).
    let mut bob = Client::connect(options(&w.ws_url(), "bob"));
    for want in 1..=100 {
        assert_eq!(next_in(&mut bob, conv).await.seq, want);
    }
    close(bob).await;
    let bob_rest = alice.with_token(token("bob"));
    wait_cursor(&bob_rest, conv, 100, Duration::from_secs(10)).await;
    let mut again = Client::connect(options(&w.ws_url(), "bob"));
    for want in 101..=300 {
        assert_eq!(
            next_in(&mut again, conv).await.seq,
            want,
            "resumed where the app stopped"
        );
    }
    close(again).await;
    wait_cursor(&bob_rest, conv, 300, Duration::from_secs(10)).await;

    // Manual acks: only what the app names, even after reading everything.
    let mut o = options(&w.ws_url(), "carol");
    o.auto_ack = false;
    let mut carol = Client::connect(o);
    for want in 1..=300 {
        assert_eq!(next_in(&mut carol, conv).await.seq, want);
    }
    carol.ack(conv, 100);
    close(carol).await;
    let carol_rest = alice.with_token(token("carol"));
    wait_cursor(&carol_rest, conv, 100, Duration::from_secs(10)).await;
    let mut o = options(&w.ws_url(), "carol");
    o.auto_ack = false;
    let mut carol = Client::connect(o);
    assert_eq!(next_in(&mut carol, conv).await.seq, 101);
    close(carol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_channel_does_not_block_a_pending_send() {
    let pg = start_db();
    let w = start_worker(&pg, "w1").await;
    let alice = Rest::new(&w.base_url(), token("alice"));
    let conv = conversation_with(&alice, &["bob"], 300).await;

    let mut o = options(&w.ws_url(), "bob");
    o.event_capacity = 32;
    let mut bob = Client::connect(o);
    // Nobody reads while the send is pending: the socket task must still
    // reach `synced` and hear `sent`.
    let sent = tokio::time::timeout(T, bob.send(conv, "from bob"))
        .await
        .expect("the send completes while nobody reads")
        .expect("stored");
    assert_eq!(sent.seq, 301);

    // Then every event, once, in order: what did not fit is replayed.
    let mut overflowed = false;
    let mut want = 1;
    while want <= 301 {
        match next(&mut bob).await {
            ClientEvent::Event(e) if e.conversation_id == conv => {
                assert_eq!(e.seq, want, "in order, once");
                want += 1;
            }
            ClientEvent::Error(ClientError::Overflow { capacity }) => {
                assert_eq!(capacity, 32);
                overflowed = true;
            }
            ClientEvent::Error(ClientError::Gap { .. }) => panic!("a gap"),
            _ => {}
        }
    }
    assert!(overflowed, "300 events cannot fit in 32 slots");
    close(bob).await;
}

/// The events until `Closed`, or a panic after `T`.
async fn until_closed(client: &mut Client) -> Vec<ClientEvent> {
    let mut seen = Vec::new();
    loop {
        let ev = next(client).await;
        let done = ev == ClientEvent::State(ConnState::Closed);
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_fail_fast_and_refusals_say_why() {
    // A scheme that can never work: no attempt at all.
    let mut c = Client::connect(ClientOptions::new("ftp://127.0.0.1:1", "t"));
    let seen = until_closed(&mut c).await;
    assert!(
        matches!(&seen[..], [ClientEvent::Error(ClientError::Config(m)), ClientEvent::State(ConnState::Closed)] if m.contains("ftp")),
        "{seen:?}"
    );

    let pg = start_db();
    let w = start_worker(&pg, "w1").await;
    // A base URL works like the JS SDK's (`/v1/ws` appended) ...
    let mut ok = Client::connect(ClientOptions::new(w.base_url(), token("bob")));
    assert!(ok.wait_synced(T).await.is_some());
    close(ok).await;
    // ... a wrong path is a 404 on the handshake: final, at once.
    let mut c = Client::connect(ClientOptions::new(
        format!("{}/nope", w.base_url()),
        token("bob"),
    ));
    let seen = until_closed(&mut c).await;
    let config = seen.iter().find_map(|e| match e {
        ClientEvent::Error(ClientError::Config(m)) => Some(m.clone()),
        _ => None,
    });
    assert!(
        config.as_deref().is_some_and(|m| m.contains("404")),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, ClientEvent::State(ConnState::Reconnecting { .. }))),
        "no retry of a configuration error: {seen:?}"
    );

    // Nothing listening: retried, and the cause is said.
    let mut c = Client::connect(ClientOptions::new(
        format!("http://127.0.0.1:{}", free_port()),
        token("bob"),
    ));
    let cause = loop {
        if let ClientEvent::Error(ClientError::Connect(m)) = next(&mut c).await {
            break m;
        }
    };
    assert!(cause.contains("refused"), "{cause}");
    loop {
        if let ClientEvent::State(ConnState::Reconnecting { .. }) = next(&mut c).await {
            break;
        }
    }
    // A send given up on (a timeout drops its future) leaves the outbox.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), c.send(1, "x")).await;
    assert!(gave_up.is_err(), "nothing can answer it");
    let handle = c.handle();
    let deadline = std::time::Instant::now() + T;
    while handle.outbox_len() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the send stays queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    close(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_rest_answers_forward_paging_and_backfill() {
    let pg = start_db();
    let w = start_worker(&pg, "w1").await;
    let alice = Rest::new(&w.base_url(), token("alice"));
    let conv = conversation_with(&alice, &["bob"], 250).await;

    let page = alice.events(conv, Page::After(0), 100).await.unwrap();
    let seqs: Vec<i64> = page.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    assert_eq!(page.next_after_seq, Some(100));
    let last = alice.events(conv, Page::After(200), 100).await.unwrap();
    assert_eq!(last.events.first().map(|e| e.seq), Some(201));
    assert_eq!(last.events.len(), 50);
    assert_eq!(last.next_after_seq, None);
    let newest = alice.events(conv, Page::Before(None), 10).await.unwrap();
    assert_eq!(newest.events.first().map(|e| e.seq), Some(250));

    let added = alice
        .add_member(conv, "carol", Some("admin"))
        .await
        .unwrap();
    assert!(added.added && added.seq == Some(251), "{added:?}");
    assert_eq!(added.role.as_deref(), Some("admin"));
    let again = alice.add_member(conv, "carol", None).await.unwrap();
    assert!(!again.added);
    let role = alice.set_role(conv, "carol", "member").await.unwrap();
    assert!(role.changed && role.role == "member");
    let bob = alice.with_token(token("bob"));
    match bob.remove_member(conv, "carol").await {
        Err(RestError::Http {
            status: 403, code, ..
        }) => assert_eq!(code, "forbidden"),
        other => panic!("a member removing another: {other:?}"),
    }
    let left = bob.remove_member(conv, "bob").await.unwrap();
    assert!(left.removed && left.new_owner.is_none());
    // A user id with characters that would change the route is encoded.
    match alice.remove_member(conv, "x/../../y").await {
        Err(RestError::Http { status, .. }) => assert!(status == 404 || status == 422, "{status}"),
        other => panic!("{other:?}"),
    }
    let rows = alice.list_conversations(None, 10).await.unwrap();
    let row = rows.conversations.iter().find(|c| c.id == conv).unwrap();
    assert_eq!(
        (row.role.as_str(), row.history.as_str()),
        ("owner", "since_join")
    );

    // The per-conversation view back-fills a range by forward pages.
    let client = Client::connect(options(&w.ws_url(), "alice"));
    let chat = client.conversation(conv, alice.clone());
    let filled = chat.backfill(150, 240).await.unwrap();
    assert_eq!(
        filled.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (150..=240).collect::<Vec<_>>()
    );
    let sent = chat.send("through the view").await.unwrap();
    assert!(sent.seq > 253);
    close(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_1001_reconnects_and_loses_or_repeats_nothing() {
    let pg = start_db();
    let mut w1 = start_worker(&pg, "w1").await;
    let addr = w1.addr;
    let alice = Rest::new(&w1.base_url(), token("alice"));
    let conv = conversation_with(&alice, &["bob"], 50).await;
    // A token callback: a valid token is reused across the reconnect.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let mut o = options(&w1.ws_url(), "bob");
    o.token = tether_client::TokenSource::fetch(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok(token("bob")) }
    });
    let mut bob = Client::connect(o);
    for want in 1..=50 {
        assert_eq!(next_in(&mut bob, conv).await.seq, want);
    }
    // SIGTERM: the worker drains, closing its sockets with 1001.
    let pid = w1.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let code = loop {
        if let ClientEvent::Error(ClientError::Disconnected { code, .. }) = next(&mut bob).await {
            break code;
        }
    };
    assert_eq!(code, Some(1001), "a draining worker says 1001");
    let _ = tokio::task::spawn_blocking(move || w1.child.wait()).await;
    let w2 = Worker::start(&pg.url(), addr, "w2").await;
    let alice = Rest::new(&w2.base_url(), token("alice"));
    for i in 51..=100 {
        alice
            .send_message(conv, &format!("m{i}"), None)
            .await
            .unwrap();
    }
    for want in 51..=100 {
        assert_eq!(
            next_in(&mut bob, conv).await.seq,
            want,
            "once, in order, after the drain"
        );
    }
    assert!(
        bob.stats()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the token was reused"
    );
    close(bob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_replaced_through_the_callback_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tether_client::TokenSource;
    let pg = start_db();
    let w = start_worker(&pg, "w1").await;
    let expired = || {
        let secret = tether_protocol::auth::Secret::new(SECRET.as_bytes().to_vec());
        let past = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 60;
        tether_protocol::auth::issue_raw(&secret, "bob", past).unwrap()
    };
    // A stale cache hands out an expired token first: refused (401), asked
    // again at once, connected.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut o = options(&w.ws_url(), "bob");
    o.token = TokenSource::fetch(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let t = if n == 1 { expired() } else { token("bob") };
        async move { Ok(t) }
    });
    let mut bob = Client::connect(o);
    assert!(bob.wait_synced(T).await.is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    close(bob).await;

    // Always expired: given up after the second refusal.
    let mut o = options(&w.ws_url(), "bob");
    o.token = TokenSource::fetch(move || {
        let t = expired();
        async move { Ok(t) }
    });
    let mut eve = Client::connect(o);
    let seen = until_closed(&mut eve).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, ClientEvent::Error(ClientError::Unauthorized(_)))),
        "{seen:?}"
    );
}
