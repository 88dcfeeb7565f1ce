//! The client against a real `tether-worker` and a throwaway PostgreSQL:
//! two clients chat; a SIGKILLed worker loses no acknowledged message.
//! (The SDK conformance scenarios are in conformance.rs.)

mod common;

use common::*;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tether_client::{Client, ClientEvent, Rest, TokenSource};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_exchange_messages() {
    let pg = start_db();
    let worker = Worker::start(
        &pg.url(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        "w1",
    )
    .await;
    let alice_rest = Rest::new(&worker.base_url(), token("alice"));
    let conv = alice_rest
        .create_conversation(&["bob"], "chat")
        .await
        .unwrap()
        .id;

    let mut alice = Client::connect(options(&worker.ws_url(), "alice"));
    let mut bob = Client::connect(options(&worker.ws_url(), "bob"));
    assert!(alice.wait_synced(T).await.is_some());
    assert!(bob.wait_synced(T).await.is_some());

    let s1 = alice.send(conv, "hi bob").await.unwrap();
    let s2 = bob.send(conv, "hi alice").await.unwrap();
    assert!(s2.seq > s1.seq && !s1.duplicate);

    let at_bob = collect_messages(&mut bob, conv, 2).await;
    let at_alice = collect_messages(&mut alice, conv, 2).await;
    for got in [&at_bob, &at_alice] {
        let bodies: Vec<_> = got.iter().map(|e| e.body.clone().unwrap()).collect();
        assert_eq!(bodies, ["hi bob", "hi alice"]);
        assert_eq!(got[0].sender, "alice");
        assert_eq!(got[1].seq, s2.seq);
    }

    // The same client_msg_id twice: one event, the second answer says so.
    let a = alice
        .send_with_id(conv, "once", "fixed-id-1")
        .await
        .unwrap();
    let b = alice
        .send_with_id(conv, "once", "fixed-id-1")
        .await
        .unwrap();
    assert_eq!(
        (a.seq, a.duplicate, b.seq, b.duplicate),
        (a.seq, false, a.seq, true)
    );

    // Final errors end the send; the REST helper sees the same log.
    let err = alice.send(999_999, "nowhere").await.unwrap_err();
    assert!(
        matches!(err, tether_client::SendError::Rejected { ref code, .. } if code == "not_found"),
        "{err:?}"
    );
    let page = alice_rest.events_page(conv, None, 10).await.unwrap();
    assert_eq!(page.events.first().map(|e| e.seq), Some(a.seq));
    let (e, dup) = alice_rest
        .send_message(conv, "via http", Some("fixed-id-2"))
        .await
        .unwrap();
    assert!(!dup && e.seq == a.seq + 1);
    let (_, dup) = alice_rest
        .send_message(conv, "via http", Some("fixed-id-2"))
        .await
        .unwrap();
    assert!(dup);
    alice.close();
    bob.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_loses_no_acknowledged_message() {
    const N: usize = 200;
    let pg = start_db();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let mut worker = Worker::start(&pg.url(), addr, "w1").await;
    let rest = Rest::new(&worker.base_url(), token("alice"));
    let conv = rest
        .create_conversation(&["bob"], "crash")
        .await
        .unwrap()
        .id;

    let alice = Client::connect(options(&worker.ws_url(), "alice"));
    // Bob gets a fresh token from a callback before every (re)connect.
    let mut bob_opts = options(&worker.ws_url(), "bob");
    bob_opts.token = TokenSource::fetch(|| async { Ok(token("bob")) });
    let mut bob = Client::connect(bob_opts);
    assert!(bob.wait_synced(T).await.is_some());

    // Alice sends N messages, a few at a time; the worker dies in between.
    let handle = alice.handle();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = progress.clone();
    let sender = tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut pending = Vec::new();
        for i in 0..N {
            pending.push(handle.send(conv, format!("m{i}")));
            if pending.len() == 10 {
                for p in pending.drain(..) {
                    sent.push(p.await.expect("every send resolves with a seq"));
                }
                done.store(sent.len(), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for p in pending {
            sent.push(p.await.expect("every send resolves with a seq"));
        }
        sent
    });
    while progress.load(std::sync::atomic::Ordering::SeqCst) < N / 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    worker.kill();
    let at_kill = progress.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        at_kill < N,
        "the worker died mid-run ({at_kill} of {N} sent)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _worker = Worker::start(&pg.url(), addr, "w2").await;

    let sent = tokio::time::timeout(T, sender)
        .await
        .expect("sends finish")
        .unwrap();
    let seqs: HashSet<i64> = sent.iter().map(|s| s.seq).collect();
    assert_eq!(seqs.len(), N, "every send has its own seq");

    let got = collect_messages(&mut bob, conv, N).await;
    let bodies: Vec<String> = got.iter().map(|e| e.body.clone().unwrap()).collect();
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "every message once, in order");
    assert!(got.iter().all(|e| seqs.contains(&e.seq)));

    // Nothing more arrives (no duplicates surfaced), and the log holds
    // exactly N messages.
    let extra = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match bob.next_event().await {
                Some(ClientEvent::Event(e)) => return Some(e),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
    let url = pg.url();
    let count = std::thread::spawn(move || {
        postgres_client(&url)
            .query_one(
                "SELECT count(*) FROM events WHERE conversation_id = $1 AND type = 'message.created'",
                &[&conv],
            )
            .map(|r| r.get::<_, i64>(0))
    })
    .join()
    .unwrap();
    match count {
        Ok(n) => assert_eq!(n, N as i64),
        // Column names are the schema's business; fall back to the API.
        Err(_) => {
            let mut total = 0;
            let mut before = None;
            loop {
                let page = rest.events_page(conv, before, 200).await.unwrap();
                total += page
                    .events
                    .iter()
                    .filter(|e| e.kind == "message.created")
                    .count();
                match page.next_before_seq {
                    Some(b) => before = Some(b),
                    None => break,
                }
            }
            assert_eq!(total, N);
        }
    }
    assert!(
        bob.stats()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}
