//! Recent frames per conversation, shared by every connection of the
//! worker, so that a reconnect storm reads each conversation's backlog
//! from the database once rather than once per member.
//!
//! Events never change once committed, so a cached frame is always right;
//! the cache only ever answers a range it holds completely, otherwise the
//! caller reads the log. Each conversation keeps one contiguous run of
//! frames (at most [`MAX_PER_CONVERSATION`]); the whole cache is bounded by
//! [`MAX_FRAMES`], evicting the conversations used longest ago.

use crate::frame::Frame;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Frames kept per conversation (the newest).
pub const MAX_PER_CONVERSATION: usize = 1024;
/// Frames kept in all (a few tens of MB at typical message sizes).
pub const MAX_FRAMES: usize = 65_536;

struct Run {
    /// Contiguous, ascending by seq.
    frames: VecDeque<Arc<Frame>>,
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
    pub fn new() -> RecentFrames {
        RecentFrames::default()
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
        inner.clock += 1;
        let clock = inner.clock;
        let mut added: isize = 0;
        match inner.runs.get_mut(&conversation_id) {
            Some(run) if a <= run.last() + 1 && b + 1 >= run.first() => {
                // Overlapping or adjacent: extend at either end.
                let (first, last) = (run.first(), run.last());
                for f in frames.iter().rev().filter(|f| f.seq < first) {
                    run.frames.push_front(f.clone());
                    added += 1;
                }
                for f in frames.iter().filter(|f| f.seq > last) {
                    run.frames.push_back(f.clone());
                    added += 1;
                }
                run.used = clock;
                while run.frames.len() > MAX_PER_CONVERSATION {
                    run.frames.pop_front();
                    added -= 1;
                }
            }
            Some(run) if b <= run.last() => {
                // Older and not adjacent: keep the newer run we have.
            }
            existing => {
                // New, or newer and not adjacent: this run replaces it.
                let dropped = existing.map_or(0, |r| r.frames.len()) as isize;
                let keep = frames.len().min(MAX_PER_CONVERSATION);
                let run = Run {
                    frames: frames[frames.len() - keep..].iter().cloned().collect(),
                    used: clock,
                };
                added = keep as isize - dropped;
                inner.runs.insert(conversation_id, run);
            }
        }
        inner.total = (inner.total as isize + added).max(0) as usize;
        if inner.total > MAX_FRAMES {
            inner.evict();
        }
    }
}

impl Inner {
    /// Drops the least recently used conversations down to 3/4 of the cap.
    fn evict(&mut self) {
        let mut by_age: Vec<(u64, i64, usize)> = self
            .runs
            .iter()
            .map(|(c, r)| (r.used, *c, r.frames.len()))
            .collect();
        by_age.sort_unstable();
        for (_, c, n) in by_age {
            if self.total <= MAX_FRAMES * 3 / 4 {
                break;
            }
            self.runs.remove(&c);
            self.total -= n;
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
        let cache = RecentFrames::new();
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
        let cache = RecentFrames::new();
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
        let cache = RecentFrames::new();
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
}
