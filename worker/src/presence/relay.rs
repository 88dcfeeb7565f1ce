//! Incoming signals to frames: which conversations a presence change is
//! shown in, which conversations are small enough to push to, and the
//! per-user throttle of presence frames.

use super::signal::Signal;
use crate::dispatch::Input;
use crate::store::{self, Pool, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_protocol::frames::server;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// At most one presence frame per user (and so per user and
/// conversation) per this.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(1);
/// How long a conversation's member count is trusted.
const COUNT_TTL: Duration = Duration::from_secs(30);
/// Member counts remembered at most.
const COUNTS_MAX: usize = 65_536;

/// The per-user throttle of presence changes: a change within
/// [`PRESENCE_EVERY`] of the last one shown is held, and only the latest
/// held state is shown once the second is over — and not at all if it is
/// the state last shown (an offline-online blip shows as nothing). Pure.
#[derive(Default)]
pub struct Throttle {
    shown: HashMap<String, (Instant, bool)>,
    held: HashMap<String, Signal>,
}

impl Throttle {
    /// The change to show now, if any (else it is held).
    pub fn offer(&mut self, s: Signal, now: Instant) -> Option<Signal> {
        let Signal::Presence { user, online, .. } = &s else {
            return Some(s);
        };
        match self.shown.get(user) {
            Some((at, _)) if now.duration_since(*at) < PRESENCE_EVERY => {
                self.held.insert(user.clone(), s);
                None
            }
            _ => {
                self.shown.insert(user.clone(), (now, *online));
                Some(s)
            }
        }
    }

    /// Held changes whose second is over, to show now.
    pub fn due(&mut self, now: Instant) -> Vec<Signal> {
        let mut out = Vec::new();
        let users: Vec<String> = self.held.keys().cloned().collect();
        for user in users {
            let Some((at, last)) = self.shown.get(&user).copied() else {
                continue;
            };
            if now.duration_since(at) < PRESENCE_EVERY {
                continue;
            }
            if let Some(s) = self.held.remove(&user) {
                if let Signal::Presence { online, .. } = &s {
                    if *online != last {
                        self.shown.insert(user, (now, *online));
                        out.push(s);
                    }
                }
            }
        }
        self.shown.retain(|u, (at, _)| {
            now.duration_since(*at) < PRESENCE_EVERY || self.held.contains_key(u)
        });
        out
    }

    /// Whether changes are held.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }
}

/// Conversations' member counts, remembered for a while (typing and read
/// receipts are pushed only in conversations small enough, see [`Reach`]).
#[derive(Default)]
pub struct MemberCounts {
    counts: Mutex<HashMap<i64, (i64, Instant)>>,
}

impl MemberCounts {
    /// The member count of each of `conversations` (counted up to
    /// `max + 1`), from memory when recent.
    fn of(
        &self,
        client: &mut postgres::Client,
        conversations: &[i64],
        max: i64,
    ) -> Result<HashMap<i64, i64>, StoreError> {
        let now = Instant::now();
        let mut known = HashMap::new();
        let mut unknown = Vec::new();
        {
            let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            for c in conversations {
                match counts.get(c) {
                    Some((n, at)) if now.duration_since(*at) < COUNT_TTL => {
                        known.insert(*c, *n);
                    }
                    _ => unknown.push(*c),
                }
            }
        }
        if !unknown.is_empty() {
            unknown.sort_unstable();
            unknown.dedup();
            let read = store::presence::member_counts(client, &unknown, max)?;
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if counts.len() + read.len() > COUNTS_MAX {
                counts.clear();
            }
            for (c, n) in read {
                counts.insert(c, (n, now));
                known.insert(c, n);
            }
        }
        Ok(known)
    }
}

/// How far each kind of signal is pushed: presence and typing in
/// conversations of at most `push_max` members, read receipts in those of
/// at most `receipts_max` (a receipt goes to every other member, so its
/// cost grows with the square of the conversation's size).
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    pub push_max: i64,
    pub receipts_max: i64,
}

/// The dispatcher inputs of `signals` (blocking: reads the database).
pub fn inputs(
    pool: &Pool,
    counts: &Arc<MemberCounts>,
    signals: Vec<Signal>,
    reach: Reach,
) -> Result<Vec<Input>, StoreError> {
    let mut client = pool.get()?;
    let mut inputs = Vec::new();
    let cs: Vec<i64> = signals
        .iter()
        .filter_map(|s| match s {
            Signal::Typing {
                conversation_id, ..
            }
            | Signal::Read {
                conversation_id, ..
            } => Some(*conversation_id),
            Signal::Presence { .. } => None,
        })
        .collect();
    let sizes = if cs.is_empty() {
        HashMap::new()
    } else {
        let most = reach.push_max.max(reach.receipts_max);
        counts.of(&mut client, &cs, most)?
    };
    let within = |c: &i64, max: i64| sizes.get(c).is_some_and(|n| *n <= max);
    for s in signals {
        let about: Arc<str> = Arc::from(s.user());
        match s {
            Signal::Presence {
                user,
                online,
                last_seen,
            } => {
                let max = reach.push_max;
                for c in store::presence::pushed_conversations(&mut client, &user, max)? {
                    inputs.push(Input::Signal {
                        conversation_id: c,
                        about: about.clone(),
                        text: Utf8Bytes::from(server::presence(c, &user, online, &last_seen)),
                    });
                }
            }
            Signal::Typing {
                conversation_id,
                user,
            } if within(&conversation_id, reach.push_max) => inputs.push(Input::Signal {
                conversation_id,
                about,
                text: Utf8Bytes::from(server::typing(conversation_id, &user)),
            }),
            Signal::Read {
                conversation_id,
                user,
                seq,
            } if within(&conversation_id, reach.receipts_max) => inputs.push(Input::Signal {
                conversation_id,
                about,
                text: Utf8Bytes::from(server::read(conversation_id, &user, seq)),
            }),
            _ => {}
        }
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(user: &str, online: bool) -> Signal {
        Signal::Presence {
            user: user.into(),
            online,
            last_seen: "t".into(),
        }
    }

    #[test]
    fn one_change_per_user_per_second_and_blips_vanish() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert!(t.offer(p("alice", true), t0).is_some());
        assert!(t.offer(p("bob", true), t0).is_some(), "per user");
        let soon = t0 + Duration::from_millis(300);
        assert!(t.offer(p("alice", false), soon).is_none());
        assert!(t.offer(p("alice", true), soon).is_none());
        assert!(t.holding());
        assert!(t.due(soon).is_empty(), "not yet");
        let later = t0 + PRESENCE_EVERY;
        assert!(t.due(later).is_empty(), "online again: nothing to show");
        assert!(!t.holding());
    }

    #[test]
    fn the_latest_held_change_is_shown_after_the_second() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert!(t.offer(p("alice", true), t0).is_some());
        assert!(t
            .offer(p("alice", false), t0 + Duration::from_millis(10))
            .is_none());
        assert_eq!(t.due(t0 + PRESENCE_EVERY), vec![p("alice", false)]);
        let t2 = t0 + PRESENCE_EVERY + Duration::from_millis(10);
        assert!(
            t.offer(p("alice", true), t2).is_none(),
            "a second after the last shown"
        );
        assert_eq!(t.due(t2 + PRESENCE_EVERY), vec![p("alice", true)]);
    }

    #[test]
    fn typing_and_reads_pass_untouched() {
        let mut t = Throttle::default();
        let now = Instant::now();
        let s = Signal::Typing {
            conversation_id: 1,
            user: "a".into(),
        };
        assert_eq!(t.offer(s.clone(), now), Some(s.clone()));
        assert_eq!(t.offer(s.clone(), now), Some(s));
    }
}
