//! tether-testkit: the end-to-end test harness, a dev-dependency of the
//! `tether` package's tests (tests/): a throwaway PostgreSQL ([`TestDb`]), the
//! real binaries as child processes ([`Proc`], [`WorkerProc`],
//! [`ClusterProc`]), HTTP requests through the project's one HTTP client,
//! `tether_client::Rest` ([`http`]; [`send_request`] alone writes raw
//! bytes, for the hostile-input tests), a WebSocket client
//! ([`WsClient`]), an event-stream client ([`SseClient`]), tokens ([`token`]) and condition waits ([`wait_until`]).
//!
//! Each test file says `use tether_testkit::*;` and uses part of it. The
//! binaries are the ones cargo built for the test run ([`bin`]).
//!
//! # Blocking vs async
//!
//! The `postgres` crate is blocking and panics when used on a tokio runtime
//! thread. [`TestDb`]'s blocking helpers (`new`, `stop`, `start`,
//! `query_i64`, `execute`, `with_client`) therefore run their work on a
//! fresh OS thread, so they may be called from anywhere, also from inside
//! `#[tokio::test]` (they block the calling thread meanwhile). Async tests
//! that need their own tasks to keep running meanwhile use the `*_async`
//! variants (which go through `tokio::task::spawn_blocking`). A
//! `postgres::Client` from [`TestDb::client`] must itself only be used off
//! the runtime (in `spawn_blocking`, or via [`TestDb::with_client`]).
//!
//! [`WorkerProc::spawn`] and [`ClusterProc::spawn`] block until the process
//! answers `GET /ready` with 200 (they use a blocking HTTP request of their
//! own), so they too may be called from sync or async tests.
//!
//! Failures are debuggable: a [`Proc`] dropped while the test panics prints
//! the last lines of the process's log (stdout and stderr) to stderr. Set
//! `TETHER_TEST_KEEP_LOGS=1` to keep the log files (their paths are printed).

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tether_pgcluster::{PgCluster, PgError, PgOptions};
use tether_protocol::auth::{self, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite::Message;

/// A binary cargo built for this test run: next to the test executable's
/// directory (`target/<profile>/deps/..`), where cargo puts a package's
/// binaries before it runs that package's integration tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (`cargo test -p tether` does)",
        path.display()
    );
    path
}

/// The secret every test process is started with: 32 random bytes in hex
/// (a weak secret is refused at start).
pub const TEST_SECRET: &str = "5f0c7b9e2a41d8c3b6e19f7a0d24c85e93b1a6f7c2d0e4b8a59f13c7e6d2b04a";

/// What every process the harness starts gets unless a test says
/// otherwise: the tests drive load that the default rate limits would
/// refuse, so they run without them (`TETHER_RATE_LIMIT=0`,
/// `TETHER_MEMBERSHIP_RATE=0`). A test of the defaults passes these
/// variables as `""` (unset: the default applies) or flags (which win).
pub const UNLIMITED_RATES: &[(&str, &str)] =
    &[("TETHER_RATE_LIMIT", "0"), ("TETHER_MEMBERSHIP_RATE", "0")];

/// How long a process may take to answer `/ready` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A token for `user` signed with `secret`, valid for one hour.
pub fn token(secret: &str, user: &str) -> String {
    auth::issue(&Secret::new(secret.as_bytes().to_vec()), user, 3600)
        .unwrap_or_else(|e| panic!("issuing a token for {user:?}: {e}"))
}

/// A token for `user` signed with `secret` that expired `ago_secs` ago.
pub fn expired_token(secret: &str, user: &str, ago_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    auth::issue_raw(
        &Secret::new(secret.as_bytes().to_vec()),
        user,
        now - ago_secs,
    )
    .unwrap_or_else(|e| panic!("issuing a token for {user:?}: {e}"))
}

/// Logging for the test process itself: nothing to set up (the harness
/// reports through panics and stderr); kept so tests can call it uniformly.
pub fn init_logging() {}

mod db;
mod http;
mod procs;
mod sse;
mod ws;

// Each test file uses part of the harness.
#[allow(unused_imports)]
pub use db::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use procs::*;
#[allow(unused_imports)]
pub use sse::*;
#[allow(unused_imports)]
pub use ws::*;

// ---------------------------------------------------------------------------
// Condition waits

/// Polls `cond` every `poll` until it returns true (→ true) or `timeout`
/// passes (→ false). `cond` is always tried at least once.
pub fn wait_until(timeout: Duration, poll: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(poll.min(deadline - now));
    }
}

/// [`wait_until`] for async conditions (sleeps with `tokio::time::sleep`).
pub async fn wait_until_async<F, Fut>(timeout: Duration, poll: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// Runs `f` on a fresh OS thread and returns its result (re-raising its
/// panic), so blocking code such as the `postgres` crate never runs on a
/// tokio runtime thread.
fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// An external program a test needs (`/usr/sbin/haproxy`...), or `None`
/// after printing `SKIPPED <test>: ...` to stderr; under
/// `TETHER_REQUIRE_ALL=1` (as in .ci/run) a missing one fails the test
/// instead, so CI cannot skip what it was meant to run.
pub fn tool_or_skip(path: &str, package: &str, test: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("TETHER_REQUIRE_ALL").as_deref() != Ok("1"),
        "{} is not installed (apt-get install {package}) and TETHER_REQUIRE_ALL=1",
        path.display()
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {} not installed (apt-get install {package})",
        path.display()
    );
    None
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------
// Helpers the end-to-end test files share

/// A token for `user` signed with [`TEST_SECRET`].
pub fn tok(user: &str) -> String {
    token(TEST_SECRET, user)
}

/// Sends a message as `user` over HTTP with `client_msg_id` (its body
/// names the id); returns the status (201 new, 200 a retry of a stored
/// one) and the event. Panics on any other status.
pub async fn send_message(
    addr: SocketAddr,
    user: &str,
    c: i64,
    client_msg_id: &str,
) -> (u16, Value) {
    let r = http(
        addr,
        "POST",
        &format!("/v1/conversations/{c}/messages"),
        Some(&tok(user)),
        Some(&serde_json::json!({"body": format!("body of {client_msg_id}"), "client_msg_id": client_msg_id})),
    )
    .await;
    assert!(
        r.status == 201 || r.status == 200,
        "{}: {}",
        r.status,
        r.body
    );
    (r.status, r.json())
}

/// Creates a conversation as `creator` with `members` (over HTTP); returns
/// its id. Panics unless the answer is 201.
pub async fn create_conversation<S: AsRef<str>>(
    addr: SocketAddr,
    creator: &str,
    members: &[S],
) -> i64 {
    let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
    let r = http(
        addr,
        "POST",
        "/v1/conversations",
        Some(&tok(creator)),
        Some(&serde_json::json!({ "members": members, "title": "t" })),
    )
    .await;
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.json()["id"].as_i64().unwrap()
}

/// A worker's `/metrics` text.
pub async fn metrics_of(addr: SocketAddr) -> String {
    http(addr, "GET", "/metrics", None, None).await.body
}

/// The value of the metric line `name{...} v` in `text`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Reads events into `last` (highest seq per conversation, dropping
/// repeats) until every conversation in `want` reached its seq; a gap or a
/// stall fails the test.
pub async fn read_until_seqs(
    ws: &mut WsClient,
    last: &mut std::collections::HashMap<i64, i64>,
    want: &std::collections::HashMap<i64, i64>,
    who: &str,
    timeout: Duration,
) {
    while want
        .iter()
        .any(|(c, s)| last.get(c).copied().unwrap_or(0) < *s)
    {
        let v = ws
            .recv_until(timeout, |v| v["type"] == "event")
            .await
            .unwrap_or_else(|| panic!("{who}: stalled at {last:?}, want {want:?}"));
        let c = v["conversation_id"].as_i64().unwrap();
        let s = v["seq"].as_i64().unwrap();
        let l = last.entry(c).or_insert(0);
        assert!(s <= *l + 1, "{who}: gap in {c}: {s} after {l}");
        if s == *l + 1 {
            *l = s;
        }
    }
}

/// How long the shared WebSocket helpers wait.
const WS_WAIT: Duration = Duration::from_secs(20);

/// Connects `user` to a worker and reads through `synced`; returns the
/// client and the backlog's events.
pub async fn ws_connect(w: &WorkerProc, user: &str) -> (WsClient, Vec<Value>) {
    let mut c = WsClient::connect(&w.ws_url(), &tok(user))
        .await
        .expect("connect");
    let backlog = c.read_until_synced(WS_WAIT).await;
    (c, backlog)
}

/// Reads frames until `pred` holds for an event frame; panics on timeout.
pub async fn recv_event(c: &mut WsClient, pred: impl Fn(&Value) -> bool) -> Value {
    c.recv_until(WS_WAIT, |v| v["type"] == "event" && pred(v))
        .await
        .expect("expected event did not arrive")
}

/// The seqs of event frames.
pub fn event_seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

/// Reads events of conversation `c` until seq `upto`, checking order and
/// contiguity (dropping duplicates); returns the seqs seen once each.
pub async fn receive_upto(ws: &mut WsClient, c: i64, mut last: i64, upto: i64, who: &str) -> i64 {
    while last < upto {
        let v = ws
            .recv_until(Duration::from_secs(60), |v| {
                v["type"] == "event" && v["conversation_id"] == c
            })
            .await
            .unwrap_or_else(|| panic!("{who}: stalled at {last} of {upto}"));
        let s = v["seq"].as_i64().unwrap();
        assert!(s <= last + 1, "{who}: gap: {s} after {last}");
        last = last.max(s);
    }
    last
}
