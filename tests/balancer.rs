//! Behind a real load balancer: Debian's HAProxy, started from the shipped
//! `ops/haproxy/haproxy.cfg` (its addresses substituted with this test's
//! ports), in front of two real tether hosts (two supervisors with two
//! workers each, on one database, on separate loopback ports).
//!
//! - Both hosts are redeployed one after the other (SIGTERM, wait for the
//!   exit, start again) while 400 subscribers take 200 messages a second
//!   and a prober opens a new WebSocket every 50 ms, all through HAProxy:
//!   nothing is lost, every subscriber comes back, and not one new
//!   connection fails (the drain delay keeps a host serving, with `/ready`
//!   503, until HAProxy has taken it out).
//! - One host's whole process group is SIGKILLed: HAProxy takes it out
//!   within its check time, and its clients reconnect to the other host
//!   and resume.
//!
//! Without `/usr/sbin/haproxy` the tests say SKIPPED and pass, unless
//! `TETHER_REQUIRE_ALL=1` (as in .ci/run). The nginx example has its own
//! test, tests/nginx.rs.

use futures_util::SinkExt;
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_testkit::*;

const T: Duration = Duration::from_secs(60);
/// HAProxy's check interval × fall is 1 s in the shipped file; the delay
/// covers it plus one interval plus a margin for a loaded machine.
const DRAIN_DELAY_MS: &str = "2500";
const CONVS: usize = 20;
const MEMBERS: usize = 20; // 400 subscribers
/// One message per conversation every this often: 200 msg/s in all.
const SEND_EVERY: Duration = Duration::from_millis(100);
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// The two cases start four supervisors and HAProxy each: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// ---------------------------------------------------------------------------
// HAProxy

struct Haproxy {
    /// Held for its lifetime: dropping it kills HAProxy (and prints its
    /// log if the test failed).
    _proc: Proc,
    front: SocketAddr,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// `text` with `from` replaced by `to`, which must occur exactly once (so a
/// change to the shipped file that this test no longer matches fails here).
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "ops/haproxy/haproxy.cfg: expected {from:?} once"
    );
    text.replace(from, to)
}

impl Haproxy {
    fn start(bin: &Path, hosts: [SocketAddr; 2]) -> Haproxy {
        let shipped = std::fs::read_to_string(repo().join("ops/haproxy/haproxy.cfg")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cfg = substitute(
            &shipped,
            "log /dev/log local0",
            "log stdout format raw local0",
        );
        cfg = substitute(
            &cfg,
            "/run/haproxy/admin.sock mode 660",
            &format!("{} mode 600", socket.display()),
        );
        cfg = substitute(&cfg, "bind :80", &format!("bind {front}"));
        cfg = substitute(&cfg, "10.0.0.11:8080", &hosts[0].to_string());
        cfg = substitute(&cfg, "10.0.0.12:8080", &hosts[1].to_string());
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut cmd = Command::new(bin);
        // -db: foreground, no daemon.
        cmd.arg("-db").arg("-f").arg(&path);
        let mut proc = Proc::spawn("haproxy", cmd);
        let both_up = wait_until(T, Duration::from_millis(20), || {
            assert!(proc.is_alive(), "HAProxy exited: {}", proc.log_tail(20));
            let s = servers(&socket);
            s.get("tether1").map(String::as_str) == Some("UP")
                && s.get("tether2").map(String::as_str) == Some("UP")
        });
        assert!(
            both_up,
            "HAProxy never saw both hosts UP: {:?}",
            servers(&socket)
        );
        Haproxy {
            _proc: proc,
            front,
            socket,
            _dir: dir,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.front)
    }

    fn servers(&self) -> HashMap<String, String> {
        servers(&self.socket)
    }

    /// Waits until `server`'s status is exactly `status`; how long it took.
    fn wait_server(&self, server: &str, status: &str, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        wait_until(timeout, Duration::from_millis(20), || {
            self.servers().get(server).map(String::as_str) == Some(status)
        })
        .then(|| start.elapsed())
    }
}

/// Each server's status from HAProxy's stats socket (`UP`, `DOWN`, `UP
/// 1/2` while going down, `DOWN 1/2` while coming up...).
fn servers(socket: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"show stat\n").is_err() {
        return out;
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return out;
    };
    let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return out;
    };
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() > st && f[px] == "tether" && f[sv].starts_with("tether") {
            out.insert(f[sv].to_string(), f[st].to_string());
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The scene: a database, two hosts, HAProxy, subscribers, senders, a prober

/// Starts a tether host on `addr` (blocking until `/ready`).
fn start_host(db_url: &str, addr: SocketAddr) -> ClusterProc {
    let listen = addr.to_string();
    ClusterProc::spawn(
        &[
            "--database-url",
            db_url,
            "--secret",
            TEST_SECRET,
            "--workers",
            "2",
            "--listen",
            &listen,
            "--drain-delay-ms",
            DRAIN_DELAY_MS,
            "--drain-ms",
            "3000",
            "--proxy-protocol-from",
            "127.0.0.1",
        ],
        &[],
    )
}

/// A tiny deterministic jitter source (no rand dependency).
fn jitter(seed: &mut u64, max_ms: u64) -> Duration {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Duration::from_millis((*seed >> 33) % max_ms.max(1))
}

/// One subscriber's state, shared with the test.
#[derive(Default)]
struct Sub {
    highest: AtomicU64,
    connected: AtomicBool,
    reconnects: AtomicU64,
}

/// One subscriber: reads its conversation forever through the balancer,
/// reconnecting with jittered backoff when its host goes away; keeps the
/// highest seq (dropping repeats) and fails on any gap. Acks every 25.
async fn subscriber(ws_url: String, user: String, c: i64, me: Arc<Sub>, mut seed: u64) {
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
            me.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        me.connected.store(true, Ordering::Release);
        let mut since_ack = 0;
        loop {
            match ws.next_event(Duration::from_secs(600)).await {
                WsEvent::Json(v) if v["type"] == "event" => {
                    assert_eq!(v["conversation_id"].as_i64(), Some(c), "{user}: {v}");
                    let s = v["seq"].as_i64().unwrap();
                    assert!(s <= last + 1, "{user}: gap: {s} after {last}");
                    if s == last + 1 {
                        last = s;
                        me.highest.store(s as u64, Ordering::Release);
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
        me.connected.store(false, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(20) + jitter(&mut seed, 300)).await;
    }
}

/// What the prober saw: every new connection, and the failures with when
/// they started.
#[derive(Default)]
struct Probes {
    ok: AtomicU64,
    failed: Mutex<Vec<(Instant, String)>>,
}

/// A new WebSocket through the balancer every [`PROBE_EVERY`], each read
/// through `synced`, until `stop`.
async fn prober(ws_url: String, probes: Arc<Probes>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    let mut n = 0u64;
    let mut running = Vec::new();
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        n += 1;
        let (url, probes) = (ws_url.clone(), probes.clone());
        // Users rotate so the per-user limit never matters.
        let user = format!("prober{}", n % 16);
        running.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = async {
                let mut ws = WsClient::connect(&url, &tok(&user))
                    .await
                    .map_err(|e| e.to_string())?;
                loop {
                    match ws.next_event(Duration::from_secs(10)).await {
                        WsEvent::Json(v) if v["type"] == "synced" => break,
                        WsEvent::Json(_) => {}
                        other => return Err(format!("before synced: {other:?}")),
                    }
                }
                ws.close(1000).await;
                Ok::<(), String>(())
            }
            .await;
            match outcome {
                Ok(()) => {
                    probes.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => probes.failed.lock().unwrap().push((started, e)),
            }
        }));
    }
    for r in running {
        let _ = r.await;
    }
}

/// Senders: one per conversation, a message every [`SEND_EVERY`] through
/// the balancer, each retried with its client_msg_id until acknowledged.
struct Senders {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    acked: Arc<Mutex<Vec<(i64, i64)>>>,
    retries: Arc<AtomicU64>,
}

impl Senders {
    fn start(front: SocketAddr, convs: &[i64]) -> Senders {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let retries = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (k, &c) in convs.iter().enumerate() {
            let (stop, acked, retries) = (stop.clone(), acked.clone(), retries.clone());
            let user = format!("u{k}_0");
            tasks.push(tokio::spawn(async move {
                let mut seed = k as u64 + 7;
                let mut tick = tokio::time::interval(SEND_EVERY);
                let mut i = 0;
                while !stop.load(Ordering::Acquire) {
                    tick.tick().await;
                    i += 1;
                    let id = format!("{user}-{i}");
                    let body =
                        serde_json::to_vec(&json!({"body": id, "client_msg_id": id})).unwrap();
                    let path = format!("/v1/conversations/{c}/messages");
                    let started = Instant::now();
                    loop {
                        let r = try_http_raw(
                            front,
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
                                acked.lock().unwrap().push((c, seq));
                                break;
                            }
                            Ok(r) if r.status >= 500 || r.status == 429 => {}
                            Ok(r) => panic!("{id}: {} {}", r.status, r.body),
                            Err(_) => {}
                        }
                        retries.fetch_add(1, Ordering::Relaxed);
                        assert!(started.elapsed() < T, "{id}: never acknowledged");
                        tokio::time::sleep(Duration::from_millis(10) + jitter(&mut seed, 100))
                            .await;
                    }
                }
            }));
        }
        Senders {
            stop,
            tasks,
            acked,
            retries,
        }
    }

    /// Stops them; every acknowledged (conversation, seq).
    async fn finish(self) -> Vec<(i64, i64)> {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

struct Scene {
    db: TestDb,
    hosts: [Option<ClusterProc>; 2],
    addrs: [SocketAddr; 2],
    lb: Haproxy,
    convs: Vec<i64>,
    subs: Vec<(i64, String, Arc<Sub>)>,
    sub_tasks: Vec<tokio::task::JoinHandle<()>>,
    probes: Arc<Probes>,
    probe_stop: Arc<AtomicBool>,
    probe_task: Option<tokio::task::JoinHandle<()>>,
}

impl Scene {
    /// Two hosts behind HAProxy; every subscriber connected and synced
    /// through it; the prober running.
    async fn start(haproxy: PathBuf) -> Scene {
        let db = TestDb::new_async().await;
        let url = db.url();
        let addrs: [SocketAddr; 2] = [
            ([127, 0, 0, 1], free_port()).into(),
            ([127, 0, 0, 1], free_port()).into(),
        ];
        let (a, b, lb) = tokio::task::spawn_blocking(move || {
            let a = start_host(&url, addrs[0]);
            let b = start_host(&url, addrs[1]);
            let lb = Haproxy::start(&haproxy, addrs);
            (a, b, lb)
        })
        .await
        .unwrap();
        let front = lb.front;
        let mut convs = Vec::new();
        for k in 0..CONVS {
            let members: Vec<String> = (1..MEMBERS).map(|m| format!("u{k}_{m}")).collect();
            convs.push(create_conversation(front, &format!("u{k}_0"), &members).await);
        }
        let mut subs = Vec::new();
        let mut sub_tasks = Vec::new();
        for (k, &c) in convs.iter().enumerate() {
            for m in 0..MEMBERS {
                let user = format!("u{k}_{m}");
                let me = Arc::new(Sub::default());
                subs.push((c, user.clone(), me.clone()));
                sub_tasks.push(tokio::spawn(subscriber(
                    lb.ws_url(),
                    user,
                    c,
                    me,
                    (k * MEMBERS + m) as u64 + 1,
                )));
            }
        }
        let mut scene = Scene {
            db,
            hosts: [Some(a), Some(b)],
            addrs,
            lb,
            convs,
            subs,
            sub_tasks,
            probes: Arc::new(Probes::default()),
            probe_stop: Arc::new(AtomicBool::new(false)),
            probe_task: None,
        };
        // Every subscriber has its backlog (the conversation's first event).
        scene
            .wait_subscribers(|_, s| s.highest.load(Ordering::Acquire) >= 1, "synced")
            .await;
        scene.probe_task = Some(tokio::spawn(prober(
            scene.lb.ws_url(),
            scene.probes.clone(),
            scene.probe_stop.clone(),
        )));
        scene
    }

    /// Waits until `ok` holds for every subscriber; fails the test
    /// (showing a subscriber's own panic first) if it does not within T.
    async fn wait_subscribers(&mut self, ok: impl Fn(i64, &Sub) -> bool, what: &str) {
        let done = wait_until_async(T, Duration::from_millis(50), || {
            let all = self.subs.iter().all(|(c, _, s)| ok(*c, s));
            async move { all }
        })
        .await;
        if !done {
            for t in self.sub_tasks.iter_mut().filter(|t| t.is_finished()) {
                t.await.unwrap();
            }
            let behind: Vec<String> = self
                .subs
                .iter()
                .filter(|(c, _, s)| !ok(*c, s))
                .take(10)
                .map(|(c, u, s)| {
                    format!(
                        "{u}@{c}: highest {} connected {}",
                        s.highest.load(Ordering::Acquire),
                        s.connected.load(Ordering::Acquire)
                    )
                })
                .collect();
            panic!("subscribers not {what} within {T:?}: {behind:?}");
        }
    }

    /// SIGTERM host `i`, wait for its exit (0), start it again on the same
    /// port and wait until HAProxy has it UP again.
    async fn redeploy(&mut self, i: usize) {
        let name = format!("tether{}", i + 1);
        let mut host = self.hosts[i].take().expect("host running");
        let started = Instant::now();
        assert!(host.signal(libc::SIGTERM));
        let status = host.wait_exit_async(T).await.expect("host exits");
        assert!(status.success(), "{name} exited with {status}");
        let stopped = started.elapsed();
        let (url, addr) = (self.db.url(), self.addrs[i]);
        let host = tokio::task::spawn_blocking(move || start_host(&url, addr))
            .await
            .unwrap();
        self.hosts[i] = Some(host);
        let lb = &self.lb;
        let up = tokio::task::block_in_place(|| lb.wait_server(&name, "UP", T));
        assert!(up.is_some(), "{name} not UP again: {:?}", lb.servers());
        eprintln!(
            "{name}: stopped {} ms after SIGTERM, UP in HAProxy {} ms after the SIGTERM",
            stopped.as_millis(),
            started.elapsed().as_millis()
        );
    }

    /// Stops the prober; (new connections, failures).
    async fn stop_prober(&mut self) -> (u64, Vec<(Instant, String)>) {
        self.probe_stop.store(true, Ordering::Release);
        if let Some(t) = self.probe_task.take() {
            t.await.unwrap();
        }
        let failed = self.probes.failed.lock().unwrap().clone();
        (
            self.probes.ok.load(Ordering::Relaxed) + failed.len() as u64,
            failed,
        )
    }

    /// Every subscriber connected, with every acknowledged message.
    async fn wait_everything_delivered(&mut self, acked: &[(i64, i64)]) {
        let mut top: HashMap<i64, i64> = HashMap::new();
        for (c, seq) in acked {
            let t = top.entry(*c).or_insert(0);
            *t = (*t).max(*seq);
        }
        self.wait_subscribers(
            |c, s| {
                s.connected.load(Ordering::Acquire)
                    && s.highest.load(Ordering::Acquire) as i64 >= top.get(&c).copied().unwrap_or(0)
            },
            "back with every message",
        )
        .await;
    }

    fn end(self) {
        for t in &self.sub_tasks {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_hosts_redeployed_under_load_lose_nothing_and_fail_no_new_connection() {
    let test = "both_hosts_redeployed_under_load_lose_nothing_and_fail_no_new_connection";
    let Some(haproxy) = tool_or_skip("/usr/sbin/haproxy", "haproxy", test) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let began = Instant::now();
    let mut scene = Scene::start(haproxy).await;
    let senders = Senders::start(scene.lb.front, &scene.convs.clone());
    // Load first, then the deploy: host 1, then host 2.
    tokio::time::sleep(Duration::from_millis(500)).await;
    scene.redeploy(0).await;
    scene.redeploy(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retries = senders.retries.clone();
    let acked = senders.finish().await;
    scene.wait_everything_delivered(&acked).await;
    let (probes, failed) = scene.stop_prober().await;
    let moved: Vec<u64> = scene
        .subs
        .iter()
        .map(|(_, _, s)| s.reconnects.load(Ordering::Relaxed))
        .collect();
    let stored = scene
        .db
        .query_i64_async("SELECT count(*) FROM events WHERE type = 'message.created'")
        .await;
    eprintln!(
        "balancer redeploy: {} subscribers, {} moved ({} reconnects); {} messages acknowledged ({} send retries), {} stored, 0 lost; {probes} new connections, {} failed; {} ms",
        scene.subs.len(),
        moved.iter().filter(|n| **n > 0).count(),
        moved.iter().sum::<u64>(),
        acked.len(),
        retries.load(Ordering::Relaxed),
        stored,
        failed.len(),
        began.elapsed().as_millis()
    );
    assert!(failed.is_empty(), "new connections failed: {failed:?}");
    assert!(probes >= 100, "only {probes} probes");
    // Every subscriber was on one of the two hosts, so it moved at least
    // once, and came back (checked above with every message).
    assert!(
        moved.iter().all(|n| *n >= 1),
        "a subscriber never moved: {moved:?}"
    );
    assert_eq!(
        stored,
        acked.len() as i64,
        "each acknowledged message stored once"
    );
    scene.end();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_killed_outright_is_routed_around_and_its_clients_resume() {
    let test = "a_host_killed_outright_is_routed_around_and_its_clients_resume";
    let Some(haproxy) = tool_or_skip("/usr/sbin/haproxy", "haproxy", test) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let began = Instant::now();
    let mut scene = Scene::start(haproxy).await;
    let senders = Senders::start(scene.lb.front, &scene.convs.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The supervisor and its workers at once: nothing drains, the socket
    // closes with the last of them.
    let mut victim = scene.hosts[0].take().unwrap();
    assert!(victim.signal_group(libc::SIGKILL));
    let killed = Instant::now();
    let lb = &scene.lb;
    let down = tokio::task::block_in_place(|| lb.wait_server("tether1", "DOWN", T))
        .unwrap_or_else(|| panic!("tether1 never DOWN: {:?}", lb.servers()));
    victim.wait_exit_async(T).await.expect("the victim is gone");
    let routed_at = killed + down;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retries = senders.retries.clone();
    let acked = senders.finish().await;
    scene.wait_everything_delivered(&acked).await;
    let (probes, failed) = scene.stop_prober().await;
    let moved = scene
        .subs
        .iter()
        .filter(|(_, _, s)| s.reconnects.load(Ordering::Relaxed) > 0)
        .count();
    eprintln!(
        "balancer SIGKILL: DOWN in HAProxy {} ms after the kill; {moved} of {} subscribers moved; {} messages acknowledged ({} send retries), 0 lost; {probes} new connections, {} failed ({} of them started after DOWN); {} ms",
        down.as_millis(),
        scene.subs.len(),
        acked.len(),
        retries.load(Ordering::Relaxed),
        failed.len(),
        failed.iter().filter(|(t, _)| *t >= routed_at).count(),
        began.elapsed().as_millis()
    );
    for (t, e) in &failed {
        eprintln!(
            "  failed {} ms after the kill: {e}",
            t.saturating_duration_since(killed).as_millis()
        );
    }
    // Its check time: inter 500 ms × fall 2, plus up to one interval until
    // the first failing check, plus slack for a loaded machine.
    assert!(down < Duration::from_millis(3000), "DOWN after {down:?}");
    assert!(moved > 0, "nobody was on the killed host");
    let after: Vec<_> = failed.iter().filter(|(t, _)| *t >= routed_at).collect();
    assert!(
        after.is_empty(),
        "new connections failed after DOWN: {after:?}"
    );
    scene.end();
}
