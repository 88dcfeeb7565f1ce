//! The one listening socket every worker accepts on.
//!
//! Either systemd passed it (socket activation: `LISTEN_PID` is our pid and
//! `LISTEN_FDS` ≥ 1, so it is fd 3; see sd_listen_fds(3)), or we bind
//! `--listen` ourselves with `SO_REUSEADDR` and a deep backlog. Either way
//! the supervisor keeps it open for its whole life, so a worker that dies or
//! is being replaced never takes the port with it: connections wait in the
//! backlog until some worker accepts them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    bind, getsockname, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrStorage,
};
use tether_protocol::control::systemd_activation_fd;

/// The listen backlog we ask for (the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 4096;

/// Why there is no listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("--listen/TETHER_LISTEN {addr:?}: cannot resolve: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("{op} {addr}: {source}")]
    Socket {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: nix::Error,
    },
    #[error("systemd socket activation: {0}")]
    Activation(String),
}

/// Where the listening socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Bound,
    Systemd,
}

/// The listening socket, owned by the supervisor.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub origin: Origin,
    /// The local address, for logs and the dev-mode banner.
    pub local: Option<SocketAddr>,
}

fn resolve(addr: &str) -> Result<SocketAddr, ListenerError> {
    addr.to_socket_addrs()
        .map_err(|e| ListenerError::Resolve {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| ListenerError::Resolve {
            addr: addr.to_string(),
            reason: "no address".to_string(),
        })
}

/// Binds `addr` with `SO_REUSEADDR` and a backlog of [`BACKLOG`].
pub fn bind_tcp(addr: &str) -> Result<Listener, ListenerError> {
    let addr = resolve(addr)?;
    let err = |op, source| ListenerError::Socket { op, addr, source };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| err("socket", e))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| err("SO_REUSEADDR", e))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| err("bind", e))?;
    let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| err("listen", e))?;
    let local = local_addr(&fd);
    Ok(Listener {
        fd,
        origin: Origin::Bound,
        local,
    })
}

fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    let ss: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    if let Some(v4) = ss.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    ss.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// The socket from systemd if it passed one, else `--listen` bound here.
/// The activation variables are removed from our environment either way,
/// so they do not leak to the workers (who get the socket as fd 3 through
/// `TETHER_LISTEN_FD` instead).
pub fn open(listen: &str) -> Result<Listener, ListenerError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let activated = systemd_activation_fd(pid.as_deref(), fds.as_deref(), std::process::id())
        .map_err(|e| ListenerError::Activation(e.0))?;
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Still single-threaded: nobody else reads the environment now.
        std::env::remove_var(var);
    }
    let Some(raw) = activated else {
        return bind_tcp(listen);
    };
    // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours) and
    // nothing else in the process has claimed it: this is the first and only
    // place that takes ownership of it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let is_listening = nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| ListenerError::Activation(format!("fd {raw} is not a socket: {e}")))?;
    if !is_listening {
        return Err(ListenerError::Activation(format!(
            "fd {raw} is not a listening socket (Accept=no and ListenStream= expected)"
        )));
    }
    // Inherited fds are not close-on-exec; the workers get their own dup.
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| ListenerError::Activation(format!("fd {raw}: FD_CLOEXEC: {e}")))?;
    let local = local_addr(&fd);
    Ok(Listener {
        fd,
        origin: Origin::Systemd,
        local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_reuseaddr_and_listens() {
        let l = bind_tcp("127.0.0.1:0").unwrap();
        assert_eq!(l.origin, Origin::Bound);
        let local = l.local.unwrap();
        assert_ne!(local.port(), 0);
        assert!(nix::sys::socket::getsockopt(&l.fd, sockopt::ReuseAddr).unwrap());
        assert!(nix::sys::socket::getsockopt(&l.fd, sockopt::AcceptConn).unwrap());
        // A connection is queued in the backlog although nobody accepts yet.
        std::net::TcpStream::connect(local).unwrap();
        assert!(bind_tcp("no-such-host.invalid:1").is_err());
    }
}
