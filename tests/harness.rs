//! Sanity checks of the test harness itself (testkit/): the throwaway
//! database, child processes, the HTTP parser and the condition waits. No
//! tether process is started here.

use std::process::Command;
use std::time::{Duration, Instant};
use tether_testkit::*;

#[test]
fn test_db_counts_stops_and_starts() {
    let db = TestDb::new();
    assert_eq!(db.query_i64("SELECT count(*) FROM events"), 0);
    assert_eq!(db.query_i64("SELECT 7::int4"), 7);

    let port = db.port();
    db.stop();
    assert!(!db.is_running());
    assert!(
        db.try_query_i64("SELECT 1").is_err(),
        "query must fail while stopped"
    );

    db.start();
    assert_eq!(db.port(), port, "same port after restart");
    assert_eq!(db.query_i64("SELECT count(*) FROM events"), 0);

    // Migrating an up-to-date database applies nothing.
    let applied = db.with_client(|c| tether_worker::store::migrate::migrate(c).unwrap());
    assert!(applied.is_empty(), "applied {applied:?} again");
    let tables = db.with_client(|c| {
        c.query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
    });
    assert_eq!(
        tables,
        [
            "conversations",
            "events",
            "members",
            "presence",
            "presence_leases",
            "schema_migrations",
            "sse_tickets_used"
        ]
    );
}

#[tokio::test]
async fn test_db_helpers_work_inside_the_runtime() {
    // Both the blocking helpers (run off the runtime thread) and the async
    // ones must be usable from an async test.
    let db = TestDb::new_async().await;
    assert_eq!(db.query_i64("SELECT count(*) FROM members"), 0);
    db.execute_async("INSERT INTO conversations (created_by) VALUES ('alice')")
        .await;
    assert_eq!(
        db.query_i64_async("SELECT count(*) FROM conversations")
            .await,
        1
    );
    db.stop_async().await;
    db.start_async().await;
    assert_eq!(db.query_i64("SELECT count(*) FROM conversations"), 1);
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn proc_is_killed_on_drop() {
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let mut proc = Proc::spawn("sleep", cmd);
    let pid = proc.pid();
    assert!(alive(pid));
    assert!(proc.is_alive());
    assert_eq!(proc.wait_exit(Duration::from_millis(50)), None);
    drop(proc);
    assert!(!alive(pid), "pid {pid} still exists after drop");
}

#[test]
fn proc_exit_status_signal_and_log() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo to-stdout; echo to-stderr >&2; exit 3"]);
    let mut proc = Proc::spawn("sh", cmd);
    let status = proc.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(3));
    let log = proc.log_contents();
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log:?}"
    );

    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let mut proc = Proc::spawn("sleep", cmd);
    assert!(proc.signal(libc::SIGTERM));
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
}

#[test]
fn proc_drop_kills_its_process_group() {
    // A child that starts a grandchild (as the supervisor starts workers).
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 60 & echo grandchild=$!; wait"]);
    let proc = Proc::spawn("sh", cmd);
    assert!(proc.wait_for_log("grandchild=", Duration::from_secs(10)));
    let log = proc.log_contents();
    let grandchild: i32 = log
        .trim()
        .strip_prefix("grandchild=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{log:?}"));
    assert!(alive(grandchild));
    drop(proc);
    // The grandchild is not ours to reap: wait until it is gone or a zombie.
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
            !alive(grandchild)
                || std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true)
        }),
        "grandchild {grandchild} survived"
    );
}

#[test]
fn wait_until_times_out_and_succeeds() {
    let start = Instant::now();
    assert!(!wait_until(
        Duration::from_millis(100),
        Duration::from_millis(10),
        || false
    ));
    assert!(start.elapsed() >= Duration::from_millis(100));
    let mut n = 0;
    assert!(wait_until(
        Duration::from_secs(5),
        Duration::from_millis(1),
        || {
            n += 1;
            n == 3
        }
    ));
}

#[test]
fn http_responses_parse() {
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n5\r\n{\"a\":\r\n2;ext=1\r\n1}\r\n0\r\n\r\n";
    for cut in 0..chunked.len() {
        assert!(parse_response(&chunked[..cut], false).unwrap().is_none());
        assert!(parse_response(&chunked[..cut], true).is_err());
    }
    let r = parse_response(chunked, false).unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), serde_json::json!({"a": 1}));

    let sized =
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 4\r\n\r\nbusy";
    assert!(parse_response(&sized[..sized.len() - 1], false)
        .unwrap()
        .is_none());
    let r = parse_response(sized, false).unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (503, "busy"));
    assert_eq!(r.header("Retry-After"), Some("2"));

    let until_eof = b"HTTP/1.1 200 OK\r\n\r\nhello";
    assert!(parse_response(until_eof, false).unwrap().is_none());
    assert_eq!(
        parse_response(until_eof, true).unwrap().unwrap().body,
        "hello"
    );
}

#[tokio::test]
async fn http_client_against_a_canned_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            req.extend_from_slice(&buf[..n]);
        }
        // The body follows the head; read it fully (Content-Length: 7).
        let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        while req.len() < head_end + 7 {
            let n = s.read(&mut buf).await.unwrap();
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\n\r\n{\"id\":42}\r\n")
            .await
            .unwrap();
        // The connection stays open until the client has read the
        // response: it must stop at Content-Length, not wait for EOF.
        let _ = s.read(&mut buf).await;
        String::from_utf8(req).unwrap()
    });
    let r = http(
        addr,
        "POST",
        "/v1/conversations",
        Some("TOKEN"),
        Some(&serde_json::json!({"x": 1})),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["id"], 42);
    let request = server.await.unwrap();
    assert!(
        request.starts_with("POST /v1/conversations HTTP/1.1\r\n"),
        "{request}"
    );
    // Header names are case-insensitive (hyper writes them in lower case).
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: bearer token\r\n"),
        "{request}"
    );
    assert!(request.ends_with("{\"x\":1}"), "{request}");
}

#[test]
fn tokens_verify() {
    let t = token(TEST_SECRET, "alice");
    let secret = tether_protocol::auth::Secret::new(TEST_SECRET.as_bytes().to_vec());
    assert_eq!(tether_protocol::auth::verify(&secret, &t).unwrap(), "alice");
    let old = expired_token(TEST_SECRET, "alice", 60);
    assert!(tether_protocol::auth::verify(&secret, &old).is_err());
}

/// A canned WebSocket server: refuses an upgrade without a token with 401,
/// else sends hello, a backlog of two events, synced, a ping, one live
/// event, then closes with 1001.
async fn canned_ws_server() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)]
                let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                    let query = req.uri().query().unwrap_or_default();
                    let header = req.headers().get("authorization");
                    if query.starts_with("token=") || header.is_some() {
                        Ok(resp)
                    } else {
                        let mut refused = ErrorResponse::new(Some("no token".into()));
                        *refused.status_mut() = 401.try_into().unwrap();
                        Err(refused)
                    }
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
                    return;
                };
                let frames = [
                    serde_json::json!({"type": "hello", "user": "alice", "worker": "w1"}),
                    serde_json::json!({"type": "event", "conversation_id": 1, "seq": 1}),
                    serde_json::json!({"type": "event", "conversation_id": 1, "seq": 2}),
                    serde_json::json!({"type": "synced"}),
                ];
                for f in frames {
                    ws.send(Message::text(f.to_string())).await.unwrap();
                }
                // Wait for the client's ping, answer with a pong frame and
                // a WebSocket ping (which the client must skip).
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m {
                        if t.as_str().contains("ping") {
                            break;
                        }
                    }
                }
                ws.send(Message::Ping(vec![1, 2].into())).await.unwrap();
                let live = serde_json::json!({"type": "event", "conversation_id": 1, "seq": 3});
                ws.send(Message::text(live.to_string())).await.unwrap();
                let close = CloseFrame {
                    code: CloseCode::Away,
                    reason: "draining".into(),
                };
                let _ = ws.send(Message::Close(Some(close))).await;
                while ws.next().await.is_some() {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn ws_client_against_a_canned_server() {
    let addr = canned_ws_server().await;
    let url = format!("ws://{addr}/v1/ws");

    let refused = WsClient::connect_url(&url).await.err().expect("refused");
    assert_eq!(refused.status(), Some(401), "{refused}");

    for header in [false, true] {
        let mut ws = if header {
            WsClient::connect_with_header(&url, "T").await.unwrap()
        } else {
            WsClient::connect(&url, "T").await.unwrap()
        };
        let backlog = ws.read_until_synced(Duration::from_secs(10)).await;
        assert_eq!(ws.hello.as_ref().unwrap()["worker"], "w1");
        let seqs: Vec<_> = backlog.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(ws.recv_json(Duration::from_millis(100)).await, None);
        assert!(!ws.is_closed());

        ws.send_json(&serde_json::json!({"type": "ping"})).await;
        let live = ws
            .recv_until(Duration::from_secs(10), |v| v["type"] == "event")
            .await
            .unwrap();
        assert_eq!(live["seq"], 3);
        assert_eq!(ws.wait_close(Duration::from_secs(10)).await, Some(1001));
        assert_eq!(ws.close_code(), Some(1001));
        assert!(ws.is_closed());
    }
}
