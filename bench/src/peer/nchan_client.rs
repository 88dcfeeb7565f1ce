//! Nchan's side of the load: WebSocket subscribers that record what they
//! receive, and HTTP publishers at a rate. Nchan has no acks, cursors or
//! seqs, so each body carries its send time and a per-room counter
//! (`"<µs> <n> xxx"`): a subscriber counts the distinct counters it got
//! (duplicates are counted apart) and the time from publish to receipt.

use crate::load::{now_us, source_addr};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_client::Rest;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
pub struct SubState {
    pub open: AtomicBool,
    pub failed: AtomicBool,
    /// Distinct counters received.
    pub messages: AtomicU64,
    pub duplicates: AtomicU64,
    pub latencies_us: Mutex<Vec<u32>>,
    /// Bit n: counter n was received.
    seen: Mutex<Vec<u64>>,
}

pub struct Sub {
    pub state: Arc<SubState>,
    pub room: usize,
    task: JoinHandle<()>,
}

impl Sub {
    /// Connects to `ws_url` (from source address `bind` when given).
    pub fn start(port: u16, ws_url: String, room: usize, bind: Option<usize>) -> Sub {
        let state = Arc::new(SubState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = run_sub(port, &ws_url, bind, &st).await {
                log::debug!("nchan subscriber: {e}");
                st.failed.store(true, Ordering::Relaxed);
            }
            st.open.store(false, Ordering::Relaxed);
        });
        Sub { state, room, task }
    }

    pub fn flush_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.state.latencies_us.lock().unwrap())
    }

    pub fn close(&self) {
        self.task.abort();
    }
}

async fn run_sub(port: u16, url: &str, bind: Option<usize>, st: &SubState) -> Result<(), String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(i) = bind {
        sock.bind(SocketAddr::new(source_addr(i, 20_000), 0))
            .map_err(|e| e.to_string())?;
    }
    let stream = sock
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    st.open.store(true, Ordering::Relaxed);
    while let Some(m) = ws.next().await {
        let m = m.map_err(|e| e.to_string())?;
        let text = match &m {
            Message::Text(t) => t.as_str(),
            Message::Close(_) => break,
            _ => continue,
        };
        let mut parts = text.split(' ');
        let (Some(us), Some(n)) = (
            parts.next().and_then(|s| s.parse::<u64>().ok()),
            parts.next().and_then(|s| s.parse::<usize>().ok()),
        ) else {
            continue;
        };
        let fresh = {
            let mut seen = st.seen.lock().unwrap();
            let (w, b) = (n / 64, n % 64);
            if seen.len() <= w {
                seen.resize(w + 1, 0);
            }
            let fresh = seen[w] & (1 << b) == 0;
            seen[w] |= 1 << b;
            fresh
        };
        if !fresh {
            st.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let lat = now_us().saturating_sub(us).min(u32::MAX as u64) as u32;
        st.latencies_us.lock().unwrap().push(lat);
        st.messages.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// What one room's publisher did.
#[derive(Default)]
pub struct PubTotals {
    pub ok: u64,
    pub failed: u64,
    /// The next counter (the publisher resumes there in the next step).
    pub next: usize,
}

/// POSTs to `/pub?id=ROOM` at `rate` msg/s for `duration` (open loop, like
/// the tether senders: every request in flight at once if need be).
pub async fn publish_loop(
    rest: Rest,
    room: String,
    phase: f64,
    first: usize,
    rate: f64,
    duration: Duration,
    pad: usize,
) -> PubTotals {
    let mut t = PubTotals {
        next: first,
        ..PubTotals::default()
    };
    let iv = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let end = Instant::now() + duration;
    let mut next = tokio::time::Instant::now() + iv.mul_f64(phase);
    let path = format!("/pub?id={room}");
    let mut inflight = FuturesUnordered::new();
    loop {
        let sending = Instant::now() < end;
        if !sending && inflight.is_empty() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next), if sending => {
                let behind = tokio::time::Instant::now().saturating_duration_since(next);
                if behind > iv * 100 {
                    next = tokio::time::Instant::now();
                }
                next += iv;
                let mut body = format!("{} {}", now_us(), t.next);
                t.next += 1;
                if pad > body.len() {
                    body.push(' ');
                    body.push_str(&"x".repeat(pad - body.len()));
                }
                let (rest, path) = (rest.clone(), path.clone());
                inflight.push(async move {
                    rest.send("POST", &path, Some(("text/plain", body.into_bytes()))).await
                });
            }
            Some(r) = inflight.next(), if !inflight.is_empty() => match r {
                Ok(resp) if (200..300).contains(&resp.status) => t.ok += 1,
                Ok(resp) => {
                    log::warn!("nchan publish: HTTP {}", resp.status);
                    t.failed += 1;
                }
                Err(e) => {
                    log::warn!("nchan publish: {e}");
                    t.failed += 1;
                }
            },
            else => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    t
}
