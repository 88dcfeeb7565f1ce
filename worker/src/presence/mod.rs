//! Presence, typing and read receipts: ephemeral signals next to the
//! event log, never in it (no seq, nothing of the log's guarantees).
//!
//! - **Leases** ([`run_leases`], a thread): every tick the worker compares
//!   the users with connections on it (`UserConnections`) with the users
//!   it holds leases for, takes leases for newcomers and gives up those of
//!   users gone, renews all of them every third of the lease, and sweeps
//!   the users whose grace period ran out. The database decides every
//!   transition exactly once (`store::presence`); the transitions are
//!   published.
//! - **Publishing** ([`Signals`]): presence changes, typing (at most once
//!   per 2 s per user and conversation) and read receipts (at most one per
//!   member and conversation per second, from the cursor writes) are
//!   batched for a few milliseconds and sent as authenticated NOTIFY
//!   payloads on [`signal::SIGNAL_CHANNEL`] (one NOTIFY per batch).
//! - **Relaying** ([`relay`]): every worker (the sender too) hears them on
//!   its LISTEN connection; the fan-out turns them into frames for the
//!   connections of the other members, in conversations of at most
//!   `--presence-push-max-members` members, through the dispatcher (whose
//!   subscriptions already say who may see a conversation).
//!
//! With `--presence off` none of this runs.

pub mod relay;
pub mod signal;

use crate::metrics::Metrics;
use crate::store::{self, NoticeKey, Pool};
use crate::upgrade::UserConnections;
use signal::{Signal, SIGNAL_CHANNEL};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Typing is forwarded at most once per this, per user and conversation.
pub const TYPING_EVERY: Duration = Duration::from_secs(2);
/// Read receipts: at most one per member and conversation per this.
pub const READ_EVERY: Duration = Duration::from_secs(1);
/// How often leases are compared with the connections and the grace
/// periods swept.
const TICK: Duration = Duration::from_millis(500);
/// How often long-expired leases are forgotten.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Signals waiting to be published before new ones are dropped.
const QUEUE: usize = 8192;
/// How long the publisher gathers signals into one NOTIFY.
const GATHER: Duration = Duration::from_millis(20);
/// Entries of the typing and read gates before old ones are forgotten.
const GATE_MAX: usize = 100_000;
/// Presence frames in the burst after `synced`, at most.
pub const BURST_MAX: i64 = 2_000;

/// What presence runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    pub enabled: bool,
    /// Offline only after this long with no connection anywhere.
    pub grace: Duration,
    /// A lease not renewed for this long has expired (its worker died).
    pub lease: Duration,
    /// Presence and typing are pushed in conversations of at most this
    /// many members.
    pub push_max_members: i64,
    /// Read receipts are pushed in conversations of at most this many.
    pub receipts_max_members: i64,
}

/// The handle connections and the cursor writer publish through.
pub struct Signals {
    enabled: bool,
    tx: mpsc::Sender<Signal>,
    typing: Mutex<HashMap<(Arc<str>, i64), Instant>>,
    metrics: Arc<Metrics>,
}

impl Signals {
    /// Starts the publisher (on the current runtime) and, when enabled,
    /// the lease thread.
    pub fn start(
        config: PresenceConfig,
        pool: Pool,
        key: NoticeKey,
        users: Arc<UserConnections>,
        metrics: Arc<Metrics>,
        worker: &str,
    ) -> Signals {
        let (tx, rx) = mpsc::channel(QUEUE);
        if config.enabled {
            tokio::spawn(publish_loop(rx, pool.clone(), key));
            let (tx, worker) = (tx.clone(), worker.to_string());
            let metrics = metrics.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{worker}-presence"))
                .spawn(move || run_leases(config, pool, users, tx, metrics, &worker));
            if let Err(e) = spawned {
                log::error!("presence: cannot start the lease thread: {e}");
            }
        }
        Signals {
            enabled: config.enabled,
            tx,
            typing: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Whether presence, typing and receipts are on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Queues a signal for publishing; dropped (and counted) when the
    /// queue is full: signals are ephemeral.
    pub fn publish(&self, s: Signal) {
        if self.enabled && self.tx.try_send(s).is_err() {
            self.metrics.signals_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `user` types in `conversation_id` (a member: the caller checked):
    /// forwarded unless they did within [`TYPING_EVERY`]. False when
    /// dropped by that limit.
    pub fn typing(&self, user: &Arc<str>, conversation_id: i64) -> bool {
        if !self.enabled {
            return false;
        }
        let now = Instant::now();
        {
            let mut gate = self.typing.lock().unwrap_or_else(|e| e.into_inner());
            if gate.len() >= GATE_MAX {
                gate.retain(|_, at| now.duration_since(*at) < TYPING_EVERY);
            }
            match gate.get(&(user.clone(), conversation_id)) {
                Some(at) if now.duration_since(*at) < TYPING_EVERY => {
                    self.metrics.typing_dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                _ => {
                    gate.insert((user.clone(), conversation_id), now);
                }
            }
        }
        self.metrics
            .typing_forwarded
            .fetch_add(1, Ordering::Relaxed);
        self.publish(Signal::Typing {
            conversation_id,
            user: user.to_string(),
        });
        true
    }
}

/// The read-receipt gate of the cursor writer: at most one receipt per
/// member and conversation per [`READ_EVERY`]; a cursor that moves again
/// within it is announced once the second is over, at its latest seq.
/// Pure (the caller passes the time).
#[derive(Default)]
pub struct ReadGate {
    shown: HashMap<(i64, Arc<str>), Instant>,
    held: HashMap<(i64, Arc<str>), i64>,
}

impl ReadGate {
    /// Cursors written: the receipts to publish now.
    pub fn written(&mut self, acks: &[(i64, Arc<str>, i64)], now: Instant) -> Vec<Signal> {
        let mut out = Vec::new();
        for (c, user, seq) in acks {
            let key = (*c, user.clone());
            match self.shown.get(&key) {
                Some(at) if now.duration_since(*at) < READ_EVERY => {
                    let held = self.held.entry(key).or_insert(*seq);
                    *held = (*held).max(*seq);
                }
                _ => {
                    self.shown.insert(key, now);
                    out.push(read(*c, user, *seq));
                }
            }
        }
        out.extend(self.due(now));
        out
    }

    /// Held receipts whose second is over.
    pub fn due(&mut self, now: Instant) -> Vec<Signal> {
        let mut out = Vec::new();
        let ready: Vec<(i64, Arc<str>)> = self
            .held
            .keys()
            .filter(|k| {
                self.shown
                    .get(*k)
                    .is_none_or(|at| now.duration_since(*at) >= READ_EVERY)
            })
            .cloned()
            .collect();
        for key in ready {
            if let Some(seq) = self.held.remove(&key) {
                out.push(read(key.0, &key.1, seq));
                self.shown.insert(key, now);
            }
        }
        if self.shown.len() > GATE_MAX {
            self.shown
                .retain(|_, at| now.duration_since(*at) < READ_EVERY);
        }
        out
    }
}

fn read(conversation_id: i64, user: &str, seq: i64) -> Signal {
    Signal::Read {
        conversation_id,
        user: user.to_string(),
        seq,
    }
}

/// Gathers queued signals for [`GATHER`] and publishes them, one NOTIFY
/// per payload (as many signals as fit in each).
async fn publish_loop(mut rx: mpsc::Receiver<Signal>, pool: Pool, key: NoticeKey) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + GATHER;
        while let Ok(Some(s)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            batch.push(s);
            if batch.len() >= 1000 {
                break;
            }
        }
        let payloads = signal::encode(&batch, &key);
        let pool = pool.clone();
        let sent = tokio::task::spawn_blocking(move || -> Result<(), store::StoreError> {
            let mut c = pool.get()?;
            for p in payloads {
                store::notify(&mut c, SIGNAL_CHANNEL, &p)?;
            }
            Ok(())
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            log::debug!("presence: {} signals not published", batch.len());
        }
    }
}

/// The lease thread (see the module doc). Runs for the life of the
/// process; a database that is down only delays it.
fn run_leases(
    config: PresenceConfig,
    pool: Pool,
    users: Arc<UserConnections>,
    tx: mpsc::Sender<Signal>,
    metrics: Arc<Metrics>,
    worker: &str,
) {
    let holder = holder_id();
    let renew_every = config.lease / 3;
    let mut held: HashSet<Arc<str>> = HashSet::new();
    let mut renewed = Instant::now();
    let mut purged = Instant::now();
    let publish = |changes: Vec<store::presence::Presence>| {
        for p in changes {
            metrics.presence_changes.fetch_add(1, Ordering::Relaxed);
            let _ = tx.blocking_send(Signal::Presence {
                user: p.user,
                online: p.online,
                last_seen: p.last_seen,
            });
        }
    };
    loop {
        std::thread::sleep(TICK);
        if tx.is_closed() {
            return;
        }
        let now: HashSet<Arc<str>> = users.keys().into_iter().collect();
        let mut client = match pool.get() {
            Ok(c) => c,
            Err(_) => continue,
        };
        let renew = renewed.elapsed() >= renew_every;
        let newcomers: Vec<Arc<str>> = now.difference(&held).cloned().collect();
        let wanted: Vec<String> = if renew {
            now.iter().map(|u| u.to_string()).collect()
        } else {
            newcomers.iter().map(|u| u.to_string()).collect()
        };
        let gone: Vec<String> = held.difference(&now).map(|u| u.to_string()).collect();
        match store::presence::lease(&mut client, &holder, &wanted, config.lease) {
            Ok(online) => {
                publish(online);
                if renew {
                    renewed = Instant::now();
                }
                held.extend(newcomers);
            }
            Err(e) => log::debug!("worker={worker}: presence leases: {e}"),
        }
        if !gone.is_empty() {
            match store::presence::release(&mut client, &holder, &gone) {
                Ok(()) => held.retain(|u| now.contains(u)),
                Err(e) => log::debug!("worker={worker}: presence release: {e}"),
            }
        }
        metrics
            .presence_leases
            .store(held.len() as u64, Ordering::Relaxed);
        // The grace period runs from the last renewal or release; a killed
        // worker renewed at most a renewal interval before it died, so
        // that interval is added: nobody goes offline sooner than the
        // grace period after their last connection went.
        match store::presence::sweep(&mut client, config.grace + renew_every) {
            Ok(offline) => publish(offline),
            Err(e) => log::debug!("worker={worker}: presence sweep: {e}"),
        }
        if purged.elapsed() >= PURGE_EVERY {
            purged = Instant::now();
            if let Err(e) = store::presence::forget_expired(&mut client) {
                log::debug!("worker={worker}: presence purge: {e}");
            }
        }
    }
}

/// This process among every worker of every host: host name, pid and a
/// random nonce (a restarted worker with a reused pid is another holder).
fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut nonce = [0u8; 6];
    let _ = getrandom::fill(&mut nonce);
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}:{}:{nonce}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_receipts_at_most_once_a_second_with_the_latest_seq() {
        let mut g = ReadGate::default();
        let bob: Arc<str> = Arc::from("bob");
        let t0 = Instant::now();
        assert_eq!(
            g.written(&[(1, bob.clone(), 5)], t0),
            vec![read(1, "bob", 5)]
        );
        let soon = t0 + Duration::from_millis(200);
        assert!(g.written(&[(1, bob.clone(), 7)], soon).is_empty());
        assert!(g.written(&[(1, bob.clone(), 9)], soon).is_empty());
        assert_eq!(
            g.written(&[(2, bob.clone(), 1)], soon),
            vec![read(2, "bob", 1)],
            "per conversation"
        );
        assert_eq!(g.due(t0 + READ_EVERY), vec![read(1, "bob", 9)]);
        assert!(g.due(t0 + READ_EVERY * 3).is_empty());
    }
}
