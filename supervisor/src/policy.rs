//! The restart policy, as pure bookkeeping over `Instant`s so that it can be
//! unit-tested without processes:
//!
//! - [`Backoff`]: how long to wait before replacing a dead worker. The first
//!   replacement after a stable period is immediate (0 ms), then the delay
//!   starts at `initial` and doubles up to `max`. It resets once a worker has
//!   stayed up [`crate::config::BACKOFF_RESET_AFTER`].
//! - [`Intensity`]: the OTP-style limit: more than `max` deaths within
//!   `window` and the supervisor gives up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Exponential restart backoff with an immediate first restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    /// Consecutive failures since the last reset.
    attempt: u32,
    /// When `attempt` last went up.
    last_bump: Option<Instant>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            reset_after,
            attempt: 0,
            last_bump: None,
        }
    }

    /// The delay for failure number `attempt` (0-based): 0, then
    /// `initial`, doubling, capped at `max`.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A worker that lived `uptime` died at `now`: the delay before its
    /// replacement. A worker that lived at least `reset_after` resets the
    /// sequence, so its replacement starts at once.
    pub fn on_death(&mut self, uptime: Duration, now: Instant) -> Duration {
        if uptime >= self.reset_after {
            self.reset();
        }
        let delay = self.delay_for(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.last_bump = Some(now);
        delay
    }

    /// A worker started at `started` is still up at `now`: if it started
    /// after the last failure and has been up `reset_after`, the cluster is
    /// stable again and the sequence resets.
    pub fn note_alive(&mut self, started: Instant, now: Instant) {
        if let Some(bump) = self.last_bump {
            if started >= bump && now.saturating_duration_since(started) >= self.reset_after {
                self.reset();
            }
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
        self.last_bump = None;
    }

    /// Consecutive failures since the last reset.
    #[cfg(test)]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Deaths within a sliding window, against a limit.
#[derive(Debug, Clone)]
pub struct Intensity {
    max: u32,
    window: Duration,
    deaths: VecDeque<Instant>,
}

impl Intensity {
    pub fn new(max: u32, window: Duration) -> Intensity {
        Intensity {
            max,
            window,
            deaths: VecDeque::new(),
        }
    }

    /// Records a death at `now`; returns the number of deaths within the
    /// window if that is more than the limit (time to give up).
    pub fn record(&mut self, now: Instant) -> Option<usize> {
        self.deaths.push_back(now);
        while let Some(&first) = self.deaths.front() {
            if now.saturating_duration_since(first) >= self.window {
                self.deaths.pop_front();
            } else {
                break;
            }
        }
        (self.deaths.len() > self.max as usize).then_some(self.deaths.len())
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_is_immediate_then_doubles_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 5000 * MS, 10_000 * MS);
        let t0 = Instant::now();
        let delays: Vec<u128> = (0..10)
            .map(|i| b.on_death(MS, t0 + i * MS).as_millis())
            .collect();
        assert_eq!(
            delays,
            [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        assert_eq!(b.attempt(), 10);
    }

    #[test]
    fn a_long_lived_worker_resets_the_backoff() {
        let mut b = Backoff::new(100 * MS, 5000 * MS, 10_000 * MS);
        let t0 = Instant::now();
        b.on_death(MS, t0);
        b.on_death(MS, t0);
        assert_eq!(b.on_death(MS, t0), 200 * MS);
        // A worker that was up for 10 s dies: its replacement is immediate.
        assert_eq!(b.on_death(10_000 * MS, t0 + 20 * MS), Duration::ZERO);
        assert_eq!(b.on_death(MS, t0 + 30 * MS), 100 * MS);
    }

    #[test]
    fn a_replacement_that_stays_up_resets_the_backoff() {
        let mut b = Backoff::new(100 * MS, 5000 * MS, 10_000 * MS);
        let t0 = Instant::now();
        b.on_death(MS, t0);
        b.on_death(MS, t0);
        // A worker started before the last failure does not count.
        b.note_alive(t0 - MS, t0 + 20_000 * MS);
        assert_eq!(b.attempt(), 2);
        // One started after it, up for 9 s: not yet.
        b.note_alive(t0 + MS, t0 + 9_000 * MS);
        assert_eq!(b.attempt(), 2);
        b.note_alive(t0 + MS, t0 + 10_001 * MS);
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.on_death(MS, t0 + 10_002 * MS), Duration::ZERO);
    }

    #[test]
    fn backoff_never_overflows() {
        let b = Backoff::new(100 * MS, 5000 * MS, 10_000 * MS);
        assert_eq!(b.delay_for(40), 5000 * MS);
        assert_eq!(b.delay_for(u32::MAX), 5000 * MS);
    }

    #[test]
    fn intensity_counts_deaths_in_the_window_only() {
        let mut i = Intensity::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(i.record(t0), None);
        assert_eq!(i.record(t0 + 10_000 * MS), None);
        assert_eq!(i.record(t0 + 20_000 * MS), None);
        // The 4th within 60 s: over the limit of 3.
        assert_eq!(i.record(t0 + 30_000 * MS), Some(4));
        let mut i = Intensity::new(3, Duration::from_secs(60));
        i.record(t0);
        i.record(t0 + 10_000 * MS);
        i.record(t0 + 20_000 * MS);
        // The first has left the window by now.
        assert_eq!(i.record(t0 + 60_000 * MS), None);
        assert_eq!(i.record(t0 + 61_000 * MS), Some(4));
    }

    #[test]
    fn a_zero_limit_gives_up_on_the_first_death() {
        let mut i = Intensity::new(0, Duration::from_secs(1));
        assert_eq!(i.record(Instant::now()), Some(1));
    }
}
