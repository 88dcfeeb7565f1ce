//! Starting one worker: fork+exec of `tether-worker` with the listening
//! socket at fd 3 and its end of a fresh control socketpair at fd 4, as
//! [`tether_protocol::control`] defines.
//!
//! `std::process::Command` does the fork+exec and reports exec failures;
//! the `command-fds` crate's `fd_mappings` dup2s the two sockets into place
//! in the child without allocating between fork and exec. Every other fd of
//! the supervisor is close-on-exec. Workers stay in the supervisor's process
//! group: a terminal's Ctrl-C (or a test harness's group kill) reaches them
//! too, and a worker treats SIGINT like SIGTERM (drain), which is what the
//! supervisor would ask of it anyway.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use command_fds::{CommandFdExt, FdMapping};
use nix::unistd::Pid;
use tether_protocol::control::{
    CONTROL_FD, ENV_CONTROL_FD, ENV_LISTEN_FD, ENV_WORKER_ID, LISTEN_FD,
};

use crate::channel::Channel;

/// Variables a worker must not inherit: systemd's (they are meant for the
/// supervisor) and the address the supervisor already bound.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "TETHER_LISTEN",
];

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{worker}: creating the control socketpair: {source}")]
    SocketPair {
        worker: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{worker}: duplicating the listening socket: {source}")]
    DupListener {
        worker: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{worker}: mapping fds: {source}")]
    FdMapping {
        worker: String,
        #[source]
        source: command_fds::FdMappingCollision,
    },
    #[error("{worker}: starting {bin}: {source}")]
    Exec {
        worker: String,
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What every worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerTemplate {
    pub bin: PathBuf,
    /// Arguments before anything else (none in production; tests run
    /// `/bin/sh -c SCRIPT`).
    pub args: Vec<String>,
    /// Environment set on every worker (DATABASE_URL, TETHER_SECRET,
    /// TETHER_DRAIN_MS, ...). Never logged: it holds the secret.
    pub env: BTreeMap<String, String>,
}

/// A freshly started worker.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub channel: Channel,
}

impl WorkerTemplate {
    /// The command for worker `id` (without the fd mappings).
    fn command(&self, id: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        // `ps` shows workers as tether-worker, whichever file runs them.
        cmd.arg0("tether-worker").args(&self.args);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.envs(&self.env)
            .env(ENV_LISTEN_FD, LISTEN_FD.to_string())
            .env(ENV_CONTROL_FD, CONTROL_FD.to_string())
            .env(ENV_WORKER_ID, id)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts worker `id` on `listener`.
    pub fn spawn(&self, id: &str, listener: BorrowedFd<'_>) -> Result<Spawned, SpawnError> {
        let worker = id.to_string();
        let (ours, theirs) = UnixStream::pair().map_err(|source| SpawnError::SocketPair {
            worker: worker.clone(),
            source,
        })?;
        let channel = Channel::new(ours).map_err(|source| SpawnError::SocketPair {
            worker: worker.clone(),
            source,
        })?;
        // A close-on-exec duplicate that the Command owns (and closes in the
        // parent when it is dropped); the child gets it dup2'd to fd 3.
        let listen_dup: OwnedFd =
            listener
                .try_clone_to_owned()
                .map_err(|source| SpawnError::DupListener {
                    worker: worker.clone(),
                    source,
                })?;
        let mut cmd = self.command(id);
        cmd.fd_mappings(vec![
            FdMapping {
                parent_fd: listen_dup,
                child_fd: LISTEN_FD,
            },
            FdMapping {
                parent_fd: OwnedFd::from(theirs),
                child_fd: CONTROL_FD,
            },
        ])
        .map_err(|source| SpawnError::FdMapping {
            worker: worker.clone(),
            source,
        })?;
        let child = cmd.spawn().map_err(|source| SpawnError::Exec {
            worker,
            bin: self.bin.clone(),
            source,
        })?;
        // We reap with waitpid on this pid; `Child` neither waits nor kills
        // on drop. Dropping `cmd` closes the parent's copies of the child's
        // fds, so our end of the pair sees EOF once the worker is gone.
        let pid = Pid::from_raw(child.id() as i32);
        drop(cmd);
        Ok(Spawned { pid, channel })
    }

    /// The worker binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }
}

impl AsFd for Spawned {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A shell "worker" that reports what it was given on its control fd.
    #[test]
    fn the_child_gets_fds_3_and_4_and_the_env() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut env = BTreeMap::new();
        env.insert("TETHER_SECRET".to_string(), "s3cret".to_string());
        let script = "printf '%s %s %s %s\\n' \"$TETHER_WORKER_ID\" \"$TETHER_LISTEN_FD\" \
                      \"$TETHER_CONTROL_FD\" \"$TETHER_SECRET\" >&4; \
                      [ -S /proc/self/fd/3 ] && echo fd3ok >&4";
        let t = WorkerTemplate {
            bin: PathBuf::from("/bin/sh"),
            args: vec!["-c".to_string(), script.to_string()],
            env,
        };
        let spawned = t.spawn("w7", listener.as_fd()).unwrap();
        let status = nix::sys::wait::waitpid(spawned.pid, None).unwrap();
        assert!(matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)));
        let mut ch = spawned.channel;
        let mut out = String::new();
        // The script has exited, so the socket holds all it wrote, then EOF.
        let fd: OwnedFd = ch.as_fd().try_clone_to_owned().unwrap();
        let mut s = UnixStream::from(fd);
        s.set_nonblocking(false).unwrap();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out, "w7 3 4 s3cret\nfd3ok\n");
        assert!(ch.receive().eof);
    }

    #[test]
    fn a_missing_binary_is_an_exec_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = WorkerTemplate {
            bin: PathBuf::from("/nonexistent/tether-worker"),
            args: vec![],
            env: BTreeMap::new(),
        };
        assert!(matches!(
            t.spawn("w1", listener.as_fd()),
            Err(SpawnError::Exec { .. })
        ));
    }
}
