//! Coalesced cursor writes. An `ack` only records the highest seq per
//! (conversation, user) in memory; a task writes them all in one UPDATE
//! every 250 ms. Losing a write (crash, database down) only means the
//! client gets those events again: cursors never move backwards and never
//! past what was committed.
//!
//! Written cursors are the read receipts: each write announces them
//! (`read` frames to the other members, at most one per member and
//! conversation per second, see [`ReadGate`]).

use crate::presence::{ReadGate, Signals};
use crate::store::{self, Pool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Highest acked seq per (conversation, user), not yet written.
type PendingAcks = HashMap<(i64, Arc<str>), i64>;

#[derive(Clone)]
pub struct CursorWriter {
    pending: Arc<Mutex<PendingAcks>>,
    pool: Pool,
    signals: Arc<Signals>,
    receipts: Arc<Mutex<ReadGate>>,
}

impl CursorWriter {
    pub fn start(pool: Pool, signals: Arc<Signals>) -> CursorWriter {
        let w = CursorWriter {
            pending: Arc::new(Mutex::new(HashMap::new())),
            pool,
            signals,
            receipts: Arc::new(Mutex::new(ReadGate::default())),
        };
        let bg = w.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                bg.flush_now().await;
            }
        });
        w
    }

    /// Records an ack (coalesced with others for the same cursor).
    pub fn ack(&self, conversation_id: i64, user: &Arc<str>, seq: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry((conversation_id, user.clone())).or_insert(seq);
        if *e < seq {
            *e = seq;
        }
    }

    /// Writes everything recorded so far. On failure the acks are put back
    /// (unless newer ones arrived) and tried on the next tick.
    pub async fn flush_now(&self) {
        let batch: Vec<((i64, Arc<str>), i64)> = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.is_empty() {
                drop(p);
                self.announce(&[]);
                return;
            }
            p.drain().collect()
        };
        let rows: Vec<(i64, String, i64)> = batch
            .iter()
            .map(|((c, u), s)| (*c, u.to_string(), *s))
            .collect();
        let pool = self.pool.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut c = pool.get()?;
            store::advance_cursors(&mut c, &rows)
        })
        .await;
        if matches!(result, Ok(Ok(_))) {
            let written: Vec<(i64, Arc<str>, i64)> = batch
                .iter()
                .map(|((c, u), s)| (*c, u.clone(), *s))
                .collect();
            self.announce(&written);
        } else {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (k, s) in batch {
                let e = p.entry(k).or_insert(s);
                if *e < s {
                    *e = s;
                }
            }
        }
    }

    /// A cursor written elsewhere (`POST .../cursor`, at once): its read
    /// receipt goes out like those of acks.
    pub fn receipt(&self, conversation_id: i64, user: &Arc<str>, seq: i64) {
        self.announce(&[(conversation_id, user.clone(), seq)]);
    }

    /// Read receipts of cursors just written, and of those held back by
    /// the once-a-second limit whose second is over.
    fn announce(&self, written: &[(i64, Arc<str>, i64)]) {
        if !self.signals.enabled() {
            return;
        }
        let due = {
            let mut gate = self.receipts.lock().unwrap_or_else(|e| e.into_inner());
            gate.written(written, Instant::now())
        };
        for s in due {
            self.signals.publish(s);
        }
    }
}
