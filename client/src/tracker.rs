//! Per-conversation bookkeeping, free of I/O so it can be tested alone:
//! the highest seq delivered (duplicates dropped, gaps reported) and
//! coalesced acks of what the application consumed (every N events or
//! after a delay, at most one in flight per conversation, never above what
//! the current connection delivered: the server refuses that).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// What to do with an incoming event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next event (or the first one seen in this conversation).
    New,
    /// At or below the highest seq seen: drop it.
    Duplicate,
    /// Above `expected`: events `expected..seq` are missing. The event is
    /// still delivered (and becomes the highest seen); the gap is reported.
    Gap { expected: i64 },
}

#[derive(Debug, Default, Clone)]
struct Conv {
    /// Highest seq delivered to the application.
    last: i64,
    /// Highest seq the application wants acknowledged (≤ `last`).
    want: i64,
    /// Highest seq the server sent on the current connection (duplicates
    /// included): an ack may not go above it.
    conn_high: i64,
    /// Highest seq acknowledged on the current connection.
    sent: i64,
    /// Events counted toward `ack_every` since the last ack.
    pending: usize,
    /// When the oldest unacknowledged wish arose.
    since: Option<Instant>,
    /// An ack was written and its flush has not completed.
    in_flight: bool,
}

/// Ack coalescing parameters.
#[derive(Debug, Clone, Copy)]
pub struct AckPolicy {
    /// Send an ack once this many events are unacknowledged...
    pub every: usize,
    /// ...or once the oldest unacknowledged one is this old.
    pub interval: Duration,
}

/// The state of every conversation this client has seen.
#[derive(Debug)]
pub struct Tracker {
    convs: HashMap<i64, Conv>,
    /// Conversations with an ack to send (or in flight).
    dirty: HashSet<i64>,
    policy: AckPolicy,
}

impl Tracker {
    pub fn new(policy: AckPolicy) -> Tracker {
        Tracker {
            convs: HashMap::new(),
            dirty: HashSet::new(),
            policy,
        }
    }

    /// The highest seq seen in `conversation_id` (0 if none).
    pub fn last(&self, conversation_id: i64) -> i64 {
        self.convs.get(&conversation_id).map_or(0, |c| c.last)
    }

    /// Classifies an incoming event and, unless it is a duplicate, makes it
    /// the highest delivered. A duplicate re-arms an ack the server
    /// evidently did not record (it replayed what was already acknowledged).
    pub fn observe(&mut self, conversation_id: i64, seq: i64, now: Instant) -> Seen {
        let known = self.convs.contains_key(&conversation_id);
        let c = self.convs.entry(conversation_id).or_default();
        c.conn_high = c.conn_high.max(seq);
        if known && seq <= c.last {
            if c.want > c.sent && c.since.is_none() {
                c.since = Some(now);
                self.dirty.insert(conversation_id);
            }
            return Seen::Duplicate;
        }
        let seen = if known && seq > c.last + 1 {
            Seen::Gap {
                expected: c.last + 1,
            }
        } else {
            Seen::New
        };
        c.last = seq;
        if c.want > c.sent && c.since.is_none() {
            c.since = Some(now);
            self.dirty.insert(conversation_id);
        }
        seen
    }

    /// The server sent `seq` on this connection but it was not delivered
    /// (the application's channel was full): it counts toward what may be
    /// acknowledged, nothing else.
    pub fn sent_by_server(&mut self, conversation_id: i64, seq: i64) {
        if let Some(c) = self.convs.get_mut(&conversation_id) {
            c.conn_high = c.conn_high.max(seq);
        }
    }

    /// The server pruned the conversation's history below `from_seq`
    /// (retention): the next event is `from_seq`, not a gap.
    pub fn truncated(&mut self, conversation_id: i64, from_seq: i64) {
        let c = self.convs.entry(conversation_id).or_default();
        c.last = c.last.max(from_seq - 1);
        c.conn_high = c.conn_high.max(from_seq - 1);
    }

    /// The application acknowledges up to `seq` (clamped to what it was
    /// delivered). False if nothing was delivered in that conversation.
    pub fn ack(&mut self, conversation_id: i64, seq: i64, now: Instant) -> bool {
        let Some(c) = self.convs.get_mut(&conversation_id) else {
            return false;
        };
        let seq = seq.min(c.last);
        if seq <= c.want {
            return true;
        }
        c.pending += 1;
        c.want = seq;
        c.since.get_or_insert(now);
        self.dirty.insert(conversation_id);
        true
    }

    /// A new connection: nothing is acknowledged on it yet, nothing is in
    /// flight. Unsent wishes stay due.
    pub fn reconnected(&mut self) {
        for (id, c) in self.convs.iter_mut() {
            c.sent = 0;
            c.conn_high = 0;
            c.in_flight = false;
            if c.since.is_some() {
                self.dirty.insert(*id);
            }
        }
    }

    /// The acks to write now as `(conversation_id, seq)`; each is marked in
    /// flight until [`Tracker::flushed`].
    pub fn take_due(&mut self, now: Instant) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        let policy = self.policy;
        let convs = &mut self.convs;
        self.dirty.retain(|id| {
            let Some(c) = convs.get_mut(id) else {
                return false;
            };
            if c.in_flight {
                return true;
            }
            let Some(since) = c.since else {
                return false;
            };
            let ackable = c.want.min(c.conn_high);
            if ackable <= c.sent {
                // Done, or waiting for this connection to deliver that far
                // (an event re-arms it).
                c.since = None;
                c.pending = 0;
                return false;
            }
            if c.pending >= policy.every || now.duration_since(since) >= policy.interval {
                out.push((*id, ackable));
                c.sent = ackable;
                c.pending = 0;
                c.since = None;
                c.in_flight = true;
                return true;
            }
            true
        });
        out
    }

    /// Every ack wanted and not written, whatever the policy and the acks
    /// in flight (the connection is about to close).
    pub fn take_all(&mut self) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for (id, c) in self.convs.iter_mut() {
            let ackable = c.want.min(c.conn_high);
            if ackable > c.sent {
                out.push((*id, ackable));
                c.sent = ackable;
                c.pending = 0;
                c.since = None;
            }
        }
        self.dirty.clear();
        out
    }

    /// The acks written by the last [`Tracker::take_due`] have been flushed.
    pub fn flushed(&mut self) {
        let convs = &mut self.convs;
        self.dirty.retain(|id| match convs.get_mut(id) {
            Some(c) => {
                c.in_flight = false;
                c.since.is_some()
            }
            None => false,
        });
    }

    /// When the next ack falls due by time, if any is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.dirty
            .iter()
            .filter_map(|id| self.convs.get(id))
            .filter(|c| !c.in_flight)
            .filter_map(|c| c.since)
            .min()
            .map(|s| s + self.policy.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(every: usize) -> Tracker {
        Tracker::new(AckPolicy {
            every,
            interval: Duration::from_millis(100),
        })
    }

    /// An event delivered and consumed by the application at once.
    fn consume(t: &mut Tracker, conversation_id: i64, seq: i64, now: Instant) -> Seen {
        let seen = t.observe(conversation_id, seq, now);
        if seen != Seen::Duplicate {
            t.ack(conversation_id, seq, now);
        }
        seen
    }

    #[test]
    fn drops_duplicates_and_reports_gaps() {
        let mut t = tracker(1000);
        let now = Instant::now();
        // The first event of a conversation sets the baseline (the server
        // starts after our cursor, which we do not know).
        assert_eq!(consume(&mut t, 1, 5, now), Seen::New);
        assert_eq!(consume(&mut t, 1, 6, now), Seen::New);
        assert_eq!(consume(&mut t, 1, 6, now), Seen::Duplicate);
        assert_eq!(consume(&mut t, 1, 3, now), Seen::Duplicate);
        assert_eq!(consume(&mut t, 1, 9, now), Seen::Gap { expected: 7 });
        assert_eq!(t.last(1), 9);
        assert_eq!(consume(&mut t, 1, 8, now), Seen::Duplicate);
        assert_eq!(consume(&mut t, 1, 10, now), Seen::New);
        // Conversations are independent.
        assert_eq!(consume(&mut t, 2, 1, now), Seen::New);
        assert_eq!(consume(&mut t, 2, 3, now), Seen::Gap { expected: 2 });
        assert_eq!(t.last(1), 10);
        assert_eq!(t.last(3), 0);
    }

    #[test]
    fn a_truncation_is_not_a_gap() {
        let mut t = tracker(1000);
        let now = Instant::now();
        assert_eq!(consume(&mut t, 1, 2, now), Seen::New);
        t.truncated(1, 16);
        assert_eq!(consume(&mut t, 1, 16, now), Seen::New);
        t.truncated(2, 3);
        assert_eq!(consume(&mut t, 2, 2, now), Seen::Duplicate);
        assert_eq!(consume(&mut t, 2, 3, now), Seen::New);
        t.truncated(1, 5);
        assert_eq!(t.last(1), 16, "never goes back");
    }

    #[test]
    fn acks_coalesce_by_count_and_by_time() {
        let mut t = tracker(3);
        let t0 = Instant::now();
        consume(&mut t, 1, 1, t0);
        consume(&mut t, 1, 2, t0);
        assert!(t.take_due(t0).is_empty(), "2 < every and not old yet");
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(100)));
        consume(&mut t, 1, 3, t0);
        assert_eq!(t.take_due(t0), vec![(1, 3)], "every=3 reached");
        t.flushed();
        assert_eq!(t.next_deadline(), None);
        consume(&mut t, 1, 4, t0);
        assert!(t.take_due(t0 + Duration::from_millis(50)).is_empty());
        assert_eq!(t.take_due(t0 + Duration::from_millis(100)), vec![(1, 4)]);
        t.flushed();
        assert!(t.take_due(t0 + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn at_most_one_ack_in_flight_per_conversation() {
        let mut t = tracker(1);
        let t0 = Instant::now();
        consume(&mut t, 1, 1, t0);
        consume(&mut t, 2, 1, t0);
        let mut due = t.take_due(t0);
        due.sort();
        assert_eq!(due, vec![(1, 1), (2, 1)]);
        // More events while the acks are in flight: held back...
        consume(&mut t, 1, 2, t0);
        consume(&mut t, 1, 3, t0);
        assert!(t.take_due(t0 + Duration::from_secs(1)).is_empty());
        t.flushed();
        // ...then coalesced into one.
        assert_eq!(t.take_due(t0 + Duration::from_secs(1)), vec![(1, 3)]);
    }

    #[test]
    fn manual_acks_are_clamped_and_never_go_backwards() {
        let mut t = tracker(1);
        let t0 = Instant::now();
        assert!(!t.ack(1, 5, t0), "nothing delivered yet");
        t.observe(1, 1, t0);
        t.observe(1, 2, t0);
        assert!(
            t.take_due(t0).is_empty(),
            "manual mode: nothing until ack()"
        );
        t.ack(1, 99, t0);
        assert_eq!(
            t.take_due(t0),
            vec![(1, 2)],
            "clamped to the last delivered"
        );
        t.flushed();
        t.ack(1, 1, t0);
        assert!(t.take_due(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn acks_follow_consumption_not_delivery() {
        let mut t = tracker(1);
        let t0 = Instant::now();
        for seq in 1..=300 {
            t.observe(1, seq, t0);
        }
        assert!(
            t.take_due(t0 + Duration::from_secs(1)).is_empty(),
            "nothing consumed"
        );
        t.ack(1, 100, t0);
        assert_eq!(t.take_due(t0), vec![(1, 100)]);
    }

    #[test]
    fn never_acks_above_what_this_connection_delivered() {
        let mut t = tracker(1);
        let t0 = Instant::now();
        for seq in 1..=10 {
            t.observe(1, seq, t0);
        }
        // The connection dies; the application consumes all ten meanwhile.
        t.reconnected();
        t.ack(1, 10, t0);
        let later = t0 + Duration::from_secs(1);
        assert!(
            t.take_due(later).is_empty(),
            "nothing delivered on this connection yet"
        );
        // The server replays from its cursor (5): duplicates up to 7 so far.
        for seq in 6..=7 {
            assert_eq!(t.observe(1, seq, t0), Seen::Duplicate);
        }
        assert_eq!(t.take_due(later), vec![(1, 7)]);
        t.flushed();
        t.sent_by_server(1, 10);
        t.observe(1, 10, t0);
        assert_eq!(t.take_all(), vec![(1, 10)]);
    }

    #[test]
    fn reconnect_re_acks_what_the_server_replays() {
        let mut t = tracker(1);
        let t0 = Instant::now();
        consume(&mut t, 1, 1, t0);
        consume(&mut t, 1, 2, t0);
        assert_eq!(t.take_due(t0), vec![(1, 2)]);
        t.flushed();
        // The connection dies; the ack was lost; the server replays 1..2.
        t.reconnected();
        assert!(t.take_due(t0).is_empty(), "no spontaneous re-ack");
        assert_eq!(consume(&mut t, 1, 1, t0), Seen::Duplicate);
        assert_eq!(consume(&mut t, 1, 2, t0), Seen::Duplicate);
        let later = t0 + Duration::from_millis(100);
        assert_eq!(t.take_due(later), vec![(1, 2)]);
        t.flushed();
        // An ack not yet written when the connection died is written on the
        // next one, once that connection delivered that far.
        consume(&mut t, 1, 3, t0);
        t.reconnected();
        assert!(t.take_due(later).is_empty());
        assert_eq!(t.observe(1, 3, t0), Seen::Duplicate);
        assert_eq!(t.take_due(later), vec![(1, 3)]);
    }
}
