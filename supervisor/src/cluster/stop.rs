//! Stopping: SIGTERM/SIGINT (or giving up) drains every worker. With a
//! drain delay, the workers are first told `unready` (`/ready` 503 while
//! they keep serving, so load balancers take the host out) and get their
//! SIGTERMs only when it has passed; a second stop signal SIGKILLs them
//! all at once, delay or not.

use super::*;

impl Cluster {
    pub(super) fn on_stop(&mut self, now: Instant, name: &'static str) {
        if let Phase::Stopping { forced, .. } = &mut self.phase {
            if !*forced {
                *forced = true;
                log::warn!(
                    "sup: second stop signal ({name}): killing {} workers now",
                    self.workers.len()
                );
                for w in &mut self.workers {
                    Self::send_signal(&mut self.actions, w, Kill::Kill);
                    w.killed = Some(KillReason::Forced);
                }
            }
            // No SIGTERMs after the kill (nor a deadline for them).
            if let Phase::Stopping { term_at, .. } = &mut self.phase {
                *term_at = None;
            }
            return;
        }
        self.begin_stop(now, StopReason::Signal(name));
    }

    /// Enter [`Phase::Stopping`]: on a stop signal with a drain delay,
    /// `unready` to every worker now and the SIGTERMs when it has passed
    /// ([`Cluster::advance`]); otherwise (no delay, or giving up, where
    /// there is nothing healthy to keep serving) the SIGTERMs now.
    pub(super) fn begin_stop(&mut self, now: Instant, reason: StopReason) {
        self.notify(vec![
            ("STOPPING", "1".into()),
            ("STATUS", "draining workers".into()),
        ]);
        self.scheduled.clear();
        self.reload_pending = false;
        // Spawns asked for and not performed yet: not any more.
        self.actions.retain(|a| !matches!(a, Action::Spawn { .. }));
        let delay = self.s.drain_delay;
        if let (StopReason::Signal(name), false) = (reason, delay.is_zero()) {
            let mut n = 0;
            for w in self.workers.iter().filter(|w| w.active()) {
                self.actions.push_back(Action::Unready { n: w.n });
                n += 1;
            }
            log::info!(
                "sup: {name}: /ready answers 503 on {n} workers; they keep serving for {}ms, then drain",
                ms(delay)
            );
            self.phase = Phase::Stopping {
                since: now,
                reason,
                forced: false,
                term_at: Some(now + delay),
            };
            return;
        }
        self.phase = Phase::Stopping {
            since: now,
            reason,
            forced: false,
            term_at: None,
        };
        self.term_all(now, reason);
    }

    /// SIGTERM every active worker (the drain proper).
    fn term_all(&mut self, now: Instant, reason: StopReason) {
        let mut n = 0;
        for w in &mut self.workers {
            if w.active() {
                Self::send_signal(&mut self.actions, w, Kill::Term);
                w.term_at = Some(now);
                n += 1;
            }
        }
        let why = match reason {
            StopReason::Signal(name) => name,
            StopReason::GaveUp => "giving up",
        };
        log::info!(
            "sup: {why}: draining {n} workers (SIGKILL after {}ms)",
            ms(self.s.kill_after)
        );
    }

    /// During the drain delay: the SIGTERMs once it has passed.
    pub(super) fn advance_stop(&mut self, now: Instant) {
        let Phase::Stopping {
            term_at: Some(at),
            reason,
            forced: false,
            ..
        } = self.phase
        else {
            return;
        };
        if now >= at {
            if let Phase::Stopping { term_at, .. } = &mut self.phase {
                *term_at = None;
            }
            self.term_all(now, reason);
        }
    }
}
