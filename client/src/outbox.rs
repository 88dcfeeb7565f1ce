//! Sends waiting for their `sent`: each keeps its `client_msg_id` for its
//! whole life, so a retry (after a reconnect, a `database_unavailable` or a
//! `rate_limited`) can never create a second event.

use crate::{SendError, Sent};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;
use tokio::sync::oneshot;

pub(crate) type Reply = oneshot::Sender<Result<Sent, SendError>>;

pub(crate) struct Pending {
    pub id: String,
    pub frame: String,
    pub reply: Reply,
    /// The connection number it was last written on (0: not written).
    pub written_on: u64,
}

/// Error codes after which a send is retried (same `client_msg_id`); the
/// rest are final (`internal` too, as in the JS SDK: docs/SDK.md).
pub(crate) fn retryable(code: &str) -> bool {
    matches!(
        code,
        "database_unavailable" | "rate_limited" | "not_synced" | "draining"
    )
}

#[derive(Default)]
pub(crate) struct Outbox {
    /// Enqueue order → send.
    entries: BTreeMap<u64, Pending>,
    by_id: HashMap<String, u64>,
    /// Entries to write on the current connection, in enqueue order.
    ready: BTreeSet<u64>,
    /// Entries waiting out a `retry_after`.
    delayed: Vec<(Instant, u64)>,
    next: u64,
    /// Written on the current connection, awaiting `sent` or `error`.
    pub in_flight: usize,
}

impl Outbox {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn push(&mut self, p: Pending) {
        self.next += 1;
        self.by_id.insert(p.id.clone(), self.next);
        self.ready.insert(self.next);
        self.entries.insert(self.next, p);
    }

    /// Takes the next entry to write on connection `conn` (marking it in
    /// flight), or `None`.
    pub fn next_to_write(&mut self, conn: u64) -> Option<&Pending> {
        let key = self.ready.pop_first()?;
        let p = self.entries.get_mut(&key)?;
        p.written_on = conn;
        self.in_flight += 1;
        Some(p)
    }

    #[cfg(test)]
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The entry `id` is answered: removes and returns it.
    pub fn complete(&mut self, id: &str, conn: u64) -> Option<Pending> {
        let key = self.by_id.remove(id)?;
        let p = self.entries.remove(&key)?;
        self.ready.remove(&key);
        self.delayed.retain(|(_, k)| *k != key);
        if p.written_on == conn && conn != 0 {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        Some(p)
    }

    /// The entry `id` is to be written again at `at` (or at once).
    pub fn retry(&mut self, id: &str, conn: u64, at: Option<Instant>) {
        let Some(&key) = self.by_id.get(id) else {
            return;
        };
        if let Some(p) = self.entries.get_mut(&key) {
            if p.written_on == conn && conn != 0 {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            p.written_on = 0;
        }
        match at {
            Some(t) => self.delayed.push((t, key)),
            None => {
                self.ready.insert(key);
            }
        }
    }

    /// Moves the retries whose time has come to the ready set.
    pub fn promote(&mut self, now: Instant) {
        let ready = &mut self.ready;
        self.delayed.retain(|(t, k)| {
            if *t <= now {
                ready.insert(*k);
                false
            } else {
                true
            }
        });
    }

    pub fn next_retry(&self) -> Option<Instant> {
        self.delayed.iter().map(|(t, _)| *t).min()
    }

    /// The connection is gone: everything written on it and not answered is
    /// to be written again on the next one.
    pub fn connection_lost(&mut self) {
        for (k, p) in self.entries.iter_mut() {
            if p.written_on != 0 {
                p.written_on = 0;
                self.ready.insert(*k);
            }
        }
        self.in_flight = 0;
    }

    /// Removes everything (the client closes).
    pub fn drain(&mut self) -> Vec<Pending> {
        self.by_id.clear();
        self.ready.clear();
        self.delayed.clear();
        self.in_flight = 0;
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pending(id: &str) -> (Pending, oneshot::Receiver<Result<Sent, SendError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Pending {
                id: id.into(),
                frame: format!("frame {id}"),
                reply: tx,
                written_on: 0,
            },
            rx,
        )
    }

    #[test]
    fn resends_in_order_after_a_lost_connection_with_the_same_id() {
        let mut o = Outbox::default();
        let mut rxs = Vec::new();
        for id in ["a", "b", "c"] {
            let (p, rx) = pending(id);
            o.push(p);
            rxs.push(rx);
        }
        assert_eq!(o.next_to_write(1).unwrap().id, "a");
        assert_eq!(o.next_to_write(1).unwrap().id, "b");
        assert_eq!(o.in_flight, 2);
        assert!(o.complete("a", 1).is_some());
        assert_eq!(o.in_flight, 1);
        o.connection_lost();
        assert_eq!(o.in_flight, 0);
        assert_eq!(o.next_to_write(2).unwrap().id, "b");
        assert_eq!(o.next_to_write(2).unwrap().id, "c");
        assert!(o.next_to_write(2).is_none());
        assert_eq!(o.len(), 2);
        // An unknown or already answered id is ignored.
        assert!(o.complete("a", 2).is_none());
    }

    #[test]
    fn retry_after_waits_its_time() {
        let mut o = Outbox::default();
        let (p, _rx) = pending("a");
        o.push(p);
        o.next_to_write(1);
        let t0 = Instant::now();
        o.retry("a", 1, Some(t0 + Duration::from_secs(1)));
        assert_eq!(o.in_flight, 0);
        o.promote(t0);
        assert!(!o.has_ready());
        assert_eq!(o.next_retry(), Some(t0 + Duration::from_secs(1)));
        o.promote(t0 + Duration::from_secs(1));
        assert_eq!(o.next_to_write(1).unwrap().id, "a");
        assert!(retryable("rate_limited") && retryable("database_unavailable"));
        assert!(!retryable("not_found") && !retryable("invalid_field"));
        assert!(!retryable("payload_too_large"));
    }
}
