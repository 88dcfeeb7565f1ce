//! Deaths and timers: an exit the rules did not ask for is counted against
//! the intensity limit and replaced after the backoff (or ends a roll, or
//! gives up); a worker that is not ready in time, stops sending
//! heartbeats, or outlives its drain is SIGKILLed.

use super::*;

impl Cluster {
    pub(super) fn on_exit(&mut self, now: Instant, w: Worker, how: String) {
        if let Some(lost) = w.lost_at {
            log::info!(
                "sup: w{} pid={} reaped ({how}), {}ms after its control socket closed",
                w.n,
                w.pid,
                ms(now - lost)
            );
            return;
        }
        let expected = w.term_at.is_some() || matches!(self.phase, Phase::Stopping { .. });
        if expected {
            let after = w.term_at.map_or(String::new(), |t| {
                format!(", {}ms after SIGTERM", ms(now - t))
            });
            log::info!(
                "sup: w{} pid={} exited ({how}{after}{})",
                w.n,
                w.pid,
                if w.killed == Some(KillReason::DrainTimeout) {
                    ", killed after the drain time"
                } else {
                    ""
                }
            );
            if let Phase::Reloading(roll) = &mut self.phase {
                if roll.step == (RollStep::WaitingExit { old: w.n }) {
                    roll.step = RollStep::Next;
                }
            }
            return;
        }
        let (why, cause) = match w.killed {
            Some(KillReason::Hung) => ("; hung: no heartbeat", DeathCause::Hang),
            Some(KillReason::NotReady) => ("; never said ready", DeathCause::NotReady),
            _ => ("", DeathCause::Crash),
        };
        self.deaths.count(cause);
        self.count_death(now, w.n, w.pid, w.spawned_at, how, why);
    }

    /// Gives up (stop, exit 1) if this death crosses the intensity limit.
    pub(super) fn over_the_limit(&mut self, now: Instant, death: &str) -> bool {
        let Some(count) = self.s.intensity.record(now) else {
            return false;
        };
        log::error!("{death}");
        log::error!(
            "sup: giving up: {count} worker deaths in {}s (limit {})",
            self.s.intensity.window().as_secs(),
            self.s.intensity.max()
        );
        self.begin_stop(now, StopReason::GaveUp);
        true
    }

    /// A worker died unasked: count it and schedule its replacement (or
    /// end a roll, or give up).
    pub(super) fn count_death(
        &mut self,
        now: Instant,
        n: u64,
        pid: i32,
        spawned_at: Instant,
        how: String,
        why: &str,
    ) {
        let uptime = now - spawned_at;
        // The new worker of a roll step: the roll is aborted and it is not
        // replaced (the old one it was meant to replace stays).
        let surplus = matches!(
            &self.phase,
            Phase::Reloading(Roll { step: RollStep::WaitingReady { new, .. }, .. }) if *new == n
        );
        if let Phase::Reloading(roll) = &mut self.phase {
            roll.queue.retain(|&queued| queued != n);
            if let RollStep::WaitingReady { old, .. } = &mut roll.step {
                if *old == Some(n) {
                    *old = None; // its replacement is already starting
                }
            }
        }
        let death = format!(
            "sup: w{n} pid={pid} died ({how}{why}) after {}ms",
            ms(uptime)
        );
        if self.over_the_limit(now, &death) {
            return;
        }
        if surplus {
            log::error!(
                "sup: w{n} pid={pid} died ({how}{why}) before it was ready; reload aborted, keeping the old workers"
            );
            self.finish_roll(now, false);
            return;
        }
        let delay = self.s.backoff.on_death(uptime, now);
        log::warn!(
            "sup: w{n} pid={pid} died ({how}{why}) after {}ms; replacing in {}ms",
            ms(uptime),
            ms(delay)
        );
        self.scheduled.push(Scheduled {
            due: now + delay,
            replaces: Some((n, now)),
        });
    }

    // ---- timers ----------------------------------------------------------

    pub(super) fn enforce_timers(&mut self, now: Instant) {
        for w in &mut self.workers {
            if w.killed.is_some() {
                continue;
            }
            if let Some(t) = w.term_at {
                if now >= t + self.s.kill_after {
                    log::warn!(
                        "sup: w{} pid={} still running {}ms after SIGTERM: SIGKILL",
                        w.n,
                        w.pid,
                        ms(now - t)
                    );
                    Self::send_signal(&mut self.actions, w, Kill::Kill);
                    w.killed = Some(KillReason::DrainTimeout);
                }
            } else if w.ready_at.is_none() {
                if now >= w.spawned_at + self.s.ready_timeout {
                    log::warn!(
                        "sup: w{} pid={} not ready after {}ms: SIGKILL",
                        w.n,
                        w.pid,
                        ms(now - w.spawned_at)
                    );
                    Self::send_signal(&mut self.actions, w, Kill::Kill);
                    w.killed = Some(KillReason::NotReady);
                }
            } else if now >= w.last_hb + self.s.heartbeat_timeout {
                log::warn!(
                    "sup: w{} pid={} hung: no heartbeat for {}ms: SIGKILL",
                    w.n,
                    w.pid,
                    ms(now - w.last_hb)
                );
                Self::send_signal(&mut self.actions, w, Kill::Kill);
                w.killed = Some(KillReason::Hung);
            } else {
                self.s.backoff.note_alive(w.spawned_at, now);
            }
        }
    }
}
