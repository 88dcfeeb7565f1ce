//! Starting workers: asking the shell for one, taking its answer (a pid,
//! or a failure that counts as a death), and starting the replacements
//! whose backoff delay is over.

use super::*;

impl Cluster {
    /// Asks for worker `n`; its result comes as [`Input::Spawned`] or
    /// [`Input::SpawnFailed`].
    pub(super) fn start_worker(
        &mut self,
        now: Instant,
        replaces: Option<(u64, Instant)>,
        is_restart: bool,
    ) -> u64 {
        let n = self.next_n;
        self.next_n += 1;
        self.workers.push(Worker {
            n,
            pid: 0,
            connected: false,
            spawned_at: now,
            ready_at: None,
            last_hb: now,
            term_at: None,
            killed: None,
            draining: false,
            status_due: false,
            replaces,
            is_restart,
            lost_at: None,
        });
        self.actions.push_back(Action::Spawn { n });
        n
    }

    pub(super) fn on_spawned(&mut self, n: u64, pid: i32) {
        let Some(w) = self.workers.iter_mut().find(|w| w.n == n) else {
            return;
        };
        w.pid = pid;
        w.connected = true;
        let mut line = format!("sup: w{n} pid={pid} started");
        if let Some((old, _)) = w.replaces {
            line.push_str(&format!(" (replacing w{old})"));
        }
        log::info!("{line}");
        if w.is_restart {
            self.restarts += 1;
        }
    }

    /// A failed spawn counts as a death; retried after the backoff (or,
    /// for a roll's replacement, the roll is aborted).
    pub(super) fn on_spawn_failed(&mut self, now: Instant, n: u64, error: String) {
        let Some(i) = self.workers.iter().position(|w| w.n == n) else {
            return;
        };
        let w = self.workers.remove(i);
        self.deaths.count(DeathCause::SpawnFailed);
        if let Phase::Reloading(Roll {
            step: RollStep::WaitingReady { new, .. },
            ..
        }) = &self.phase
        {
            if *new == n {
                log::error!("sup: reload aborted: {error}; keeping the old workers");
                self.finish_roll(now, false);
                return;
            }
        }
        if self.over_the_limit(now, &format!("sup: {error}")) {
            return;
        }
        let delay = self.s.backoff.on_death(Duration::ZERO, now);
        log::error!("sup: {error}; retrying in {}ms", ms(delay));
        self.scheduled.push(Scheduled {
            due: now + delay,
            replaces: w.replaces,
        });
    }

    pub(super) fn start_due(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            self.scheduled.clear();
            return;
        }
        let (due, later): (Vec<Scheduled>, Vec<Scheduled>) =
            self.scheduled.drain(..).partition(|s| s.due <= now);
        self.scheduled = later;
        for s in due {
            self.start_worker(now, s.replaces, s.replaces.is_some());
        }
    }
}
