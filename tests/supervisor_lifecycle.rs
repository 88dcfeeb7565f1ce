//! The supervisor's lifecycle end to end (docs/LIFECYCLE.md): the real
//! `tether` with real `tether-worker`s on a throwaway PostgreSQL, real
//! signals. sd_notify datagrams on a NOTIFY_SOCKET the test binds, a worker
//! SIGKILLed and replaced at once, the intensity limit, a SIGHUP roll under
//! load with nothing refused, SIGTERM closing clients with 1001 within
//! the drain time, and the drain delay (`/ready` 503 at once while the host
//! keeps serving; a second signal stops at once).

use serde_json::json;
use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry: look at its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z'))
        }
    }
}

/// The children of `pid` and their states (`R`, `S`, `Z`...).
fn children(pid: i32) -> Vec<(i32, char)> {
    let list =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .filter_map(|c| {
            let stat = std::fs::read_to_string(format!("/proc/{c}/stat")).ok()?;
            let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
            Some((c, state))
        })
        .collect()
}

fn health(addr: std::net::SocketAddr) -> serde_json::Value {
    let r = http_blocking(addr, "GET", "/health", None, None).expect("GET /health");
    r.json()
}

/// Datagrams received on `sock` until `pred` matches one (returned with all
/// that came before it), or `timeout`.
fn recv_until(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = pred(&msg);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn sd_notify_ready_reloading_stopping_and_watchdog() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut cluster = ClusterProc::spawn_with(
        &db.url(),
        TEST_SECRET,
        2,
        &["--drain-ms", "2000"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    assert!(
        recv_until(&sock, &mut seen, T, |m| m.lines().any(|l| l == "READY=1")),
        "no READY=1: {seen:?}"
    );
    let ready = seen.last().unwrap().clone();
    assert!(ready.contains("STATUS=2/2 workers ready"), "{ready:?}");
    let h = health(cluster.addr());
    assert_eq!(h["workers"]["configured"], 2, "{h}");
    assert_eq!(h["workers"]["alive"], 2, "{h}");

    // The watchdog: every WATCHDOG_USEC/2 = 100 ms.
    let mut wd = Vec::new();
    assert!(
        recv_until(&sock, &mut wd, Duration::from_secs(2), |m| m
            == "WATCHDOG=1\n"),
        "{wd:?}"
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 once rolled.
    assert!(cluster.signal(libc::SIGHUP));
    let mut reload = Vec::new();
    assert!(
        recv_until(&sock, &mut reload, T, |m| m.starts_with("RELOADING=1\n")),
        "{reload:?}"
    );
    let msg = reload.last().unwrap();
    let usec: u64 = msg
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    assert!(
        recv_until(&sock, &mut reload, T, |m| m.starts_with("READY=1\n")),
        "{reload:?}"
    );

    // SIGTERM: STOPPING=1, then exit 0.
    assert!(cluster.signal(libc::SIGTERM));
    let mut stop = Vec::new();
    assert!(
        recv_until(&sock, &mut stop, T, |m| m.starts_with("STOPPING=1\n")),
        "{stop:?}"
    );
    let status = cluster.wait_exit(T).expect("tether did not exit");
    assert_eq!(status.code(), Some(0), "{}", cluster.log_tail(40));
}

/// "At once" is checked by state, not by the clock: every restart delay
/// but the first is set far beyond the test's timeout, so a replacement
/// that shows up at all is one that was started without a delay.
#[test]
fn a_killed_worker_is_replaced_at_once_and_reaped() {
    let db = TestDb::new();
    let cluster = ClusterProc::spawn_with(
        &db.url(),
        TEST_SECRET,
        2,
        &[
            "--restart-backoff-ms",
            "600000",
            "--restart-backoff-max-ms",
            "600000",
        ],
        &[],
    );
    let sup = cluster.pid();
    assert!(wait_until(T, Duration::from_millis(20), || {
        health(cluster.addr())["workers"]["alive"] == 2 && children(sup).len() == 2
    }));
    let (pid, _) = children(sup)[0];

    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t0 = Instant::now();

    // The supervisor counts one restart and two serving workers again, and
    // the dead one is reaped: its children are exactly two live processes,
    // neither of them the killed one.
    let replaced = wait_until(T, Duration::from_millis(20), || {
        let h = health(cluster.addr());
        let kids = children(sup);
        h["workers"]["alive"] == 2
            && h["workers"]["restarts"] == 1
            && kids.len() == 2
            && kids.iter().all(|&(p, s)| p != pid && s != 'Z')
    });
    assert!(
        replaced,
        "worker pid {pid} not replaced: health {}, children {:?}\n{}",
        health(cluster.addr()),
        children(sup),
        cluster.log_tail(40)
    );
    eprintln!(
        "worker pid {pid} SIGKILLed -> replacement serving and the dead one reaped: seen after {} ms",
        t0.elapsed().as_millis()
    );
    assert!(!alive(pid));
}

#[test]
fn workers_that_die_at_start_make_the_supervisor_give_up() {
    let db = TestDb::new();
    let started = Instant::now();
    let mut cluster = ClusterProc::spawn_no_wait(
        &[
            "--database-url",
            &db.url(),
            "--secret",
            TEST_SECRET,
            "--workers",
            "2",
            "--worker-bin",
            "/bin/false",
            "--max-restarts",
            "4",
            "--restart-backoff-ms",
            "20",
            "--restart-backoff-max-ms",
            "100",
        ],
        &[],
    );
    let status = cluster.wait_exit(T).expect("tether did not give up");
    assert_eq!(status.code(), Some(1), "{}", cluster.log_tail(40));
    // It gave up (exit 1). How many deaths and which delays lead there is
    // the rules' business, unit-tested in supervisor/src/cluster/tests.rs
    // without processes.
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// The worker's own fault injection (test builds only).
#[cfg(feature = "fault-injection")]
#[test]
fn a_worker_fault_at_start_makes_the_supervisor_give_up() {
    let db = TestDb::new();
    let mut cluster = ClusterProc::spawn_no_wait(
        &[
            "--database-url",
            &db.url(),
            "--secret",
            TEST_SECRET,
            "--workers",
            "1",
            "--max-restarts",
            "3",
            "--restart-backoff-max-ms",
            "100",
        ],
        &[("TETHER_FAULT", "die-at-start")],
    );
    let status = cluster.wait_exit(T).expect("tether did not give up");
    assert_eq!(status.code(), Some(1), "{}", cluster.log_tail(40));
}

#[test]
fn sighup_replaces_every_worker_while_every_request_succeeds() {
    let db = TestDb::new();
    let cluster = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 2, &["--drain-ms", "3000"], &[]);
    let addr = cluster.addr();
    // Two serving workers, as the supervisor counts them, and its two live
    // children are they.
    let live_children = || -> HashSet<i32> {
        children(cluster.pid())
            .into_iter()
            .filter(|(_, state)| *state != 'Z')
            .map(|(p, _)| p)
            .collect()
    };
    assert!(wait_until(T, Duration::from_millis(20), || {
        health(addr)["workers"]["alive"] == 2 && live_children().len() == 2
    }));
    let before: HashSet<i32> = live_children();

    let c = http_blocking(
        addr,
        "POST",
        "/v1/conversations",
        Some(&tok("alice")),
        Some(&json!({"members": ["bob"]})),
    )
    .unwrap();
    assert_eq!(c.status, 201, "{}", c.body);
    let conv = c.json()["id"].as_i64().unwrap();

    // Steady load: 4 senders, each a new connection per message. A refused
    // connection fails the test. A connection that a draining worker closed
    // before answering is retried with the same client_msg_id (idempotent),
    // as a client would.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Acknowledged sends so far, over all senders: the roll starts once the
    // load runs, and the load stops once it ran on after the roll.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let stop = stop.clone();
            let progress = progress.clone();
            std::thread::spawn(move || {
                let (mut acked, mut refused, mut retried) = (0u64, Vec::new(), 0u64);
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let body =
                        json!({"body": format!("m{s}-{i}"), "client_msg_id": format!("s{s}-{i}")});
                    let path = format!("/v1/conversations/{conv}/messages");
                    loop {
                        match http_blocking(addr, "POST", &path, Some(&tok("alice")), Some(&body)) {
                            Ok(r) if r.status == 201 || r.status == 200 => {
                                acked += 1;
                                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                break;
                            }
                            Ok(r) => {
                                refused.push(format!("{} {}", r.status, r.body));
                                break;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                refused.push(e.to_string());
                                break;
                            }
                            Err(_) => retried += 1,
                        }
                    }
                }
                (acked, refused, retried)
            })
        })
        .collect();
    let acked_so_far = || progress.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        wait_until(T, Duration::from_millis(10), || acked_so_far() >= 20),
        "the load did not start: {} acknowledged",
        acked_so_far()
    );
    assert!(cluster.signal(libc::SIGHUP));
    // Rolled: the supervisor counts two serving workers again and none of
    // the old ones is left.
    let rolled = wait_until(T, Duration::from_millis(20), || {
        health(addr)["workers"]["alive"] == 2
            && !children(cluster.pid())
                .iter()
                .any(|(p, _)| before.contains(p))
    });
    assert!(rolled, "not rolled\n{}", cluster.log_tail(40));
    let after_roll = acked_so_far();
    assert!(
        wait_until(T, Duration::from_millis(10), || acked_so_far()
            >= after_roll + 20),
        "the load stalled after the roll: {} acknowledged",
        acked_so_far()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut retried) = (0, 0);
    for s in senders {
        let (a, refused, r) = s.join().unwrap();
        assert!(
            refused.is_empty(),
            "requests refused during the roll: {refused:?}"
        );
        acked += a;
        retried += r;
    }
    eprintln!("{acked} messages acknowledged during the roll, {retried} retried after a closed connection");
    assert!(acked > 20, "only {acked} messages were sent");

    // Every old worker is gone, two new ones serve.
    let after: HashSet<i32> = live_children()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(after.len(), 2, "{}", cluster.log_tail(40));
    assert!(
        before.iter().all(|&p| !alive(p)),
        "an old worker survived the roll"
    );
    let kids: HashSet<i32> = children(cluster.pid())
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(kids, after);
    let h = health(addr);
    assert_eq!(h["workers"]["alive"], 2, "{h}");
    assert_eq!(h["workers"]["restarts"], 0, "{h}");

    let stored = db.query_i64(&format!(
        "SELECT count(*) FROM events WHERE conversation_id = {conv} AND type = 'message.created'"
    ));
    assert_eq!(stored as u64, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_closes_clients_with_1001_and_exits_within_the_drain_time() {
    let db = TestDb::new_async().await;
    let url = db.url();
    let mut cluster = tokio::task::spawn_blocking(move || {
        ClusterProc::spawn_with(&url, TEST_SECRET, 2, &["--drain-ms", "2000"], &[])
    })
    .await
    .unwrap();
    let mut clients = Vec::new();
    let mut workers = HashSet::new();
    for i in 0..20 {
        let mut ws = WsClient::connect(&cluster.ws_url(), &tok(&format!("u{i}")))
            .await
            .expect("connect");
        ws.read_until_synced(T).await;
        workers.insert(
            ws.hello.as_ref().unwrap()["worker"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        clients.push(ws);
    }
    // With 20 connections on 2 workers, both almost surely have some.
    eprintln!("clients on workers {workers:?}");

    let t0 = Instant::now();
    assert!(cluster.signal(libc::SIGTERM));
    for ws in &mut clients {
        assert_eq!(ws.wait_close(T).await, Some(1001));
    }
    let status = cluster
        .wait_exit_async(T)
        .await
        .expect("tether did not exit");
    let took = t0.elapsed();
    eprintln!("SIGTERM -> exit with 20 clients: {} ms", took.as_millis());
    assert_eq!(status.code(), Some(0), "{}", cluster.log_tail(40));
    // Drain 2 s, SIGKILL at drain + 2 s: a clean drain (no SIGKILL) is
    // well within that.
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_drain_delay_ready_turns_503_at_once_while_the_host_keeps_serving() {
    let db = TestDb::new_async().await;
    let url = db.url();
    let mut cluster = tokio::task::spawn_blocking(move || {
        ClusterProc::spawn_with(
            &url,
            TEST_SECRET,
            2,
            &["--drain-ms", "2000", "--drain-delay-ms", "1500"],
            &[],
        )
    })
    .await
    .unwrap();
    let addr = cluster.addr();
    let mut before = WsClient::connect(&cluster.ws_url(), &tok("early"))
        .await
        .expect("connect");
    before.read_until_synced(T).await;

    let t0 = Instant::now();
    assert!(cluster.signal(libc::SIGTERM));
    // Every worker answers /ready with 503 (whichever accepts): wait
    // until two in a row do, then keep asking.
    assert!(
        wait_until_async(T, Duration::from_millis(10), || async {
            http(addr, "GET", "/ready", None, None).await.status == 503
                && http(addr, "GET", "/ready", None, None).await.status == 503
        })
        .await
    );
    let unready = t0.elapsed();
    assert!(
        unready < Duration::from_millis(1000),
        "503 after {unready:?}"
    );
    let h = http(addr, "GET", "/health", None, None).await.json();
    assert_eq!(h["phase"], "leaving", "{h}");
    // Meanwhile the host serves: new WebSockets, REST, the old connection.
    let mut during = WsClient::connect(&cluster.ws_url(), &tok("late"))
        .await
        .expect("a new connection during the delay");
    during.read_until_synced(T).await;
    let c = create_conversation(addr, "late", &["early"]).await;
    recv_event(&mut before, |v| v["conversation_id"] == c).await;
    assert!(!before.is_closed());
    // After the delay: the drain as always (1001), then the exit.
    assert_eq!(before.wait_close(T).await, Some(1001));
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "closed {:?} after SIGTERM, before the delay",
        t0.elapsed()
    );
    assert_eq!(during.wait_close(T).await, Some(1001));
    let status = cluster.wait_exit_async(T).await.expect("tether exits");
    assert_eq!(status.code(), Some(0), "{}", cluster.log_tail(40));
    eprintln!(
        "drain delay 1500 ms: /ready 503 {} ms after SIGTERM, exit after {} ms",
        unready.as_millis(),
        t0.elapsed().as_millis()
    );
}

#[test]
fn a_second_stop_signal_during_the_drain_delay_stops_at_once() {
    let db = TestDb::new();
    let mut cluster = ClusterProc::spawn_with(
        &db.url(),
        TEST_SECRET,
        2,
        &["--drain-delay-ms", "20000"],
        &[],
    );
    let t0 = Instant::now();
    assert!(cluster.signal(libc::SIGINT));
    assert!(wait_until(T, Duration::from_millis(10), || {
        http_blocking(cluster.addr(), "GET", "/ready", None, None).is_ok_and(|r| r.status == 503)
    }));
    assert!(cluster.signal(libc::SIGINT));
    let status = cluster.wait_exit(T).expect("tether exits");
    assert_eq!(status.code(), Some(1), "forced: {}", cluster.log_tail(20));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
