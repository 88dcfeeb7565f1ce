//! The SIGHUP roll: for each old worker, start its replacement, wait until
//! it is ready, then SIGTERM the old one and wait for its exit; a
//! replacement that dies or fails to start before it is ready aborts the
//! roll and the old workers stay.

use super::*;

impl Cluster {
    pub(super) fn begin_roll(&mut self, now: Instant) {
        self.notify(vec![
            ("RELOADING", "1".into()),
            (
                "STATUS",
                "reloading: replacing workers one at a time".into(),
            ),
        ]);
        let queue: VecDeque<u64> = self
            .workers
            .iter()
            .filter(|w| w.active())
            .map(|w| w.n)
            .collect();
        log::info!(
            "sup: SIGHUP: replacing {} workers one at a time",
            queue.len()
        );
        self.phase = Phase::Reloading(Roll {
            queue,
            step: RollStep::Next,
            started: now,
            replaced: 0,
        });
    }

    pub(super) fn roll_mut(&mut self) -> Option<&mut Roll> {
        match &mut self.phase {
            Phase::Reloading(roll) => Some(roll),
            _ => None,
        }
    }

    pub(super) fn advance_roll(&mut self, now: Instant) {
        loop {
            let Some(roll) = self.roll_mut() else { return };
            match roll.step.clone() {
                RollStep::Next => {
                    let mut queue = std::mem::take(&mut roll.queue);
                    let next = loop {
                        match queue.pop_front() {
                            None => break None,
                            Some(n) if self.worker(n).is_some_and(|w| w.active()) => break Some(n),
                            Some(_) => {}
                        }
                    };
                    if let Some(roll) = self.roll_mut() {
                        roll.queue = queue;
                    }
                    let Some(old) = next else {
                        self.finish_roll(now, true);
                        return;
                    };
                    let new = self.start_worker(now, None, false);
                    log::info!("sup: reload: w{new} starting to replace w{old}");
                    if let Some(roll) = self.roll_mut() {
                        roll.step = RollStep::WaitingReady {
                            new,
                            old: Some(old),
                        };
                    }
                    return;
                }
                RollStep::WaitingReady { new, old } => {
                    if self.worker(new).is_none_or(|w| w.ready_at.is_none()) {
                        return;
                    }
                    let mut next = RollStep::Next;
                    if let Some(w) = old
                        .and_then(|o| self.workers.iter_mut().find(|w| w.n == o))
                        .filter(|w| w.active())
                    {
                        Self::send_signal(&mut self.actions, w, Kill::Term);
                        w.term_at = Some(now);
                        log::info!("sup: reload: w{new} ready, draining w{} pid={}", w.n, w.pid);
                        next = RollStep::WaitingExit { old: w.n };
                    }
                    if let Some(roll) = self.roll_mut() {
                        roll.replaced += 1;
                        roll.step = next;
                    }
                }
                RollStep::WaitingExit { old } => {
                    if self.worker(old).is_some() {
                        return;
                    }
                    if let Some(roll) = self.roll_mut() {
                        roll.step = RollStep::Next;
                    }
                }
            }
        }
    }

    pub(super) fn finish_roll(&mut self, now: Instant, ok: bool) {
        let Phase::Reloading(roll) = &self.phase else {
            return;
        };
        if ok {
            log::info!(
                "sup: reload done: {} workers replaced in {}ms",
                roll.replaced,
                ms(now - roll.started)
            );
        }
        self.phase = Phase::Running;
        let status = if ok {
            self.status_line()
        } else {
            format!("reload failed; {}", self.status_line())
        };
        self.notify(vec![("READY", "1".into()), ("STATUS", status)]);
        if self.reload_pending {
            self.reload_pending = false;
            self.begin_roll(now);
        }
    }
}
