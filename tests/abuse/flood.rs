//! The control-character flood of tests/abuse.rs: a worker's RSS, read
//! from /proc while 1,100 messages of 43 KB of control characters (258 KB
//! frames) go through one conversation, stays within the recent-frames
//! cache bound plus 32 MiB, and falls back once the clients leave.

use super::*;

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
        let t = match m {
            Message::Text(t) => t,
            Message::Close(frame) => panic!("closed by the server: {frame:?}"),
            _ => continue,
        };
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
        after.saturating_sub(baseline) <= cache + 16 * MIB
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

/// Large events reach another worker through its catch-up reads of the
/// log, which stop at 1 MiB per conversation and continue where they
/// stopped: everything arrives, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_cross_workers_in_byte_bounded_reads() {
    const N: usize = 60;
    let db = TestDb::new_async().await;
    let a = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--rate-limit", "0"], &[]);
    let b = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--rate-limit", "0"], &[]);
    let c = create_conversation(a.addr(), "alice", &["bob"]).await;
    let body = "\u{1}".repeat(43_000);
    let frames: Vec<String> = (0..N)
        .map(|i| {
            json!({"type":"send","conversation_id":c,"body":body,"client_msg_id":format!("x{i}")})
                .to_string()
        })
        .collect();
    let last = 1 + N as i64;
    let progress: Progress = Arc::new((0..2).map(|_| AtomicI64::new(0)).collect());
    let bob_url = format!("{}?token={}", b.ws_url(), tok("bob"));
    let alice_url = format!("{}?token={}", a.ws_url(), tok("alice"));
    let bob = tokio::spawn(read_flood(bob_url, last, Some((progress.clone(), 0)), None));
    let alice = read_flood(alice_url, last, Some((progress.clone(), 1)), Some(frames)).await;
    assert_eq!(alice, (last, N));
    assert_eq!(bob.await.unwrap().0, last);
    let reads = metric(&metrics_of(b.addr()).await, "tether_catchup_reads_total");
    assert!(reads >= 1.0, "bob's worker read the log: {reads}");
}

/// A client that stops reading is cut (1013) once its queue holds
/// `--outbound-queue-bytes`, long before `--outbound-queue` events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_full_of_large_events_is_cut_by_its_bytes() {
    const N: usize = 100;
    let db = TestDb::new_async().await;
    // bob's worker has the small queue; alice sends through another one
    // (her own queue keeps the default).
    let w = WorkerProc::spawn(
        &db.url(),
        TEST_SECRET,
        &["--outbound-queue-bytes", "1048576"],
        &[],
    );
    let a = WorkerProc::spawn(&db.url(), TEST_SECRET, &["--rate-limit", "0"], &[]);
    let c = create_conversation(a.addr(), "alice", &["bob"]).await;
    let mut bob = WsClient::connect(&w.ws_url(), &tok("bob")).await.unwrap();
    bob.read_until_synced(T).await;
    // bob reads nothing while 100 events of 258 KB (25 MB) are queued for
    // him: far fewer than the 4096 events of --outbound-queue.
    let body = "\u{1}".repeat(43_000);
    let frames: Vec<String> = (0..N)
        .map(|i| {
            json!({"type":"send","conversation_id":c,"body":body,"client_msg_id":format!("q{i}")})
                .to_string()
        })
        .collect();
    let progress: Progress = Arc::new(vec![AtomicI64::new(0)]);
    let alice_url = format!("{}?token={}", a.ws_url(), tok("alice"));
    let last = 1 + N as i64;
    assert_eq!(
        read_flood(alice_url, last, Some((progress, 0)), Some(frames)).await,
        (last, N)
    );
    let m = metrics_of(w.addr()).await;
    assert_eq!(
        metric(&m, "tether_slow_client_closes_total"),
        1.0,
        "bob was cut"
    );
    assert_eq!(bob.wait_close(Duration::from_secs(60)).await, Some(1013));
}
