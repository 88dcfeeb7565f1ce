//! The client against a real `tether-worker` and a throwaway PostgreSQL.
//!
//! Needs the worker binary: `cargo build --bin tether-worker` first (it is
//! looked up next to this test's target directory, or at
//! `$TETHER_WORKER_BIN`).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_client::{Client, ClientEvent, ClientOptions, EventFrame, Rest, TokenSource};
use tether_pgcluster::{PgCluster, PgOptions};
use tether_protocol::auth::{self, Secret};

const SECRET: &str = "tether-client-test-secret";
const T: Duration = Duration::from_secs(60);

fn token(user: &str) -> String {
    auth::issue(&Secret::new(SECRET.as_bytes().to_vec()), user, 3600).unwrap()
}

/// A throwaway PostgreSQL with the schema (started on a plain thread: the
/// `postgres` crate must not run on a tokio worker thread).
fn start_db() -> PgCluster {
    std::thread::spawn(|| {
        let pg = PgCluster::start_temp(PgOptions {
            fsync: false,
            max_connections: 300,
            port: None,
        })
        .expect("starting PostgreSQL");
        let mut c = postgres_client(&pg.url());
        tether_worker::store::apply_schema(&mut c).expect("applying the schema");
        pg
    })
    .join()
    .unwrap()
}

fn postgres_client(url: &str) -> postgres::Client {
    url.parse::<postgres::Config>()
        .unwrap()
        .connect(postgres::NoTls)
        .expect("connecting to PostgreSQL")
}

fn worker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_WORKER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/e2e-HASH → target/debug/tether-worker
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("tether-worker");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bin tether-worker` first",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A worker process, SIGKILLed on drop.
struct Worker {
    child: Child,
    addr: SocketAddr,
}

impl Worker {
    async fn start(db_url: &str, addr: SocketAddr, id: &str) -> Worker {
        let log = std::env::temp_dir().join(format!("tether-client-test-{id}-{}.log", addr.port()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(worker_bin())
            .args(["--listen", &addr.to_string(), "--database-url", db_url])
            .args(["--secret", SECRET, "--worker-id", id])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawning tether-worker");
        let mut w = Worker { child, addr };
        let rest = Rest::new(&w.base_url(), "");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = rest.get("/ready").await {
                if r.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = w.child.try_wait() {
                panic!(
                    "worker exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "worker not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn options(url: &str, user: &str) -> ClientOptions {
    let mut o = ClientOptions::new(url, token(user));
    o.ack_every = 8;
    o.ack_interval = Duration::from_millis(50);
    o
}

/// Reads events until `want` message events of `conversation` arrived;
/// panics on a gap or on anything out of order.
async fn collect_messages(client: &mut Client, conversation: i64, want: usize) -> Vec<EventFrame> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    while out.len() < want {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(ClientEvent::Event(e))) => {
                if e.conversation_id == conversation && e.event == "message.created" {
                    if let Some(prev) = out.last() {
                        let prev: &EventFrame = prev;
                        assert!(
                            e.seq > prev.seq,
                            "out of order: {} after {}",
                            e.seq,
                            prev.seq
                        );
                    }
                    out.push(e);
                }
            }
            Ok(Some(ClientEvent::Error(tether_client::ClientError::Gap {
                conversation_id,
                expected,
                got,
            }))) => panic!("gap in {conversation_id}: expected {expected}, got {got}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client closed after {} messages", out.len()),
            Err(_) => panic!("only {} of {want} messages within {T:?}", out.len()),
        }
    }
    out
}

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
        .unwrap();

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
    let conv = rest.create_conversation(&["bob"], "crash").await.unwrap();

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
                    .filter(|e| e.event == "message.created")
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
