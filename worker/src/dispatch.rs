//! The dispatcher's rules as a pure state machine: [`Inputs`](Input) in,
//! [`Actions`](Action) out. The shell in [`crate::fanout`] feeds it from
//! its inbox (connections, commit lanes, the LISTEN thread, finished
//! reads) and performs what it asks (queue a frame, read the log, retry
//! later); the tests here drive it with random interleavings instead.
//!
//! Per followed conversation it keeps `upto`, the highest seq delivered,
//! and delivers only `upto + 1`: an event ahead of a gap waits in
//! `pending` while the gap is read from the log (an [`Action::Fetch`]); a
//! hint past `upto` causes a read too.
//!
//! Membership, by construction:
//! - an event that makes a user a member (`member.joined`,
//!   `conversation.created`) subscribes that user's connections here from
//!   that event on;
//! - the user's own `member.left` is their connections' last event of the
//!   conversation: they are unsubscribed right after it, and the
//!   dispatcher remembers where each local user left ([`State::departed`]);
//! - a subscription whose range (connection's position, `upto`] contains
//!   the user's `member.left` is refused: the connection is sent the range
//!   up to and including the `member.left`, and is not subscribed. (The
//!   race this closes: a connection reads its memberships, the user is
//!   removed and the removal delivered, then the connection subscribes
//!   with the position it read before the removal.)
//!
//! The connection's own [`Sequencer`](crate::sequencer::Sequencer) applies
//! the same rule to every frame it writes, so neither alone has to be
//! perfect; the property test checks the two together.

use crate::frame::{Frame, MembershipChange};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Identifies one WebSocket connection in this worker.
pub type ConnId = u64;

/// Out-of-order events held per conversation while a gap is read.
const MAX_PENDING: usize = 10_000;
/// Departures remembered per local user (the oldest are forgotten; the
/// connection's sequencer still stops at a `member.left` without them).
const MAX_DEPARTED_PER_USER: usize = 4096;

/// What the dispatcher is told.
#[derive(Debug)]
pub enum Input {
    /// A connection of `user` exists (before it reads its memberships).
    Register { conn: ConnId, user: Arc<str> },
    /// Follow these conversations for `conn`: (conversation, the seq up to
    /// which the connection will have written everything itself).
    Subscribe {
        conn: ConnId,
        positions: Vec<(i64, i64)>,
    },
    /// The connection is gone (closed, or cut for being slow).
    Gone { conn: ConnId },
    /// A committed event whose content is trusted: from this worker's own
    /// commit, an authenticated notification, or a read of the log.
    Event(Arc<Frame>),
    /// A conversation is committed up to `upto` (a hint: causes a read).
    Hint { conversation_id: i64, upto: i64 },
    /// From an authenticated notification: `user` joined or left the
    /// conversation at `seq`.
    MemberHint {
        conversation_id: i64,
        seq: i64,
        user: String,
    },
    /// Notifications may have been lost: read every followed conversation.
    CatchUpAll,
    /// The answer to an [`Action::Fetch`]: the events after each position
    /// (at most `limit` per conversation), or `None` if the read failed.
    Fetched {
        positions: Vec<(i64, i64)>,
        events: Option<Vec<Arc<Frame>>>,
    },
    /// The retry an [`Action::RetryLater`] asked for is due.
    RetryFetches,
    /// An ephemeral frame (presence, typing, read) about `about` in a
    /// conversation: for the connections here of its other members. No
    /// seq, no order with events, nothing kept.
    Signal {
        conversation_id: i64,
        about: Arc<str>,
        text: Utf8Bytes,
    },
}

/// What the dispatcher asks the shell to do, in order.
#[derive(Debug)]
pub enum Action {
    /// Queue `frame` for `conn`. If the queue is full, the shell cuts the
    /// connection (1013) and answers [`Input::Gone`].
    Send { conn: ConnId, frame: Arc<Frame> },
    /// Queue "send (after, upto] of this conversation" for `conn` (from
    /// the recent-frames cache, or the connection reads the log).
    Replay {
        conn: ConnId,
        conversation_id: i64,
        after: i64,
        upto: i64,
    },
    /// `frame` was delivered in order to `recipients` connections (it
    /// enters the recent-frames cache).
    Delivered {
        frame: Arc<Frame>,
        recipients: usize,
    },
    /// Read, for each (conversation, after), the events after it.
    Fetch(Vec<(i64, i64)>),
    /// Send [`Input::RetryFetches`] a little later (a read failed).
    RetryLater,
    /// Queue an ephemeral frame for `conn`.
    Signal { conn: ConnId, text: Utf8Bytes },
}

struct Conn {
    user: Arc<str>,
    /// Conversations subscribed, each with the position the subscription
    /// starts after: a `member.left` at or before it is an earlier
    /// membership the connection already knows about.
    convs: HashMap<i64, i64>,
}

struct Conv {
    /// Highest seq delivered to subscribers.
    upto: i64,
    subs: Vec<ConnId>,
    pending: BTreeMap<i64, Arc<Frame>>,
    /// Seqs above `upto` where a local user's membership changes (from
    /// authenticated hints): the conversation stays followed, even with no
    /// subscriber, until they are delivered.
    hinted: BTreeSet<i64>,
    fetching: bool,
    refetch: bool,
}

/// The dispatcher's whole state.
pub struct State {
    conns: HashMap<ConnId, Conn>,
    users: HashMap<Arc<str>, Vec<ConnId>>,
    convs: HashMap<i64, Conv>,
    /// Where each local user's `member.left` was delivered, per
    /// conversation (until they join again or their last connection goes).
    departed: HashMap<Arc<str>, HashMap<i64, i64>>,
    to_fetch: HashSet<i64>,
    failed_fetches: HashSet<i64>,
    retry_scheduled: bool,
    /// Events read per conversation per fetch.
    fetch_limit: usize,
    actions: Vec<Action>,
}

impl State {
    pub fn new(fetch_limit: usize) -> State {
        State {
            conns: HashMap::new(),
            users: HashMap::new(),
            convs: HashMap::new(),
            departed: HashMap::new(),
            to_fetch: HashSet::new(),
            failed_fetches: HashSet::new(),
            retry_scheduled: false,
            fetch_limit: fetch_limit.max(1),
            actions: Vec::new(),
        }
    }

    /// Applies one input; its actions wait in [`State::take_actions`].
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Register { conn, user } => {
                self.users.entry(user.clone()).or_default().push(conn);
                self.conns.insert(
                    conn,
                    Conn {
                        user,
                        convs: HashMap::new(),
                    },
                );
            }
            Input::Subscribe { conn, positions } => {
                for (c, pos) in positions {
                    self.subscribe(conn, c, pos);
                }
            }
            Input::Gone { conn } => self.drop_conn(conn),
            Input::Event(f) => self.offer(f),
            Input::Hint {
                conversation_id,
                upto,
            } => self.hint(conversation_id, upto),
            Input::MemberHint {
                conversation_id,
                seq,
                user,
            } => {
                if !self.is_local(&user) {
                    return;
                }
                let joining = MembershipChange::Joined(user.clone());
                let start = self.resume_point(conversation_id, seq - 1, &joining);
                let conv = self.follow(conversation_id, start);
                if seq <= conv.upto {
                    self.late_member(conversation_id, seq, &user);
                } else {
                    conv.hinted.insert(seq);
                    // Read up to it even if nothing else asks.
                    if conv.fetching {
                        conv.refetch = true;
                    } else {
                        self.to_fetch.insert(conversation_id);
                    }
                }
            }
            Input::CatchUpAll => {
                let all: Vec<i64> = self.convs.keys().copied().collect();
                self.to_fetch.extend(all);
            }
            Input::Fetched { positions, events } => self.fetched(positions, events),
            Input::RetryFetches => {
                self.retry_scheduled = false;
                let failed: Vec<i64> = self.failed_fetches.drain().collect();
                self.to_fetch.extend(failed);
            }
            Input::Signal {
                conversation_id,
                about,
                text,
            } => self.signal(conversation_id, &about, text),
        }
    }

    /// An ephemeral frame goes to the subscribers of the conversation
    /// (members here, their membership checked by the subscription rules)
    /// but not to the connections of the user it is about.
    fn signal(&mut self, c: i64, about: &str, text: Utf8Bytes) {
        let Some(conv) = self.convs.get(&c) else {
            return;
        };
        for conn in &conv.subs {
            let theirs = self.conns.get(conn).is_some_and(|s| &*s.user == about);
            if !theirs {
                self.actions.push(Action::Signal {
                    conn: *conn,
                    text: text.clone(),
                });
            }
        }
    }

    /// Issues the reads that inputs so far made necessary (one read for
    /// all of them), then hands over every action in order. The shell
    /// calls it after a burst of inputs, so one read serves many.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.start_fetches();
        std::mem::take(&mut self.actions)
    }

    /// Conversations followed (for metrics and tests).
    pub fn followed(&self) -> usize {
        self.convs.len()
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
            hinted: BTreeSet::new(),
            fetching: false,
            refetch: false,
        })
    }

    fn subscribe(&mut self, conn: ConnId, c: i64, pos: i64) {
        let Some(state) = self.conns.get(&conn) else {
            return;
        };
        if state.convs.contains_key(&c) {
            return;
        }
        let left_at = self
            .departed
            .get(&state.user)
            .and_then(|d| d.get(&c))
            .copied();
        if let Some(left) = left_at.filter(|left| *left > pos) {
            // The user left after the position the connection read: it
            // gets everything up to its member.left, and no subscription.
            self.actions.push(Action::Replay {
                conn,
                conversation_id: c,
                after: pos,
                upto: left,
            });
            return;
        }
        if let Some(state) = self.conns.get_mut(&conn) {
            state.convs.insert(c, pos);
        }
        let conv = self.follow(c, pos);
        conv.subs.push(conn);
        let upto = conv.upto;
        if upto > pos {
            // The connection is behind what we already delivered.
            self.actions.push(Action::Replay {
                conn,
                conversation_id: c,
                after: pos,
                upto,
            });
        }
    }

    /// Where to start following `c`, unfollowed here, when `membership`
    /// brings local users in at `at + 1`: not after where any of them last
    /// left it here, so a membership of theirs in between (which this
    /// dispatcher has not seen) is delivered too, in order.
    fn resume_point(&self, c: i64, at: i64, membership: &MembershipChange) -> i64 {
        let users: Vec<&str> = match membership {
            MembershipChange::Joined(u) => vec![u.as_str()],
            MembershipChange::Created(members) => members.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        users
            .iter()
            .filter_map(|u| self.departed.get(*u).and_then(|d| d.get(&c)))
            .fold(at, |start, left| start.min(*left))
    }

    /// `user` joined (or left) `c` at `seq`, which this dispatcher has
    /// already passed: each of their connections here not subscribed gets
    /// a subscription from just before `seq` (so it is replayed what it
    /// missed); [`State::subscribe`] stops it at a later `member.left`.
    fn late_member(&mut self, c: i64, seq: i64, user: &str) {
        for conn in self.users.get(user).cloned().unwrap_or_default() {
            self.subscribe(conn, c, seq - 1);
        }
    }

    fn remove_sub(&mut self, c: i64, conn: ConnId) {
        if let Some(conv) = self.convs.get_mut(&c) {
            conv.subs.retain(|s| *s != conn);
        }
        self.maybe_unfollow(c);
    }

    /// Stops following `c` when nobody here is subscribed, unless an event
    /// held or hinted may still bring one of our users in.
    fn maybe_unfollow(&mut self, c: i64) {
        let Some(conv) = self.convs.get(&c) else {
            return;
        };
        if !conv.subs.is_empty() || !conv.hinted.is_empty() {
            return;
        }
        let rejoins = conv.pending.values().any(|f| match &f.membership {
            MembershipChange::Joined(u) => self.users.contains_key(u.as_str()),
            MembershipChange::Created(members) => {
                members.iter().any(|u| self.users.contains_key(u.as_str()))
            }
            _ => false,
        });
        if !rejoins {
            self.convs.remove(&c);
            self.to_fetch.remove(&c);
        }
    }

    fn drop_conn(&mut self, conn: ConnId) {
        let Some(state) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(ids) = self.users.get_mut(&state.user) {
            ids.retain(|x| *x != conn);
            if ids.is_empty() {
                self.users.remove(&state.user);
                self.departed.remove(&state.user);
            }
        }
        for c in state.convs.into_keys() {
            self.remove_sub(c, conn);
        }
    }

    fn is_local(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// A committed event arrives.
    fn offer(&mut self, f: Arc<Frame>) {
        let c = f.conversation_id;
        if !self.convs.contains_key(&c) {
            // Not followed here. Follow it if this event brings one of our
            // users into it.
            let ours = match &f.membership {
                MembershipChange::Joined(u) => self.is_local(u),
                MembershipChange::Created(members) => members.iter().any(|u| self.is_local(u)),
                _ => false,
            };
            if !ours {
                return;
            }
            let start = self.resume_point(c, f.seq - 1, &f.membership);
            self.follow(c, start);
        }
        let Some(conv) = self.convs.get_mut(&c) else {
            return;
        };
        if f.seq <= conv.upto {
            // Already delivered: but a membership it brings may have
            // reached us late (another source was faster).
            match &f.membership {
                MembershipChange::Joined(u) => self.late_member(c, f.seq, u),
                MembershipChange::Created(members) => {
                    for u in members {
                        self.late_member(c, f.seq, u);
                    }
                }
                _ => {}
            }
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
        // A member joining: their connections here receive the
        // conversation from this very event.
        let joining: Vec<Arc<str>> = match &f.membership {
            MembershipChange::Joined(u) => self.local_user(u).into_iter().collect(),
            MembershipChange::Created(members) => {
                members.iter().filter_map(|u| self.local_user(u)).collect()
            }
            _ => Vec::new(),
        };
        for user in joining {
            if let Some(d) = self.departed.get_mut(&user) {
                d.remove(&c);
            }
            for conn in self.users.get(&user).cloned().unwrap_or_default() {
                if let Some(state) = self.conns.get_mut(&conn) {
                    if let std::collections::hash_map::Entry::Vacant(e) = state.convs.entry(c) {
                        e.insert(f.seq - 1);
                        if let Some(conv) = self.convs.get_mut(&c) {
                            conv.subs.push(conn);
                        }
                    }
                }
            }
        }
        let Some(conv) = self.convs.get_mut(&c) else {
            return;
        };
        conv.upto = f.seq;
        conv.hinted = conv.hinted.split_off(&(f.seq + 1));
        for conn in &conv.subs {
            self.actions.push(Action::Send {
                conn: *conn,
                frame: f.clone(),
            });
        }
        let recipients = conv.subs.len();
        // A member leaving: they got this event, and nothing after it.
        if let MembershipChange::Left(u) = &f.membership {
            if let Some(user) = self.local_user(u) {
                for conn in self.users.get(&user).cloned().unwrap_or_default() {
                    // Only subscriptions from before this member.left end
                    // here; one that starts after it belongs to a later
                    // membership.
                    let Some(state) = self.conns.get_mut(&conn) else {
                        continue;
                    };
                    if state.convs.get(&c).is_some_and(|from| *from < f.seq) {
                        state.convs.remove(&c);
                        self.remove_sub(c, conn);
                    }
                }
                let d = self.departed.entry(user).or_default();
                if d.len() >= MAX_DEPARTED_PER_USER {
                    if let Some(oldest) = d.iter().min_by_key(|(_, s)| **s).map(|(c, _)| *c) {
                        d.remove(&oldest);
                    }
                }
                d.insert(c, f.seq);
            }
        }
        self.actions.push(Action::Delivered {
            frame: f,
            recipients,
        });
        self.maybe_unfollow(c);
    }

    /// The shared name of a user with connections here.
    fn local_user(&self, user: &str) -> Option<Arc<str>> {
        self.users.get_key_value(user).map(|(k, _)| k.clone())
    }

    fn hint(&mut self, c: i64, upto: i64) {
        if let Some(conv) = self.convs.get_mut(&c) {
            if upto > conv.upto {
                if conv.fetching {
                    conv.refetch = true;
                } else {
                    self.to_fetch.insert(c);
                }
            }
        }
    }

    fn start_fetches(&mut self) {
        if self.to_fetch.is_empty() {
            return;
        }
        let mut positions = Vec::new();
        let mut wanted: Vec<i64> = self.to_fetch.drain().collect();
        wanted.sort_unstable();
        for c in wanted {
            if let Some(conv) = self.convs.get_mut(&c) {
                if conv.fetching {
                    conv.refetch = true;
                } else {
                    conv.fetching = true;
                    positions.push((c, conv.upto));
                }
            }
        }
        if !positions.is_empty() {
            self.actions.push(Action::Fetch(positions));
        }
    }

    fn fetched(&mut self, positions: Vec<(i64, i64)>, events: Option<Vec<Arc<Frame>>>) {
        let Some(frames) = events else {
            for (c, _) in positions {
                if let Some(conv) = self.convs.get_mut(&c) {
                    conv.fetching = false;
                    conv.refetch = false;
                    self.failed_fetches.insert(c);
                }
            }
            if !self.retry_scheduled && !self.failed_fetches.is_empty() {
                self.retry_scheduled = true;
                self.actions.push(Action::RetryLater);
            }
            return;
        };
        let asked: HashMap<i64, i64> = positions.iter().copied().collect();
        let mut counts: HashMap<i64, usize> = HashMap::new();
        for (c, _) in &positions {
            if let Some(conv) = self.convs.get_mut(c) {
                conv.fetching = false;
            }
        }
        // History pruned by retention: seqs commit in order (writers hold
        // the conversation's row lock), so a committed read that starts
        // above where it was asked from met deleted events. The
        // conversation moves past them; each connection meets the same
        // hole in its own read and tells its client `truncated`.
        let mut first: HashMap<i64, i64> = HashMap::new();
        for f in &frames {
            first
                .entry(f.conversation_id)
                .and_modify(|s| *s = (*s).min(f.seq))
                .or_insert(f.seq);
        }
        for (c, after) in &positions {
            let (Some(conv), Some(first)) = (self.convs.get_mut(c), first.get(c)) else {
                continue;
            };
            if *first > after + 1 && first - 1 > conv.upto {
                conv.upto = first - 1;
                conv.hinted = conv.hinted.split_off(first);
                conv.pending = conv.pending.split_off(first);
            }
        }
        for f in frames {
            let c = f.conversation_id;
            if !asked.contains_key(&c) {
                continue;
            }
            *counts.entry(c).or_default() += 1;
            let Some(conv) = self.convs.get_mut(&c) else {
                // Unfollowed while the read ran: it may still bring one of
                // our users in.
                self.offer(f);
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
                let full = counts.get(&c).copied().unwrap_or(0) >= self.fetch_limit;
                if conv.refetch || full || !conv.pending.is_empty() {
                    conv.refetch = false;
                    self.to_fetch.insert(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod simulation;
#[cfg(test)]
mod tests;
