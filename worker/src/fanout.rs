//! Fan-out: the shell around the dispatcher's pure rules
//! ([`crate::dispatch`]). It owns the inbox, the connections' queues, the
//! recent-frames cache, the reads of the log and the LISTEN connection,
//! and performs every [`Action`] the rules ask for.
//!
//! Events reach the inbox from this worker's own commits (full events,
//! straight from the commit lanes) and from the LISTEN connection, which
//! hears every other worker and host. A notification's content (the
//! committed events riding along) is used only when the payload is
//! authenticated (see `crate::store::notice`); anything else is a
//! hint that makes the dispatcher read the log, which is the truth.
//!
//! The hand-off from a connection's backlog to live delivery: the
//! connection registers (so membership changes reach it), reads its
//! memberships with each conversation's `last_seq` L, subscribes with L,
//! and then replays its backlog up to exactly L. The dispatcher delivers
//! it everything after; if it is already past L it first sends the
//! missing (L, upto] from the shared cache of recent frames, or tells the
//! connection to read that range itself ([`ConnMsg::Backfill`]).
//!
//! Everything here is bounded: the inbox ([`INBOX`] messages; senders wait,
//! which slows commits rather than growing memory), each connection's
//! queue (a connection whose queue is full is cut with 1013 and replays
//! from its cursor when it reconnects), the cache.
//!
//! The LISTEN thread is supervised: a lost connection is re-established
//! (counted in `tether_listener_reconnects_total`) followed by a catch-up
//! of every followed conversation; if the thread stops anyway, the
//! dispatcher's [`Dispatcher::listener_alive`] turns false, the worker
//! reports unhealthy and exits, and the supervisor replaces it. A worker
//! never serves without cross-worker fan-out.

use crate::dispatch::{Action, ConnId, Input, State};
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::presence::relay::{self, MemberCounts, Throttle, PRESENCE_EVERY};
use crate::presence::signal::{self, Signal, SIGNAL_CHANNEL};
use crate::presence::PresenceConfig;
use crate::recent::RecentFrames;
use crate::store::{self, DbSettings, Notice, NoticeKey, Pool, StoreError, NOTIFY_CHANNEL};
use postgres::fallible_iterator::FallibleIterator;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Events read per conversation per catch-up query.
const FETCH_LIMIT: usize = 2000;
/// Messages waiting for the dispatcher before senders wait.
pub const INBOX: usize = 16_384;

/// What the dispatcher puts in a connection's queue.
#[derive(Debug, Clone)]
pub enum ConnMsg {
    Event(Arc<Frame>),
    /// Read (after, upto] of this conversation from the log and send it
    /// before anything else queued after this message.
    Backfill {
        conversation_id: i64,
        after: i64,
        upto: i64,
    },
    /// An ephemeral frame (presence, typing, read): written as is.
    Signal(Utf8Bytes),
}

/// What a connection and the dispatcher share about its queue.
#[derive(Default)]
pub struct QueueState {
    /// Set when the connection is cut for being slow.
    pub cut: AtomicBool,
    /// Bytes of event text queued and not yet taken by the connection.
    pub queued_bytes: AtomicUsize,
}

impl QueueState {
    /// The connection took `msg` off its queue.
    pub fn taken(&self, msg: &ConnMsg) {
        let cost = msg.cost();
        if cost > 0 {
            self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
        }
    }
}

impl ConnMsg {
    /// Bytes it holds in a connection's queue.
    fn cost(&self) -> usize {
        match self {
            ConnMsg::Event(f) => f.text.len(),
            ConnMsg::Backfill { .. } => 0,
            ConnMsg::Signal(text) => text.len(),
        }
    }
}

/// Where the dispatcher reaches one connection.
struct Outlet {
    tx: mpsc::Sender<ConnMsg>,
    state: Arc<QueueState>,
}

enum Msg {
    Register {
        conn: ConnId,
        user: Arc<str>,
        tx: mpsc::Sender<ConnMsg>,
        state: Arc<QueueState>,
    },
    Rules(Input),
    /// Authenticated signals heard on the LISTEN connection.
    Signals(Vec<Signal>),
    /// Presence changes held by the throttle may be due.
    SignalsDue,
}

/// The handle connections and commit lanes use. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<Msg>,
    listener: watch::Receiver<bool>,
}

impl Dispatcher {
    /// Starts the dispatcher task (on the current runtime) and the LISTEN
    /// thread.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        recent: Arc<RecentFrames>,
        pool: Pool,
        settings: DbSettings,
        key: NoticeKey,
        metrics: Arc<Metrics>,
        worker_id: &str,
        queue_bytes: usize,
        presence: PresenceConfig,
    ) -> Dispatcher {
        let (tx, rx) = mpsc::channel(INBOX);
        let (alive_tx, alive_rx) = watch::channel(true);
        let shell = Shell {
            rules: State::new(FETCH_LIMIT),
            outlets: HashMap::new(),
            pool,
            recent,
            metrics: metrics.clone(),
            self_tx: tx.clone(),
            queue_bytes,
            presence,
            throttle: Throttle::default(),
            due_scheduled: false,
            counts: Arc::new(MemberCounts::default()),
        };
        tokio::spawn(shell.run(rx));
        let listen_tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{worker_id}-listen"))
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    listen_loop(settings, &listen_tx, &metrics, &key, presence.enabled)
                });
                if std::panic::catch_unwind(run).is_err() {
                    log::error!("listen: the LISTEN thread panicked");
                }
                if !listen_tx.is_closed() {
                    log::error!("listen: cross-worker fan-out stopped; this worker must go");
                    alive_tx.send_replace(false);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the LISTEN thread: {e}");
            // The receiver sees a closed channel: treated as not alive.
        }
        Dispatcher {
            tx,
            listener: alive_rx,
        }
    }

    /// Whether the LISTEN thread is running (cross-worker fan-out works).
    pub fn listener_alive(&self) -> bool {
        *self.listener.borrow() && self.listener.has_changed().is_ok()
    }

    /// Resolves when the LISTEN thread has stopped for good.
    pub async fn listener_lost(&self) {
        let mut rx = self.listener.clone();
        let _ = rx.wait_for(|alive| !*alive).await;
    }

    /// A connection of `user` exists; its queue is `tx`.
    pub async fn register(
        &self,
        conn: ConnId,
        user: Arc<str>,
        tx: mpsc::Sender<ConnMsg>,
        state: Arc<QueueState>,
    ) {
        let _ = self
            .tx
            .send(Msg::Register {
                conn,
                user,
                tx,
                state,
            })
            .await;
    }

    /// Follow these conversations for `conn`; `positions` are
    /// (conversation, the seq up to which the connection will have sent
    /// everything).
    pub async fn subscribe(&self, conn: ConnId, positions: Vec<(i64, i64)>) {
        let _ = self
            .tx
            .send(Msg::Rules(Input::Subscribe { conn, positions }))
            .await;
    }

    pub async fn deregister(&self, conn: ConnId) {
        let _ = self.tx.send(Msg::Rules(Input::Gone { conn })).await;
    }

    /// Events this worker just committed (after COMMIT), from async code.
    pub async fn local(&self, frames: Vec<Arc<Frame>>) {
        for f in frames {
            let _ = self.tx.send(Msg::Rules(Input::Event(f))).await;
        }
    }

    /// Events this worker just committed, from a commit lane's thread
    /// (waits while the inbox is full: back-pressure on the write path).
    pub fn local_blocking(&self, frames: Vec<Arc<Frame>>) {
        for f in frames {
            let _ = self.tx.blocking_send(Msg::Rules(Input::Event(f)));
        }
    }
}

/// The dispatcher task's state: the rules and what performs their actions.
struct Shell {
    rules: State,
    outlets: HashMap<ConnId, Outlet>,
    pool: Pool,
    /// Shared with backlog replays: every delivered frame goes in.
    recent: Arc<RecentFrames>,
    metrics: Arc<Metrics>,
    self_tx: mpsc::Sender<Msg>,
    /// Bytes of events queued for one connection before it is cut.
    queue_bytes: usize,
    presence: PresenceConfig,
    /// At most one presence frame per user per second.
    throttle: Throttle,
    due_scheduled: bool,
    /// Member counts (typing and receipts go to small conversations).
    counts: Arc<MemberCounts>,
}

impl Shell {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            self.handle(msg);
            // Take whatever else is waiting before acting, so one
            // catch-up read serves many conversations.
            for _ in 0..1024 {
                match rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => break,
                }
            }
            loop {
                let actions = self.rules.take_actions();
                if actions.is_empty() {
                    break;
                }
                for a in actions {
                    self.perform(a);
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Register {
                conn,
                user,
                tx,
                state,
            } => {
                self.outlets.insert(conn, Outlet { tx, state });
                self.rules.handle(Input::Register { conn, user });
            }
            Msg::Rules(input) => {
                if let Input::Gone { conn } = &input {
                    self.outlets.remove(conn);
                }
                self.rules.handle(input);
            }
            Msg::Signals(signals) => {
                let now = Instant::now();
                let pass: Vec<Signal> = signals
                    .into_iter()
                    .filter_map(|s| self.throttle.offer(s, now))
                    .collect();
                self.relay(pass);
            }
            Msg::SignalsDue => {
                self.due_scheduled = false;
                let due = self.throttle.due(Instant::now());
                self.relay(due);
            }
        }
    }

    /// Turns signals into the dispatcher's inputs (reading which
    /// conversations they go to off the async threads), and schedules the
    /// throttle's held changes.
    fn relay(&mut self, signals: Vec<Signal>) {
        if self.throttle.holding() && !self.due_scheduled {
            self.due_scheduled = true;
            let tx = self.self_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PRESENCE_EVERY / 4).await;
                let _ = tx.send(Msg::SignalsDue).await;
            });
        }
        if signals.is_empty() {
            return;
        }
        let (pool, counts, tx) = (self.pool.clone(), self.counts.clone(), self.self_tx.clone());
        let reach = relay::Reach {
            push_max: self.presence.push_max_members,
            receipts_max: self.presence.receipts_max_members,
        };
        tokio::task::spawn_blocking(
            move || match relay::inputs(&pool, &counts, signals, reach) {
                Ok(inputs) => {
                    for input in inputs {
                        if tx.blocking_send(Msg::Rules(input)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => log::debug!("presence: signals not relayed: {e}"),
            },
        );
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Send { conn, frame } => self.queue(conn, ConnMsg::Event(frame)),
            Action::Replay {
                conn,
                conversation_id,
                after,
                upto,
            } => match self.recent.get(conversation_id, after, upto) {
                Some(frames) => {
                    for f in frames {
                        self.queue(conn, ConnMsg::Event(f));
                    }
                }
                None => self.queue(
                    conn,
                    ConnMsg::Backfill {
                        conversation_id,
                        after,
                        upto,
                    },
                ),
            },
            Action::Delivered { frame, recipients } => {
                self.recent
                    .put(frame.conversation_id, std::slice::from_ref(&frame));
                self.metrics
                    .deliveries
                    .fetch_add(recipients as u64, Ordering::Relaxed);
                if recipients > 0 {
                    self.metrics
                        .delivery_latency
                        .observe_duration(frame.committed_at.elapsed());
                }
            }
            Action::Signal { conn, text } => {
                self.metrics.signal_frames.fetch_add(1, Ordering::Relaxed);
                self.queue(conn, ConnMsg::Signal(text));
            }
            Action::Fetch(positions) => self.fetch(positions),
            Action::RetryLater => {
                let tx = self.self_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let _ = tx.send(Msg::Rules(Input::RetryFetches)).await;
                });
            }
        }
    }

    /// Queues for a connection; a full queue (in events or in bytes; one
    /// event always fits) cuts it: marked, its sender dropped, so it closes
    /// with 1013 after what is queued.
    fn queue(&mut self, conn: ConnId, msg: ConnMsg) {
        let Some(outlet) = self.outlets.get(&conn) else {
            return;
        };
        let cost = msg.cost();
        let queued = outlet.state.queued_bytes.load(Ordering::Acquire);
        if queued == 0 || queued + cost <= self.queue_bytes {
            outlet.state.queued_bytes.fetch_add(cost, Ordering::AcqRel);
            match outlet.tx.try_send(msg) {
                Ok(()) => return,
                Err(_) => {
                    outlet.state.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
                }
            }
        }
        outlet.state.cut.store(true, Ordering::Release);
        self.outlets.remove(&conn);
        self.metrics
            .slow_client_closes
            .fetch_add(1, Ordering::Relaxed);
        log::info!("conn={conn}: too slow, cutting (1013)");
        self.rules.handle(Input::Gone { conn });
    }

    /// One read of the log for every conversation that needs one.
    fn fetch(&mut self, positions: Vec<(i64, i64)>) {
        self.metrics.catchup_reads.fetch_add(1, Ordering::Relaxed);
        let pool = self.pool.clone();
        let tx = self.self_tx.clone();
        tokio::task::spawn_blocking(move || {
            let read = pool
                .get()
                .map_err(StoreError::from)
                .and_then(|mut c| store::events_after_many(&mut c, &positions, FETCH_LIMIT as i64));
            let mut more = Vec::new();
            let events = match read {
                Ok((events, cut)) => {
                    more = cut;
                    let now = Instant::now();
                    Some(
                        events
                            .iter()
                            .map(|e| Arc::new(Frame::from_event(e, now)))
                            .collect(),
                    )
                }
                Err(e) => {
                    log::warn!(
                        "fan-out: catch-up read of {} conversations failed: {e}",
                        positions.len()
                    );
                    None
                }
            };
            let _ = tx.blocking_send(Msg::Rules(Input::Fetched { positions, events }));
            // A read cut short by its byte bound: the rest is read next,
            // as for a hint of a later event.
            for (conversation_id, last) in more {
                let _ = tx.blocking_send(Msg::Rules(Input::Hint {
                    conversation_id,
                    upto: last + 1,
                }));
            }
        });
    }
}

/// Turns one notification into the dispatcher's inputs. Content and
/// membership are taken only from an authenticated payload; from any
/// other, only `e` lines, which make the dispatcher read the log.
fn inputs_of(notice: Notice, metrics: &Metrics) -> Vec<Input> {
    let mut inputs = Vec::new();
    if !notice.authenticated {
        metrics
            .notifications_unauthenticated
            .fetch_add(1, Ordering::Relaxed);
    }
    if notice.everything && notice.authenticated {
        inputs.push(Input::CatchUpAll);
    }
    let now = Instant::now();
    for e in &notice.content {
        inputs.push(Input::Event(Arc::new(Frame::from_event(e, now))));
    }
    for (conversation_id, seq, user) in notice.membership {
        inputs.push(Input::MemberHint {
            conversation_id,
            seq,
            user,
        });
    }
    for (conversation_id, upto) in notice.events {
        inputs.push(Input::Hint {
            conversation_id,
            upto,
        });
    }
    inputs
}

/// The LISTEN connection: a dedicated thread (the `postgres` client is
/// blocking) that turns notifications into the dispatcher's inputs, and
/// reconnects with backoff when the connection is lost (then asks for a
/// full catch-up). Returns only when the dispatcher is gone.
fn listen_loop(
    settings: DbSettings,
    tx: &mpsc::Sender<Msg>,
    metrics: &Metrics,
    key: &NoticeKey,
    signals: bool,
) {
    let listen = if signals {
        format!("LISTEN {NOTIFY_CHANNEL}; LISTEN {SIGNAL_CHANNEL}")
    } else {
        format!("LISTEN {NOTIFY_CHANNEL}")
    };
    let mut backoff = Duration::from_millis(100);
    let mut connected_once = false;
    loop {
        if tx.is_closed() {
            return;
        }
        let mut client = match settings.connect().and_then(|mut c| {
            c.batch_execute(&listen)
                .map(|_| c)
                .map_err(StoreError::from)
        }) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("listen: cannot connect: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if connected_once {
            metrics.listener_reconnects.fetch_add(1, Ordering::Relaxed);
            log::info!("listen: reconnected; catching up every followed conversation");
        }
        connected_once = true;
        if tx.blocking_send(Msg::Rules(Input::CatchUpAll)).is_err() {
            return;
        }
        let mut idle_since = Instant::now();
        loop {
            let next = client
                .notifications()
                .timeout_iter(Duration::from_millis(500))
                .next();
            match next {
                Ok(Some(n)) => {
                    idle_since = Instant::now();
                    #[cfg(feature = "fault-injection")]
                    if n.payload() == "tether-fault: panic the LISTEN thread" {
                        panic!("fault injection: LISTEN thread panics");
                    }
                    if n.channel() == SIGNAL_CHANNEL {
                        match signal::parse(n.payload(), key) {
                            Some(signals) if !signals.is_empty() => {
                                if tx.blocking_send(Msg::Signals(signals)).is_err() {
                                    return;
                                }
                            }
                            Some(_) => {}
                            None => {
                                metrics
                                    .notifications_unauthenticated
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        continue;
                    }
                    let notice = Notice::parse(n.payload(), key);
                    for input in inputs_of(notice, metrics) {
                        if tx.blocking_send(Msg::Rules(input)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    log::warn!("listen: connection lost: {e}");
                    break;
                }
                Ok(None) => {
                    if tx.is_closed() {
                        return;
                    }
                    if client.is_closed() {
                        log::warn!("listen: connection closed");
                        break;
                    }
                    // A quiet connection may be dead without us knowing
                    // (the server was stopped, a proxy dropped it): probe.
                    if idle_since.elapsed() > Duration::from_secs(2) {
                        idle_since = Instant::now();
                        if let Err(e) = client.simple_query("SELECT 1") {
                            log::warn!("listen: probe failed: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }
}
