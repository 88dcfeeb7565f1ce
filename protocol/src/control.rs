//! The supervisor ↔ worker interface.
//!
//! The supervisor fork+execs each worker with two inherited descriptors:
//! the listening socket at fd [`LISTEN_FD`] (named by `TETHER_LISTEN_FD`)
//! and one end of a Unix stream socketpair at fd [`CONTROL_FD`] (named by
//! `TETHER_CONTROL_FD`). Over the control socket both sides write
//! newline-terminated lines:
//!
//! - worker → supervisor: `ready` (accepting), `hb` (heartbeat, every
//!   [`HEARTBEAT_INTERVAL_MS`]), `draining` (stopped accepting);
//! - supervisor → worker: `status <configured> <alive> <restarts>` whenever
//!   the cluster changes, which the worker shows in `/health`; `unready`
//!   when the host is about to stop (`--drain-delay-ms`): `/ready` answers
//!   503 from then on while the worker keeps accepting and serving, so a
//!   load balancer takes the host out before its SIGTERM.
//!
//! A worker whose control socket reaches end-of-file has lost its supervisor
//! and drains itself, so no orphan keeps serving.
//!
//! Run without a supervisor (`tether-worker --listen ...`) a worker binds
//! its own socket, or takes one from systemd (`LISTEN_FDS`/`LISTEN_PID`).

use std::os::fd::RawFd;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// `LISTEN_PID` / `LISTEN_FDS` that say something we cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("systemd socket activation: {0}")]
pub struct ActivationError(pub String);

/// Environment variable naming the inherited listening socket's fd.
pub const ENV_LISTEN_FD: &str = "TETHER_LISTEN_FD";
/// Environment variable naming the inherited control socket's fd.
pub const ENV_CONTROL_FD: &str = "TETHER_CONTROL_FD";
/// Environment variable with the worker's name in logs and `hello` (`w1`).
pub const ENV_WORKER_ID: &str = "TETHER_WORKER_ID";
/// Where the supervisor puts the listening socket in each worker.
pub const LISTEN_FD: RawFd = 3;
/// Where the supervisor puts the worker's end of the control socketpair.
pub const CONTROL_FD: RawFd = 4;
/// How often a worker says `hb`.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;

/// What the supervisor tells every worker about the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    pub configured: u32,
    pub alive: u32,
    pub restarts: u64,
}

/// A line from a worker to its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMessage {
    Ready,
    Heartbeat,
    Draining,
}

/// A line from the supervisor to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorMessage {
    Status(ClusterStatus),
    /// The host is leaving: answer `/ready` with 503, keep serving.
    Unready,
}

impl WorkerMessage {
    pub fn encode(self) -> &'static [u8] {
        match self {
            WorkerMessage::Ready => b"ready\n",
            WorkerMessage::Heartbeat => b"hb\n",
            WorkerMessage::Draining => b"draining\n",
        }
    }

    /// Parses one line (without its newline); `None` for anything else.
    pub fn parse(line: &str) -> Option<WorkerMessage> {
        match line.trim() {
            "ready" => Some(WorkerMessage::Ready),
            "hb" => Some(WorkerMessage::Heartbeat),
            "draining" => Some(WorkerMessage::Draining),
            _ => None,
        }
    }
}

impl SupervisorMessage {
    pub fn encode(&self) -> String {
        match self {
            SupervisorMessage::Status(s) => {
                format!("status {} {} {}\n", s.configured, s.alive, s.restarts)
            }
            SupervisorMessage::Unready => "unready\n".to_string(),
        }
    }

    /// Parses one line (without its newline); `None` for anything else.
    pub fn parse(line: &str) -> Option<SupervisorMessage> {
        let mut parts = line.split_whitespace();
        match parts.next()? {
            "status" => {
                let configured = parts.next()?.parse().ok()?;
                let alive = parts.next()?.parse().ok()?;
                let restarts = parts.next()?.parse().ok()?;
                Some(SupervisorMessage::Status(ClusterStatus {
                    configured,
                    alive,
                    restarts,
                }))
            }
            "unready" if parts.next().is_none() => Some(SupervisorMessage::Unready),
            _ => None,
        }
    }
}

/// Interprets systemd's socket activation (sd_listen_fds(3)), for the
/// supervisor and for a worker run on its own alike: `LISTEN_PID` /
/// `LISTEN_FDS` give `Ok(Some(3))` when they hand us one socket,
/// `Ok(None)` when they are absent or meant for another process, and an
/// error when they are malformed or hand over more than one socket.
pub fn systemd_activation_fd(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    our_pid: u32,
) -> Result<Option<RawFd>, ActivationError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError(format!("bad LISTEN_PID {pid:?}")))?;
    if pid != our_pid {
        return Ok(None);
    }
    let n: u32 = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError(format!("bad LISTEN_FDS {fds:?}")))?;
    match n {
        0 => Ok(None),
        1 => Ok(Some(SD_LISTEN_FDS_START)),
        n => Err(ActivationError(format!(
            "LISTEN_FDS={n}: expected exactly one socket (ListenStream= once in tether.socket)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for m in [
            WorkerMessage::Ready,
            WorkerMessage::Heartbeat,
            WorkerMessage::Draining,
        ] {
            let line = std::str::from_utf8(m.encode()).unwrap();
            assert_eq!(WorkerMessage::parse(line), Some(m));
        }
        let s = SupervisorMessage::Status(ClusterStatus {
            configured: 4,
            alive: 3,
            restarts: 17,
        });
        assert_eq!(SupervisorMessage::parse(s.encode().trim_end()), Some(s));
        assert_eq!(SupervisorMessage::parse("status 1 x 2"), None);
        let u = SupervisorMessage::Unready;
        assert_eq!(u.encode(), "unready\n");
        assert_eq!(SupervisorMessage::parse("unready"), Some(u));
        assert_eq!(SupervisorMessage::parse("unready now"), None);
        assert_eq!(WorkerMessage::parse("bogus"), None);
    }

    #[test]
    fn listen_fds_parsing() {
        assert_eq!(systemd_activation_fd(None, None, 10).unwrap(), None);
        assert_eq!(systemd_activation_fd(Some("10"), None, 10).unwrap(), None);
        assert_eq!(
            systemd_activation_fd(Some("10"), Some("1"), 10).unwrap(),
            Some(3)
        );
        assert_eq!(
            systemd_activation_fd(Some(" 10 "), Some("1\n"), 10).unwrap(),
            Some(3)
        );
        // For another process (e.g. inherited from a parent that was activated).
        assert_eq!(
            systemd_activation_fd(Some("11"), Some("1"), 10).unwrap(),
            None
        );
        assert_eq!(
            systemd_activation_fd(Some("10"), Some("0"), 10).unwrap(),
            None
        );
        assert!(systemd_activation_fd(Some("10"), Some("2"), 10).is_err());
        assert!(systemd_activation_fd(Some("x"), Some("1"), 10).is_err());
        assert!(systemd_activation_fd(Some("10"), Some("y"), 10).is_err());
    }
}
