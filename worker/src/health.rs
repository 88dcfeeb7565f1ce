//! The database probe behind `/health` and `/ready`: a background task
//! runs `SELECT 1` every 500 ms (with a timeout) and records whether the
//! database answered and how fast, so a load balancer's probe never waits
//! on the database itself. A failed store call marks the database down at
//! once; the next successful probe marks it up.

use crate::store;
use crate::App;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A response slower than this makes `/health` say degraded.
pub const SLOW_DB_MS: u64 = 500;

pub struct DbHealth {
    connected: AtomicBool,
    /// Whether any probe has finished yet (for the log wording).
    probed: AtomicBool,
    response_us: AtomicU64,
}

impl DbHealth {
    pub fn new() -> DbHealth {
        DbHealth {
            // Unknown until the first probe: say not ready.
            connected: AtomicBool::new(false),
            probed: AtomicBool::new(false),
            response_us: AtomicU64::new(0),
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn response_ms(&self) -> f64 {
        self.response_us.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub fn mark_down(&self) {
        self.connected.store(false, Ordering::Release);
    }

    fn record(&self, ok: bool, took: Duration) {
        self.response_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        let was = self.connected.swap(ok, Ordering::AcqRel);
        let first = !self.probed.swap(true, Ordering::AcqRel);
        if was != ok || (first && !ok) {
            match (ok, first) {
                (true, true) => log::info!("database reachable ({} ms)", took.as_millis()),
                (true, false) => log::info!("database reachable again ({} ms)", took.as_millis()),
                (false, _) => log::warn!("database unreachable"),
            }
        }
    }
}

impl Default for DbHealth {
    fn default() -> Self {
        DbHealth::new()
    }
}

/// Starts the probe task.
pub fn spawn_probe(app: Arc<App>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let pool = app.pool.clone();
            let started = Instant::now();
            let probe = tokio::task::spawn_blocking(move || {
                let mut c = pool.get()?;
                store::ping(&mut c)
            });
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(3), probe).await,
                Ok(Ok(Ok(())))
            );
            app.health.record(ok, started.elapsed());
        }
    });
}
