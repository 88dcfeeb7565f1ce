//! The worker's side of the supervisor's control socket (see
//! `tether_protocol::control`): says `ready`, `hb` every 500 ms and
//! `draining`; reads the cluster `status` lines shown in `/health` and
//! `unready` (answer `/ready` with 503, keep serving); drains
//! when the socket closes (the supervisor is gone).

use crate::phase::ShutdownReason;
use crate::App;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_protocol::control::{
    ClusterStatus, SupervisorMessage, WorkerMessage, ENV_CONTROL_FD, HEARTBEAT_INTERVAL_MS,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The cluster as last told by the supervisor (or this worker alone).
pub struct ClusterView {
    configured: AtomicU32,
    alive: AtomicU32,
    restarts: AtomicU64,
    pub supervised: std::sync::atomic::AtomicBool,
}

impl ClusterView {
    /// A worker running without a supervisor: a cluster of one.
    pub fn standalone() -> ClusterView {
        ClusterView {
            configured: AtomicU32::new(1),
            alive: AtomicU32::new(1),
            restarts: AtomicU64::new(0),
            supervised: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn set(&self, s: ClusterStatus) {
        self.configured.store(s.configured, Ordering::Relaxed);
        self.alive.store(s.alive, Ordering::Relaxed);
        self.restarts.store(s.restarts, Ordering::Relaxed);
    }

    pub fn get(&self) -> ClusterStatus {
        ClusterStatus {
            configured: self.configured.load(Ordering::Relaxed),
            alive: self.alive.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

/// Sends lines to the supervisor.
pub struct Control {
    tx: mpsc::UnboundedSender<WorkerMessage>,
}

impl Control {
    pub fn ready(&self) {
        let _ = self.tx.send(WorkerMessage::Ready);
    }
    pub fn draining(&self) {
        let _ = self.tx.send(WorkerMessage::Draining);
    }
}

/// Attaches to the control socket if the supervisor gave us one.
pub fn attach(app: Arc<App>) -> Option<Control> {
    let fd: i32 = std::env::var(ENV_CONTROL_FD).ok()?.trim().parse().ok()?;
    std::env::remove_var(ENV_CONTROL_FD);
    // SAFETY: the supervisor handed us this fd (one end of a socketpair)
    // for this purpose; nothing else in the process owns it.
    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    // SAFETY: fcntl on an fd we own: keep it out of anything we spawn.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
    if let Err(e) = std_stream.set_nonblocking(true) {
        log::error!("control socket unusable: {e}");
        return None;
    }
    let stream = match tokio::net::UnixStream::from_std(std_stream) {
        Ok(s) => s,
        Err(e) => {
            log::error!("control socket unusable: {e}");
            return None;
        }
    };
    app.cluster.supervised.store(true, Ordering::Relaxed);
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<WorkerMessage>();
    // Writer: queued lines plus a heartbeat. The heartbeat comes from the
    // runtime itself, so a wedged runtime stops it and the supervisor
    // replaces us.
    tokio::spawn(async move {
        let mut beat = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = beat.tick() => WorkerMessage::Heartbeat,
            };
            if write.write_all(msg.encode()).await.is_err() {
                return;
            }
        }
    });
    // Reader: status lines; EOF means the supervisor is gone.
    let reader_app = app.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(read).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match SupervisorMessage::parse(&line) {
                    Some(SupervisorMessage::Status(s)) => reader_app.cluster.set(s),
                    Some(SupervisorMessage::Unready) => {
                        reader_app.phase.start_leaving();
                    }
                    None => {}
                },
                Ok(None) | Err(_) => {
                    log::warn!("supervisor gone (control socket closed)");
                    reader_app
                        .phase
                        .start_draining(ShutdownReason::SupervisorGone);
                    return;
                }
            }
        }
    });
    Some(Control { tx })
}
