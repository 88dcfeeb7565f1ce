//! Recent frames per conversation, shared by every connection of the
//! worker, so that a reconnect storm reads each conversation's backlog
//! from the database once rather than once per member.
//!
//! Events never change once committed, so a cached frame is always right;
//! the cache only ever answers a range it holds completely, otherwise the
//! caller reads the log. Each conversation keeps one contiguous run of
//! frames (at most [`MAX_PER_CONVERSATION`]); the whole cache is bounded by
//! [`MAX_FRAMES`] and by its byte budget (`--recent-cache-bytes`, counting
//! each frame's text and bookkeeping), evicting the conversations used
//! longest ago.

use crate::frame::Frame;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Frames kept per conversation (the newest).
pub const MAX_PER_CONVERSATION: usize = 1024;
/// Frames kept in all (a few tens of MB at typical message sizes).
pub const MAX_FRAMES: usize = 65_536;

/// What one cached frame costs, in bytes: its text, the users its
/// membership change names, and the bookkeeping around it.
pub fn frame_bytes(f: &Frame) -> usize {
    use crate::frame::MembershipChange;
    let names = match &f.membership {
        MembershipChange::None => 0,
        MembershipChange::Joined(u) | MembershipChange::Left(u) => u.len(),
        MembershipChange::Created(users) => users.iter().map(|u| u.len() + 24).sum(),
    };
    f.text.len() + names + 128
}

struct Run {
    /// Contiguous, ascending by seq.
    frames: VecDeque<Arc<Frame>>,
    /// [`frame_bytes`] of `frames`.
    bytes: usize,
    used: u64,
}

impl Run {
    fn first(&self) -> i64 {
        self.frames.front().map_or(0, |f| f.seq)
    }
    fn last(&self) -> i64 {
        self.frames.back().map_or(0, |f| f.seq)
    }
}

#[derive(Default)]
struct Inner {
    runs: HashMap<i64, Run>,
    total: usize,
    /// [`frame_bytes`] of every frame held.
    bytes: usize,
    max_bytes: usize,
    clock: u64,
}

#[derive(Default)]
pub struct RecentFrames {
    inner: Mutex<Inner>,
    /// Test-only (fault injection): answer nothing, so every replay takes
    /// the log-reading path.
    disabled: std::sync::atomic::AtomicBool,
}

impl RecentFrames {
    /// A cache of at most `max_bytes` (see [`frame_bytes`]).
    pub fn new(max_bytes: usize) -> RecentFrames {
        let cache = RecentFrames::default();
        cache
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .max_bytes = max_bytes;
        cache
    }

    /// Bytes held (see [`frame_bytes`]).
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Answer nothing from now on (fault injection: forces log reads).
    pub fn disable(&self) {
        self.disabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The frames of (after, upto] of a conversation, if all are held.
    pub fn get(&self, conversation_id: i64, after: i64, upto: i64) -> Option<Vec<Arc<Frame>>> {
        if self.disabled.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        if upto <= after {
            return Some(Vec::new());
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let clock = inner.clock;
        let run = inner.runs.get_mut(&conversation_id)?;
        if run.first() > after + 1 || run.last() < upto {
            return None;
        }
        run.used = clock;
        let start = (after + 1 - run.first()) as usize;
        let len = (upto - after) as usize;
        Some(run.frames.range(start..start + len).cloned().collect())
    }

    /// Remembers `frames`: contiguous, ascending, of one conversation.
    pub fn put(&self, conversation_id: i64, frames: &[Arc<Frame>]) {
        let (Some(a), Some(b)) = (frames.first().map(|f| f.seq), frames.last().map(|f| f.seq))
        else {
            return;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let max_bytes = inner.max_bytes;
        inner.clock += 1;
        let clock = inner.clock;
        // (frames, bytes) before and after.
        let before = inner
            .runs
            .get(&conversation_id)
            .map_or((0, 0), |r| (r.frames.len(), r.bytes));
        match inner.runs.get_mut(&conversation_id) {
            Some(run) if a <= run.last() + 1 && b + 1 >= run.first() => {
                // Overlapping or adjacent: extend at either end.
                let (first, last) = (run.first(), run.last());
                for f in frames.iter().rev().filter(|f| f.seq < first) {
                    run.bytes += frame_bytes(f);
                    run.frames.push_front(f.clone());
                }
                for f in frames.iter().filter(|f| f.seq > last) {
                    run.bytes += frame_bytes(f);
                    run.frames.push_back(f.clone());
                }
                run.used = clock;
            }
            Some(run) if b <= run.last() => {
                // Older and not adjacent: keep the newer run we have.
            }
            _ => {
                // New, or newer and not adjacent: this run replaces it.
                let keep = frames.len().min(MAX_PER_CONVERSATION);
                let kept = &frames[frames.len() - keep..];
                let run = Run {
                    frames: kept.iter().cloned().collect(),
                    bytes: kept.iter().map(|f| frame_bytes(f)).sum(),
                    used: clock,
                };
                inner.runs.insert(conversation_id, run);
            }
        }
        // One conversation never holds more than the whole budget (the
        // newest frames stay).
        let after = match inner.runs.get_mut(&conversation_id) {
            Some(run) => {
                while run.frames.len() > MAX_PER_CONVERSATION
                    || (run.bytes > max_bytes && run.frames.len() > 1)
                {
                    if let Some(f) = run.frames.pop_front() {
                        run.bytes -= frame_bytes(&f);
                    }
                }
                (run.frames.len(), run.bytes)
            }
            None => (0, 0),
        };
        inner.total = (inner.total + after.0).saturating_sub(before.0);
        inner.bytes = (inner.bytes + after.1).saturating_sub(before.1);
        if inner.total > MAX_FRAMES || inner.bytes > max_bytes {
            inner.evict();
        }
    }
}

impl Inner {
    /// Drops the least recently used conversations down to 3/4 of the
    /// caps (frames and bytes).
    fn evict(&mut self) {
        let mut by_age: Vec<(u64, i64)> = self.runs.iter().map(|(c, r)| (r.used, *c)).collect();
        by_age.sort_unstable();
        for (_, c) in by_age {
            if self.total <= MAX_FRAMES * 3 / 4 && self.bytes <= self.max_bytes / 4 * 3 {
                break;
            }
            if let Some(run) = self.runs.remove(&c) {
                self.total -= run.frames.len();
                self.bytes -= run.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::MembershipChange;
    use std::time::Instant;

    fn frames(c: i64, seqs: std::ops::RangeInclusive<i64>) -> Vec<Arc<Frame>> {
        seqs.map(|s| {
            Arc::new(Frame {
                conversation_id: c,
                seq: s,
                text: format!("{s}").into(),
                membership: MembershipChange::None,
                committed_at: Instant::now(),
            })
        })
        .collect()
    }

    fn seqs(v: &[Arc<Frame>]) -> Vec<i64> {
        v.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn answers_only_ranges_it_holds_completely() {
        let cache = RecentFrames::new(usize::MAX);
        assert!(cache.get(1, 0, 5).is_none());
        cache.put(1, &frames(1, 3..=10));
        assert_eq!(
            seqs(&cache.get(1, 2, 10).unwrap()),
            (3..=10).collect::<Vec<_>>()
        );
        assert_eq!(seqs(&cache.get(1, 5, 7).unwrap()), vec![6, 7]);
        assert!(cache.get(1, 1, 10).is_none(), "seq 2 is not held");
        assert!(cache.get(1, 5, 11).is_none(), "seq 11 is not held");
        assert!(cache.get(2, 0, 1).is_none());
        assert_eq!(cache.get(1, 7, 7).unwrap().len(), 0);
    }

    #[test]
    fn runs_extend_at_both_ends_and_newer_runs_replace_older() {
        let cache = RecentFrames::new(usize::MAX);
        cache.put(1, &frames(1, 5..=6));
        cache.put(1, &frames(1, 7..=9)); // adjacent after
        cache.put(1, &frames(1, 2..=5)); // overlapping before
        assert_eq!(
            seqs(&cache.get(1, 1, 9).unwrap()),
            (2..=9).collect::<Vec<_>>()
        );
        cache.put(1, &frames(1, 20..=21)); // a gap: the newer run wins
        assert!(cache.get(1, 1, 9).is_none());
        assert_eq!(seqs(&cache.get(1, 19, 21).unwrap()), vec![20, 21]);
        cache.put(1, &frames(1, 1..=3)); // older, not adjacent: ignored
        assert_eq!(seqs(&cache.get(1, 19, 21).unwrap()), vec![20, 21]);
    }

    #[test]
    fn bounded_per_conversation_and_in_total() {
        let cache = RecentFrames::new(usize::MAX);
        cache.put(1, &frames(1, 1..=(MAX_PER_CONVERSATION as i64 + 10)));
        assert!(cache.get(1, 0, 10).is_none(), "the oldest were dropped");
        assert!(cache.get(1, 10, MAX_PER_CONVERSATION as i64 + 10).is_some());
        for c in 2..200 {
            cache.put(c, &frames(c, 1..=1000));
        }
        let inner = cache.inner.lock().unwrap();
        assert!(inner.total <= MAX_FRAMES);
        let held: usize = inner.runs.values().map(|r| r.frames.len()).sum();
        assert_eq!(held, inner.total);
    }

    fn big(c: i64, seqs: std::ops::RangeInclusive<i64>, size: usize) -> Vec<Arc<Frame>> {
        seqs.map(|s| {
            Arc::new(Frame {
                conversation_id: c,
                seq: s,
                text: "x".repeat(size).into(),
                membership: MembershipChange::None,
                committed_at: Instant::now(),
            })
        })
        .collect()
    }

    #[test]
    fn bounded_by_bytes() {
        let budget = 1 << 20;
        let cache = RecentFrames::new(budget);
        // 100 frames of 64 KiB into one conversation: the newest stay.
        for s in 1..=100 {
            cache.put(1, &big(1, s..=s, 64 << 10));
            assert!(cache.bytes() <= budget, "{}", cache.bytes());
        }
        assert!(cache.get(1, 98, 100).is_some());
        assert!(cache.get(1, 0, 100).is_none());
        // Many conversations: the whole stays within the budget.
        for c in 2..50 {
            cache.put(c, &big(c, 1..=10, 10_000));
            assert!(cache.bytes() <= budget);
        }
        // Frames larger than the whole budget are not kept.
        let huge = RecentFrames::new(1000);
        huge.put(1, &big(1, 1..=3, 5000));
        assert!(huge.bytes() <= 1000);
        let inner = cache.inner.lock().unwrap();
        let held: usize = inner.runs.values().map(|r| r.bytes).sum();
        assert_eq!(held, inner.bytes);
    }
}
