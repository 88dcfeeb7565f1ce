//! The client's address against a real worker, with hostile input: a
//! PROXY protocol v2 header and `X-Forwarded-For` are believed from a
//! `--proxy-protocol-from` peer only; the address they give is what
//! `--max-connections-per-ip` counts; malformed, truncated or oversized
//! headers close that connection and change nothing else (the worker keeps
//! serving, nothing panics); from an untrusted peer both are ignored.
//!
//! The limit is the observable: with `--max-connections-per-ip 2`, a third
//! WebSocket from one address gets 429, one from another address does not.

use std::net::SocketAddr;
use std::time::Duration;
use tether_testkit::*;
use tether_worker::proxy_protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

const T: Duration = Duration::from_secs(10);

/// A PROXY v2 header saying the connection comes from `client`.
fn header_from(client: &str) -> Vec<u8> {
    let src: SocketAddr = format!("{client}:40000").parse().unwrap();
    proxy_protocol::encode(Some((src, "10.0.0.1:8080".parse().unwrap())))
}

/// A WebSocket upgrade on a fresh connection that starts with `prefix`,
/// with an optional `X-Forwarded-For`: the HTTP status (101 on success;
/// the connection is kept open in `keep`).
async fn upgrade(
    addr: SocketAddr,
    prefix: &[u8],
    forwarded_for: Option<&str>,
    keep: &mut Vec<Box<dyn Send>>,
) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(prefix).await.unwrap();
    let mut req = format!("ws://{addr}/v1/ws?token={}", tok("mallory"))
        .into_client_request()
        .unwrap();
    if let Some(xff) = forwarded_for {
        req.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
    }
    let attempt = tokio::time::timeout(T, tokio_tungstenite::client_async(req, stream)).await;
    match attempt.expect("the upgrade timed out") {
        Ok((ws, response)) => {
            keep.push(Box::new(ws));
            response.status().as_u16()
        }
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade: {e}"),
    }
}

/// Sends `bytes` on a fresh connection and reads until the worker closes
/// it; what it answered (empty: closed without a word).
async fn answer_to(addr: SocketAddr, bytes: &[u8], then_close_write: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if then_close_write {
        stream.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut out))
        .await
        .expect("the worker never closed the connection")
        .ok();
    out
}

async fn still_serving(addr: SocketAddr) {
    let r = http(addr, "GET", "/ready", None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancer_gives_the_address_that_the_limit_counts() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &[
            "--proxy-protocol-from",
            "127.0.0.0/8",
            "--max-connections-per-ip",
            "2",
            "--max-connections-per-user",
            "0",
        ],
        &[],
    );
    let addr = w.addr();
    let mut keep = Vec::new();
    // PROXY v2: two from one client, the third refused; another client is
    // unaffected.
    let a = header_from("203.0.113.5");
    assert_eq!(upgrade(addr, &a, None, &mut keep).await, 101);
    assert_eq!(upgrade(addr, &a, None, &mut keep).await, 101);
    assert_eq!(upgrade(addr, &a, None, &mut keep).await, 429);
    assert_eq!(
        upgrade(addr, &header_from("203.0.113.6"), None, &mut keep).await,
        101
    );
    // IPv6 too.
    let v6 = header_from("[2001:db8::7]");
    assert_eq!(upgrade(addr, &v6, None, &mut keep).await, 101);
    // X-Forwarded-For from the trusted peer: the same counting.
    for status in [101, 101, 429] {
        assert_eq!(
            upgrade(addr, b"", Some("198.51.100.9"), &mut keep).await,
            status
        );
    }
    // A client's forged entry left of the balancer's is not believed: this
    // is 198.51.100.9 again, whatever it claims first.
    assert_eq!(
        upgrade(addr, b"", Some("192.0.2.1, 198.51.100.9"), &mut keep).await,
        429
    );
    // LOCAL (a balancer's own check) and no header at all: the balancer's
    // own address, which is trusted and so never counted.
    let local = proxy_protocol::encode(None);
    for _ in 0..3 {
        assert_eq!(upgrade(addr, &local, None, &mut keep).await, 101);
        assert_eq!(upgrade(addr, b"", None, &mut keep).await, 101);
    }
    // Closing connections gives the slots back.
    keep.clear();
    assert!(
        wait_until_async(T, Duration::from_millis(50), || async {
            let mut k = Vec::new();
            upgrade(addr, &a, None, &mut k).await == 101
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_proxy_headers_close_that_connection_and_change_nothing() {
    let db = TestDb::new_async().await;
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &[
            "--proxy-protocol-from",
            "127.0.0.1",
            "--handshake-timeout-ms",
            "500",
        ],
        &[],
    );
    let addr = w.addr();
    let good = header_from("203.0.113.5");
    let with = |at: usize, byte: u8| {
        let mut h = good.clone();
        h[at] = byte;
        h
    };
    let mut too_long = good.clone();
    too_long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let mut short_addresses = good[..20].to_vec();
    short_addresses[14..16].copy_from_slice(&4u16.to_be_bytes());
    let mut bad: Vec<(&str, Vec<u8>, bool)> = vec![
        ("version 1 byte", with(12, 0x11), false),
        ("unknown command", with(12, 0x2f), false),
        ("unknown family", with(13, 0x41), false),
        ("length beyond the limit", too_long, false),
        ("addresses too short", short_addresses, false),
    ];
    // Truncated: the connection ends (or goes silent) mid-header.
    for cut in [12, 15, 20] {
        bad.push(("truncated, then EOF", good[..cut].to_vec(), true));
    }
    bad.push(("truncated, then silence", good[..20].to_vec(), false));
    for (what, bytes, eof) in &bad {
        let before = metric(&metrics_of(addr).await, "tether_proxy_header_errors_total");
        let answer = answer_to(addr, bytes, *eof).await;
        assert!(
            answer.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&answer)
        );
        let after = metric(&metrics_of(addr).await, "tether_proxy_header_errors_total");
        assert_eq!(after, before + 1.0, "{what}: counted");
        still_serving(addr).await;
    }
    // Silence is no malformed header: closed after the header timeout,
    // not counted.
    let before = metric(&metrics_of(addr).await, "tether_proxy_header_errors_total");
    assert!(answer_to(addr, b"", false).await.is_empty());
    let after = metric(&metrics_of(addr).await, "tether_proxy_header_errors_total");
    assert_eq!(after, before, "an idle connection is not a bad header");
    // A good header followed by garbage instead of HTTP: HTTP's own 400.
    let mut then_garbage = good.clone();
    then_garbage.extend_from_slice(b"\x00\x01\x02 not http\r\n\r\n");
    let answer = answer_to(addr, &then_garbage, false).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // Random bytes after the signature never take the worker down.
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..50 {
        let mut h = good.clone();
        for b in h.iter_mut().skip(12) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let _ = answer_to(addr, &h, true).await;
    }
    still_serving(addr).await;
    let mut w = w;
    assert!(w.is_alive(), "{}", w.log_tail(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_an_untrusted_peer_nothing_is_believed() {
    let db = TestDb::new_async().await;
    // Nobody trusted (the default), limit 2 per address.
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--max-connections-per-ip", "2"],
        &[],
    );
    let addr = w.addr();
    let mut keep = Vec::new();
    // A PROXY header from an untrusted peer is not read as one: it reaches
    // the HTTP parser, which refuses it.
    let answer = answer_to(addr, &header_from("203.0.113.5"), true).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // Spoofed X-Forwarded-For, a new address each time: all of them are
    // 127.0.0.1, so the third is refused.
    assert_eq!(upgrade(addr, b"", Some("192.0.2.1"), &mut keep).await, 101);
    assert_eq!(upgrade(addr, b"", Some("192.0.2.2"), &mut keep).await, 101);
    assert_eq!(upgrade(addr, b"", Some("192.0.2.3"), &mut keep).await, 429);
    assert_eq!(upgrade(addr, b"", None, &mut keep).await, 429);
    let h = metric(&metrics_of(addr).await, "tether_proxy_header_errors_total");
    assert_eq!(h, 0.0, "nothing was read as a PROXY header");
    still_serving(addr).await;
}
