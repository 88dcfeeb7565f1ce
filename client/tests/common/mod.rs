//! What the client's end-to-end tests share: a throwaway PostgreSQL with
//! the schema, real `tether-worker` processes, tokens, and readers that
//! fail loudly on a gap or anything out of order.
//!
//! Needs the worker binary: `cargo build --bin tether-worker` first (it is
//! looked up next to the test's target directory, or at
//! `$TETHER_WORKER_BIN`).
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_client::{Client, ClientEvent, ClientOptions, Event, Rest};
use tether_pgcluster::{PgCluster, PgOptions};
use tether_protocol::auth::{self, Secret};

/// 32 random bytes in hex: a worker refuses a weak secret at start.
pub const SECRET: &str = "a3f19c0e7d5b2846e1c97f30b5d2a86c4e09f7b1d3c5a2e8f6b40d9c1e7a3b52";
pub const T: Duration = Duration::from_secs(60);

pub fn token(user: &str) -> String {
    auth::issue(&Secret::new(SECRET.as_bytes().to_vec()), user, 3600).unwrap()
}

/// A throwaway PostgreSQL with the schema (started on a plain thread: the
/// `postgres` crate must not run on a tokio worker thread).
pub fn start_db() -> PgCluster {
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

pub fn postgres_client(url: &str) -> postgres::Client {
    url.parse::<postgres::Config>()
        .unwrap()
        .connect(postgres::NoTls)
        .expect("connecting to PostgreSQL")
}

pub fn worker_bin() -> PathBuf {
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

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A worker process, SIGKILLed on drop.
pub struct Worker {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Worker {
    pub async fn start(db_url: &str, addr: SocketAddr, id: &str) -> Worker {
        let log = std::env::temp_dir().join(format!("tether-client-test-{id}-{}.log", addr.port()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(worker_bin())
            .args(["--listen", &addr.to_string(), "--database-url", db_url])
            .args(["--secret", SECRET, "--worker-id", id])
            // The scenarios drive more than the default per-user rates.
            .args(["--rate-limit", "0", "--membership-rate", "0"])
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

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn options(url: &str, user: &str) -> ClientOptions {
    let mut o = ClientOptions::new(url, token(user));
    o.ack_every = 8;
    o.ack_interval = Duration::from_millis(50);
    o
}

/// Reads events until `want` message events of `conversation` arrived;
/// panics on a gap or on anything out of order.
pub async fn collect_messages(client: &mut Client, conversation: i64, want: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    while out.len() < want {
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(ClientEvent::Event(e))) => {
                if e.conversation_id == conversation && e.kind == "message.created" {
                    if let Some(prev) = out.last() {
                        let prev: &Event = prev;
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

/// A worker on a fresh local port.
pub async fn start_worker(pg: &PgCluster, id: &str) -> Worker {
    Worker::start(
        &pg.url(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        id,
    )
    .await
}

/// A conversation of alice's with `members` holding exactly `events`
/// events (`conversation.created` and messages `m2`, `m3`...).
pub async fn conversation_with(rest: &Rest, members: &[&str], events: i64) -> i64 {
    let id = rest.create_conversation(members, "test").await.unwrap().id;
    for seq in 2..=events {
        let (e, _) = rest
            .send_message(id, &format!("m{seq}"), None)
            .await
            .unwrap();
        assert_eq!(e.seq, seq);
    }
    id
}

/// The next client event, or a panic after `T`.
pub async fn next(client: &mut Client) -> ClientEvent {
    tokio::time::timeout(T, client.next_event())
        .await
        .unwrap_or_else(|_| panic!("no client event within {T:?}"))
        .expect("the client closed")
}

/// The next event of `conversation` (panics on a gap or after `T`).
pub async fn next_in(client: &mut Client, conversation: i64) -> Event {
    loop {
        match next(client).await {
            ClientEvent::Event(e) if e.conversation_id == conversation => return e,
            ClientEvent::Error(tether_client::ClientError::Gap { .. }) => panic!("a gap"),
            _ => {}
        }
    }
}

/// Closes `client` and reads it to its end.
pub async fn close(mut client: Client) {
    client.close();
    tokio::time::timeout(T, async { while client.next_event().await.is_some() {} })
        .await
        .expect("the client closes");
}

/// The user's cursor in `conversation`, as the server has it.
pub async fn cursor(rest: &Rest, conversation: i64) -> i64 {
    let page = rest.list_conversations(None, 200).await.unwrap();
    page.conversations
        .iter()
        .find(|c| c.id == conversation)
        .map(|c| c.cursor)
        .expect("the conversation is listed")
}

/// Polls `cursor` until it is `want` (acks are written within 250 ms);
/// panics with the last value after `within`.
pub async fn wait_cursor(rest: &Rest, conversation: i64, want: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = cursor(rest, conversation).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cursor {got}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
