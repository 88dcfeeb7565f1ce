//! Fan-out: getting every committed event to every connected member on
//! this worker, in seq order, with no gap.
//!
//! One dispatcher task owns all fan-out state (no locks). Events reach it
//! from two sources: this worker's own commits (full events, straight from
//! the commit lanes) and the LISTEN connection (hints from every other
//! worker and host: "conversation C is committed up to seq S"). A hint is
//! never trusted for content: the dispatcher reads the event log.
//!
//! Per followed conversation the dispatcher keeps `upto`, the highest seq
//! it has delivered, and delivers only `upto + 1`. An event that arrives
//! ahead of a gap waits in `pending` while the gap is read from the log;
//! a hint past `upto` triggers a read. A newly followed conversation, and
//! every followed one after the LISTEN connection was lost, gets a catch-up
//! read, so an event whose notification was lost is still delivered.
//!
//! The hand-off from a connection's backlog to live delivery: the
//! connection registers (so membership changes reach it), reads its
//! memberships with each conversation's `last_seq` L, subscribes with L,
//! and then replays its backlog up to exactly L. The dispatcher delivers it
//! everything after `upto`; if `upto` is already past L it first sends the
//! missing (L, upto] from the worker's shared cache of recent frames
//! ([`RecentFrames`], which every delivered frame enters), or tells the
//! connection to read that range itself ([`ConnMsg::Backfill`]). The
//! connection drops anything at or below what it already sent.
//!
//! A connection whose queue is full is cut (closed with 1013): the worker
//! never buffers without bound for a client that does not read.

use crate::metrics::Metrics;
use crate::recent::RecentFrames;
use postgres::fallible_iterator::FallibleIterator;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_shared::frames::{
    Event, EVENT_CONVERSATION_CREATED, EVENT_MEMBER_JOINED, EVENT_MEMBER_LEFT,
};
use tether_shared::store::{self, DbSettings, Notice, Pool, StoreError, NOTIFY_CHANNEL};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Identifies one WebSocket connection in this worker.
pub type ConnId = u64;

/// Events read per conversation per catch-up query.
const FETCH_LIMIT: i64 = 2000;
/// Out-of-order events held per conversation while a gap is read.
const MAX_PENDING: usize = 10_000;

/// What a membership event changes for fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    None,
    Joined(String),
    Left(String),
    Created(Vec<String>),
}

/// One event, serialized once, shared by every recipient.
#[derive(Debug)]
pub struct Frame {
    pub conversation_id: i64,
    pub seq: i64,
    /// The `{"type":"event",...}` text frame.
    pub text: Utf8Bytes,
    pub membership: MembershipChange,
    /// When it was committed (or read), for the delivery latency metric.
    pub committed_at: Instant,
}

impl Frame {
    pub fn from_event(e: &Event, committed_at: Instant) -> Frame {
        let membership = match e.kind.as_str() {
            EVENT_MEMBER_JOINED => MembershipChange::Joined(e.user.clone().unwrap_or_default()),
            EVENT_MEMBER_LEFT => MembershipChange::Left(e.user.clone().unwrap_or_default()),
            EVENT_CONVERSATION_CREATED => {
                MembershipChange::Created(e.members.clone().unwrap_or_default())
            }
            _ => MembershipChange::None,
        };
        Frame {
            conversation_id: e.conversation_id,
            seq: e.seq,
            text: Utf8Bytes::from(e.to_frame()),
            membership,
            committed_at,
        }
    }
}

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
}

enum DispatchMsg {
    Register {
        id: ConnId,
        user: Arc<str>,
        tx: mpsc::Sender<ConnMsg>,
        cut: Arc<AtomicBool>,
    },
    Subscribe {
        id: ConnId,
        positions: Vec<(i64, i64)>,
    },
    Unsubscribe {
        id: ConnId,
        conversation_id: i64,
    },
    Deregister {
        id: ConnId,
    },
    Local(Vec<Arc<Frame>>),
    /// A notification from another process, with the events it carried.
    Hint(Notice, Vec<Arc<Frame>>),
    ListenerRestored,
    Fetched {
        positions: Vec<(i64, i64)>,
        result: Result<Vec<Arc<Frame>>, StoreError>,
    },
    RetryFetches,
}

/// The handle connections and commit lanes use. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<DispatchMsg>,
}

impl Dispatcher {
    /// Starts the dispatcher task (on the current runtime) and the LISTEN
    /// thread.
    pub fn start(
        recent: Arc<RecentFrames>,
        pool: Pool,
        settings: DbSettings,
        metrics: Arc<Metrics>,
        worker_id: &str,
    ) -> Dispatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Dispatcher { tx: tx.clone() };
        let state = State {
            conns: HashMap::new(),
            users: HashMap::new(),
            convs: HashMap::new(),
            to_fetch: HashSet::new(),
            retry_scheduled: false,
            failed_fetches: HashSet::new(),
            pool,
            recent,
            metrics: metrics.clone(),
            self_tx: tx.clone(),
        };
        tokio::spawn(run(state, rx));
        let listen_tx = tx;
        std::thread::Builder::new()
            .name(format!("{worker_id}-listen"))
            .spawn(move || listen_loop(settings, listen_tx, metrics))
            .expect("spawning the LISTEN thread");
        handle
    }

    pub fn register(
        &self,
        id: ConnId,
        user: Arc<str>,
        tx: mpsc::Sender<ConnMsg>,
        cut: Arc<AtomicBool>,
    ) {
        let _ = self.tx.send(DispatchMsg::Register { id, user, tx, cut });
    }

    /// Follow these conversations for `id`; `positions` are (conversation,
    /// the seq up to which the connection will have sent everything).
    pub fn subscribe(&self, id: ConnId, positions: Vec<(i64, i64)>) {
        let _ = self.tx.send(DispatchMsg::Subscribe { id, positions });
    }

    pub fn unsubscribe(&self, id: ConnId, conversation_id: i64) {
        let _ = self.tx.send(DispatchMsg::Unsubscribe {
            id,
            conversation_id,
        });
    }

    pub fn deregister(&self, id: ConnId) {
        let _ = self.tx.send(DispatchMsg::Deregister { id });
    }

    /// Events this worker just committed (after COMMIT).
    pub fn local(&self, frames: Vec<Arc<Frame>>) {
        let _ = self.tx.send(DispatchMsg::Local(frames));
    }
}

struct Conn {
    user: Arc<str>,
    tx: mpsc::Sender<ConnMsg>,
    cut: Arc<AtomicBool>,
    convs: HashSet<i64>,
}

struct Conv {
    /// Highest seq delivered to subscribers.
    upto: i64,
    subs: Vec<ConnId>,
    pending: BTreeMap<i64, Arc<Frame>>,
    fetching: bool,
    refetch: bool,
}

struct State {
    conns: HashMap<ConnId, Conn>,
    users: HashMap<Arc<str>, Vec<ConnId>>,
    convs: HashMap<i64, Conv>,
    to_fetch: HashSet<i64>,
    failed_fetches: HashSet<i64>,
    retry_scheduled: bool,
    pool: Pool,
    /// Shared with backlog replays: every delivered frame goes in.
    recent: Arc<RecentFrames>,
    metrics: Arc<Metrics>,
    self_tx: mpsc::UnboundedSender<DispatchMsg>,
}

async fn run(mut st: State, mut rx: mpsc::UnboundedReceiver<DispatchMsg>) {
    while let Some(msg) = rx.recv().await {
        st.handle(msg);
        // Take whatever else is waiting before starting reads, so one
        // catch-up query serves many conversations.
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(m) => st.handle(m),
                Err(_) => break,
            }
        }
        st.start_fetches();
    }
}

impl State {
    fn handle(&mut self, msg: DispatchMsg) {
        match msg {
            DispatchMsg::Register { id, user, tx, cut } => {
                self.users.entry(user.clone()).or_default().push(id);
                self.conns.insert(
                    id,
                    Conn {
                        user,
                        tx,
                        cut,
                        convs: HashSet::new(),
                    },
                );
            }
            DispatchMsg::Subscribe { id, positions } => {
                for (c, pos) in positions {
                    self.subscribe(id, c, pos);
                }
            }
            DispatchMsg::Unsubscribe {
                id,
                conversation_id,
            } => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.convs.remove(&conversation_id);
                }
                self.remove_sub(conversation_id, id);
            }
            DispatchMsg::Deregister { id } => self.drop_conn(id),
            DispatchMsg::Local(frames) => {
                for f in frames {
                    self.offer(f);
                }
            }
            DispatchMsg::Hint(notice, frames) => {
                for f in frames {
                    self.offer(f);
                }
                self.hint(notice);
            }
            DispatchMsg::ListenerRestored => {
                // Notifications may have been lost while we were not
                // listening: re-read everything we follow.
                let all: Vec<i64> = self.convs.keys().copied().collect();
                self.to_fetch.extend(all);
            }
            DispatchMsg::Fetched { positions, result } => self.fetched(positions, result),
            DispatchMsg::RetryFetches => {
                self.retry_scheduled = false;
                let failed: Vec<i64> = self.failed_fetches.drain().collect();
                self.to_fetch.extend(failed);
            }
        }
    }

    /// Starts following `c` at `upto` (if not yet) and schedules the
    /// catch-up read that closes the window before we followed it.
    fn follow(&mut self, c: i64, upto: i64) -> &mut Conv {
        if !self.convs.contains_key(&c) {
            self.to_fetch.insert(c);
        }
        self.convs.entry(c).or_insert_with(|| Conv {
            upto,
            subs: Vec::new(),
            pending: BTreeMap::new(),
            fetching: false,
            refetch: false,
        })
    }

    fn subscribe(&mut self, id: ConnId, c: i64, pos: i64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.convs.insert(c) {
            return;
        }
        let tx = conn.tx.clone();
        let conv = self.follow(c, pos);
        conv.subs.push(id);
        let upto = conv.upto;
        if upto > pos {
            // The connection is behind what we already delivered.
            let ok = if let Some(frames) = self.recent.get(c, pos, upto) {
                frames
                    .into_iter()
                    .all(|f| tx.try_send(ConnMsg::Event(f)).is_ok())
            } else {
                tx.try_send(ConnMsg::Backfill {
                    conversation_id: c,
                    after: pos,
                    upto,
                })
                .is_ok()
            };
            if !ok {
                self.cut(id);
            }
        }
    }

    fn remove_sub(&mut self, c: i64, id: ConnId) {
        if let Some(conv) = self.convs.get_mut(&c) {
            conv.subs.retain(|s| *s != id);
            if conv.subs.is_empty() {
                self.convs.remove(&c);
                self.to_fetch.remove(&c);
            }
        }
    }

    fn drop_conn(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            if let Some(ids) = self.users.get_mut(&conn.user) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.users.remove(&conn.user);
                }
            }
            for c in conn.convs {
                self.remove_sub(c, id);
            }
        }
    }

    /// A connection that cannot keep up: mark it and drop its queue's
    /// sender, so it closes with 1013 after what is queued.
    fn cut(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get(&id) {
            conn.cut.store(true, Ordering::Release);
            self.metrics
                .slow_client_closes
                .fetch_add(1, Ordering::Relaxed);
            log::info!("user={} conn={id}: too slow, cutting (1013)", conn.user);
        }
        self.drop_conn(id);
    }

    fn has_local_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// A committed event arrives (from a local commit or a read).
    fn offer(&mut self, f: Arc<Frame>) {
        let c = f.conversation_id;
        if !self.convs.contains_key(&c) {
            // Not followed here. Follow it if this event brings one of our
            // users into it.
            let ours = match &f.membership {
                MembershipChange::Joined(u) => self.has_local_user(u),
                MembershipChange::Created(members) => {
                    members.iter().any(|u| self.has_local_user(u))
                }
                _ => false,
            };
            if !ours {
                return;
            }
            self.follow(c, f.seq - 1);
        }
        let Some(conv) = self.convs.get_mut(&c) else {
            return;
        };
        if f.seq <= conv.upto {
            return;
        }
        if f.seq == conv.upto + 1 && !conv.fetching {
            self.deliver(f);
            self.drain_pending(c);
        } else {
            if conv.pending.len() < MAX_PENDING {
                conv.pending.insert(f.seq, f);
            }
            if conv.fetching {
                conv.refetch = true;
            } else {
                self.to_fetch.insert(c);
            }
        }
    }

    fn drain_pending(&mut self, c: i64) {
        loop {
            let Some(conv) = self.convs.get_mut(&c) else {
                return;
            };
            let upto = conv.upto;
            conv.pending = conv.pending.split_off(&(upto + 1));
            let Some(entry) = conv.pending.first_entry() else {
                return;
            };
            if *entry.key() != upto + 1 {
                return;
            }
            let f = entry.remove();
            self.deliver(f);
        }
    }

    /// Delivers the next event of a conversation to its subscribers.
    fn deliver(&mut self, f: Arc<Frame>) {
        let c = f.conversation_id;
        // A member joining: their connections here start receiving the
        // conversation from this very event.
        let joining: Vec<ConnId> = match &f.membership {
            MembershipChange::Joined(u) => self.users.get(u.as_str()).cloned().unwrap_or_default(),
            MembershipChange::Created(members) => members
                .iter()
                .filter_map(|u| self.users.get(u.as_str()))
                .flatten()
                .copied()
                .collect(),
            _ => Vec::new(),
        };
        for id in joining {
            if let Some(conn) = self.conns.get_mut(&id) {
                if conn.convs.insert(c) {
                    if let Some(conv) = self.convs.get_mut(&c) {
                        conv.subs.push(id);
                    }
                }
            }
        }
        let Some(conv) = self.convs.get_mut(&c) else {
            return;
        };
        conv.upto = f.seq;
        self.recent.put(c, std::slice::from_ref(&f));
        let mut slow = Vec::new();
        for id in &conv.subs {
            if let Some(conn) = self.conns.get(id) {
                if conn.tx.try_send(ConnMsg::Event(f.clone())).is_err() {
                    slow.push(*id);
                }
            }
        }
        let n = (conv.subs.len() - slow.len()) as u64;
        self.metrics.deliveries.fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            self.metrics
                .delivery_latency
                .observe_duration(f.committed_at.elapsed());
        }
        for id in slow {
            self.cut(id);
        }
        // A member leaving: they got this event, and nothing after it.
        if let MembershipChange::Left(u) = &f.membership {
            let leaving = self.users.get(u.as_str()).cloned().unwrap_or_default();
            for id in leaving {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.convs.remove(&c);
                }
                self.remove_sub(c, id);
            }
        }
    }

    fn hint(&mut self, notice: Notice) {
        if notice.everything {
            let all: Vec<i64> = self.convs.keys().copied().collect();
            self.to_fetch.extend(all);
        }
        for (c, seq) in notice.events {
            if let Some(conv) = self.convs.get_mut(&c) {
                if seq > conv.upto {
                    if conv.fetching {
                        conv.refetch = true;
                    } else {
                        self.to_fetch.insert(c);
                    }
                }
            }
        }
        for (c, seq, user) in notice.membership {
            if !self.convs.contains_key(&c) && self.has_local_user(&user) {
                self.follow(c, seq - 1);
            }
        }
    }

    /// Issues one read for every conversation that needs one.
    fn start_fetches(&mut self) {
        if self.to_fetch.is_empty() {
            return;
        }
        let mut positions = Vec::new();
        for c in self.to_fetch.drain() {
            if let Some(conv) = self.convs.get_mut(&c) {
                if conv.fetching {
                    conv.refetch = true;
                } else {
                    conv.fetching = true;
                    positions.push((c, conv.upto));
                }
            }
        }
        if positions.is_empty() {
            return;
        }
        self.metrics.catchup_reads.fetch_add(1, Ordering::Relaxed);
        let pool = self.pool.clone();
        let tx = self.self_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = pool
                .get()
                .map_err(StoreError::from)
                .and_then(|mut c| store::events_after_many(&mut c, &positions, FETCH_LIMIT))
                .map(|events| {
                    let now = Instant::now();
                    events
                        .iter()
                        .map(|e| Arc::new(Frame::from_event(e, now)))
                        .collect()
                });
            let _ = tx.send(DispatchMsg::Fetched { positions, result });
        });
    }

    fn fetched(&mut self, positions: Vec<(i64, i64)>, result: Result<Vec<Arc<Frame>>, StoreError>) {
        match result {
            Ok(frames) => {
                let mut counts: HashMap<i64, i64> = HashMap::new();
                for (c, _) in &positions {
                    if let Some(conv) = self.convs.get_mut(c) {
                        conv.fetching = false;
                    }
                }
                for f in frames {
                    *counts.entry(f.conversation_id).or_default() += 1;
                    let c = f.conversation_id;
                    let Some(conv) = self.convs.get_mut(&c) else {
                        continue;
                    };
                    if f.seq == conv.upto + 1 {
                        self.deliver(f);
                    } else if f.seq > conv.upto + 1 && conv.pending.len() < MAX_PENDING {
                        conv.pending.insert(f.seq, f);
                    }
                }
                for (c, _) in positions {
                    self.drain_pending(c);
                    if let Some(conv) = self.convs.get_mut(&c) {
                        let full = counts.get(&c).copied().unwrap_or(0) >= FETCH_LIMIT;
                        if conv.refetch || full || !conv.pending.is_empty() {
                            conv.refetch = false;
                            self.to_fetch.insert(c);
                        }
                    }
                }
            }
            Err(e) => {
                log::warn!(
                    "fan-out: catch-up read of {} conversations failed: {e}",
                    positions.len()
                );
                for (c, _) in positions {
                    if let Some(conv) = self.convs.get_mut(&c) {
                        conv.fetching = false;
                        conv.refetch = false;
                        self.failed_fetches.insert(c);
                    }
                }
                if !self.retry_scheduled {
                    self.retry_scheduled = true;
                    let tx = self.self_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        let _ = tx.send(DispatchMsg::RetryFetches);
                    });
                }
            }
        }
    }
}

/// The LISTEN connection: a dedicated thread (the `postgres` client is
/// blocking) that turns notifications into hints, and reconnects with
/// backoff when the connection is lost (then asks for a full catch-up).
fn listen_loop(
    settings: DbSettings,
    tx: mpsc::UnboundedSender<DispatchMsg>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_once = false;
    loop {
        if tx.is_closed() {
            return;
        }
        let mut client = match settings.connect().and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
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
        if tx.send(DispatchMsg::ListenerRestored).is_err() {
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
                    let mut notice = Notice::parse(n.payload());
                    let now = Instant::now();
                    let frames = notice
                        .content
                        .drain(..)
                        .map(|e| Arc::new(Frame::from_event(&e, now)))
                        .collect();
                    if tx.send(DispatchMsg::Hint(notice, frames)).is_err() {
                        return;
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
