//! The supervisor's decisions as a state machine: inputs in, actions out,
//! no processes, sockets or clocks of its own (time comes with each
//! input). [`crate::supervise`] is the thin shell around it: it polls,
//! reads control sockets, reaps, spawns and signals, and reports each
//! outcome back.
//!
//! What it decides:
//! - **spawn**: the configured number of workers at start, each
//!   replacement after its [`Backoff`] delay, under the [`Intensity`] limit
//!   (beyond it: stop, exit 1); a failed spawn counts as a death;
//! - **restart**: a worker that exits unasked, or closes its control
//!   socket while serving (it is dying: killed to be sure and replaced at
//!   once), is counted and replaced;
//! - **hang**: no `ready` within the ready timeout, or no `hb` within the
//!   heartbeat timeout: SIGKILL, counted as a death;
//! - **drain**: SIGTERM/SIGINT: with a drain delay, first `unready` to
//!   every worker (`/ready` 503 while they keep serving, so load balancers
//!   take the host out) and the SIGTERMs only after the delay; then
//!   SIGKILL to those still there after drain + 2 s; a second stop signal
//!   SIGKILLs all at once; done when no worker is left;
//! - **roll**: SIGHUP: for each old worker, start its replacement, wait
//!   until it is ready, then SIGTERM the old one and wait for its exit; a
//!   replacement that dies before it is ready aborts the roll (the old
//!   workers stay);
//! - what systemd is told (`READY=1`, `RELOADING=1`, `STOPPING=1`,
//!   `STATUS=`, `WATCHDOG=1`) and the `status` line each worker shows in
//!   `/health`.
//!
//! Every event is one log line tagged `sup:` and, for a worker, its name
//! and pid (`sup: w3 pid=4242 ready in 48ms`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tether_protocol::control::{ClusterStatus, WorkerMessage};

use crate::policy::{Backoff, Intensity};

/// What the rules need of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub workers: u32,
    pub ready_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// SIGKILL this long after SIGTERM (drain + 2 s).
    pub kill_after: Duration,
    /// On a stop signal: `/ready` 503 this long before the SIGTERMs.
    pub drain_delay: Duration,
    pub backoff: Backoff,
    pub intensity: Intensity,
    /// systemd's watchdog interval, when it asks for one.
    pub watchdog: Option<Duration>,
    /// Where the workers listen, for logs and `STATUS=`.
    pub listen_desc: String,
}

/// A signal, as the rules understand it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGCHLD: some worker changed state (the shell reaps every turn).
    Child,
    /// SIGHUP: roll the workers.
    Reload,
    /// SIGTERM or SIGINT: drain and exit (twice: kill now).
    Stop(&'static str),
}

/// What the shell tells the rules.
#[derive(Debug, Clone)]
pub enum Input {
    Signal(Signal),
    /// A control line from worker `n`.
    Control {
        n: u64,
        message: WorkerMessage,
    },
    /// Worker `n`'s control socket reached end-of-file.
    ControlClosed {
        n: u64,
    },
    /// Worker `n` was reaped; `how` says how it ended.
    Exited {
        n: u64,
        how: String,
    },
    /// The spawn the rules asked for succeeded.
    Spawned {
        n: u64,
        pid: i32,
    },
    /// The spawn the rules asked for failed.
    SpawnFailed {
        n: u64,
        error: String,
    },
    /// Time passed: timers, due restarts, phase changes, status, watchdog.
    Tick,
}

/// A signal the rules send to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    Term,
    Kill,
}

/// What the rules ask the shell to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start worker `n` (name `w{n}`); answer [`Input::Spawned`] or
    /// [`Input::SpawnFailed`] before anything else.
    Spawn { n: u64 },
    /// Send a signal to worker `n` (not reaped yet, so its pid is still ours).
    Signal { n: u64, pid: i32, signal: Kill },
    /// Send worker `n` the cluster's status line.
    SendStatus { n: u64, status: ClusterStatus },
    /// Tell worker `n` to answer `/ready` with 503 (and keep serving).
    Unready { n: u64 },
    /// Tell systemd (sd_notify fields).
    Notify(Vec<(&'static str, String)>),
}

/// Why the supervisor is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM/SIGINT (the name): exit 0.
    Signal(&'static str),
    /// The intensity limit: exit 1.
    GaveUp,
}

/// How the supervisor ended; [`Outcome::exit_code`] is its exit status.
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
struct Roll {
    queue: VecDeque<u64>,
    step: RollStep,
    started: Instant,
    replaced: usize,
}

/// The supervisor's phase.
#[derive(Debug, Clone)]
enum Phase {
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
        /// During the drain delay: when the SIGTERMs go out. `None` once
        /// they have.
        term_at: Option<Instant>,
    },
}

/// Why the rules SIGKILLed a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    Hung,
    NotReady,
    DrainTimeout,
    Forced,
    /// It closed its control socket while serving: it is dying.
    ControlLost,
}

/// One worker, as the rules see it.
#[derive(Debug)]
struct Worker {
    n: u64,
    /// Known once [`Input::Spawned`] arrives.
    pid: i32,
    connected: bool,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    last_hb: Instant,
    term_at: Option<Instant>,
    killed: Option<KillReason>,
    draining: bool,
    status_due: bool,
    replaces: Option<(u64, Instant)>,
    /// Counts as a restart once spawned.
    is_restart: bool,
    lost_at: Option<Instant>,
}

impl Worker {
    fn active(&self) -> bool {
        self.term_at.is_none() && self.killed.is_none()
    }

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

/// Why a worker died unasked (the supervisor's metrics count each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// It exited or was killed by something else, or its control socket
    /// closed while it served.
    Crash,
    /// No heartbeat for the heartbeat timeout.
    Hang,
    /// Not ready within the ready timeout.
    NotReady,
    /// It could not even be started.
    SpawnFailed,
}

impl DeathCause {
    pub const ALL: [DeathCause; 4] = [
        DeathCause::Crash,
        DeathCause::Hang,
        DeathCause::NotReady,
        DeathCause::SpawnFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeathCause::Crash => "crash",
            DeathCause::Hang => "hang",
            DeathCause::NotReady => "not_ready",
            DeathCause::SpawnFailed => "spawn_failed",
        }
    }
}

/// Deaths counted by cause.
#[derive(Debug, Default, Clone, Copy)]
pub struct Deaths([u64; 4]);

impl Deaths {
    fn count(&mut self, cause: DeathCause) {
        self.0[cause as usize] += 1;
    }

    pub fn of(&self, cause: DeathCause) -> u64 {
        self.0[cause as usize]
    }
}

/// The rules' whole state.
pub struct Cluster {
    deaths: Deaths,
    s: Settings,
    workers: Vec<Worker>,
    next_n: u64,
    scheduled: Vec<Scheduled>,
    restarts: u64,
    phase: Phase,
    reload_pending: bool,
    watchdog_last: Instant,
    last_status: Option<ClusterStatus>,
    last_status_text: String,
    actions: VecDeque<Action>,
}

impl Cluster {
    /// The rules at `now`: schedules the first workers (their spawns come
    /// with the first [`Input::Tick`]).
    pub fn new(s: Settings, now: Instant) -> Cluster {
        let first: Vec<Scheduled> = (0..s.workers)
            .map(|_| Scheduled {
                due: now,
                replaces: None,
            })
            .collect();
        Cluster {
            deaths: Deaths::default(),
            s,
            workers: Vec::new(),
            next_n: 1,
            scheduled: first,
            restarts: 0,
            phase: Phase::Starting { since: now },
            reload_pending: false,
            watchdog_last: now,
            last_status: None,
            last_status_text: String::new(),
            actions: VecDeque::new(),
        }
    }

    /// Applies one input at `now`.
    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Signal(Signal::Child) => {}
            Input::Signal(Signal::Reload) => self.on_reload(),
            Input::Signal(Signal::Stop(name)) => self.on_stop(now, name),
            Input::Control { n, message } => self.on_control(now, n, message),
            Input::ControlClosed { n } => self.on_control_closed(now, n),
            Input::Exited { n, how } => {
                if let Some(i) = self.workers.iter().position(|w| w.n == n) {
                    let w = self.workers.remove(i);
                    self.on_exit(now, w, how);
                }
            }
            Input::Spawned { n, pid } => self.on_spawned(n, pid),
            Input::SpawnFailed { n, error } => self.on_spawn_failed(now, n, error),
            Input::Tick => {
                self.enforce_timers(now);
                self.start_due(now);
                self.advance(now);
                self.publish_status();
                self.ping_watchdog(now);
            }
        }
    }

    /// The next action to perform, in order.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// How the supervisor ends, once it has: stopping and no worker left.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Stopping { reason, forced, .. } if self.workers.is_empty() => {
                Some(match (forced, reason) {
                    (true, _) => Outcome::Forced,
                    (false, StopReason::GaveUp) => Outcome::GaveUp,
                    (false, StopReason::Signal(_)) => Outcome::Stopped,
                })
            }
            _ => None,
        }
    }

    /// When the phase started stopping (for the exit log line).
    pub fn stopping_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Stopping { since, .. } => Some(since),
            _ => None,
        }
    }

    /// The nearest moment a [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.iter().filter_map(|w| {
            if w.killed.is_some() {
                None
            } else if let Some(t) = w.term_at {
                Some(t + self.s.kill_after)
            } else if w.ready_at.is_none() {
                Some(w.spawned_at + self.s.ready_timeout)
            } else {
                Some(w.last_hb + self.s.heartbeat_timeout)
            }
        });
        let scheduled = self.scheduled.iter().map(|s| s.due);
        let watchdog = self.s.watchdog.map(|every| self.watchdog_last + every);
        let drain = match self.phase {
            Phase::Stopping { term_at, .. } => term_at,
            _ => None,
        };
        workers.chain(scheduled).chain(watchdog).chain(drain).min()
    }

    /// Unasked deaths so far, by cause.
    pub fn deaths(&self) -> Deaths {
        self.deaths
    }

    /// The status every worker shows in `/health`.
    pub fn status(&self) -> ClusterStatus {
        let serving = self.workers.iter().filter(|w| w.serving()).count() as u32;
        ClusterStatus {
            configured: self.s.workers,
            alive: serving.min(self.s.workers),
            restarts: self.restarts,
        }
    }

    /// Workers not yet reaped (numbers).
    #[cfg(test)]
    pub fn workers(&self) -> Vec<u64> {
        self.workers.iter().map(|w| w.n).collect()
    }

    fn worker(&self, n: u64) -> Option<&Worker> {
        self.workers.iter().find(|w| w.n == n)
    }

    fn worker_mut(&mut self, n: u64) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.n == n)
    }

    fn notify(&mut self, fields: Vec<(&'static str, String)>) {
        if let Some((_, status)) = fields.iter().find(|(k, _)| *k == "STATUS") {
            self.last_status_text = status.clone();
        }
        self.actions.push_back(Action::Notify(fields));
    }

    fn send_signal(actions: &mut VecDeque<Action>, w: &Worker, signal: Kill) {
        actions.push_back(Action::Signal {
            n: w.n,
            pid: w.pid,
            signal,
        });
    }

    fn status_line(&self) -> String {
        let s = self.status();
        format!(
            "{}/{} workers ready on {}, {} restarts",
            s.alive, s.configured, self.s.listen_desc, s.restarts
        )
    }

    // ---- signals ---------------------------------------------------------

    fn on_reload(&mut self) {
        match self.phase {
            Phase::Running => self.reload_pending = true,
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

    // ---- control lines ---------------------------------------------------

    fn on_control(&mut self, now: Instant, n: u64, message: WorkerMessage) {
        let Some(w) = self.worker_mut(n) else { return };
        match message {
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
                        line.push_str(&format!(" ({}ms after w{old} died)", ms(now - died)));
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

    /// A serving worker whose control socket closed is dying: replace it
    /// now rather than when the kernel has finished tearing it down.
    fn on_control_closed(&mut self, now: Instant, n: u64) {
        let Some(w) = self.workers.iter_mut().find(|w| w.n == n) else {
            return;
        };
        log::debug!("sup: w{} pid={} closed its control socket", w.n, w.pid);
        w.connected = false;
        // While stopping (the drain delay included) an exit is expected:
        // nothing is replaced.
        if !w.active() || w.draining || matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        Self::send_signal(&mut self.actions, w, Kill::Kill);
        w.killed = Some(KillReason::ControlLost);
        w.lost_at = Some(now);
        let (pid, spawned_at) = (w.pid, w.spawned_at);
        self.deaths.count(DeathCause::Crash);
        self.count_death(now, n, pid, spawned_at, "control socket closed".into(), "");
    }

    // ---- phases ----------------------------------------------------------

    fn advance(&mut self, now: Instant) {
        match &self.phase {
            Phase::Starting { since } => {
                let since = *since;
                let serving = self.workers.iter().filter(|w| w.serving()).count() as u32;
                if serving >= self.s.workers {
                    log::info!(
                        "sup: all {} workers ready in {}ms, serving on {}",
                        self.s.workers,
                        ms(now - since),
                        self.s.listen_desc
                    );
                    let status = self.status_line();
                    self.notify(vec![("READY", "1".into()), ("STATUS", status)]);
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
            Phase::Stopping { .. } => self.advance_stop(now),
        }
    }

    // ---- status and watchdog ----------------------------------------------

    fn publish_status(&mut self) {
        let status = self.status();
        let changed = self.last_status != Some(status);
        for w in &mut self.workers {
            if (changed || w.status_due) && w.ready_at.is_some() && w.connected {
                self.actions
                    .push_back(Action::SendStatus { n: w.n, status });
            }
            w.status_due = false;
        }
        if changed {
            let line = self.status_line();
            if !matches!(self.phase, Phase::Stopping { .. }) && line != self.last_status_text {
                self.notify(vec![("STATUS", line)]);
            }
            self.last_status = Some(status);
        }
    }

    fn ping_watchdog(&mut self, now: Instant) {
        if let Some(every) = self.s.watchdog {
            if now >= self.watchdog_last + every {
                self.notify(vec![("WATCHDOG", "1".into())]);
                self.watchdog_last = now;
            }
        }
    }
}

mod deaths;
mod roll;
mod spawns;
mod stop;

#[cfg(test)]
mod tests;
