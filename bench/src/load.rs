//! The pieces every scenario uses: tokens, clients that record what they
//! receive (readers), clients that send at a rate (senders), percentiles
//! and the report.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tether_client::{Client, ClientError, ClientEvent, ClientHandle, ClientOptions, Rest};
use tether_protocol::auth::{self, Secret};

/// Micros since the first call in this process (send timestamps in bodies).
pub fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Everything a scenario needs to reach the server.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` of each worker (one entry for a supervisor).
    pub urls: Vec<String>,
    pub secret: Secret,
    /// Makes user names unique per run (the database may be shared).
    pub prefix: String,
}

impl Target {
    pub fn token(&self, user: &str) -> String {
        auth::issue(&self.secret, user, 24 * 3600).expect("valid user id")
    }

    pub fn user(&self, kind: &str, i: usize) -> String {
        format!("{}{kind}{i}", self.prefix)
    }

    pub fn url(&self, i: usize) -> &str {
        &self.urls[i % self.urls.len()]
    }

    pub fn ws_url(&self, i: usize) -> String {
        let u = self.url(i);
        format!(
            "ws://{}/v1/ws",
            u.trim_start_matches("http://").trim_end_matches('/')
        )
    }

    pub fn rest(&self, i: usize, user: &str) -> Rest {
        Rest::new(self.url(i), self.token(user))
    }

    /// Client options for `user` on worker `i`.
    pub fn options(&self, i: usize, user: &str) -> ClientOptions {
        let mut o = ClientOptions::new(self.ws_url(i), self.token(user));
        o.read_buffer = 4096;
        o
    }
}

/// Source address for connection `i`: 127.0.0.2, .3, ... every `per` connections.
pub fn source_addr(i: usize, per: usize) -> IpAddr {
    let n = 2 + (i / per.max(1)) as u32;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000u32 + n))
}

/// Creates conversations `[(creator, members)]` through the REST API, a
/// few at a time; returns their ids in order.
pub async fn create_conversations(
    target: &Target,
    specs: Vec<(String, Vec<String>)>,
) -> Result<Vec<i64>, String> {
    let mut ids = vec![0i64; specs.len()];
    let mut pending = FuturesUnordered::new();
    let mut it = specs.into_iter().enumerate();
    loop {
        while pending.len() < 16 {
            let Some((i, (creator, members))) = it.next() else {
                break;
            };
            let rest = target.rest(i, &creator);
            pending.push(async move {
                let mut tries = 0;
                loop {
                    match rest.create_conversation(&members, "bench").await {
                        Ok(c) => return Ok((i, c.id)),
                        Err(e) if tries < 5 => {
                            tries += 1;
                            log::warn!("create conversation: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(format!("creating a conversation: {e}")),
                    }
                }
            });
        }
        match pending.next().await {
            Some(r) => {
                let (i, id) = r?;
                ids[i] = id;
            }
            None => return Ok(ids),
        }
    }
}

/// What one reader saw.
#[derive(Default)]
pub struct ReaderState {
    /// Message events received (after the client's dedup).
    pub messages: AtomicU64,
    /// Message events whose seq was not above the last one (should be 0:
    /// the client deduplicates).
    pub dup_surfaced: AtomicU64,
    pub gaps: AtomicU64,
    pub last_seq: AtomicI64,
    pub synced: AtomicU64,
    pub disconnects: AtomicU64,
    pub connect_errors: AtomicU64,
    /// When the last `synced` / disconnect happened (µs, [`now_us`]).
    pub last_synced_us: AtomicU64,
    pub last_disconnect_us: AtomicU64,
    pub worker: Mutex<String>,
    pub latencies_us: Mutex<Vec<u32>>,
    /// First synced after this (µs) is recorded in `resynced_us`.
    pub watch_from_us: AtomicU64,
    pub resynced_us: AtomicU64,
    /// `read` and `presence` frames received (what presence costs).
    pub read_frames: AtomicU64,
    pub presence_frames: AtomicU64,
}

/// A client whose events are consumed by a task that records them.
pub struct Reader {
    pub state: Arc<ReaderState>,
    pub handle: ClientHandle,
    pub conversation: i64,
}

impl Reader {
    /// Connects; messages in `conversation` with a timestamp body count
    /// toward latency when `record_latency`.
    pub fn start(opts: ClientOptions, conversation: i64, record_latency: bool) -> Reader {
        let client = Client::connect(opts);
        let (handle, mut rx) = client.into_parts();
        let state = Arc::new(ReaderState::default());
        let st = state.clone();
        tokio::spawn(async move {
            let mut last = 0i64;
            while let Some(ev) = rx.recv().await {
                match ev {
                    ClientEvent::Event(e) => {
                        if e.kind != "message.created" || e.conversation_id != conversation {
                            continue;
                        }
                        if e.seq <= last {
                            st.dup_surfaced.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        last = e.seq;
                        st.last_seq.store(e.seq, Ordering::Relaxed);
                        if record_latency {
                            if let Some(t) = e.body.as_deref().and_then(parse_stamp) {
                                let us = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                                st.latencies_us.lock().unwrap().push(us);
                            }
                        }
                        st.messages.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Synced => {
                        let now = now_us();
                        st.last_synced_us.store(now, Ordering::Relaxed);
                        let watch = st.watch_from_us.load(Ordering::Relaxed);
                        if watch > 0 && st.resynced_us.load(Ordering::Relaxed) == 0 && now > watch {
                            st.resynced_us.store(now, Ordering::Relaxed);
                        }
                        st.synced.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Hello { worker, .. } => *st.worker.lock().unwrap() = worker,
                    ClientEvent::Read { .. } => {
                        st.read_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Presence { .. } => {
                        st.presence_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Error(ClientError::Gap { .. }) => {
                        st.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Error(ClientError::Disconnected { .. }) => {
                        st.last_disconnect_us.store(now_us(), Ordering::Relaxed);
                        st.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Error(ClientError::Connect(e)) => {
                        log::debug!("connect failed: {e}");
                        st.connect_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        Reader {
            state,
            handle,
            conversation,
        }
    }

    pub fn flush_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.state.latencies_us.lock().unwrap())
    }
}

/// `"<µs> ..."`: the send time at the start of a body.
pub fn stamp_body(pad: usize) -> String {
    let mut s = now_us().to_string();
    if pad > s.len() {
        s.push(' ');
        let n = pad - s.len();
        s.push_str(&"x".repeat(n));
    }
    s
}

fn parse_stamp(body: &str) -> Option<u64> {
    body.split(' ').next()?.parse().ok()
}

/// Waits until `cond` or `timeout`; true if it held.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects readers in waves of `wave` (each wave synced before the next).
pub async fn connect_readers(
    specs: Vec<(ClientOptions, i64)>,
    wave: usize,
    record_latency: bool,
    timeout: Duration,
) -> Result<Vec<Reader>, String> {
    let mut readers: Vec<Reader> = Vec::with_capacity(specs.len());
    for chunk in specs.chunks(wave.max(1)) {
        let start = readers.len();
        for (o, c) in chunk {
            readers.push(Reader::start(o.clone(), *c, record_latency));
        }
        let fresh = &readers[start..];
        if !wait_for(timeout, || {
            fresh
                .iter()
                .all(|r| r.state.synced.load(Ordering::Relaxed) > 0)
        })
        .await
        {
            let n = fresh
                .iter()
                .filter(|r| r.state.synced.load(Ordering::Relaxed) > 0)
                .count();
            return Err(format!(
                "only {n} of {} clients synced within {timeout:?}",
                fresh.len()
            ));
        }
    }
    Ok(readers)
}

/// What the senders did.
#[derive(Default)]
pub struct SendTotals {
    pub acked: u64,
    pub failed: u64,
    pub outbox_full: u64,
    pub duplicates: u64,
    pub latencies_us: Vec<u32>,
    /// Acked seqs per conversation.
    pub seqs: HashMap<i64, Vec<i64>>,
    pub elapsed: Duration,
}

/// Sends to `conversation` from `handle` for `duration`: at `rate` msg/s
/// (open loop), or with `window` sends outstanding when `rate` is 0.
pub async fn send_loop(
    handle: ClientHandle,
    conversation: i64,
    rate: f64,
    window: usize,
    duration: Duration,
    pad: usize,
) -> SendTotals {
    let mut t = SendTotals::default();
    let start = Instant::now();
    let end = start + duration;
    let mut inflight = FuturesUnordered::new();
    let interval = if rate > 0.0 {
        Some(Duration::from_secs_f64(1.0 / rate))
    } else {
        None
    };
    // Spread the senders over the interval: started in lockstep, N senders
    // at rate R each would arrive as bursts of N every 1/R seconds, which
    // measures burst queueing rather than a steady load. The golden-ratio
    // phase spreads any number of conversations evenly.
    let phase = (conversation as f64 * 0.618_033_988_749_895).fract();
    let mut next =
        tokio::time::Instant::now() + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(phase));
    let issue = |t: &mut SendTotals, inflight: &mut FuturesUnordered<_>| {
        let sent_at = Instant::now();
        let fut = handle.send(conversation, stamp_body(pad));
        let _ = t;
        inflight.push(async move { (fut.await, sent_at.elapsed()) });
    };
    loop {
        let now = Instant::now();
        let done_sending = now >= end;
        if done_sending && inflight.is_empty() {
            break;
        }
        match interval {
            None => {
                while !done_sending && inflight.len() < window {
                    issue(&mut t, &mut inflight);
                }
                if let Some((r, lat)) = inflight.next().await {
                    record(&mut t, r, lat);
                }
            }
            Some(iv) => {
                if done_sending {
                    if let Some((r, lat)) = inflight.next().await {
                        record(&mut t, r, lat);
                    }
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {
                        // Catch up at most a little after a stall.
                        let behind = tokio::time::Instant::now().saturating_duration_since(next);
                        if behind > iv * 100 {
                            next = tokio::time::Instant::now();
                        }
                        next += iv;
                        issue(&mut t, &mut inflight);
                    }
                    Some((r, lat)) = inflight.next(), if !inflight.is_empty() => record(&mut t, r, lat),
                }
            }
        }
    }
    t.elapsed = start.elapsed();
    t
}

fn record(
    t: &mut SendTotals,
    r: Result<tether_client::Sent, tether_client::SendError>,
    lat: Duration,
) {
    match r {
        Ok(s) => {
            t.acked += 1;
            if s.duplicate {
                t.duplicates += 1;
            }
            t.latencies_us
                .push(lat.as_micros().min(u32::MAX as u128) as u32);
            t.seqs.entry(s.conversation_id).or_default().push(s.seq);
        }
        Err(tether_client::SendError::OutboxFull { .. }) => t.outbox_full += 1,
        Err(e) => {
            log::warn!("send failed: {e}");
            t.failed += 1;
        }
    }
}

impl SendTotals {
    pub fn merge(&mut self, o: SendTotals) {
        self.acked += o.acked;
        self.failed += o.failed;
        self.outbox_full += o.outbox_full;
        self.duplicates += o.duplicates;
        self.latencies_us.extend(o.latencies_us);
        for (c, s) in o.seqs {
            self.seqs.entry(c).or_default().extend(s);
        }
        self.elapsed = self.elapsed.max(o.elapsed);
    }

    /// Per conversation, the acked seqs must be distinct. Returns the
    /// number of repeated seqs.
    pub fn repeated_seqs(&self) -> u64 {
        let mut n = 0;
        for s in self.seqs.values() {
            let mut v = s.clone();
            v.sort_unstable();
            let before = v.len();
            v.dedup();
            n += (before - v.len()) as u64;
        }
        n
    }
}

/// p50/p90/p99/p999/max of `v` (sorted in place), in ms.
pub fn percentiles(v: &mut [u32]) -> Map<String, Value> {
    let mut m = Map::new();
    v.sort_unstable();
    let at = |q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((q * v.len() as f64) as usize).min(v.len() - 1);
        v[i] as f64 / 1000.0
    };
    for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
        m.insert(k.into(), json!(round3(at(q))));
    }
    m.insert(
        "max".into(),
        json!(round3(v.last().map_or(0.0, |x| *x as f64 / 1000.0))),
    );
    m.insert("samples".into(), json!(v.len()));
    m
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The end of every scenario: a table, then one JSON line.
pub struct Report {
    pub scenario: &'static str,
    rows: Vec<(String, String)>,
    pub json: Map<String, Value>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            rows: Vec::new(),
            json: Map::new(),
            failures: Vec::new(),
        }
    }

    /// A figure for both the table and the JSON.
    pub fn put(&mut self, key: &str, label: &str, value: Value) {
        let shown = match &value {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        self.rows.push((label.to_string(), shown));
        self.json.insert(key.to_string(), value);
    }

    /// A figure shown one way in the table and stored another in the JSON.
    pub fn put_shown(&mut self, key: &str, label: &str, shown: String, value: Value) {
        self.rows.push((label.to_string(), shown));
        self.json.insert(key.to_string(), value);
    }

    /// A percentile set (ms).
    pub fn put_latency(&mut self, key: &str, label: &str, samples: &mut [u32]) {
        let p = percentiles(samples);
        let shown = format!(
            "p50 {} · p90 {} · p99 {} · p999 {} · max {} ms ({} samples)",
            p["p50"], p["p90"], p["p99"], p["p999"], p["max"], p["samples"]
        );
        self.rows.push((label.to_string(), shown));
        self.json.insert(key.to_string(), Value::Object(p));
    }

    /// A correctness check: recorded, and a failure if not `ok`.
    pub fn check(&mut self, ok: bool, what: String) {
        if !ok {
            self.failures.push(what);
        }
    }

    pub fn print(mut self) -> bool {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(10);
        println!("\n== tether-bench {} ==", self.scenario);
        for (k, v) in &self.rows {
            println!("{k:<width$}  {v}");
        }
        let ok = self.failures.is_empty();
        if ok {
            println!("{:<width$}  PASS", "correctness");
        } else {
            for f in &self.failures {
                println!("{:<width$}  FAIL: {f}", "correctness");
            }
        }
        let mut out = Map::new();
        out.insert("scenario".into(), json!(self.scenario));
        out.insert("ok".into(), json!(ok));
        out.insert("failures".into(), json!(self.failures));
        out.append(&mut self.json);
        println!("{}", Value::Object(out));
        ok
    }
}
