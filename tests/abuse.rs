//! Abuse resistance by default, end to end: the real `tether` and
//! `tether-worker` binaries, a throwaway PostgreSQL per test, real
//! WebSocket.
//!
//! - weak secrets (empty, short, placeholders, the example file's value)
//!   are refused at start with one line and exit 2; `tether secret` makes
//!   a good one;
//! - dev mode's PostgreSQL is closed to other local users (no TCP, a
//!   socket directory only its user enters; root only, else skipped);
//! - one user cannot take every connection (429 `too_many_connections`);
//! - the control-character flood: the worker's RSS stays within the
//!   recent-frames cache bound plus 32 MiB and falls back afterwards;
//! - a trickled request body gets 408 and the connection is closed;
//! - /demo/ sends its protective headers;
//! - rate limits are on by default (sends, membership writes) and a
//!   conversation's members are capped (422 `too_many_members`);
//! - RS256 and ES256 tokens under `--token-public-key`, with `nbf`, `iss`,
//!   `aud`, and the rejections (alg none, algorithm confusion, expiry).
//!
//! (The token as a WebSocket subprotocol is tested in tests/integrity.rs.)

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

/// Runs `cmd` to its exit (at most 30 s); its status code and output.
fn run_to_exit(name: &str, mut cmd: Command) -> (Option<i32>, String) {
    cmd.env_remove("TETHER_SECRET").env_remove("DATABASE_URL");
    let mut p = Proc::spawn(name, cmd);
    let status = p
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{name} did not exit:\n{}", p.log_contents()));
    (status.code(), p.log_contents())
}

/// The value `systemd/tether.env.example` gives TETHER_SECRET ("" if none).
fn example_secret() -> String {
    let example = include_str!("../systemd/tether.env.example");
    let line = example
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .find(|l| l.starts_with("TETHER_SECRET="))
        .expect("the example names TETHER_SECRET");
    line["TETHER_SECRET=".len()..].to_string()
}

#[test]
fn weak_secrets_are_refused_at_start_and_tether_secret_makes_a_good_one() {
    let mut weak = vec![
        String::new(),
        "CHANGE-ME".to_string(),
        "changeme".to_string(),
        "secret".to_string(),
        "password".to_string(),
        "x".repeat(31),
    ];
    weak.push(example_secret());
    for value in &weak {
        let worker = {
            let mut c = Command::new(env!("CARGO_BIN_EXE_tether-worker"));
            c.args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "postgres://127.0.0.1:1/x",
            ])
            .arg(format!("--secret={value}"));
            c
        };
        let tether = {
            let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
            c.args(["--listen", "127.0.0.1:0", "--workers", "1"])
                .args(["--database-url", "postgres://127.0.0.1:1/x"])
                .arg(format!("--secret={value}"));
            c
        };
        let token = {
            let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
            c.args(["token", "alice"]).arg(format!("--secret={value}"));
            c
        };
        for (name, cmd) in [
            ("tether-worker", worker),
            ("tether", tether),
            ("tether-token", token),
        ] {
            let (code, out) = run_to_exit(name, cmd);
            assert_eq!(code, Some(2), "{name} with secret {value:?}: {out}");
            let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{name}: one line, got {out:?}");
            assert!(
                lines[0].contains("TETHER_SECRET") && lines[0].contains("tether secret"),
                "{name}: the line names the variable and the remedy: {out:?}"
            );
            if value.len() > 3 && !"tether secret".contains(value.to_lowercase().as_str()) {
                assert!(
                    !out.contains(value.as_str()),
                    "{name} printed the secret: {out:?}"
                );
            }
        }
    }
    // The environment variable is checked like the flag.
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether-worker"));
    c.args([
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        "postgres://127.0.0.1:1/x",
    ]);
    let mut p = {
        c.env_remove("DATABASE_URL")
            .env("TETHER_SECRET", "CHANGE-ME");
        Proc::spawn("tether-worker-env", c)
    };
    let status = p.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(2), "{}", p.log_contents());

    // `tether secret`: 32 random bytes in hex, different each time, and a
    // worker runs with one.
    let secret_of = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("secret")
            .output()
            .expect("tether secret");
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (a, b) = (secret_of(), secret_of());
    assert_ne!(a, b);
    for s in [&a, &b] {
        assert_eq!(s.len(), 64, "{s}");
        assert!(s.bytes().all(|c| c.is_ascii_hexdigit()), "{s}");
    }
    let db = TestDb::new();
    let w = WorkerProc::spawn(&db.url(), &a, &[], &[]);
    let r = http_blocking(
        w.addr(),
        "GET",
        "/v1/conversations",
        Some(&token(&a, "alice")),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// psql: on PATH or in Debian's versioned directory.
fn psql() -> Option<String> {
    if Command::new("psql").arg("--version").output().is_ok() {
        return Some("psql".into());
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().map(|p| p.display().to_string())
}

#[test]
fn dev_mode_postgres_is_closed_to_other_local_users() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED dev_mode_postgres_is_closed_to_other_local_users: not root (runuser -u nobody needs root)");
        return;
    }
    let psql = psql().expect("psql is installed with the PostgreSQL server binaries");
    let data = tempfile::tempdir().unwrap();
    // The postgres user must reach <data>/pg (the data dir itself is 0711).
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let data_dir = data.path().join("tether");
    let mut cluster = ClusterProc::spawn(
        &["--workers", "1", "--data-dir", data_dir.to_str().unwrap()],
        &[],
    );
    let socket_dir = data_dir.join("pg/pg-run");
    let port: u16 = std::fs::read_dir(&socket_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(".s.PGSQL.")?
                .parse()
                .ok()
        })
        .next()
        .unwrap_or_else(|| panic!("no socket in {}", socket_dir.display()));
    let port_s = port.to_string();
    // No TCP listener at all.
    let tcp = std::net::TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    );
    assert!(tcp.is_err(), "PostgreSQL listens on TCP port {port}");
    let sql = ["-U", "postgres", "-d", "postgres", "-w", "-c", "SELECT 1"];
    let as_nobody = |host: &str| {
        Command::new("runuser")
            .args(["-u", "nobody", "--", &psql, "-h", host, "-p", &port_s])
            .args(sql)
            .current_dir("/")
            .output()
            .expect("runuser")
    };
    for host in ["127.0.0.1", socket_dir.to_str().unwrap()] {
        let out = as_nobody(host);
        assert!(
            !out.status.success(),
            "nobody reached the dev database via {host}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        eprintln!(
            "nobody via {host}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Its own user (root can enter anything) still gets in: the refusal
    // above is the access rule, not a server that is down.
    let out = Command::new(&psql)
        .args(["-h", socket_dir.to_str().unwrap(), "-p", &port_s])
        .args(sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A clean stop takes the private PostgreSQL down with it.
    cluster.signal(libc::SIGTERM);
    assert!(cluster.wait_exit(T).is_some(), "tether did not exit");
    assert!(!data_dir.join("pg/pgdata/postmaster.pid").exists());
}

async fn ws_connect_status(ws_url: &str, token: &str) -> Result<WsClient, ConnectError> {
    let mut c = WsClient::connect(ws_url, token).await?;
    match c.next_event(T).await {
        WsEvent::Json(v) if v["type"] == "hello" => Ok(c),
        other => Err(ConnectError::Other(format!("no hello: {other:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_take_every_connection() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--max-connections-per-user", "3"],
        &[],
    );
    let mut alice = Vec::new();
    for _ in 0..3 {
        alice.push(ws_connect_status(&w.ws_url(), &tok("alice")).await.unwrap());
    }
    let refused = match WsClient::connect(&w.ws_url(), &tok("alice")).await {
        Err(ConnectError::Http { status, body }) => (status, body),
        Ok(_) => panic!("a 4th connection of alice was accepted"),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(refused.0, 429, "{}", refused.1);
    assert!(refused.1.contains("too_many_connections"), "{}", refused.1);
    // Other users are unaffected.
    let _bob = ws_connect_status(&w.ws_url(), &tok("bob")).await.unwrap();
    // A slot comes back when a connection closes.
    let mut first = alice.remove(0);
    first.close(1000).await;
    first.wait_close(T).await;
    let url = w.ws_url();
    let back = wait_until_async(T, Duration::from_millis(50), || {
        let url = url.clone();
        async move {
            match ws_connect_status(&url, &tok("alice")).await {
                Ok(c) => {
                    drop(c);
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(back, "alice could not connect again after closing one");
}

/// VmRSS of `pid`, in bytes (`None` once it is gone).
fn try_rss(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(kb * 1024)
}

fn rss(pid: i32) -> u64 {
    try_rss(pid).expect("the worker's VmRSS")
}

/// The `seq` of an event frame, without parsing its (large) body.
fn seq_of(text: &str) -> Option<i64> {
    if !text.starts_with("{\"type\":\"event\"") {
        return None;
    }
    let at = text.find("\"seq\":")? + 6;
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// How far each live reader of the flood has read (the highest seq).
type Progress = Arc<Vec<AtomicI64>>;

/// Frames the sender may be ahead of the slowest live reader: the test's
/// own (unoptimized) clients read slower than the worker writes, and a
/// reader further behind than its queue's bytes is cut with 1013, which is
/// another test's subject (tests/failures.rs). 16 frames are about 4 MiB.
const WINDOW: i64 = 16;

/// Reads from `url` until the event with seq `last` arrived and, for the
/// sender, `sent` for every frame of `outgoing`; records progress in
/// `progress[slot]`. Returns (events, sent).
async fn read_flood(
    url: String,
    last: i64,
    progress: Option<(Progress, usize)>,
    outgoing: Option<Vec<String>>,
) -> (i64, usize) {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let acks = outgoing.as_ref().map_or(0, Vec::len);
    let sender = outgoing.map(|frames| {
        let progress = progress
            .clone()
            .expect("the sender paces itself by the readers")
            .0;
        tokio::spawn(async move {
            for (i, f) in frames.into_iter().enumerate() {
                // Message i becomes seq i + 2 (seq 1 is the creation).
                let ahead = |p: &Progress| {
                    let slowest = p
                        .iter()
                        .map(|a| a.load(Ordering::Acquire))
                        .min()
                        .unwrap_or(0);
                    i as i64 + 2 - slowest <= WINDOW
                };
                let deadline = Instant::now() + Duration::from_secs(120);
                while !ahead(&progress) {
                    assert!(Instant::now() < deadline, "the readers stopped reading");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tx.send(Message::Text(f.into())).await.expect("send");
            }
            tx
        })
    });
    let (mut events, mut sent, mut next) = (0i64, 0usize, 1i64);
    while next <= last || sent < acks {
        let m = tokio::time::timeout(Duration::from_secs(120), rx.next())
            .await
            .expect("the flood stalled")
            .expect("connection ended")
            .expect("read");
        let Message::Text(t) = m else { continue };
        if let Some(seq) = seq_of(t.as_str()) {
            assert_eq!(seq, next, "in order, no gaps");
            if let Some((p, slot)) = &progress {
                p[*slot].store(seq, Ordering::Release);
            }
            next += 1;
            events += 1;
        } else if t.as_str().contains("\"type\":\"sent\"") {
            sent += 1;
        } else if t.as_str().contains("\"type\":\"error\"") {
            panic!("error during the flood: {t}");
        }
    }
    if let Some(s) = sender {
        drop(s.await.unwrap());
    }
    (events, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_character_flood_stays_within_the_cache_bound() {
    const MIB: u64 = 1024 * 1024;
    const N: usize = 1100;
    // A cache smaller than the default (64 MiB), so that what stays after
    // the flood (the cache) is clearly apart from what went (everything else).
    let cache: u64 = 16 * MIB;
    let cache_arg = cache.to_string();
    let db = TestDb::new_async().await;
    // The flood is one user's: this test is about memory, not the send rate.
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--rate-limit", "0", "--recent-cache-bytes", &cache_arg],
        &[],
    );
    let pid = w.pid();
    let c = create_conversation(w.addr(), "alice", &["bob", "carol", "dave"]).await;
    let url = |u: &str| format!("{}?token={}", w.ws_url(), tok(u));
    // Warm up (connections, pools), then the baseline.
    for u in ["alice", "bob", "carol", "dave"] {
        let mut x = WsClient::connect(&w.ws_url(), &tok(u)).await.unwrap();
        x.read_until_synced(T).await;
    }
    let baseline = rss(pid);

    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(now) = try_rss(pid) else { return };
                peak.fetch_max(now, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // 43 KB of control characters: each frame is about 258 KB of JSON.
    let body = "\u{1}".repeat(43_000);
    let frames: Vec<String> = (0..N)
        .map(|i| {
            json!({"type":"send","conversation_id":c,"body":body,"client_msg_id":format!("f{i}")})
                .to_string()
        })
        .collect();
    assert!(frames[0].len() > 250_000);
    let last = 1 + N as i64;
    let started = Instant::now();
    let progress: Progress = Arc::new((0..3).map(|_| AtomicI64::new(0)).collect());
    let p = |slot| Some((progress.clone(), slot));
    let bob = tokio::spawn(read_flood(url("bob"), last, p(0), None));
    let carol = tokio::spawn(read_flood(url("carol"), last, p(1), None));
    let alice = tokio::spawn(read_flood(url("alice"), last, p(2), Some(frames)));
    assert_eq!(alice.await.unwrap(), (last, N));
    assert_eq!(bob.await.unwrap().0, last);
    assert_eq!(carol.await.unwrap().0, last);
    // dave replays it all as backlog (byte-bounded pages, the cache).
    assert_eq!(read_flood(url("dave"), last, None, None).await.0, last);
    let flood_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "flood: {N} messages of 43 KB control characters in {flood_secs:.1} s; RSS baseline {:.1} MiB, peak {:.1} MiB (+{:.1} MiB; bound: cache {} MiB + 32 MiB)",
        baseline as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        growth as f64 / MIB as f64,
        cache / MIB
    );
    assert!(
        growth <= cache + 32 * MIB,
        "RSS grew by {} MiB",
        growth / MIB
    );
    // Everyone has left: what stays is the cache (at most its bound) and
    // a few MiB, not the flood.
    let mut after = 0;
    let fell = wait_until(T, Duration::from_millis(100), || {
        after = rss(pid);
        after.saturating_sub(baseline) <= cache + 12 * MIB
    });
    eprintln!(
        "flood: RSS after the clients left {:.1} MiB (+{:.1} MiB over the baseline)",
        after as f64 / MIB as f64,
        after.saturating_sub(baseline) as f64 / MIB as f64
    );
    assert!(
        fell,
        "RSS stayed at +{} MiB",
        after.saturating_sub(baseline) / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_the_connection_closes() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--body-timeout-ms", "1500"], &[]);
    let stream = tokio::net::TcpStream::connect(w.addr()).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        tok("alice")
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    // One byte every 200 ms (the body would take 20 s) until the server
    // answers or stops taking them.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(T, async {
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection stayed open: {}",
        String::from_utf8_lossy(&buf)
    );
    trickle.abort();
    let response = parse_response(&buf, true)
        .unwrap()
        .expect("a whole response");
    assert_eq!(response.status, 408, "{}", response.body);
    assert_eq!(response.json()["error"], "request_timeout");
    // Nothing was created.
    let list = http(
        w.addr(),
        "GET",
        "/v1/conversations",
        Some(&tok("alice")),
        None,
    )
    .await;
    assert_eq!(list.json()["conversations"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_sends_protective_headers() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], &[]);
    for path in ["/demo/", "/demo/app.js", "/demo/tether-client.js"] {
        let r = http(w.addr(), "GET", path, None, None).await;
        assert_eq!(r.status, 200, "{path}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        for directive in [
            "default-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                csp.split(';').any(|d| d.trim() == directive),
                "{path}: {directive} not in {csp:?}"
            );
        }
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
    }
}

/// The defaults, not the harness's unlimited rates.
const DEFAULT_RATES: &[(&str, &str)] = &[("TETHER_RATE_LIMIT", ""), ("TETHER_MEMBERSHIP_RATE", "")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_on_by_default() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &[], DEFAULT_RATES);
    // Membership writes: 10/s, burst 100, per user.
    let (mut created, mut refused, mut retry) = (0u32, 0u32, None);
    let started = Instant::now();
    for i in 0..200 {
        let body = json!({"members": ["bob"], "title": format!("c{i}")});
        let r = http(
            w.addr(),
            "POST",
            "/v1/conversations",
            Some(&tok("alice")),
            Some(&body),
        )
        .await;
        match r.status {
            201 => created += 1,
            429 => {
                refused += 1;
                assert_eq!(r.json()["error"], "rate_limited");
                retry = retry.or(r.header("retry-after").map(str::to_owned));
                assert!(r.json()["retry_after"].as_u64().unwrap() >= 1);
            }
            s => panic!("{s}: {}", r.body),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(
        f64::from(created) <= 100.0 + 10.0 * secs + 1.0,
        "{created} creates in {secs:.1} s"
    );
    assert!(
        refused > 0 && retry.is_some(),
        "{created} created, none refused in {secs:.1} s"
    );
    // Other users are unaffected.
    let c = create_conversation(w.addr(), "bob", &["alice"]).await;

    // Sends: 50/s, burst 200, per user (over WebSocket here).
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;
    let n = 700;
    let started = Instant::now();
    for i in 0..n {
        bob.send_json(
            &json!({"type":"send","conversation_id":c,"body":"x","client_msg_id":format!("m{i}")}),
        )
        .await;
    }
    let (mut sent, mut limited) = (0u32, 0u32);
    while sent + limited < n {
        let v = bob.recv_json(T).await.expect("a reply for every send");
        match v["type"].as_str() {
            Some("sent") => sent += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert!(v["retry_after"].as_u64().unwrap() >= 1);
                limited += 1;
            }
            _ => {}
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(
        f64::from(sent) <= 200.0 + 50.0 * secs + 1.0,
        "{sent} sends in {secs:.1} s"
    );
    assert!(limited > 0, "{sent} sent, none limited in {secs:.1} s");
    let m = metrics_of(w.addr()).await;
    assert!(metric(&m, "tether_rate_limited_total") >= f64::from(limited + refused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_have_at_most_max_members() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--max-members", "3"], &[]);
    let too_many = json!({"members": ["b", "c", "d"]});
    let r = http(
        w.addr(),
        "POST",
        "/v1/conversations",
        Some(&tok("a")),
        Some(&too_many),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"], "too_many_members");
    let c = create_conversation(w.addr(), "a", &["b"]).await;
    let add = |u: &'static str| {
        let addr = w.addr();
        async move {
            let path = format!("/v1/conversations/{c}/members");
            http(
                addr,
                "POST",
                &path,
                Some(&tok("a")),
                Some(&json!({"user": u})),
            )
            .await
        }
    };
    assert_eq!(add("c").await.status, 200);
    let r = add("d").await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"], "too_many_members");
    // Nothing was written: created, c joined; no member.joined for d.
    let path = format!("/v1/conversations/{c}/events");
    let events = http(w.addr(), "GET", &path, Some(&tok("a")), None)
        .await
        .json();
    assert_eq!(events["events"].as_array().unwrap().len(), 2, "{events}");
}

mod idp {
    //! An identity provider of the test's own: key pairs made here, never
    //! stored anywhere but a temp dir.
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    pub struct Idp {
        pub alg: Algorithm,
        private: EncodingKey,
        pub public_pem: String,
    }

    impl Idp {
        pub fn rsa() -> Idp {
            let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
            let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
            Idp {
                alg: Algorithm::RS256,
                private: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                public_pem: private
                    .to_public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap(),
            }
        }

        pub fn ec() -> Idp {
            let private = p256::SecretKey::random(&mut rand_core::OsRng);
            let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
            Idp {
                alg: Algorithm::ES256,
                private: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
                public_pem: private
                    .public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap(),
            }
        }

        pub fn sign(&self, claims: serde_json::Value) -> String {
            encode(&Header::new(self.alg), &claims, &self.private).unwrap()
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with any header and claims, HMAC-signed with `key`.
fn forge(header: &str, claims: &Value, key: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let h = URL_SAFE_NO_PAD.encode(header);
    let p = URL_SAFE_NO_PAD.encode(claims.to_string());
    let s = URL_SAFE_NO_PAD.encode(tether_protocol::auth::hs256(
        key,
        format!("{h}.{p}").as_bytes(),
    ));
    format!("{h}.{p}.{s}")
}

async fn status_with(addr: SocketAddr, token: &str) -> u16 {
    http(addr, "GET", "/v1/conversations", Some(token), None)
        .await
        .status
}

async fn hello_user(ws_url: &str, token: &str) -> Result<String, ConnectError> {
    let (mut c, _) = WsClient::connect_with_subprotocol(ws_url, token).await?;
    match c.next_event(T).await {
        WsEvent::Json(v) if v["type"] == "hello" => Ok(v["user"].as_str().unwrap().to_string()),
        other => Err(ConnectError::Other(format!("{other:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_tokens_of_an_identity_provider() {
    let db = TestDb::new_async().await;
    let keys = tempfile::tempdir().unwrap();
    let (rsa, ec) = (idp::Idp::rsa(), idp::Idp::ec());
    let rsa_path = keys.path().join("idp-rsa.pem");
    let ec_path = keys.path().join("idp-ec.pem");
    std::fs::write(&rsa_path, &rsa.public_pem).unwrap();
    std::fs::write(&ec_path, &ec.public_pem).unwrap();
    let a = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--token-public-key", rsa_path.to_str().unwrap()],
        &[],
    );
    let b = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &[],
        &[
            ("TETHER_TOKEN_PUBLIC_KEY", ec_path.to_str().unwrap()),
            ("TETHER_TOKEN_ISSUER", "https://idp.test"),
            ("TETHER_TOKEN_AUDIENCE", "tether"),
        ],
    );
    let exp = now() + 3600;
    // A: RS256 over REST and WebSocket; our own HS256 still works.
    let alice = rsa.sign(json!({"sub": "alice", "exp": exp}));
    assert_eq!(status_with(a.addr(), &alice).await, 200);
    assert_eq!(hello_user(&a.ws_url(), &alice).await.unwrap(), "alice");
    assert_eq!(status_with(a.addr(), &tok("bob")).await, 200);
    let refused = [
        (
            "expired",
            rsa.sign(json!({"sub": "alice", "exp": now() - 10})),
        ),
        (
            "nbf in the future",
            rsa.sign(json!({"sub": "alice", "exp": exp, "nbf": exp - 60})),
        ),
        ("no exp", rsa.sign(json!({"sub": "alice"}))),
        (
            "ES256 without its key",
            ec.sign(json!({"sub": "alice", "exp": exp})),
        ),
        (
            "HS256 signed with the public key",
            forge(
                r#"{"alg":"HS256","typ":"JWT"}"#,
                &json!({"sub": "mallory", "exp": exp}),
                rsa.public_pem.as_bytes(),
            ),
        ),
        ("alg none", {
            let t = forge(
                r#"{"alg":"none"}"#,
                &json!({"sub": "mallory", "exp": exp}),
                b"",
            );
            format!("{}.", t.rsplit_once('.').unwrap().0)
        }),
        ("a tampered RS256 token", {
            let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
            parts[1] = forge("{}", &json!({"sub": "mallory", "exp": exp}), b"")
                .split('.')
                .nth(1)
                .unwrap()
                .to_string();
            parts.join(".")
        }),
    ];
    for (what, t) in &refused {
        assert_eq!(status_with(a.addr(), t).await, 401, "{what}");
        let ws = WsClient::connect(&a.ws_url(), t).await;
        assert_eq!(ws.err().and_then(|e| e.status()), Some(401), "{what}");
    }
    // B: ES256 with the issuer and audience it requires.
    let good =
        ec.sign(json!({"sub": "carol", "exp": exp, "iss": "https://idp.test", "aud": "tether"}));
    assert_eq!(status_with(b.addr(), &good).await, 200);
    assert_eq!(hello_user(&b.ws_url(), &good).await.unwrap(), "carol");
    for (what, claims) in [
        (
            "wrong audience",
            json!({"sub": "carol", "exp": exp, "iss": "https://idp.test", "aud": "other"}),
        ),
        (
            "no issuer",
            json!({"sub": "carol", "exp": exp, "aud": "tether"}),
        ),
        (
            "wrong issuer",
            json!({"sub": "carol", "exp": exp, "iss": "https://evil.test", "aud": "tether"}),
        ),
    ] {
        assert_eq!(status_with(b.addr(), &ec.sign(claims)).await, 401, "{what}");
    }
    // The RS256 key is not B's.
    assert_eq!(status_with(b.addr(), &alice).await, 401);

    // A key that cannot be used stops the start, with one line.
    let not_a_key = keys.path().join("not-a-key.pem");
    std::fs::write(
        &not_a_key,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    for path in [Path::new("/nonexistent/idp.pem"), not_a_key.as_path()] {
        for bin in [
            env!("CARGO_BIN_EXE_tether-worker"),
            env!("CARGO_BIN_EXE_tether"),
        ] {
            let mut c = Command::new(bin);
            c.args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                "postgres://127.0.0.1:1/x",
            ])
            .args(["--secret", TEST_SECRET, "--token-public-key"])
            .arg(path);
            let (code, out) = run_to_exit("bad-key", c);
            assert_eq!(code, Some(2), "{bin} {}: {out}", path.display());
            assert!(out.contains("TETHER_TOKEN_PUBLIC_KEY"), "{out}");
        }
    }
}
