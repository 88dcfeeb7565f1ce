//! The end-to-end test harness: a throwaway PostgreSQL ([`TestDb`]), the
//! real binaries as child processes ([`Proc`], [`WorkerProc`],
//! [`ClusterProc`]), a small HTTP/1.1 client ([`http`]), a WebSocket client
//! ([`WsClient`]), tokens ([`token`]) and condition waits ([`wait_until`]).
//!
//! Each test file includes it with `mod support;` (or
//! `#[path = "support/mod.rs"] mod support;`) and uses only part of it.
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
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------
// TestDb

/// A throwaway PostgreSQL cluster (fsync off, 300 connections) with
/// `schema.sql` applied. Cheap to clone (shared); stopped and removed when
/// the last clone drops.
#[derive(Clone)]
pub struct TestDb {
    inner: Arc<DbInner>,
}

struct DbInner {
    pg: Mutex<PgCluster>,
    url: String,
}

impl TestDb {
    /// Starts the cluster and applies the schema. Blocking; callable from
    /// async tests too (see the module docs).
    pub fn new() -> TestDb {
        off_runtime(|| {
            let pg = PgCluster::start_temp(PgOptions {
                fsync: false,
                max_connections: 300,
                port: None,
            })
            .unwrap_or_else(|e| panic!("starting the test PostgreSQL: {e}"));
            let url = pg.url();
            let db = TestDb {
                inner: Arc::new(DbInner {
                    pg: Mutex::new(pg),
                    url,
                }),
            };
            tether_worker::store::apply_schema(&mut db.client())
                .unwrap_or_else(|e| panic!("applying schema.sql: {e}"));
            db
        })
    }

    /// [`TestDb::new`] via `spawn_blocking`.
    pub async fn new_async() -> TestDb {
        tokio::task::spawn_blocking(TestDb::new).await.unwrap()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    pub fn port(&self) -> u16 {
        self.pg().port()
    }

    fn pg(&self) -> std::sync::MutexGuard<'_, PgCluster> {
        self.inner.pg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fast shutdown: the database goes away (same port on [`TestDb::start`]).
    pub fn stop(&self) {
        self.try_stop()
            .unwrap_or_else(|e| panic!("stopping the test PostgreSQL: {e}"))
    }

    pub fn try_stop(&self) -> Result<(), PgError> {
        off_runtime(|| self.pg().stop())
    }

    /// Starts it again on the same port; returns once it accepts connections.
    pub fn start(&self) {
        self.try_start()
            .unwrap_or_else(|e| panic!("restarting the test PostgreSQL: {e}"))
    }

    pub fn try_start(&self) -> Result<(), PgError> {
        off_runtime(|| self.pg().start())
    }

    pub fn is_running(&self) -> bool {
        self.pg().is_running()
    }

    pub async fn stop_async(&self) {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.stop())
            .await
            .unwrap()
    }

    pub async fn start_async(&self) {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.start())
            .await
            .unwrap()
    }

    /// The server log's last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        self.pg().log_tail(lines)
    }

    /// A new blocking client. Use it only off the tokio runtime
    /// (`spawn_blocking`, [`TestDb::with_client`], or a sync test).
    pub fn client(&self) -> postgres::Client {
        self.try_client()
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.inner.url))
    }

    pub fn try_client(&self) -> Result<postgres::Client, postgres::Error> {
        let mut config: postgres::Config = self.inner.url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        config.connect(postgres::NoTls)
    }

    /// Runs `f` with a fresh client on a non-runtime thread.
    pub fn with_client<R: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> R + Send) -> R {
        off_runtime(|| f(&mut self.client()))
    }

    /// The first column of the first row of `sql` (an `int8`, `int4` or
    /// `int2`), e.g. `SELECT count(*) FROM events`.
    pub fn query_i64(&self, sql: &str) -> i64 {
        self.try_query_i64(sql)
            .unwrap_or_else(|e| panic!("query {sql:?}: {e}"))
    }

    /// Like [`TestDb::query_i64`], but connection and SQL errors are returned.
    pub fn try_query_i64(&self, sql: &str) -> Result<i64, postgres::Error> {
        off_runtime(|| {
            let row = self.try_client()?.query_one(sql, &[])?;
            row.try_get::<_, i64>(0)
                .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
                .or_else(|_| row.try_get::<_, i16>(0).map(i64::from))
        })
    }

    pub async fn query_i64_async(&self, sql: &str) -> i64 {
        let (db, sql) = (self.clone(), sql.to_string());
        tokio::task::spawn_blocking(move || db.query_i64(&sql))
            .await
            .unwrap()
    }

    /// Runs `sql` (one or more statements) with `batch_execute`.
    pub fn execute(&self, sql: &str) {
        off_runtime(|| {
            self.client()
                .batch_execute(sql)
                .unwrap_or_else(|e| panic!("executing {sql:?}: {e}"))
        })
    }

    pub async fn execute_async(&self, sql: &str) {
        let (db, sql) = (self.clone(), sql.to_string());
        tokio::task::spawn_blocking(move || db.execute(&sql))
            .await
            .unwrap()
    }
}

// ---------------------------------------------------------------------------
// Proc

/// A child process, SIGKILLed (with its process group) and reaped on drop.
/// Its stdout and stderr go to a log file; dropped while the test panics,
/// it prints the log's tail to stderr.
pub struct Proc {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    log_dir: Option<tempfile::TempDir>,
}

/// Lines of a process log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

impl Proc {
    /// Spawns `cmd` in its own process group (so dropping it also kills
    /// the processes it started), output to a log file.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let log_dir = tempfile::Builder::new()
            .prefix("tether-test-log-")
            .tempdir()
            .expect("creating a log dir");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("creating the log file");
        let log2 = log.try_clone().expect("dup of the log file");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        let keep = std::env::var_os("TETHER_TEST_KEEP_LOGS").is_some();
        let log_dir = if keep {
            eprintln!("{name} (pid {}) logs to {}", child.id(), log_path.display());
            let _ = log_dir.keep();
            None
        } else {
            Some(log_dir)
        };
        Proc {
            child,
            name: name.to_string(),
            status: None,
            log_path,
            log_dir,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the process; false if that
    /// failed (e.g. it is gone).
    pub fn signal(&self, sig: i32) -> bool {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), sig) == 0 }
    }

    /// Sends `sig` to the process's whole process group.
    pub fn signal_group(&self, sig: i32) -> bool {
        // SAFETY: as above.
        unsafe { libc::kill(-self.pid(), sig) == 0 }
    }

    /// The exit status if it has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_alive(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, Duration::from_millis(10), || {
            self.try_status().is_some()
        });
        self.status
    }

    /// [`Proc::wait_exit`] without blocking the runtime.
    pub async fn wait_exit_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs the process group and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        if self.status.is_none() {
            self.signal_group(libc::SIGKILL);
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait"));
        }
        self.status.unwrap()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_contents();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(20), || {
            self.log_contents().contains(needle)
        })
    }

    fn dump_log(&self) {
        eprintln!(
            "----- last {LOG_TAIL_LINES} lines of {} (pid {}, {}) -----\n{}\n----- end of {} -----",
            self.name,
            self.pid(),
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES),
            self.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        // The group too: a supervisor's workers must not outlive the test,
        // even when the supervisor itself has already exited.
        self.signal_group(libc::SIGKILL);
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        drop(self.log_dir.take());
    }
}

/// Environment variables of the test process that must not leak into the
/// processes under test.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("TETHER_")
                || matches!(
                    k,
                    "DATABASE_URL"
                        | "NOTIFY_SOCKET"
                        | "LISTEN_FDS"
                        | "LISTEN_PID"
                        | "LISTEN_FDNAMES"
                        | "WATCHDOG_USEC"
                        | "WATCHDOG_PID"
                )
            {
                cmd.env_remove(&key);
            }
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
}

/// Spawns what `make(port)` builds on a free port and waits for `/ready`
/// 200; retries with another port if the process died because the port
/// was taken meanwhile. Panics (printing the log) if it never gets ready.
fn spawn_ready(
    name: &str,
    wait: bool,
    mut make: impl FnMut(u16) -> (Command, SocketAddr),
) -> (Proc, SocketAddr) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (cmd, addr) = make(free_port());
        let mut proc = Proc::spawn(name, cmd);
        if !wait {
            return (proc, addr);
        }
        match wait_ready(&mut proc, addr, READY_TIMEOUT) {
            Ok(()) => return (proc, addr),
            Err(why) => {
                let log = proc.log_contents();
                if attempt < 3 && log.contains("in use") && !proc.is_alive() {
                    continue;
                }
                panic!("{name} at {addr} did not get ready: {why}");
            }
        }
    }
}

/// Polls `GET /ready` until it answers 200.
fn wait_ready(proc: &mut Proc, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(status) = proc.try_status() {
            return Err(format!("it exited ({status}); last: {last}"));
        }
        match http_blocking(addr, "GET", "/ready", None, None) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("{} {}", r.status, r.body),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?}; last: {last}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Sets `env` on a command.
fn add_env(cmd: &mut Command, env: &[(&str, &str)]) {
    for (k, v) in env {
        cmd.env(k, v);
    }
}

static WORKER_SEQ: AtomicU32 = AtomicU32::new(1);

// ---------------------------------------------------------------------------
// WorkerProc

/// A `tether-worker` started on its own (no supervisor), listening on a
/// free port of 127.0.0.1.
pub struct WorkerProc {
    pub proc: Proc,
    addr: SocketAddr,
    worker_id: String,
}

impl WorkerProc {
    /// `tether-worker --listen 127.0.0.1:PORT --database-url URL --secret S
    /// --worker-id wN EXTRA...` with `env`; returns once `/ready` is 200.
    pub fn spawn(
        db_url: &str,
        secret: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProc {
        Self::spawn_inner(db_url, secret, extra_args, env, true)
    }

    /// Like [`WorkerProc::spawn`] but does not wait for readiness (e.g. the
    /// database is down on purpose).
    pub fn spawn_no_wait(
        db_url: &str,
        secret: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProc {
        Self::spawn_inner(db_url, secret, extra_args, env, false)
    }

    fn spawn_inner(
        db_url: &str,
        secret: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        wait: bool,
    ) -> WorkerProc {
        let worker_id = format!("w{}", WORKER_SEQ.fetch_add(1, Ordering::Relaxed));
        let (proc, addr) = spawn_ready(&format!("tether-worker-{worker_id}"), wait, |port| {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether-worker"));
            scrub_env(&mut cmd);
            cmd.arg("--listen")
                .arg(addr.to_string())
                .arg("--database-url")
                .arg(db_url)
                .arg("--secret")
                .arg(secret)
                .arg("--worker-id")
                .arg(&worker_id)
                .args(extra_args);
            add_env(&mut cmd, UNLIMITED_RATES);
            add_env(&mut cmd, env);
            (cmd, addr)
        });
        WorkerProc {
            proc,
            addr,
            worker_id,
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Waits (again) until `/ready` answers 200, e.g. after the database
    /// came back.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        wait_ready(&mut self.proc, self.addr, timeout)
    }
}

impl std::ops::Deref for WorkerProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for WorkerProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

// ---------------------------------------------------------------------------
// ClusterProc

/// The supervisor `tether` with its workers.
pub struct ClusterProc {
    pub proc: Proc,
    addr: SocketAddr,
}

impl ClusterProc {
    /// `tether ARGS...` with `env`; if `args` has no `--listen`, the harness
    /// adds `--listen 127.0.0.1:PORT` with a free port. Returns once
    /// `/ready` is 200.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> ClusterProc {
        Self::spawn_inner(args, env, true)
    }

    /// Like [`ClusterProc::spawn`] but does not wait for readiness.
    pub fn spawn_no_wait(args: &[&str], env: &[(&str, &str)]) -> ClusterProc {
        Self::spawn_inner(args, env, false)
    }

    /// The usual start: `--database-url URL --secret S --workers N EXTRA...`.
    pub fn spawn_with(
        db_url: &str,
        secret: &str,
        workers: u32,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ClusterProc {
        let workers = workers.to_string();
        let mut args = vec![
            "--database-url",
            db_url,
            "--secret",
            secret,
            "--workers",
            &workers,
        ];
        args.extend_from_slice(extra_args);
        Self::spawn(&args, env)
    }

    fn spawn_inner(args: &[&str], env: &[(&str, &str)], wait: bool) -> ClusterProc {
        let given = listen_arg(args);
        let (proc, addr) = spawn_ready("tether", wait, |port| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
            scrub_env(&mut cmd);
            let addr = match given {
                Some(addr) => addr,
                None => {
                    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    cmd.arg("--listen").arg(addr.to_string());
                    addr
                }
            };
            cmd.args(args);
            add_env(&mut cmd, UNLIMITED_RATES);
            add_env(&mut cmd, env);
            (cmd, addr)
        });
        ClusterProc { proc, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Waits (again) until `/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        wait_ready(&mut self.proc, self.addr, timeout)
    }
}

impl std::ops::Deref for ClusterProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for ClusterProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// The address of a `--listen ADDR` / `--listen=ADDR` in `args`.
fn listen_arg(args: &[&str]) -> Option<SocketAddr> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if *a == "--listen" {
            it.next().copied()
        } else {
            a.strip_prefix("--listen=")
        };
        if let Some(v) = value {
            return Some(v.parse().unwrap_or_else(|e| panic!("--listen {v:?}: {e}")));
        }
    }
    None
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON (panics, quoting the body, if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response {} is not JSON ({e}): {:?}",
                self.status, self.body
            )
        })
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How long one HTTP exchange may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// `METHOD PATH` with an optional bearer token and JSON body. Panics on
/// I/O errors (use [`try_http_raw`] to observe them).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> HttpResponse {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let ct = body.as_ref().map(|_| "application/json");
    try_http_raw(addr, method, path, token, ct, body.as_deref())
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// Like [`http`] with an arbitrary body (malformed JSON, invalid UTF-8...)
/// sent as `Content-Type: application/json`.
pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    try_http_raw(
        addr,
        method,
        path,
        token,
        Some("application/json"),
        Some(body),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// The general form: returns I/O errors (connection refused, timeout...).
pub async fn try_http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> io::Result<HttpResponse> {
    let request = build_request(addr, method, path, token, content_type, body);
    send_request(addr, &request).await
}

/// Sends `request` (bytes as given, e.g. a deliberately broken request) and
/// reads the response.
pub async fn send_request(addr: SocketAddr, request: &[u8]) -> io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(response) = parse_response(&buf, n == 0)? {
                return Ok(response);
            }
        }
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP exchange timed out",
            ))
        })
}

/// A blocking [`try_http_raw`] (std sockets; usable outside any runtime).
pub fn http_blocking(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> io::Result<HttpResponse> {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let ct = body.as_ref().map(|_| "application/json");
    let request = build_request(addr, method, path, token, ct, body.as_deref());
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&request)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(response) = parse_response(&buf, n == 0)? {
            return Ok(response);
        }
    }
}

fn build_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    match body {
        Some(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        None if !matches!(method, "GET" | "HEAD") => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body.unwrap_or_default());
    request
}

/// Parses a response from `buf`: `Ok(None)` while incomplete (more bytes
/// needed), an error if `eof` came before it was complete or it is
/// malformed.
pub fn parse_response(buf: &[u8], eof: bool) -> io::Result<Option<HttpResponse>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let incomplete = |eof: bool| {
        if eof {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ))
        } else {
            Ok(None)
        }
    };
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return incomplete(eof);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("non-UTF-8 header"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_end + 4..];
    let body: Vec<u8> = if status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        match decode_chunked(rest).map_err(|e| bad(&e))? {
            Some(b) => b,
            None => return incomplete(eof),
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        if rest.len() < len {
            return incomplete(eof);
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

/// Decodes a chunked body: `Ok(None)` while incomplete.
fn decode_chunked(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size_hex, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[end + 2..];
            }
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        rest = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------
// WebSocket client

/// Why a WebSocket connection could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade request with a non-101 status.
    Http { status: u16, body: String },
    /// Anything else (connection refused, timeout, protocol error).
    Other(String),
}

impl ConnectError {
    /// The HTTP status of a refused upgrade (e.g. 401).
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Http { status, .. } => Some(*status),
            ConnectError::Other(_) => None,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Http { status, body } => {
                write!(f, "upgrade refused with HTTP {status}: {body}")
            }
            ConnectError::Other(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// One thing read from a WebSocket.
#[derive(Debug, Clone)]
pub enum WsEvent {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// The server sent a Close frame (its code, if any) or the connection
    /// ended (`None`).
    Closed(Option<u16>),
    /// Nothing within the timeout.
    Timeout,
}

/// How long a WebSocket handshake may take.
pub const WS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A WebSocket client speaking the contract's JSON frames.
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    /// The `hello` frame, once [`WsClient::read_until_synced`] (or
    /// [`WsClient::recv_json`]) has seen it.
    pub hello: Option<Value>,
    close_code: Option<u16>,
    closed: bool,
}

impl WsClient {
    /// Connects to `ws_url?token=TOKEN`.
    pub async fn connect(ws_url: &str, token: &str) -> Result<WsClient, ConnectError> {
        let sep = if ws_url.contains('?') { '&' } else { '?' };
        Self::connect_request(&format!("{ws_url}{sep}token={token}"), None).await
    }

    /// Connects to `ws_url` with `Authorization: Bearer TOKEN`.
    pub async fn connect_with_header(ws_url: &str, token: &str) -> Result<WsClient, ConnectError> {
        Self::connect_request(ws_url, Some(token)).await
    }

    /// Connects to `ws_url` as given (no token added).
    pub async fn connect_url(ws_url: &str) -> Result<WsClient, ConnectError> {
        Self::connect_request(ws_url, None).await
    }

    /// Connects offering `Sec-WebSocket-Protocol: tether.v1,
    /// tether.token.TOKEN` (the token out of the URL, as browsers do);
    /// returns the subprotocol the server chose too.
    pub async fn connect_with_subprotocol(
        ws_url: &str,
        token: &str,
    ) -> Result<(WsClient, Option<String>), ConnectError> {
        let mut request = ws_url
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad URL {ws_url}: {e}")))?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("tether.v1, tether.token.{token}")
                .parse()
                .map_err(|e| ConnectError::Other(format!("bad token: {e}")))?,
        );
        let (ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| ConnectError::Other(format!("connecting to {ws_url}: {e}")))?;
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((
            WsClient {
                ws,
                hello: None,
                close_code: None,
                closed: false,
            },
            chosen,
        ))
    }

    async fn connect_request(url: &str, bearer: Option<&str>) -> Result<WsClient, ConnectError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(format!("bad URL {url}: {e}")))?;
        if let Some(t) = bearer {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .map_err(|e| ConnectError::Other(format!("bad token: {e}")))?,
            );
        }
        let connecting = tokio_tungstenite::connect_async(request);
        let (ws, _response) = match tokio::time::timeout(WS_CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(ConnectError::Other(format!(
                    "connecting to {url} timed out"
                )))
            }
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ConnectError::Http {
                    status: response.status().as_u16(),
                    body,
                });
            }
            Ok(Err(e)) => return Err(ConnectError::Other(format!("connecting to {url}: {e}"))),
            Ok(Ok(pair)) => pair,
        };
        Ok(WsClient {
            ws,
            hello: None,
            close_code: None,
            closed: false,
        })
    }

    /// Sends one JSON text frame.
    pub async fn send_json(&mut self, value: &Value) {
        self.send_raw(Message::text(value.to_string())).await
    }

    /// Sends any frame (binary, oversized, ping, close...). Panics if the
    /// connection is gone (use `self.ws` directly to observe that).
    pub async fn send_raw(&mut self, message: Message) {
        self.ws
            .send(message)
            .await
            .unwrap_or_else(|e| panic!("sending a WebSocket frame: {e}"))
    }

    /// Sends a Close frame with `code`.
    pub async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.ws.send(Message::Close(Some(frame))).await;
    }

    /// The next data frame, a close, or a timeout. Ping/pong frames are
    /// skipped (tungstenite answers pings by itself).
    pub async fn next_event(&mut self, timeout: Duration) -> WsEvent {
        if self.closed {
            return WsEvent::Closed(self.close_code);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return WsEvent::Timeout,
                Ok(next) => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {text}"));
                    if self.hello.is_none() && value["type"] == "hello" {
                        self.hello = Some(value.clone());
                    }
                    return WsEvent::Json(value);
                }
                Some(Ok(Message::Binary(b))) => {
                    panic!("server sent a binary frame ({} bytes)", b.len())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    self.closed = true;
                    self.close_code = frame.map(|f| u16::from(f.code));
                    return WsEvent::Closed(self.close_code);
                }
                Some(Err(_)) | None => {
                    self.closed = true;
                    return WsEvent::Closed(self.close_code);
                }
            }
        }
    }

    /// The next JSON frame; `None` on timeout or when the connection closed
    /// (see [`WsClient::close_code`], [`WsClient::is_closed`]).
    pub async fn recv_json(&mut self, timeout: Duration) -> Option<Value> {
        match self.next_event(timeout).await {
            WsEvent::Json(v) => Some(v),
            WsEvent::Closed(_) | WsEvent::Timeout => None,
        }
    }

    /// Reads frames until one satisfies `pred` (returned) within `timeout`;
    /// the frames before it are dropped.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.recv_json(left).await?;
            if pred(&v) {
                return Some(v);
            }
        }
    }

    /// Reads `hello` (if not yet seen), then the backlog up to
    /// `{"type":"synced"}`, and returns the `event` frames of the backlog.
    /// Panics on timeout or close, showing what arrived.
    pub async fn read_until_synced(&mut self, timeout: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = Vec::new();
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WsEvent::Json(v) => match v["type"].as_str() {
                    Some("synced") => {
                        assert!(
                            self.hello.is_some(),
                            "synced before hello; frames: {seen:?}"
                        );
                        return events;
                    }
                    Some("hello") => {}
                    Some("event") => {
                        assert!(self.hello.is_some(), "event before hello: {v}");
                        events.push(v.clone());
                    }
                    _ => seen.push(v),
                },
                other => panic!(
                    "no synced within {timeout:?} ({other:?}); {} events, other frames: {seen:?}",
                    events.len()
                ),
            }
        }
    }

    /// Reads until the server closes (dropping data frames) and returns the
    /// close code; `None` if it did not close within `timeout` or closed
    /// without a code.
    pub async fn wait_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                WsEvent::Json(_) => continue,
                WsEvent::Closed(code) => return code,
                WsEvent::Timeout => return None,
            }
        }
    }

    /// The code of the Close frame the server sent, once one was read.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Whether the connection ended (Close frame read or stream ended).
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

// ---------------------------------------------------------------------------
// Helpers the end-to-end test files share

/// A token for `user` signed with [`TEST_SECRET`].
pub fn tok(user: &str) -> String {
    token(TEST_SECRET, user)
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

/// `(worker id, pid)` of every `sup: wN pid=P ready` line of a supervisor
/// log, in order.
pub fn ready_workers(log: &str) -> Vec<(String, i32)> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("sup: w")? + 5..];
            let (id, rest) = rest.split_once(" pid=")?;
            let (pid, rest) = rest.split_once(' ')?;
            if !rest.starts_with("ready") {
                return None;
            }
            Some((id.to_string(), pid.parse().ok()?))
        })
        .collect()
}
