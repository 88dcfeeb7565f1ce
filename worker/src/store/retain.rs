//! Retention: pruning the event log, one conversation and one small batch
//! per transaction.
//!
//! Each step locks one conversation's row (skipping rows a writer holds,
//! so it never waits on the write path and the write path waits at most
//! one batch on it), deletes at most a batch of its oldest events, and
//! raises its `horizon_seq` to the highest seq deleted, in the same
//! transaction: a reader sees the events or the horizon above them, never
//! neither. Steps of different workers never overlap: each takes a
//! transaction-scoped advisory lock first (transaction-scoped, so it
//! works behind a transaction-mode pooler too), and a worker that finds
//! it taken leaves the round to the one holding it.
//!
//! Idempotency keys live as long as their events: a retry of a send whose
//! event was pruned is a new message.

use super::oneshot::OneShot;
use super::StoreError;
use postgres::Client;
use std::time::Duration;

/// What to keep (each rule off when zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Events kept per conversation (the newest), 0 = all.
    pub max_events: i64,
    /// Events younger than this are kept, zero = all.
    pub max_age: Duration,
}

impl Retention {
    /// Whether any rule is on.
    pub fn is_on(&self) -> bool {
        self.max_events > 0 || !self.max_age.is_zero()
    }
}

/// The advisory lock every prune step takes.
const LOCK: i64 = 7_412_094;

/// One step's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Another worker is pruning: leave the round to it.
    Busy,
    /// No conversation after the one given needs pruning.
    Done,
    /// Pruned `deleted` events of `conversation_id` (its horizon is now
    /// `horizon`); it may need more steps.
    Pruned {
        conversation_id: i64,
        deleted: u64,
        horizon: i64,
    },
}

/// The new horizon of a conversation: the higher of what each rule
/// allows, at most `batch` above the current one, never below it.
/// `aged` is the highest seq (within the next batch) older than the age
/// limit, if any.
pub fn next_horizon(
    rules: &Retention,
    horizon: i64,
    last_seq: i64,
    aged: Option<i64>,
    batch: i64,
) -> i64 {
    let by_count = if rules.max_events > 0 {
        last_seq - rules.max_events
    } else {
        0
    };
    let by_age = if rules.max_age.is_zero() {
        0
    } else {
        aged.unwrap_or(0)
    };
    by_count
        .max(by_age)
        .min(horizon + batch.max(1))
        .min(last_seq)
        .max(horizon)
}

/// One step: the first conversation with id above `after` that a rule
/// says to prune, pruned by at most `batch` events.
pub fn prune_step(
    client: &mut Client,
    rules: &Retention,
    after: i64,
    batch: i64,
) -> Result<Step, StoreError> {
    if !rules.is_on() {
        return Ok(Step::Done);
    }
    let max_age_secs = rules.max_age.as_secs_f64();
    let mut tx = client.transaction()?;
    let locked: bool = tx
        .oneshot_query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LOCK])?
        .get(0);
    if !locked {
        tx.rollback()?;
        return Ok(Step::Busy);
    }
    // The age rule looks at the oldest event kept: events are never
    // deleted but here, so it is seq horizon + 1 (an index probe).
    let row = tx.oneshot_query_opt(
        "SELECT c.id, c.horizon_seq, c.last_seq FROM conversations c
         WHERE c.id > $1 AND c.last_seq > c.horizon_seq
           AND (($2 > 0 AND c.last_seq - c.horizon_seq > $2)
                OR ($3 > 0 AND EXISTS (
                    SELECT 1 FROM events e
                    WHERE e.conversation_id = c.id AND e.seq = c.horizon_seq + 1
                      AND e.created_at < now() - make_interval(secs => $3))))
         ORDER BY c.id LIMIT 1
         FOR UPDATE SKIP LOCKED",
        &[&after, &rules.max_events, &max_age_secs],
    )?;
    let Some(row) = row else {
        tx.rollback()?;
        return Ok(Step::Done);
    };
    let (id, horizon, last_seq): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let aged: Option<i64> = if rules.max_age.is_zero() {
        None
    } else {
        tx.oneshot_query_one(
            "SELECT max(seq) FROM (
                 SELECT seq, created_at FROM events
                 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3) w
             WHERE created_at < now() - make_interval(secs => $4)",
            &[&id, &horizon, &batch, &max_age_secs],
        )?
        .get(0)
    };
    let new = next_horizon(rules, horizon, last_seq, aged, batch);
    if new <= horizon {
        tx.rollback()?;
        return Ok(Step::Pruned {
            conversation_id: id,
            deleted: 0,
            horizon,
        });
    }
    let deleted = tx.oneshot_execute(
        "DELETE FROM events WHERE conversation_id = $1 AND seq > $2 AND seq <= $3",
        &[&id, &horizon, &new],
    )?;
    tx.oneshot_execute(
        "UPDATE conversations SET horizon_seq = $2 WHERE id = $1",
        &[&id, &new],
    )?;
    tx.commit()?;
    Ok(Step::Pruned {
        conversation_id: id,
        deleted,
        horizon: new,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: i64 = 1000;

    #[test]
    fn by_count_keeps_the_newest() {
        let r = Retention {
            max_events: 100,
            ..Default::default()
        };
        assert_eq!(next_horizon(&r, 0, 150, None, BATCH), 50);
        assert_eq!(next_horizon(&r, 50, 150, None, BATCH), 50);
        assert_eq!(next_horizon(&r, 0, 80, None, BATCH), 0, "fewer than kept");
    }

    #[test]
    fn a_step_prunes_at_most_a_batch() {
        let r = Retention {
            max_events: 10,
            ..Default::default()
        };
        assert_eq!(next_horizon(&r, 0, 5_000, None, BATCH), 1_000);
        assert_eq!(next_horizon(&r, 1_000, 5_000, None, BATCH), 2_000);
        assert_eq!(next_horizon(&r, 4_000, 5_000, None, BATCH), 4_990);
    }

    #[test]
    fn by_age_prunes_what_is_older() {
        let r = Retention {
            max_age: Duration::from_secs(86_400),
            ..Default::default()
        };
        assert_eq!(next_horizon(&r, 0, 50, Some(30), BATCH), 30);
        assert_eq!(next_horizon(&r, 0, 50, None, BATCH), 0, "nothing old");
        assert_eq!(
            next_horizon(&r, 0, 50, Some(50), BATCH),
            50,
            "everything old"
        );
    }

    #[test]
    fn the_stricter_rule_wins_and_the_horizon_never_goes_back() {
        let r = Retention {
            max_events: 40,
            max_age: Duration::from_secs(60),
        };
        assert_eq!(next_horizon(&r, 0, 100, Some(20), BATCH), 60);
        assert_eq!(next_horizon(&r, 0, 100, Some(90), BATCH), 90);
        assert_eq!(next_horizon(&r, 70, 100, Some(20), BATCH), 70);
    }

    #[test]
    fn off_prunes_nothing() {
        let r = Retention::default();
        assert!(!r.is_on());
        assert_eq!(next_horizon(&r, 0, 1_000_000, Some(999_999), BATCH), 0);
    }
}
