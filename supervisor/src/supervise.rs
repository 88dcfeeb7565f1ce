//! The supervisor's shell: one thread, one `poll()`, around the rules of
//! [`crate::cluster`]. It does the I/O the rules cannot: it sleeps in
//! `poll()` on the signal self-pipe (signal-hook writes a byte there from
//! its handler for SIGCHLD, SIGHUP, SIGTERM and SIGINT) and on every
//! worker's control socket, with a timeout that is the rules' nearest
//! deadline. Each turn it feeds the rules, in order:
//!
//! 1. pending signals;
//! 2. control lines (`ready`, `hb`, `draining`) and closed control sockets;
//! 3. exits, reaped with `waitpid(pid, WNOHANG)` on each worker's own pid
//!    (never `-1`, so a child of some library is never stolen);
//! 4. a tick (timers, due restarts, phase changes, status, watchdog);
//!
//! and after each input performs the rules' actions: fork+exec a worker
//! (reporting its pid or the failure straight back), signal one, send a
//! `status` line, notify systemd.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use tether_protocol::control::SupervisorMessage;
use tether_protocol::exposition::{file_name, process_metrics};

use crate::channel::Channel;
use crate::cluster::{Action, Cluster, DeathCause, Input, Kill, Outcome, Settings, Signal};
use crate::config::{Config, BACKOFF_RESET_AFTER};
use crate::notify::{monotonic_usec, watchdog_interval, Notifier};
use crate::policy::{Backoff, Intensity};
use crate::spawn::WorkerTemplate;

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

/// The rules' signal for a raw one.
fn signal_of(sig: i32) -> Option<Signal> {
    match sig {
        SIGCHLD => Some(Signal::Child),
        SIGHUP => Some(Signal::Reload),
        SIGTERM => Some(Signal::Stop("SIGTERM")),
        SIGINT => Some(Signal::Stop("SIGINT")),
        _ => None,
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
        self.0.pending().filter_map(signal_of).collect()
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.get_read().as_fd()
    }
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

/// The supervisor's own series, labelled `worker="supervisor"`.
fn render_metrics(rules: &Cluster, started: Instant) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let status = rules.status();
    let _ = writeln!(
        out,
        "# HELP tether_supervisor_workers_up Workers alive and ready, as the supervisor counts them.\n# TYPE tether_supervisor_workers_up gauge\ntether_supervisor_workers_up{{worker=\"supervisor\"}} {}",
        status.alive
    );
    let _ = writeln!(
        out,
        "# HELP tether_supervisor_workers_configured Workers the supervisor runs.\n# TYPE tether_supervisor_workers_configured gauge\ntether_supervisor_workers_configured{{worker=\"supervisor\"}} {}",
        status.configured
    );
    let _ = writeln!(
        out,
        "# HELP tether_supervisor_restarts_total Workers that died unasked, by cause.\n# TYPE tether_supervisor_restarts_total counter"
    );
    let deaths = rules.deaths();
    for cause in DeathCause::ALL {
        let _ = writeln!(
            out,
            "tether_supervisor_restarts_total{{worker=\"supervisor\",cause=\"{}\"}} {}",
            cause.as_str(),
            deaths.of(cause)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tether_supervisor_uptime_seconds Seconds since the supervisor started.\n# TYPE tether_supervisor_uptime_seconds gauge\ntether_supervisor_uptime_seconds{{worker=\"supervisor\"}} {}",
        started.elapsed().as_secs_f64()
    );
    out.push_str(&process_metrics("supervisor"));
    out
}

/// A live worker process: what the shell holds for it.
struct Process {
    pid: Pid,
    channel: Option<Channel>,
}

/// The supervisor: the rules and the processes, sockets and signals.
pub struct Supervisor<'l> {
    rules: Cluster,
    template: WorkerTemplate,
    listener: BorrowedFd<'l>,
    listen_desc: String,
    signals: Signals,
    procs: HashMap<u64, Process>,
    notifier: Option<Notifier>,
    /// Where every process of the host writes its metrics.
    metrics_dir: Option<PathBuf>,
    started: Instant,
    metrics_written: Option<Instant>,
}

impl<'l> Supervisor<'l> {
    pub fn new(
        cfg: Config,
        template: WorkerTemplate,
        listener: BorrowedFd<'l>,
        listen_desc: String,
        signals: Signals,
        metrics_dir: Option<PathBuf>,
    ) -> Supervisor<'l> {
        let notifier = match Notifier::from_env() {
            Ok(n) => n,
            Err(e) => {
                log::warn!("sup: {e}; not notifying systemd");
                None
            }
        };
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let settings = Settings {
            workers: cfg.workers,
            ready_timeout: cfg.ready_timeout,
            heartbeat_timeout: cfg.heartbeat_timeout,
            kill_after: cfg.kill_after(),
            drain_delay: cfg.drain_delay,
            backoff: Backoff::new(cfg.backoff_initial, cfg.backoff_max, BACKOFF_RESET_AFTER),
            intensity: Intensity::new(cfg.max_restarts, cfg.restart_window),
            watchdog,
            listen_desc: listen_desc.clone(),
        };
        Supervisor {
            rules: Cluster::new(settings, Instant::now()),
            template,
            listener,
            listen_desc,
            signals,
            procs: HashMap::new(),
            notifier,
            metrics_dir,
            started: Instant::now(),
            metrics_written: None,
        }
    }

    /// Runs until every worker is gone after a stop signal or giving up.
    pub fn run(mut self) -> Result<Outcome, SuperviseError> {
        log::info!(
            "sup: starting {} workers ({}) on {}",
            self.rules.status().configured,
            self.template.bin().display(),
            self.listen_desc
        );
        if let Some(every) = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        ) {
            log::info!(
                "sup: systemd watchdog on: ping every {}ms",
                every.as_millis()
            );
        }
        loop {
            for sig in self.signals.pending() {
                self.feed(Input::Signal(sig));
            }
            self.read_channels();
            self.reap();
            self.feed(Input::Tick);
            self.write_metrics();
            if let Some(outcome) = self.rules.outcome() {
                let since = self
                    .rules
                    .stopping_since()
                    .map_or(0, |t| t.elapsed().as_millis());
                log::info!(
                    "sup: all workers gone {since}ms after the stop; exiting with code {}",
                    outcome.exit_code()
                );
                return Ok(outcome);
            }
            self.sleep()?;
        }
    }

    /// Writes the supervisor's series for the workers' `/metrics`, at most
    /// once a second (the loop turns at least that often).
    fn write_metrics(&mut self) {
        let Some(dir) = &self.metrics_dir else { return };
        if self
            .metrics_written
            .is_some_and(|t| t.elapsed() < Duration::from_millis(900))
        {
            return;
        }
        self.metrics_written = Some(Instant::now());
        let text = render_metrics(&self.rules, self.started);
        let tmp = dir.join(".supervisor.tmp");
        let written = std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, dir.join(file_name("supervisor"))));
        if let Err(e) = written {
            log::debug!("sup: writing metrics: {e}");
        }
    }

    /// Gives the rules one input and performs what they ask.
    fn feed(&mut self, input: Input) {
        self.rules.handle(input, Instant::now());
        while let Some(action) = self.rules.next_action() {
            self.perform(action);
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Spawn { n } => match self.template.spawn(&format!("w{n}"), self.listener) {
                Ok(spawned) => {
                    let pid = spawned.pid.as_raw();
                    self.procs.insert(
                        n,
                        Process {
                            pid: spawned.pid,
                            channel: Some(spawned.channel),
                        },
                    );
                    self.rules.handle(Input::Spawned { n, pid }, Instant::now());
                }
                Err(e) => {
                    let error = e.to_string();
                    self.rules
                        .handle(Input::SpawnFailed { n, error }, Instant::now());
                }
            },
            Action::Signal { n, pid, signal } => {
                // Only a worker not reaped yet: its pid cannot be reused.
                if self.procs.get(&n).is_some_and(|p| p.pid.as_raw() == pid) {
                    let sig = match signal {
                        Kill::Term => NixSignal::SIGTERM,
                        Kill::Kill => NixSignal::SIGKILL,
                    };
                    if let Err(e) = kill(Pid::from_raw(pid), sig) {
                        // ESRCH: it is exiting; reaped soon.
                        if e != Errno::ESRCH {
                            log::warn!("sup: w{n} pid={pid}: sending {sig}: {e}");
                        }
                    }
                }
            }
            Action::Unready { n } => {
                if let Some(ch) = self.procs.get_mut(&n).and_then(|p| p.channel.as_mut()) {
                    if let Err(e) = ch.send(SupervisorMessage::Unready) {
                        log::debug!("sup: w{n}: sending unready: {e}");
                    }
                }
            }
            Action::SendStatus { n, status } => {
                if let Some(ch) = self.procs.get_mut(&n).and_then(|p| p.channel.as_mut()) {
                    if let Err(e) = ch.send_status(status) {
                        log::debug!("sup: w{n}: sending status: {e}");
                    }
                }
            }
            Action::Notify(fields) => {
                let mut fields: Vec<(&str, String)> = fields;
                if fields.iter().any(|(k, _)| *k == "RELOADING") {
                    fields.push(("MONOTONIC_USEC", monotonic_usec().to_string()));
                }
                if let Some(notifier) = &self.notifier {
                    let borrowed: Vec<(&str, &str)> =
                        fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    if let Err(e) = notifier.send(&borrowed) {
                        log::warn!("sup: sd_notify: {e}");
                    }
                }
            }
        }
    }

    /// Sleeps in `poll()` until a signal, a control line or the rules'
    /// next deadline. Readiness itself is not inspected: each turn reads
    /// every socket non-blockingly and reaps every worker.
    fn sleep(&mut self) -> Result<(), SuperviseError> {
        let timeout = self.rules.next_deadline().map_or(MAX_SLEEP, |d| {
            d.saturating_duration_since(Instant::now()).min(MAX_SLEEP)
        });
        // Round up, so we never wake a fraction of a millisecond early and spin.
        let millis = timeout.as_micros().div_ceil(1000) as u16;
        let mut fds = Vec::with_capacity(self.procs.len() + 1);
        fds.push(PollFd::new(self.signals.fd(), PollFlags::POLLIN));
        for p in self.procs.values() {
            if let Some(ch) = &p.channel {
                fds.push(PollFd::new(ch.as_fd(), PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(SuperviseError::Poll(e)),
        }
    }

    fn read_channels(&mut self) {
        let mut inputs = Vec::new();
        let mut numbers: Vec<u64> = self.procs.keys().copied().collect();
        numbers.sort_unstable();
        for n in numbers {
            let Some(p) = self.procs.get_mut(&n) else {
                continue;
            };
            let Some(ch) = &mut p.channel else { continue };
            let got = ch.receive();
            for message in got.messages {
                inputs.push(Input::Control { n, message });
            }
            for line in got.unknown {
                log::warn!(
                    "sup: w{n} pid={}: unknown control line {:?}",
                    p.pid,
                    line.chars().take(80).collect::<String>()
                );
            }
            if got.eof {
                p.channel = None;
                inputs.push(Input::ControlClosed { n });
            }
        }
        for input in inputs {
            self.feed(input);
        }
    }

    fn reap(&mut self) {
        let mut numbers: Vec<u64> = self.procs.keys().copied().collect();
        numbers.sort_unstable();
        for n in numbers {
            let Some(pid) = self.procs.get(&n).map(|p| p.pid) else {
                continue;
            };
            let how = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    describe(&status)
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                // ECHILD: not our child any more (cannot happen unless
                // something else reaped it). Treat it as gone.
                Err(e) => format!("lost ({e})"),
            };
            self.procs.remove(&n);
            if let Some(dir) = &self.metrics_dir {
                // A dead worker's series leave the host's scrape with it.
                let _ = std::fs::remove_file(dir.join(file_name(&format!("w{n}"))));
            }
            self.feed(Input::Exited { n, how });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_the_rules_signals() {
        assert_eq!(signal_of(SIGCHLD), Some(Signal::Child));
        assert_eq!(signal_of(SIGHUP), Some(Signal::Reload));
        assert_eq!(signal_of(SIGTERM), Some(Signal::Stop("SIGTERM")));
        assert_eq!(signal_of(SIGINT), Some(Signal::Stop("SIGINT")));
        assert_eq!(signal_of(libc::SIGUSR1), None);
    }
}
