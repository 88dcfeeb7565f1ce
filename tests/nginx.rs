//! The nginx example, `ops/nginx/tether.conf`: `nginx -t` accepts it, and
//! a real nginx started from it (its addresses substituted with this
//! test's ports) fronts two real tether hosts: REST and WebSockets pass,
//! and the client's address reaches tether in `X-Forwarded-For`, which the
//! per-address limit counts.
//!
//! Without `/usr/sbin/nginx` (Debian's `nginx-light`) the tests say
//! SKIPPED and pass, unless `TETHER_REQUIRE_ALL=1` (as in .ci/run).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tether_testkit::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

const T: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "ops/nginx/tether.conf: expected {from:?} once"
    );
    text.replace(from, to)
}

/// A main config around `include` (the example is an http-level
/// include), every path in `dir`.
fn main_conf(dir: &Path, include: &Path) -> PathBuf {
    let conf = dir.join("nginx.conf");
    // Run as root (as CI does), the workers would otherwise be `nobody`.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "{user}daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  include {};\n}}\n",
            include.display(),
            d = dir.display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn the_nginx_example_is_valid() {
    let test = "the_nginx_example_is_valid";
    let Some(nginx) = tool_or_skip("/usr/sbin/nginx", "nginx-light", test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let conf = main_conf(dir.path(), &repo().join("ops/nginx/tether.conf"));
    let out = Command::new(nginx)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A WebSocket upgrade through `front` that says it comes from `claimed`
/// (the client's own `X-Forwarded-For`, to which nginx appends the peer,
/// 127.0.0.1, which the hosts trust); the status, the connection kept in
/// `keep`.
async fn upgrade_from(
    front: SocketAddr,
    claimed: &str,
    keep: &mut Vec<Box<dyn Send>>,
) -> Result<u16, String> {
    let mut req = format!("ws://{front}/v1/ws?token={}", tok("carol"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", claimed.parse().unwrap());
    match tokio::time::timeout(T, tokio_tungstenite::connect_async(req)).await {
        Err(_) => Err("timed out".into()),
        Ok(Ok((ws, response))) => {
            keep.push(Box::new(ws));
            Ok(response.status().as_u16())
        }
        Ok(Err(WsError::Http(response))) => Ok(response.status().as_u16()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_from_the_example_fronts_two_hosts() {
    let test = "nginx_from_the_example_fronts_two_hosts";
    let Some(nginx) = tool_or_skip("/usr/sbin/nginx", "nginx-light", test) else {
        return;
    };
    let db = TestDb::new_async().await;
    let url = db.url();
    let hosts = tokio::task::spawn_blocking(move || {
        let args = [
            "--proxy-protocol-from",
            "127.0.0.1",
            "--max-connections-per-ip",
            "2",
        ];
        [
            ClusterProc::spawn_with(&url, TEST_SECRET, 1, &args, &[]),
            ClusterProc::spawn_with(&url, TEST_SECRET, 1, &args, &[]),
        ]
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let shipped = std::fs::read_to_string(repo().join("ops/nginx/tether.conf")).unwrap();
    let mut example = substitute(&shipped, "listen 80;", &format!("listen {front};"));
    example = substitute(&example, "10.0.0.11:8080", &hosts[0].addr().to_string());
    example = substitute(&example, "10.0.0.12:8080", &hosts[1].addr().to_string());
    let include = dir.path().join("tether.conf");
    std::fs::write(&include, example).unwrap();
    let conf = main_conf(dir.path(), &include);
    let mut cmd = Command::new(nginx);
    cmd.arg("-c").arg(&conf).arg("-p").arg(dir.path());
    let mut proc = Proc::spawn("nginx", cmd);
    assert!(
        wait_until(T, Duration::from_millis(20), || {
            assert!(proc.is_alive(), "nginx exited: {}", proc.log_tail(20));
            http_blocking(front, "GET", "/ready", None, None).is_ok_and(|r| r.status == 200)
        }),
        "nginx never answered /ready"
    );
    // REST through nginx; /metrics is not exposed.
    let c = create_conversation(front, "carol", &["dave"]).await;
    assert!(c > 0);
    assert_eq!(http(front, "GET", "/metrics", None, None).await.status, 404);
    // WebSockets through nginx, counted per client address as tether
    // learns it from nginx's X-Forwarded-For: two from one address (on
    // either host, one worker each: so both on one host, or one on each),
    // another address unaffected.
    let mut keep = Vec::new();
    let mut statuses = Vec::new();
    for claimed in ["203.0.113.5", "203.0.113.5", "203.0.113.6", "203.0.113.6"] {
        statuses.push(upgrade_from(front, claimed, &mut keep).await);
    }
    assert!(
        statuses.iter().all(|s| s == &Ok(101)),
        "through nginx: {statuses:?}"
    );
    // Each host allows 2 per address, so 203.0.113.5 has room for 2 more
    // at most. A 429 at all shows the hosts counted the address from
    // X-Forwarded-For: nginx's own, 127.0.0.1, is trusted and never
    // counted.
    let mut more = Vec::new();
    for _ in 0..4 {
        more.push(upgrade_from(front, "203.0.113.5", &mut keep).await);
    }
    let ok = more.iter().filter(|s| **s == Ok(101)).count();
    assert!(ok <= 2, "more than 4 of 203.0.113.5 in all: {more:?}");
    assert!(more.contains(&Ok(429)), "never refused: {more:?}");
    assert!(
        more.iter().all(|s| s == &Ok(101) || s == &Ok(429)),
        "{more:?}"
    );
    drop(proc);
}
