//! The operator's view, end to end: one scrape through the shared port
//! covers every worker and the supervisor; a real Prometheus (Debian's
//! `prometheus`) scrapes a real 2-worker cluster, loads the alert rules
//! of ops/prometheus/alerts.yml, and fires the critical database alert
//! once PostgreSQL is stopped; every metric the Grafana dashboard queries
//! exists in a live scrape.
//!
//! Without the `prometheus` binary the Prometheus test says SKIPPED and
//! passes, unless `TETHER_REQUIRE_ALL=1` (as in .ci/run).

use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);

fn scrape(addr: SocketAddr) -> String {
    http_blocking(addr, "GET", "/metrics", None, None)
        .expect("GET /metrics")
        .body
}

/// The `worker` label values of a metric's samples.
fn workers_of(text: &str, metric: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter_map(|l| {
            let at = l.find("worker=\"")? + 8;
            Some(l[at..].split('"').next()?.to_string())
        })
        .collect()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn one_scrape_covers_every_worker_and_the_supervisor() {
    let db = TestDb::new();
    let cluster = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 2, &[], &[]);
    let addr = cluster.addr();
    let everyone = |text: &str| {
        let w = workers_of(text, "process_resident_memory_bytes");
        w.contains("supervisor")
            && w.iter().filter(|x| x.starts_with('w')).count() == 2
            && text.contains("tether_supervisor_workers_up{worker=\"supervisor\"} 2")
    };
    assert!(
        wait_until(T, Duration::from_millis(100), || everyone(&scrape(addr))),
        "never saw both workers and the supervisor in one scrape:\n{}",
        scrape(addr)
    );
    // Whichever worker answers, every scrape has the whole host, and each
    // metric family is declared once.
    for _ in 0..10 {
        let text = scrape(addr);
        assert!(everyone(&text), "{text}");
        for family in [
            "tether_connections_open",
            "tether_commit_seconds",
            "process_open_fds",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family} declared once"
            );
        }
        assert_eq!(workers_of(&text, "tether_connections_open").len(), 2);
        assert_eq!(
            workers_of(&text, "tether_event_loop_lag_seconds_count").len(),
            2
        );
        assert!(text
            .contains("tether_supervisor_restarts_total{worker=\"supervisor\",cause=\"crash\"} 0"));
        assert!(text.contains("tether_supervisor_workers_up{worker=\"supervisor\"} 2"));
    }
    // A worker killed: the replacement's series come, the dead one's go,
    // and the supervisor counts the crash.
    let health = http_blocking(addr, "GET", "/health", None, None)
        .unwrap()
        .json();
    let (victim, pid) = (
        health["worker"].as_str().unwrap().to_string(),
        health["pid"].as_i64().unwrap() as i32,
    );
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    assert!(
        wait_until(T, Duration::from_millis(100), || {
            let text = scrape(addr);
            let w = workers_of(&text, "tether_connections_open");
            !w.contains(&victim)
                && w.len() == 2
                && text.contains(
                    "tether_supervisor_restarts_total{worker=\"supervisor\",cause=\"crash\"} 1",
                )
        }),
        "the scrape did not follow the replacement of {victim}:\n{}",
        scrape(addr)
    );
}

#[test]
fn every_metric_the_dashboard_queries_exists_in_a_live_scrape() {
    let db = TestDb::new();
    let cluster = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 2, &[], &[]);
    let addr = cluster.addr();
    assert!(wait_until(T, Duration::from_millis(100), || {
        workers_of(&scrape(addr), "process_open_fds").len() == 3
    }));
    let text = scrape(addr);
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("ops/grafana/tether.json")).expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("tether_") || word.starts_with("process_") {
                    queried.insert(word.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 10, "the dashboard queries {queried:?}");
    for metric in &queried {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{metric}{{"))),
            "the dashboard queries {metric}, which no scrape has"
        );
    }
}

fn prometheus() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/prometheus");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("TETHER_REQUIRE_ALL").as_deref() != Ok("1"),
        "prometheus is not installed (apt-get install prometheus) and TETHER_REQUIRE_ALL=1"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED a_real_prometheus_scrapes_the_cluster_and_fires_the_database_alert: prometheus not installed (apt-get install prometheus)"
    );
    None
}

/// GET a Prometheus API path; the JSON `data`.
fn api(prom: SocketAddr, path: &str) -> Option<Value> {
    let r = http_blocking(prom, "GET", path, None, None).ok()?;
    let v: Value = serde_json::from_str(&r.body).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

#[test]
fn a_real_prometheus_scrapes_the_cluster_and_fires_the_database_alert() {
    let Some(bin) = prometheus() else { return };
    let db = TestDb::new();
    let cluster = ClusterProc::spawn_with(&db.url(), TEST_SECRET, 2, &[], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let prom: SocketAddr = ([127, 0, 0, 1], port).into();
    let rules = repo().join("ops/prometheus/alerts.yml");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: tether\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            cluster.addr()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg(format!(
        "--config.file={}",
        dir.path().join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.path().join("data").display()
    ))
    .arg(format!("--web.listen-address={prom}"));
    let mut p = Proc::spawn("prometheus", cmd);
    // Scraped: up is 1, and both workers' series are there.
    assert!(
        wait_until(T, Duration::from_millis(250), || {
            let up = api(prom, "/api/v1/query?query=up%7Bjob%3D%22tether%22%7D");
            let workers = api(
                prom,
                "/api/v1/query?query=count%28tether_connections_open%29",
            );
            up.is_some_and(|d| d["result"][0]["value"][1] == "1")
                && workers.is_some_and(|d| d["result"][0]["value"][1] == "2")
        }),
        "prometheus never scraped both workers\n{}",
        p.log_tail(30)
    );
    // The rule file loaded, every rule healthy.
    let groups = api(prom, "/api/v1/rules").expect("rules");
    let rules: Vec<&Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), 6, "the seed's six alerts");
    assert!(rules.iter().all(|r| r["health"] == "ok"), "{rules:?}");
    let firing = |name: &str| {
        api(prom, "/api/v1/alerts").is_some_and(|d| {
            d["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
        })
    };
    assert!(!firing("TetherDatabaseUnavailable"));
    // PostgreSQL goes: the critical alert fires.
    db.stop();
    assert!(
        wait_until(T, Duration::from_millis(250), || firing(
            "TetherDatabaseUnavailable"
        )),
        "the database alert did not fire\n{}",
        p.log_tail(30)
    );
    let alert = api(prom, "/api/v1/alerts").unwrap();
    eprintln!("alerts while PostgreSQL is down: {alert}");
    p.kill();
}

#[test]
fn json_logs_are_one_object_per_line_and_never_hold_a_token() {
    let db = TestDb::new();
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--log-format", "json"],
        &[("RUST_LOG", "debug")],
    );
    let token = tok("alice");
    let r = http_blocking(
        w.addr(),
        "POST",
        "/v1/conversations",
        Some(&token),
        Some(&serde_json::json!({"members": ["bob"]})),
    )
    .expect("create");
    assert_eq!(r.status, 201);
    let c = r.json()["id"].as_i64().unwrap();
    // A refused token is logged too (at debug): still not the token.
    let bad = format!("{token}x");
    let r = http_blocking(w.addr(), "GET", "/v1/conversations", Some(&bad), None).unwrap();
    assert_eq!(r.status, 401);
    assert!(wait_until(T, Duration::from_millis(50), || w
        .log_contents()
        .contains(&format!("\"conversation\":\"{c}\""))));
    let log = w.log_contents();
    let mut lines = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["process"], w.worker_id(), "{line}");
        assert!(
            v["level"].is_string() && v["msg"].is_string() && v["ts"].is_u64(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{log}");
    assert!(
        !log.lines()
            .any(|l| l.starts_with(|c: char| c.is_ascii_digit())),
        "a human-format line in a JSON log:\n{log}"
    );
    assert!(
        !log.contains(&token) && !log.contains(TEST_SECRET),
        "a token or the secret reached the log"
    );
}
