//! The supervisor loop: one thread, one `poll()`.
//!
//! The loop sleeps in `poll()` on the signal self-pipe (signal-hook writes a
//! byte there from its handler for SIGCHLD, SIGHUP, SIGTERM and SIGINT) and
//! on every worker's control socket, with a timeout that is the nearest
//! deadline (a scheduled restart, a heartbeat or ready timeout, a SIGKILL
//! after drain, the systemd watchdog). Each turn it then, in order:
//!
//! 1. takes pending signals ([`Signal`]): stop, reload, child;
//! 2. reads control lines (`ready`, `hb`, `draining`);
//! 3. reaps exited workers with `waitpid(pid, WNOHANG)` on each worker's own
//!    pid (never `-1`, so a child of some library is never stolen), and
//!    schedules replacements with [`Backoff`] under the [`Intensity`] limit;
//! 4. enforces timers: heartbeat and ready timeouts (SIGKILL, counted as a
//!    death), SIGKILL after drain + 2 s;
//! 5. starts the replacements that are due;
//! 6. advances the [`Phase`] (starting → running, the SIGHUP roll, stop);
//! 7. publishes `status` lines and `STATUS=` when the cluster changed;
//! 8. pings the systemd watchdog.
//!
//! Every event is one log line tagged `sup:` and, for a worker, its name
//! and pid (`sup: w3 pid=4242 ready in 48ms`).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use tether_protocol::control::{ClusterStatus, WorkerMessage};

use crate::channel::Channel;
use crate::config::{Config, BACKOFF_RESET_AFTER};
use crate::notify::{monotonic_usec, watchdog_interval, Notifier};
use crate::policy::{Backoff, Intensity};
use crate::spawn::{SpawnError, WorkerTemplate};

/// The longest `poll()` sleep, so slow bookkeeping (backoff reset) runs.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Errors that stop the supervisor loop itself (not a worker).
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("registering signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("poll() on the signal pipe and control sockets: {0}")]
    Poll(#[source] Errno),
}

/// A signal, as the loop understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGCHLD: some worker changed state (we reap every turn anyway).
    Child,
    /// SIGHUP: roll the workers.
    Reload,
    /// SIGTERM or SIGINT: drain and exit (twice: kill now).
    Stop(&'static str),
}

impl Signal {
    pub fn from_raw(sig: i32) -> Option<Signal> {
        match sig {
            SIGCHLD => Some(Signal::Child),
            SIGHUP => Some(Signal::Reload),
            SIGTERM => Some(Signal::Stop("SIGTERM")),
            SIGINT => Some(Signal::Stop("SIGINT")),
            _ => None,
        }
    }
}

/// The signals the loop handles, delivered through a self-pipe that the
/// loop polls (no signal thread).
pub struct Signals(SignalDelivery<UnixStream, SignalOnly>);

impl Signals {
    /// Installs the handlers. Do it early: a SIGTERM that arrives while dev
    /// mode is still starting PostgreSQL is then kept for the loop.
    pub fn install() -> Result<Signals, SuperviseError> {
        let (read, write) = UnixStream::pair().map_err(SuperviseError::Signals)?;
        read.set_nonblocking(true)
            .map_err(SuperviseError::Signals)?;
        write
            .set_nonblocking(true)
            .map_err(SuperviseError::Signals)?;
        SignalDelivery::with_pipe(read, write, SignalOnly, [SIGCHLD, SIGHUP, SIGTERM, SIGINT])
            .map(Signals)
            .map_err(SuperviseError::Signals)
    }

    /// Signals received since the last call (never blocks).
    fn pending(&mut self) -> Vec<Signal> {
        self.0.pending().filter_map(Signal::from_raw).collect()
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.get_read().as_fd()
    }
}

/// Why the supervisor is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM/SIGINT (the name): exit 0.
    Signal(&'static str),
    /// The intensity limit: exit 1.
    GaveUp,
}

/// How `run` ended; [`Outcome::exit_code`] is the process's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every worker drained (or was killed after the drain time).
    Stopped,
    /// Too many deaths in the window.
    GaveUp,
    /// A second stop signal: workers were SIGKILLed without draining.
    Forced,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Stopped => 0,
            Outcome::GaveUp | Outcome::Forced => 1,
        }
    }
}

/// Where the SIGHUP roll is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RollStep {
    /// Start the replacement of the next old worker.
    Next,
    /// `new` was started to replace `old` (None: `old` died meanwhile).
    WaitingReady { new: u64, old: Option<u64> },
    /// `old` got SIGTERM; wait until it has exited.
    WaitingExit { old: u64 },
}

/// A rolling replacement in progress.
#[derive(Debug, Clone)]
pub struct Roll {
    queue: VecDeque<u64>,
    step: RollStep,
    started: Instant,
    replaced: usize,
}

/// The supervisor's phase.
#[derive(Debug, Clone)]
pub enum Phase {
    /// The initial workers are starting; READY=1 not sent yet.
    Starting { since: Instant },
    /// Serving; replacing workers that die.
    Running,
    /// SIGHUP: replacing the workers one at a time.
    Reloading(Roll),
    /// Draining every worker, then exit.
    Stopping {
        since: Instant,
        reason: StopReason,
        forced: bool,
    },
}

/// Why the supervisor SIGKILLed a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    /// No `hb` for the heartbeat timeout.
    Hung,
    /// No `ready` within the ready timeout.
    NotReady,
    /// Still running drain + 2 s after SIGTERM.
    DrainTimeout,
    /// A second stop signal.
    Forced,
    /// It closed its control socket while serving: it is dying (the kernel
    /// closes a dying process's low fds first, long before a worker with
    /// thousands of sockets is fully torn down and reaped). Killed to be
    /// sure, and its death is counted right away.
    ControlLost,
}

/// One worker process.
#[derive(Debug)]
struct Worker {
    n: u64,
    pid: Pid,
    channel: Option<Channel>,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    last_hb: Instant,
    /// When we sent SIGTERM (it is retiring: its exit is expected).
    term_at: Option<Instant>,
    killed: Option<KillReason>,
    /// The worker said `draining`.
    draining: bool,
    /// Send it the current `status` at the end of this turn.
    status_due: bool,
    /// The worker it replaces after a death, and when that one died.
    replaces: Option<(u64, Instant)>,
    /// When its control socket closed while it was serving: its death was
    /// counted (and its replacement scheduled) then; reaping it only logs.
    lost_at: Option<Instant>,
}

impl Worker {
    /// Neither asked to leave nor killed.
    fn active(&self) -> bool {
        self.term_at.is_none() && self.killed.is_none()
    }

    /// Counts as alive in `/health`: active, ready and not draining.
    fn serving(&self) -> bool {
        self.active() && self.ready_at.is_some() && !self.draining
    }
}

/// A replacement waiting for its backoff delay.
#[derive(Debug, Clone, Copy)]
struct Scheduled {
    due: Instant,
    replaces: Option<(u64, Instant)>,
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!(
                "killed by {sig}{}",
                if *core { " (core dumped)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

/// Sends `sig` to a worker we have not reaped yet (so its pid cannot have
/// been reused). ESRCH means it is exiting: fine, we reap it soon.
fn signal(pid: Pid, sig: NixSignal) {
    if let Err(e) = kill(pid, sig) {
        if e != Errno::ESRCH {
            log::warn!("sup: pid={pid}: sending {sig}: {e}");
        }
    }
}

/// The supervisor: configuration, workers, phase, policy state.
pub struct Supervisor<'l> {
    cfg: Config,
    template: WorkerTemplate,
    listener: BorrowedFd<'l>,
    listen_desc: String,
    signals: Signals,
    workers: Vec<Worker>,
    next_n: u64,
    scheduled: Vec<Scheduled>,
    restarts: u64,
    backoff: Backoff,
    intensity: Intensity,
    phase: Phase,
    reload_pending: bool,
    notifier: Option<Notifier>,
    watchdog: Option<(Duration, Instant)>,
    last_status: Option<ClusterStatus>,
    /// The last `STATUS=` sent to systemd (not repeated).
    last_status_text: String,
}

impl<'l> Supervisor<'l> {
    pub fn new(
        cfg: Config,
        template: WorkerTemplate,
        listener: BorrowedFd<'l>,
        listen_desc: String,
        signals: Signals,
    ) -> Supervisor<'l> {
        let notifier = match Notifier::from_env() {
            Ok(n) => n,
            Err(e) => {
                log::warn!("sup: {e}; not notifying systemd");
                None
            }
        };
        let wd = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let now = Instant::now();
        Supervisor {
            backoff: Backoff::new(cfg.backoff_initial, cfg.backoff_max, BACKOFF_RESET_AFTER),
            intensity: Intensity::new(cfg.max_restarts, cfg.restart_window),
            cfg,
            template,
            listener,
            listen_desc,
            signals,
            workers: Vec::new(),
            next_n: 1,
            scheduled: Vec::new(),
            restarts: 0,
            phase: Phase::Starting { since: now },
            reload_pending: false,
            notifier,
            watchdog: wd.map(|d| (d, now)),
            last_status: None,
            last_status_text: String::new(),
        }
    }

    /// Runs until every worker is gone after a stop signal or giving up.
    pub fn run(mut self) -> Result<Outcome, SuperviseError> {
        let now = Instant::now();
        log::info!(
            "sup: starting {} workers ({}) on {}",
            self.cfg.workers,
            self.template.bin().display(),
            self.listen_desc
        );
        if let Some((every, _)) = self.watchdog {
            log::info!("sup: systemd watchdog on: ping every {}ms", ms(every));
        }
        self.handle_signals(now);
        for _ in 0..self.cfg.workers {
            // A stop signal that came early, or giving up because the
            // spawns themselves fail: start nothing (more).
            if matches!(self.phase, Phase::Stopping { .. }) {
                break;
            }
            self.start_replacement(now, None, false);
        }
        loop {
            let now = Instant::now();
            self.handle_signals(now);
            self.read_channels(now);
            self.reap(now);
            self.enforce_timers(now);
            self.start_due(now);
            self.advance(now);
            self.publish_status();
            self.ping_watchdog(now);
            if let Phase::Stopping {
                reason,
                forced,
                since,
            } = self.phase
            {
                if self.workers.is_empty() {
                    let outcome = match (forced, reason) {
                        (true, _) => Outcome::Forced,
                        (false, StopReason::GaveUp) => Outcome::GaveUp,
                        (false, StopReason::Signal(_)) => Outcome::Stopped,
                    };
                    log::info!(
                        "sup: all workers gone {}ms after the stop; exiting with code {}",
                        ms(since.elapsed()),
                        outcome.exit_code()
                    );
                    return Ok(outcome);
                }
            }
            self.sleep()?;
        }
    }

    /// Sleeps in `poll()` until a signal, a control line or the next
    /// deadline. Readiness itself is not inspected: each turn reads every
    /// socket non-blockingly and reaps every worker.
    fn sleep(&mut self) -> Result<(), SuperviseError> {
        let timeout = self.next_deadline().map_or(MAX_SLEEP, |d| {
            d.saturating_duration_since(Instant::now()).min(MAX_SLEEP)
        });
        // Round up, so we never wake a fraction of a millisecond early and spin.
        let millis = timeout.as_micros().div_ceil(1000) as u16;
        let mut fds = Vec::with_capacity(self.workers.len() + 1);
        fds.push(PollFd::new(self.signals.fd(), PollFlags::POLLIN));
        for w in &self.workers {
            if let Some(ch) = &w.channel {
                fds.push(PollFd::new(ch.as_fd(), PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(SuperviseError::Poll(e)),
        }
    }

    /// The nearest moment something must happen.
    fn next_deadline(&self) -> Option<Instant> {
        let kill_after = self.cfg.kill_after();
        let workers = self.workers.iter().filter_map(|w| {
            if w.killed.is_some() {
                None
            } else if let Some(t) = w.term_at {
                Some(t + kill_after)
            } else if w.ready_at.is_none() {
                Some(w.spawned_at + self.cfg.ready_timeout)
            } else {
                Some(w.last_hb + self.cfg.heartbeat_timeout)
            }
        });
        let scheduled = self.scheduled.iter().map(|s| s.due);
        let watchdog = self.watchdog.map(|(every, last)| last + every);
        workers.chain(scheduled).chain(watchdog).min()
    }

    fn worker_mut(&mut self, n: u64) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.n == n)
    }

    fn worker(&self, n: u64) -> Option<&Worker> {
        self.workers.iter().find(|w| w.n == n)
    }

    fn notify(&mut self, fields: &[(&str, &str)]) {
        if let Some((_, status)) = fields.iter().find(|(k, _)| *k == "STATUS") {
            self.last_status_text = status.to_string();
        }
        if let Some(n) = &self.notifier {
            if let Err(e) = n.send(fields) {
                log::warn!("sup: sd_notify: {e}");
            }
        }
    }

    /// The status every worker shows in `/health`.
    fn cluster_status(&self) -> ClusterStatus {
        let serving = self.workers.iter().filter(|w| w.serving()).count() as u32;
        ClusterStatus {
            configured: self.cfg.workers,
            alive: serving.min(self.cfg.workers),
            restarts: self.restarts,
        }
    }

    // ---- 1. signals -------------------------------------------------------

    fn handle_signals(&mut self, now: Instant) {
        for sig in self.signals.pending() {
            match sig {
                Signal::Child => {}
                Signal::Reload => self.on_reload(),
                Signal::Stop(name) => self.on_stop(now, name),
            }
        }
    }

    fn on_reload(&mut self) {
        match self.phase {
            Phase::Running => {
                self.reload_pending = true;
            }
            Phase::Starting { .. } => {
                log::info!("sup: SIGHUP while starting: will roll once every worker is ready");
                self.reload_pending = true;
            }
            Phase::Reloading(_) => {
                log::info!("sup: SIGHUP during a roll: will roll again after this one");
                self.reload_pending = true;
            }
            Phase::Stopping { .. } => log::info!("sup: SIGHUP while stopping: ignored"),
        }
    }

    fn on_stop(&mut self, now: Instant, name: &'static str) {
        if let Phase::Stopping { forced, .. } = &mut self.phase {
            if !*forced {
                *forced = true;
                log::warn!(
                    "sup: second stop signal ({name}): killing {} workers now",
                    self.workers.len()
                );
                for w in &mut self.workers {
                    signal(w.pid, NixSignal::SIGKILL);
                    w.killed = Some(KillReason::Forced);
                }
            }
            return;
        }
        self.begin_stop(now, StopReason::Signal(name));
    }

    /// SIGTERM every worker and enter [`Phase::Stopping`].
    fn begin_stop(&mut self, now: Instant, reason: StopReason) {
        self.notify(&[("STOPPING", "1"), ("STATUS", "draining workers")]);
        self.scheduled.clear();
        self.reload_pending = false;
        let mut n = 0;
        for w in &mut self.workers {
            if w.active() {
                signal(w.pid, NixSignal::SIGTERM);
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
            ms(self.cfg.kill_after())
        );
        self.phase = Phase::Stopping {
            since: now,
            reason,
            forced: false,
        };
    }

    // ---- 2. control lines -------------------------------------------------

    fn read_channels(&mut self, now: Instant) {
        let mut lost = Vec::new();
        for w in &mut self.workers {
            let Some(ch) = &mut w.channel else { continue };
            let got = ch.receive();
            for m in got.messages {
                match m {
                    WorkerMessage::Ready => {
                        if w.ready_at.is_none() {
                            w.ready_at = Some(now);
                            let mut line = format!(
                                "sup: w{} pid={} ready in {}ms",
                                w.n,
                                w.pid,
                                ms(now - w.spawned_at)
                            );
                            if let Some((old, died)) = w.replaces {
                                line.push_str(&format!(
                                    " ({}ms after w{old} died)",
                                    ms(now - died)
                                ));
                            }
                            log::info!("{line}");
                        }
                        w.last_hb = now;
                        w.status_due = true;
                    }
                    WorkerMessage::Heartbeat => w.last_hb = now,
                    WorkerMessage::Draining => {
                        if !w.draining {
                            log::info!("sup: w{} pid={} draining", w.n, w.pid);
                        }
                        w.draining = true;
                    }
                }
            }
            for line in got.unknown {
                log::warn!(
                    "sup: w{} pid={}: unknown control line {:?}",
                    w.n,
                    w.pid,
                    line.chars().take(80).collect::<String>()
                );
            }
            if got.eof {
                log::debug!("sup: w{} pid={} closed its control socket", w.n, w.pid);
                w.channel = None;
                if w.active() && !w.draining {
                    lost.push(w.n);
                }
            }
        }
        // A serving worker whose control socket closed is dying: replace it
        // now rather than when the kernel has finished tearing it down.
        for n in lost {
            let Some(w) = self.workers.iter_mut().find(|w| w.n == n) else {
                continue;
            };
            signal(w.pid, NixSignal::SIGKILL);
            w.killed = Some(KillReason::ControlLost);
            w.lost_at = Some(now);
            let (n, pid, spawned_at) = (w.n, w.pid, w.spawned_at);
            self.count_death(now, n, pid, spawned_at, "control socket closed".into(), "");
        }
    }

    // ---- 3. reaping -------------------------------------------------------

    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.workers.len() {
            let pid = self.workers[i].pid;
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => i += 1,
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    let w = self.workers.remove(i);
                    self.on_exit(now, w, describe(&status));
                }
                Ok(_) => i += 1,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    // ECHILD: it is not our child any more (cannot happen
                    // unless something else reaped it). Treat it as gone.
                    let w = self.workers.remove(i);
                    self.on_exit(now, w, format!("lost ({e})"));
                }
            }
        }
    }

    fn on_exit(&mut self, now: Instant, w: Worker, how: String) {
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
        let why = match w.killed {
            Some(KillReason::Hung) => "; hung: no heartbeat",
            Some(KillReason::NotReady) => "; never said ready",
            _ => "",
        };
        self.count_death(now, w.n, w.pid, w.spawned_at, how, why);
    }

    /// A worker died unasked: count it against the intensity limit and
    /// schedule its replacement (or end a roll, or give up).
    fn count_death(
        &mut self,
        now: Instant,
        n: u64,
        pid: Pid,
        spawned_at: Instant,
        how: String,
        why: &str,
    ) {
        let uptime = now - spawned_at;
        // Is it the new worker of a roll step? Then the roll is aborted and
        // it is not replaced: the old one it was meant to replace stays.
        let surplus = matches!(
            &self.phase,
            Phase::Reloading(Roll { step: RollStep::WaitingReady { new, .. }, .. }) if *new == n
        );
        if let Phase::Reloading(roll) = &mut self.phase {
            roll.queue.retain(|&queued| queued != n);
            if let RollStep::WaitingReady { old, .. } = &mut roll.step {
                if *old == Some(n) {
                    // Its replacement is already starting.
                    *old = None;
                }
            }
        }
        if let Some(count) = self.intensity.record(now) {
            log::error!(
                "sup: w{} pid={} died ({how}{why}) after {}ms",
                n,
                pid,
                ms(uptime)
            );
            log::error!(
                "sup: giving up: {count} worker deaths in {}s (limit {})",
                self.intensity.window().as_secs(),
                self.intensity.max()
            );
            self.begin_stop(now, StopReason::GaveUp);
            return;
        }
        if surplus {
            log::error!(
                "sup: w{} pid={} died ({how}{why}) before it was ready; reload aborted, keeping the old workers",
                n,
                pid
            );
            self.finish_roll(now, false);
            return;
        }
        let delay = self.backoff.on_death(uptime, now);
        log::warn!(
            "sup: w{} pid={} died ({how}{why}) after {}ms; replacing in {}ms",
            n,
            pid,
            ms(uptime),
            ms(delay)
        );
        self.scheduled.push(Scheduled {
            due: now + delay,
            replaces: Some((n, now)),
        });
    }

    // ---- 4. timers --------------------------------------------------------

    fn enforce_timers(&mut self, now: Instant) {
        let kill_after = self.cfg.kill_after();
        for w in &mut self.workers {
            if w.killed.is_some() {
                continue;
            }
            if let Some(t) = w.term_at {
                if now >= t + kill_after {
                    log::warn!(
                        "sup: w{} pid={} still running {}ms after SIGTERM: SIGKILL",
                        w.n,
                        w.pid,
                        ms(now - t)
                    );
                    signal(w.pid, NixSignal::SIGKILL);
                    w.killed = Some(KillReason::DrainTimeout);
                }
            } else if w.ready_at.is_none() {
                if now >= w.spawned_at + self.cfg.ready_timeout {
                    log::warn!(
                        "sup: w{} pid={} not ready after {}ms: SIGKILL",
                        w.n,
                        w.pid,
                        ms(now - w.spawned_at)
                    );
                    signal(w.pid, NixSignal::SIGKILL);
                    w.killed = Some(KillReason::NotReady);
                }
            } else if now >= w.last_hb + self.cfg.heartbeat_timeout {
                log::warn!(
                    "sup: w{} pid={} hung: no heartbeat for {}ms: SIGKILL",
                    w.n,
                    w.pid,
                    ms(now - w.last_hb)
                );
                signal(w.pid, NixSignal::SIGKILL);
                w.killed = Some(KillReason::Hung);
            } else {
                self.backoff.note_alive(w.spawned_at, now);
            }
        }
    }

    // ---- 5. starting workers ---------------------------------------------

    /// Starts one worker; on failure the failure counts as a death and is
    /// retried after the backoff. Returns the new worker's number.
    fn start_replacement(
        &mut self,
        now: Instant,
        replaces: Option<(u64, Instant)>,
        is_restart: bool,
    ) -> Option<u64> {
        match self.start_worker(now, replaces) {
            Ok(n) => {
                if is_restart {
                    self.restarts += 1;
                }
                Some(n)
            }
            Err(e) => {
                if let Some(count) = self.intensity.record(now) {
                    log::error!("sup: {e}");
                    log::error!(
                        "sup: giving up: {count} worker deaths in {}s (limit {})",
                        self.intensity.window().as_secs(),
                        self.intensity.max()
                    );
                    self.begin_stop(now, StopReason::GaveUp);
                    return None;
                }
                let delay = self.backoff.on_death(Duration::ZERO, now);
                log::error!("sup: {e}; retrying in {}ms", ms(delay));
                self.scheduled.push(Scheduled {
                    due: now + delay,
                    replaces,
                });
                None
            }
        }
    }

    fn start_worker(
        &mut self,
        now: Instant,
        replaces: Option<(u64, Instant)>,
    ) -> Result<u64, SpawnError> {
        let n = self.next_n;
        self.next_n += 1;
        let spawned = self.template.spawn(&format!("w{n}"), self.listener)?;
        let mut line = format!("sup: w{n} pid={} started", spawned.pid);
        if let Some((old, _)) = replaces {
            line.push_str(&format!(" (replacing w{old})"));
        }
        log::info!("{line}");
        self.workers.push(Worker {
            n,
            pid: spawned.pid,
            channel: Some(spawned.channel),
            spawned_at: now,
            ready_at: None,
            last_hb: now,
            term_at: None,
            killed: None,
            draining: false,
            status_due: false,
            replaces,
            lost_at: None,
        });
        Ok(n)
    }

    fn start_due(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            self.scheduled.clear();
            return;
        }
        let (due, later): (Vec<Scheduled>, Vec<Scheduled>) =
            self.scheduled.drain(..).partition(|s| s.due <= now);
        self.scheduled = later;
        for s in due {
            if matches!(self.phase, Phase::Stopping { .. }) {
                break;
            }
            self.start_replacement(now, s.replaces, s.replaces.is_some());
        }
    }

    // ---- 6. phases ---------------------------------------------------------

    fn advance(&mut self, now: Instant) {
        match &self.phase {
            Phase::Starting { since } => {
                let since = *since;
                let serving = self.workers.iter().filter(|w| w.serving()).count() as u32;
                if serving >= self.cfg.workers {
                    log::info!(
                        "sup: all {} workers ready in {}ms, serving on {}",
                        self.cfg.workers,
                        ms(now - since),
                        self.listen_desc
                    );
                    let status = self.status_line();
                    self.notify(&[("READY", "1"), ("STATUS", &status)]);
                    self.phase = Phase::Running;
                    self.advance(now);
                }
            }
            Phase::Running => {
                if self.reload_pending {
                    self.reload_pending = false;
                    self.begin_roll(now);
                    self.advance(now);
                }
            }
            Phase::Reloading(_) => self.advance_roll(now),
            Phase::Stopping { .. } => {}
        }
    }

    fn status_line(&self) -> String {
        let s = self.cluster_status();
        format!(
            "{}/{} workers ready on {}, {} restarts",
            s.alive, s.configured, self.listen_desc, s.restarts
        )
    }

    fn begin_roll(&mut self, now: Instant) {
        let usec = monotonic_usec().to_string();
        self.notify(&[
            ("RELOADING", "1"),
            ("MONOTONIC_USEC", &usec),
            ("STATUS", "reloading: replacing workers one at a time"),
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

    fn roll_mut(&mut self) -> Option<&mut Roll> {
        match &mut self.phase {
            Phase::Reloading(roll) => Some(roll),
            _ => None,
        }
    }

    fn advance_roll(&mut self, now: Instant) {
        loop {
            let Some(roll) = self.roll_mut() else {
                return;
            };
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
                    match self.start_worker(now, None) {
                        Ok(new) => {
                            log::info!("sup: reload: w{new} starting to replace w{old}");
                            if let Some(roll) = self.roll_mut() {
                                roll.step = RollStep::WaitingReady {
                                    new,
                                    old: Some(old),
                                };
                            }
                        }
                        Err(e) => {
                            log::error!("sup: reload aborted: {e}; keeping the old workers");
                            self.finish_roll(now, false);
                        }
                    }
                    return;
                }
                RollStep::WaitingReady { new, old } => {
                    if self.worker(new).is_none_or(|w| w.ready_at.is_none()) {
                        return;
                    }
                    let mut next = RollStep::Next;
                    if let Some(w) = old.and_then(|o| self.worker_mut(o)).filter(|w| w.active()) {
                        signal(w.pid, NixSignal::SIGTERM);
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

    fn finish_roll(&mut self, now: Instant, ok: bool) {
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
        self.notify(&[("READY", "1"), ("STATUS", &status)]);
        if self.reload_pending {
            self.reload_pending = false;
            self.begin_roll(now);
        }
    }

    // ---- 7. status ---------------------------------------------------------

    fn publish_status(&mut self) {
        let status = self.cluster_status();
        let changed = self.last_status != Some(status);
        for w in &mut self.workers {
            if (changed || w.status_due) && w.ready_at.is_some() {
                if let Some(ch) = &mut w.channel {
                    if let Err(e) = ch.send_status(status) {
                        log::debug!("sup: w{} pid={}: sending status: {e}", w.n, w.pid);
                    }
                }
            }
            w.status_due = false;
        }
        if changed {
            let line = self.status_line();
            if !matches!(self.phase, Phase::Stopping { .. }) && line != self.last_status_text {
                self.notify(&[("STATUS", &line)]);
            }
            self.last_status = Some(status);
        }
    }

    // ---- 8. watchdog -------------------------------------------------------

    fn ping_watchdog(&mut self, now: Instant) {
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notify(&[("WATCHDOG", "1")]);
                self.watchdog = Some((every, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_loop_events() {
        assert_eq!(Signal::from_raw(SIGCHLD), Some(Signal::Child));
        assert_eq!(Signal::from_raw(SIGHUP), Some(Signal::Reload));
        assert_eq!(Signal::from_raw(SIGTERM), Some(Signal::Stop("SIGTERM")));
        assert_eq!(Signal::from_raw(SIGINT), Some(Signal::Stop("SIGINT")));
        assert_eq!(Signal::from_raw(libc::SIGUSR1), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::Stopped.exit_code(), 0);
        assert_eq!(Outcome::GaveUp.exit_code(), 1);
        assert_eq!(Outcome::Forced.exit_code(), 1);
    }
}
