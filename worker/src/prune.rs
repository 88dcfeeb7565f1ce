//! The retention job's shell: every `--prune-interval-secs`, one round of
//! [`store::retain::prune_step`]s over every conversation a rule says to
//! prune, on a thread of its own (the steps are blocking database calls).
//! Every worker runs it; the steps' advisory lock lets one prune at a time,
//! and a worker that finds it taken leaves the round to the other.

use crate::metrics::Metrics;
use crate::store::retain::{prune_step, Retention, Step};
use crate::store::{Pool, StoreError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Events deleted per step (one conversation, one short transaction).
const BATCH: i64 = 500;

/// Starts the job, if a rule is on.
pub fn spawn(pool: Pool, rules: Retention, every: Duration, metrics: Arc<Metrics>, worker: &str) {
    if !rules.is_on() {
        return;
    }
    let name = worker.to_string();
    let worker = name.clone();
    let started = std::thread::Builder::new()
        .name("tether-prune".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            match round(&pool, &rules, &metrics) {
                Ok(0) => {}
                Ok(n) => log::info!("worker={worker}: retention pruned {n} events"),
                Err(e) => log::warn!("worker={worker}: retention round failed: {e}"),
            }
        });
    if let Err(e) = started {
        log::error!("worker={name}: cannot start the retention job: {e}");
    }
}

/// One round: steps until no conversation is left to prune or another
/// worker holds the lock. Returns the events deleted.
fn round(pool: &Pool, rules: &Retention, metrics: &Metrics) -> Result<u64, StoreError> {
    let mut client = pool.get()?;
    let mut after = 0;
    let mut total = 0;
    loop {
        match prune_step(&mut client, rules, after, BATCH)? {
            Step::Busy | Step::Done => return Ok(total),
            Step::Pruned {
                conversation_id,
                deleted,
                ..
            } => {
                total += deleted;
                metrics.pruned_events.fetch_add(deleted, Ordering::Relaxed);
                // A full batch: this conversation may need another step.
                after = if deleted as i64 >= BATCH {
                    conversation_id - 1
                } else {
                    conversation_id
                };
            }
        }
    }
}
