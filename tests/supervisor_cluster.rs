//! The cluster under the supervisor, end to end: fan-out across the workers
//! of one `tether` and across two `tether` instances on one database, and a
//! worker SIGKILLed while it holds half of 200 clients and 2,000 messages
//! are being sent (the clients reconnect with jittered backoff and end with
//! every acknowledged message, in order, once after dedup).

use futures_util::SinkExt;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_testkit::*;

const T: Duration = Duration::from_secs(60);

fn worker_of(ws: &WsClient) -> String {
    ws.hello.as_ref().expect("hello")["worker"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Opens connections for `users` (round-robin over `urls`) until the
/// clients are spread over at least `min_workers` distinct workers.
async fn connect_spread(
    urls: &[String],
    users: &[String],
    min_workers: usize,
) -> Vec<(String, WsClient)> {
    let mut clients = Vec::new();
    let mut workers = HashSet::new();
    let mut i = 0;
    while i < users.len() * 2 || (workers.len() < min_workers && i < users.len() * 20) {
        let u = &users[i % users.len()];
        let url = &urls[i % urls.len()];
        let mut ws = WsClient::connect(url, &tok(u)).await.expect("connect");
        ws.read_until_synced(T).await;
        workers.insert(format!("{url} {}", worker_of(&ws)));
        clients.push((u.clone(), ws));
        i += 1;
    }
    assert!(
        workers.len() >= min_workers,
        "clients only reached {workers:?}"
    );
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_reaches_every_member_across_workers_and_instances() {
    let db = TestDb::new_async().await;
    let url = db.url();
    let (a, b) = tokio::task::spawn_blocking(move || {
        (
            ClusterProc::spawn_with(&url, TEST_SECRET, 2, &[], &[]),
            ClusterProc::spawn_with(&url, TEST_SECRET, 2, &[], &[]),
        )
    })
    .await
    .unwrap();
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    let c = create_conversation(a.addr(), "u0", &users[1..]).await;

    // Readers on both instances, and on both workers of each.
    let urls = [a.ws_url(), b.ws_url()];
    let mut readers = connect_spread(&urls, &users, 4).await;

    // Every user sends through its own connection, alternating instances.
    const PER: usize = 30;
    let mut tasks = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let url = urls[i % 2].clone();
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = WsClient::connect(&url, &tok(&u)).await.expect("connect");
            ws.read_until_synced(T).await;
            for k in 0..PER {
                let id = format!("{u}:{k}");
                ws.send_json(
                    &json!({"type": "send", "conversation_id": c, "body": id, "client_msg_id": id}),
                )
                .await;
            }
            for _ in 0..PER {
                let v = ws
                    .recv_until(T, |v| v["type"] == "sent" || v["type"] == "error")
                    .await
                    .expect("sent");
                assert_eq!(v["type"], "sent", "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want = HashMap::from([(c, 1 + (users.len() * PER) as i64)]);
    for (u, ws) in readers.iter_mut() {
        let who = format!("{u} on {}", worker_of(ws));
        let mut last = HashMap::from([(c, 1)]);
        read_until_seqs(ws, &mut last, &want, &who, T).await;
    }
    assert_eq!(
        db.query_i64_async(&format!(
            "SELECT count(*) FROM events WHERE conversation_id = {c} AND type = 'message.created'"
        ))
        .await,
        (users.len() * PER) as i64
    );
}

/// A tiny deterministic jitter source (no rand dependency).
fn jitter(seed: &mut u64, max_ms: u64) -> Duration {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Duration::from_millis((*seed >> 33) % max_ms.max(1))
}

/// One receiving client: reads its conversation's events forever,
/// reconnecting with jittered backoff when its worker goes away; keeps the
/// highest seq (dropping repeats) and fails on any gap. Acks every 25 events.
async fn receiver(
    ws_url: String,
    user: String,
    c: i64,
    highest: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    mut seed: u64,
) {
    let mut last = 0i64;
    let mut first = true;
    loop {
        let mut ws = loop {
            match WsClient::connect(&ws_url, &tok(&user)).await {
                Ok(ws) => break ws,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20) + jitter(&mut seed, 200)).await
                }
            }
        };
        if !first {
            reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let mut since_ack = 0;
        loop {
            match ws.next_event(Duration::from_secs(600)).await {
                WsEvent::Json(v) if v["type"] == "event" => {
                    assert_eq!(v["conversation_id"].as_i64(), Some(c), "{user}: {v}");
                    let s = v["seq"].as_i64().unwrap();
                    assert!(s <= last + 1, "{user}: gap: {s} after {last}");
                    if s == last + 1 {
                        last = s;
                        highest.store(s as u64, Ordering::Release);
                        since_ack += 1;
                        if since_ack >= 25 {
                            since_ack = 0;
                            let ack = json!({"type": "ack", "conversation_id": c, "seq": last});
                            if ws.ws.send(Message::text(ack.to_string())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                WsEvent::Json(_) => {}
                WsEvent::Closed(_) | WsEvent::Timeout => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(20) + jitter(&mut seed, 300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_busy_worker_loses_no_acknowledged_message() {
    const CONVS: usize = 10;
    const MEMBERS: usize = 20; // 200 clients
    const MESSAGES: usize = 2000;
    const SENDERS_PER_CONV: usize = 2;

    let db = TestDb::new_async().await;
    let url = db.url();
    let cluster = tokio::task::spawn_blocking(move || {
        ClusterProc::spawn_with(&url, TEST_SECRET, 2, &["--drain-ms", "2000"], &[])
    })
    .await
    .unwrap();
    let addr = cluster.addr();

    let mut convs = Vec::new();
    for k in 0..CONVS {
        let members: Vec<String> = (1..MEMBERS).map(|m| format!("u{k}_{m}")).collect();
        convs.push(create_conversation(addr, &format!("u{k}_0"), &members).await);
    }

    // 200 receivers, one per member; note which worker each landed on.
    let mut on_worker: HashMap<String, usize> = HashMap::new();
    let mut highest = Vec::new();
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    for (k, &c) in convs.iter().enumerate() {
        for m in 0..MEMBERS {
            let user = format!("u{k}_{m}");
            // A probe connection tells us which worker serves it; the
            // receiver task then connects on its own.
            let h = Arc::new(AtomicU64::new(0));
            highest.push((c, user.clone(), h.clone()));
            receivers.push(tokio::spawn(receiver(
                cluster.ws_url(),
                user,
                c,
                h,
                reconnects.clone(),
                (k * MEMBERS + m) as u64 + 1,
            )));
        }
    }
    // Wait until every receiver has its backlog (seq 1), then find the
    // workers' loads from their /health connection counts.
    assert!(
        wait_until_async(T, Duration::from_millis(50), || {
            let done = highest
                .iter()
                .all(|(_, _, h)| h.load(Ordering::Acquire) >= 1);
            async move { done }
        })
        .await,
        "not every receiver got its backlog"
    );
    let mut pids: HashMap<String, i32> = HashMap::new();
    // /health answers from whichever worker accepts it: ask until both did.
    for _ in 0..200 {
        let h = http(addr, "GET", "/health", None, None).await.json();
        let w = h["worker"].as_str().unwrap().to_string();
        pids.insert(
            w.clone(),
            h["pid"].as_i64().expect("/health says its pid") as i32,
        );
        on_worker.insert(w, h["connections"].as_u64().unwrap_or(0) as usize);
        if on_worker.len() == 2 {
            break;
        }
    }
    let (victim, load) = on_worker
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(w, n)| (w.clone(), *n))
        .unwrap();
    eprintln!("connections per worker: {on_worker:?}; killing {victim}");
    let victim_pid = pids[&victim];

    // 2,000 messages over HTTP, SENDERS_PER_CONV senders per conversation,
    // each send retried with the same client_msg_id until acknowledged.
    let acked: Arc<Mutex<Vec<(i64, String, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let sent_count = Arc::new(AtomicU64::new(0));
    let per_sender = MESSAGES / (CONVS * SENDERS_PER_CONV);
    let mut senders = Vec::new();
    for (k, &c) in convs.iter().enumerate() {
        for s in 0..SENDERS_PER_CONV {
            let acked = acked.clone();
            let sent_count = sent_count.clone();
            let user = format!("u{k}_{s}");
            senders.push(tokio::spawn(async move {
                let mut seed = (k * 31 + s) as u64 + 7;
                for i in 0..per_sender {
                    let id = format!("{user}-{i}");
                    let body =
                        serde_json::to_vec(&json!({"body": id, "client_msg_id": id})).unwrap();
                    let path = format!("/v1/conversations/{c}/messages");
                    let started = Instant::now();
                    loop {
                        let r = try_http_raw(
                            addr,
                            "POST",
                            &path,
                            Some(&tok(&user)),
                            Some("application/json"),
                            Some(&body),
                        )
                        .await;
                        match r {
                            Ok(r) if r.status == 201 || r.status == 200 => {
                                let seq = r.json()["seq"].as_i64().unwrap();
                                acked.lock().unwrap().push((c, id.clone(), seq));
                                sent_count.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Ok(r) if r.status >= 500 || r.status == 429 => {}
                            Ok(r) => panic!("{id}: {} {}", r.status, r.body),
                            Err(_) => {}
                        }
                        assert!(started.elapsed() < T, "{id}: never acknowledged");
                        tokio::time::sleep(Duration::from_millis(10) + jitter(&mut seed, 100))
                            .await;
                    }
                }
            }));
        }
    }
    // Kill the busiest worker once a quarter of the messages are in.
    assert!(
        wait_until_async(T, Duration::from_millis(5), || {
            let n = sent_count.load(Ordering::Relaxed);
            async move { n >= (MESSAGES / 4) as u64 }
        })
        .await
    );
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(victim_pid, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), MESSAGES);

    // Every receiver ends with every acknowledged message: it has seen
    // every seq (no gaps) up to the highest acknowledged one.
    let mut top: HashMap<i64, i64> = HashMap::new();
    for (c, _, seq) in &acked {
        let t = top.entry(*c).or_insert(0);
        *t = (*t).max(*seq);
    }
    let done = wait_until_async(T, Duration::from_millis(50), || {
        let ok = highest
            .iter()
            .all(|(c, _, h)| h.load(Ordering::Acquire) as i64 >= top[c]);
        async move { ok }
    })
    .await;
    let behind: Vec<_> = highest
        .iter()
        .filter(|(c, _, h)| (h.load(Ordering::Acquire) as i64) < top[c])
        .map(|(c, u, h)| format!("{u}@{c}:{}<{}", h.load(Ordering::Acquire), top[c]))
        .take(10)
        .collect();
    if !done {
        // A receiver that failed (a gap) panicked: show that first.
        for r in receivers.into_iter().filter(|r| r.is_finished()) {
            r.await.unwrap();
        }
        panic!("receivers behind: {behind:?}");
    }
    let reconnected = reconnects.load(Ordering::Relaxed);
    eprintln!(
        "{} acknowledged; {reconnected} reconnects ({load} clients were on {victim}); all delivered {} ms after the kill",
        acked.len(),
        killed_at.elapsed().as_millis()
    );
    assert!(
        reconnected as usize >= load,
        "only {reconnected} reconnects"
    );
    for r in receivers {
        r.abort();
    }

    // The supervisor replaced the victim; /health shows it.
    let h = http(addr, "GET", "/health", None, None).await.json();
    assert_eq!(h["workers"]["alive"], 2, "{h}");
    assert!(h["workers"]["restarts"].as_u64() >= Some(1), "{h}");

    // The database holds every acknowledged message, each once.
    let stored = db
        .query_i64_async("SELECT count(*) FROM events WHERE type = 'message.created'")
        .await;
    assert_eq!(stored, MESSAGES as i64);
    let distinct_seqs: HashSet<(i64, i64)> = acked.iter().map(|(c, _, s)| (*c, *s)).collect();
    assert_eq!(distinct_seqs.len(), MESSAGES);
}
