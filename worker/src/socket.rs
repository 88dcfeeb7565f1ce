//! Where the listening socket comes from: inherited from the supervisor
//! (`TETHER_LISTEN_FD`), from systemd socket activation (`LISTEN_FDS` with
//! `LISTEN_PID` = our pid, fd 3), or bound here (`--listen`).

use std::net::TcpListener as StdListener;
use std::os::fd::{FromRawFd, RawFd};
use tether_protocol::control::{systemd_activation_fd, ActivationError, ENV_LISTEN_FD};

/// Why no listening socket could be had.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{var}={value:?} is not a file descriptor")]
    BadFd { var: &'static str, value: String },
    #[error("fd {fd} is not a listening TCP socket: {source}")]
    NotASocket { fd: RawFd, source: std::io::Error },
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A listening socket, not yet registered with tokio.
pub struct Acquired(StdListener);

impl Acquired {
    /// Registers the socket with the current tokio runtime.
    pub fn into_tokio(self) -> std::io::Result<tokio::net::TcpListener> {
        self.0.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(self.0)
    }
}

fn from_fd(var: &'static str, value: &str) -> Result<Acquired, SocketError> {
    let fd: RawFd = value.trim().parse().map_err(|_| SocketError::BadFd {
        var,
        value: value.to_string(),
    })?;
    // Check it is a socket we can use before taking ownership.
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a c_int we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || ty != libc::SOCK_STREAM {
        return Err(SocketError::NotASocket {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd was handed to this process for exactly this purpose
    // (by the supervisor or systemd) and nothing else in the process owns it.
    let listener = unsafe { StdListener::from_raw_fd(fd) };
    // Our copy must not leak into anything we might spawn.
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
    Ok(Acquired(listener))
}

/// Gets the listening socket (see the module doc for the order).
pub fn acquire(listen: &str) -> Result<Acquired, SocketError> {
    if let Ok(v) = std::env::var(ENV_LISTEN_FD) {
        std::env::remove_var(ENV_LISTEN_FD);
        return from_fd("TETHER_LISTEN_FD", &v);
    }
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    if let Some(fd) = systemd_activation_fd(pid.as_deref(), fds.as_deref(), std::process::id())? {
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        return from_fd("LISTEN_FDS", &fd.to_string());
    }
    let listener = StdListener::bind(listen).map_err(|source| SocketError::Bind {
        addr: listen.to_string(),
        source,
    })?;
    // std listens with a backlog of 128: a reconnect storm overflows that
    // and clients see SYN retries of a second or more. Listening again on
    // a listening socket only raises the backlog (the kernel caps it at
    // net.core.somaxconn), as the supervisor does for the shared socket.
    // SAFETY: listen(2) on a socket we own; no memory is involved.
    unsafe {
        libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096);
    }
    Ok(Acquired(listener))
}
