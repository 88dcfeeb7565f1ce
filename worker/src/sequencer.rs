//! The per-connection sequencer: what one WebSocket connection may write,
//! decided for every event on every path (backlog, cache, repair, live).
//!
//! Per conversation it keeps `last`, the highest seq written (or the
//! cursor before any), and whether the user is a member. It writes only
//! `last + 1`: anything at or below is a duplicate from an overlap, and
//! anything above is a gap for the caller to read from the log first.
//!
//! Membership is enforced here, whatever the dispatcher sends: the user's
//! own `member.left` is written (so the client learns it) and then nothing
//! more of that conversation until an event that makes them a member
//! again (`member.joined`). A conversation the connection never had is
//! entered only through such an event. Pure: no I/O, unit-tested and
//! property-tested (in [`crate::dispatch`]'s tests, together with the
//! dispatcher).

use crate::frame::Frame;
use std::collections::HashMap;

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it (the position has moved to it).
    Write,
    /// Already written, or not the user's to see: drop it.
    Skip,
    /// Events `(after, upto]` are missing before this one: read them from
    /// the log, offer each, then offer this one again.
    Gap { after: i64, upto: i64 },
}

#[derive(Debug, Clone, Copy)]
struct Position {
    last: i64,
    member: bool,
}

/// One connection's positions.
#[derive(Debug)]
pub struct Sequencer {
    user: String,
    positions: HashMap<i64, Position>,
}

impl Sequencer {
    pub fn new(user: &str) -> Sequencer {
        Sequencer {
            user: user.to_string(),
            positions: HashMap::new(),
        }
    }

    /// The user is a member of `conversation_id` and has everything up to
    /// `cursor` (read with the memberships at connect).
    pub fn start(&mut self, conversation_id: i64, cursor: i64) {
        self.positions.insert(
            conversation_id,
            Position {
                last: cursor,
                member: true,
            },
        );
    }

    /// Decides one event, moving the position when it says `Write`.
    pub fn offer(&mut self, f: &Frame) -> Verdict {
        let joins_me = f.membership.joins(&self.user);
        let pos = match self.positions.get_mut(&f.conversation_id) {
            Some(p) => p,
            None if joins_me => self.positions.entry(f.conversation_id).or_insert(Position {
                last: f.seq - 1,
                member: true,
            }),
            None => return Verdict::Skip,
        };
        if !pos.member {
            if !joins_me || f.seq <= pos.last {
                return Verdict::Skip;
            }
            // Re-joined: delivery starts at this very event.
            pos.member = true;
            pos.last = f.seq - 1;
        }
        if f.seq <= pos.last {
            return Verdict::Skip;
        }
        if f.seq > pos.last + 1 {
            return Verdict::Gap {
                after: pos.last,
                upto: f.seq - 1,
            };
        }
        pos.last = f.seq;
        if f.membership.leaves(&self.user) {
            pos.member = false;
        }
        Verdict::Write
    }

    /// History up to `horizon` is gone (retention) while the connection,
    /// a member, stands below it: it moves to `horizon`, and the caller
    /// tells the client (`truncated`, from `horizon + 1`). False (nothing
    /// moves) when it already stands at or above it, or is not a member.
    /// The caller has made sure the pruned range cannot hold the user's
    /// own `member.left` (their membership is unbroken since their
    /// position).
    pub fn truncate(&mut self, conversation_id: i64, horizon: i64) -> bool {
        match self.positions.get_mut(&conversation_id) {
            Some(p) if p.member && p.last < horizon => {
                p.last = horizon;
                true
            }
            _ => false,
        }
    }

    /// Where a replay of (after, upto] should start reading: past what was
    /// written already, member or not (a replay may hold the user's
    /// joining again).
    pub fn replay_start(&self, conversation_id: i64, after: i64) -> i64 {
        self.positions
            .get(&conversation_id)
            .map_or(after, |p| p.last.max(after))
    }

    /// Where the connection stands in a conversation it is a member of:
    /// the highest seq written. `None` when it is not (or no longer) a
    /// member.
    pub fn last(&self, conversation_id: i64) -> Option<i64> {
        self.positions
            .get(&conversation_id)
            .filter(|p| p.member)
            .map(|p| p.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::MembershipChange as M;

    fn f(seq: i64, m: M) -> Frame {
        Frame::test(1, seq, m)
    }

    #[test]
    fn writes_in_order_and_drops_duplicates() {
        let mut s = Sequencer::new("bob");
        s.start(1, 3);
        assert_eq!(s.offer(&f(3, M::None)), Verdict::Skip);
        assert_eq!(s.offer(&f(4, M::None)), Verdict::Write);
        assert_eq!(s.offer(&f(4, M::None)), Verdict::Skip);
        assert_eq!(s.offer(&f(5, M::None)), Verdict::Write);
        assert_eq!(s.last(1), Some(5));
    }

    #[test]
    fn truncation_moves_a_member_past_pruned_history_once() {
        let mut s = Sequencer::new("bob");
        s.start(1, 3);
        assert!(s.truncate(1, 10));
        assert_eq!(s.last(1), Some(10));
        assert!(!s.truncate(1, 8), "already past it");
        assert_eq!(s.offer(&f(11, M::None)), Verdict::Write);
    }

    #[test]
    fn truncation_never_brings_back_a_departed_member() {
        let mut s = Sequencer::new("bob");
        s.start(1, 0);
        assert_eq!(s.offer(&f(1, M::Left("bob".into()))), Verdict::Write);
        assert!(!s.truncate(1, 10));
        assert_eq!(s.offer(&f(11, M::None)), Verdict::Skip);
        assert!(!s.truncate(2, 10), "an unknown conversation stays unknown");
    }

    #[test]
    fn a_gap_is_reported_and_nothing_moves() {
        let mut s = Sequencer::new("bob");
        s.start(1, 3);
        assert_eq!(s.offer(&f(7, M::None)), Verdict::Gap { after: 3, upto: 6 });
        assert_eq!(s.last(1), Some(3));
    }

    #[test]
    fn nothing_after_the_users_own_member_left() {
        let mut s = Sequencer::new("bob");
        s.start(1, 0);
        assert_eq!(s.offer(&f(1, M::None)), Verdict::Write);
        assert_eq!(s.offer(&f(2, M::Left("bob".into()))), Verdict::Write);
        assert_eq!(
            s.offer(&f(3, M::None)),
            Verdict::Skip,
            "SECRET after removal"
        );
        assert_eq!(
            s.offer(&f(9, M::None)),
            Verdict::Skip,
            "no gap repair either"
        );
        assert_eq!(s.last(1), None);
    }

    #[test]
    fn someone_elses_member_left_changes_nothing() {
        let mut s = Sequencer::new("bob");
        s.start(1, 0);
        assert_eq!(s.offer(&f(1, M::Left("carol".into()))), Verdict::Write);
        assert_eq!(s.offer(&f(2, M::None)), Verdict::Write);
    }

    #[test]
    fn rejoining_resumes_at_the_member_joined() {
        let mut s = Sequencer::new("bob");
        s.start(1, 0);
        assert_eq!(s.offer(&f(1, M::Left("bob".into()))), Verdict::Write);
        assert_eq!(s.offer(&f(2, M::None)), Verdict::Skip);
        assert_eq!(s.offer(&f(3, M::Joined("carol".into()))), Verdict::Skip);
        assert_eq!(s.offer(&f(5, M::Joined("bob".into()))), Verdict::Write);
        assert_eq!(s.offer(&f(6, M::None)), Verdict::Write);
        assert_eq!(s.last(1), Some(6));
    }

    #[test]
    fn an_unknown_conversation_is_entered_only_by_joining_it() {
        let mut s = Sequencer::new("bob");
        assert_eq!(s.offer(&Frame::test(2, 4, M::None)), Verdict::Skip);
        assert_eq!(
            s.offer(&Frame::test(2, 5, M::Joined("carol".into()))),
            Verdict::Skip
        );
        assert_eq!(
            s.offer(&Frame::test(2, 6, M::Joined("bob".into()))),
            Verdict::Write
        );
        assert_eq!(s.offer(&Frame::test(2, 7, M::None)), Verdict::Write);
        let created = M::Created(vec!["alice".into(), "bob".into()]);
        assert_eq!(s.offer(&Frame::test(3, 1, created)), Verdict::Write);
    }
}
