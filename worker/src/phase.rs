//! The worker's lifecycle phase, one value that `/ready`, the accept loop,
//! every connection and the tests all read.

use std::sync::atomic::{AtomicU8, Ordering};
use tokio::sync::watch;

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// The host is about to stop (the supervisor's `unready`, during
    /// `--drain-delay-ms`): `/ready` answers 503 so load balancers take the
    /// host out, while the worker still accepts and serves everything.
    Leaving,
    /// Stopped accepting; connections are being closed with 1001 and
    /// in-flight commits finished. `/ready` answers 503.
    Draining,
}

/// Why the worker drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// SIGTERM or SIGINT.
    Signal,
    /// The supervisor's control socket closed: our supervisor is gone.
    SupervisorGone,
    /// The LISTEN thread stopped for good: without it this worker would
    /// miss other workers' events, so it goes and is replaced.
    FanoutLost,
}

/// Shared phase: an atomic for cheap reads and a watch for waiting.
pub struct PhaseCell {
    value: AtomicU8,
    tx: watch::Sender<Phase>,
    reason: std::sync::Mutex<Option<ShutdownReason>>,
}

impl PhaseCell {
    pub fn new() -> PhaseCell {
        PhaseCell {
            value: AtomicU8::new(0),
            tx: watch::channel(Phase::Serving).0,
            reason: std::sync::Mutex::new(None),
        }
    }

    pub fn get(&self) -> Phase {
        match self.value.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Leaving,
            _ => Phase::Draining,
        }
    }

    /// Serving → Leaving (`/ready` 503, still accepting); false if the
    /// worker is already leaving or draining.
    pub fn start_leaving(&self) -> bool {
        if self
            .value
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        log::info!("unready: /ready answers 503; still accepting until the drain");
        self.tx.send_replace(Phase::Leaving);
        true
    }

    /// Moves to Draining (from Serving or Leaving); returns false if
    /// already draining.
    pub fn start_draining(&self, reason: ShutdownReason) -> bool {
        if self.value.swap(2, Ordering::AcqRel) == 2 {
            return false;
        }
        log::info!("draining ({reason:?})");
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        self.tx.send_replace(Phase::Draining);
        true
    }

    /// Why the worker is draining, once it is.
    pub fn reason(&self) -> Option<ShutdownReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that changes when draining starts.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }
}

impl Default for PhaseCell {
    fn default() -> Self {
        PhaseCell::new()
    }
}

/// Resolves once the phase is Draining (holds no borrow across awaits, so
/// the future stays `Send`).
pub async fn until_draining(rx: &mut watch::Receiver<Phase>) {
    let _ = rx.wait_for(|p| *p == Phase::Draining).await.map(|_| ());
}
