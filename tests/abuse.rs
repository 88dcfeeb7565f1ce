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

#[path = "abuse/flood.rs"]
mod flood;
#[path = "abuse/tokens.rs"]
mod tokens;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_testkit::*;
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
