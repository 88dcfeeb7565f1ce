//! sd_notify without libsystemd: datagrams to `$NOTIFY_SOCKET` (a path, or
//! an abstract name written with a leading `@`), and the watchdog interval
//! from `$WATCHDOG_USEC` / `$WATCHDOG_PID`.
//!
//! Messages are `KEY=VALUE` lines in one datagram (see sd_notify(3)): the
//! supervisor sends `READY=1` + `STATUS=...` once every initial worker is
//! ready, `RELOADING=1` + `MONOTONIC_USEC=...` and `READY=1` around a SIGHUP
//! roll, `STOPPING=1` on SIGTERM, and `WATCHDOG=1` from its loop.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// Why a notification could not be sent (always logged, never fatal).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {socket:?}: bad address: {source}")]
    Address {
        socket: String,
        #[source]
        source: io::Error,
    },
    #[error("sending to NOTIFY_SOCKET {socket:?}: {source}")]
    Send {
        socket: String,
        #[source]
        source: io::Error,
    },
}

/// Connection to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: String,
    addr: SocketAddr,
    sock: UnixDatagram,
}

/// Parses `NOTIFY_SOCKET` into an address (`@name` is abstract).
pub fn parse_address(socket: &str) -> io::Result<SocketAddr> {
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(Path::new(socket))
    }
}

/// Formats one datagram: `KEY=VALUE` lines, newline-terminated.
pub fn format(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC` with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// The watchdog ping interval (half of `WATCHDOG_USEC`), if the watchdog is
/// on and meant for `our_pid`.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `Ok(None)` when not run by a service manager.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if !s.is_empty() => Notifier::new(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// To the given `NOTIFY_SOCKET` value.
    pub fn new(socket: &str) -> Result<Notifier, NotifyError> {
        let addr = parse_address(socket).map_err(|source| NotifyError::Address {
            socket: socket.to_string(),
            source,
        })?;
        let sock = UnixDatagram::unbound().map_err(|source| NotifyError::Send {
            socket: socket.to_string(),
            source,
        })?;
        Ok(Notifier {
            socket: socket.to_string(),
            addr,
            sock,
        })
    }

    /// Sends one datagram with `fields`.
    pub fn send(&self, fields: &[(&str, &str)]) -> Result<(), NotifyError> {
        let msg = format(fields);
        self.sock
            .send_to_addr(msg.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                socket: self.socket.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_key_value_lines() {
        assert_eq!(
            format(&[("READY", "1"), ("STATUS", "2 workers")]),
            "READY=1\nSTATUS=2 workers\n"
        );
    }

    #[test]
    fn watchdog_interval_is_half_and_respects_the_pid() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
    }

    #[test]
    fn sends_a_real_datagram_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.send(&[("READY", "1"), ("STATUS", "serving")]).unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving\n");
    }

    #[test]
    fn sends_a_real_datagram_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tether-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.send(&[("STOPPING", "1")]).unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\n");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let n = Notifier::new("/nonexistent/tether/notify").unwrap();
        assert!(matches!(
            n.send(&[("READY", "1")]),
            Err(NotifyError::Send { .. })
        ));
    }

    #[test]
    fn monotonic_usec_moves_forward() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() > a);
    }
}
