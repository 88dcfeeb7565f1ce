//! The worker's configuration: flags, each also readable from the
//! environment (flag wins), with the contract's defaults.

use std::time::Duration;
use tether_shared::config::{ConfigError, Flags};
use tether_shared::control::ENV_WORKER_ID;

/// Options that take a value (without `--`).
const OPTIONS: &[&str] = &[
    "listen",
    "database-url",
    "secret",
    "worker-id",
    "drain-ms",
    "max-body-bytes",
    "max-frame-bytes",
    "outbound-queue",
    "max-connections",
    "idle-timeout-secs",
    "handshake-timeout-ms",
    "pool-size",
    "commit-lanes",
    "max-batch",
    "max-inflight",
    "rate-limit",
    "rate-burst",
    "demo",
];

/// Everything a worker is told at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Address to bind when no socket is inherited.
    pub listen: String,
    pub database_url: String,
    pub secret: String,
    /// The name in logs and `hello` (`w1`); the pid when not supervised.
    pub worker_id: String,
    /// How long a drain may take before the worker exits anyway.
    pub drain: Duration,
    /// Largest message body (bytes of UTF-8).
    pub max_body_bytes: usize,
    /// Largest WebSocket frame/message accepted (close 1009 beyond).
    pub max_frame_bytes: usize,
    /// Events queued for one connection before it counts as too slow (1013).
    pub outbound_queue: usize,
    /// Open WebSocket connections this worker accepts (503 beyond).
    pub max_connections: usize,
    /// A connection silent this long is closed (pinged at half of it).
    pub idle_timeout: Duration,
    /// A client must finish its request headers within this.
    pub handshake_timeout: Duration,
    /// Read connections in the pool.
    pub pool_size: u32,
    /// Dedicated committing connections (group commit lanes).
    pub commit_lanes: usize,
    /// Most messages in one committed batch.
    pub max_batch: usize,
    /// Sends one connection may have awaiting COMMIT.
    pub max_inflight: usize,
    /// Sends per second per user (sustained), 0 = unlimited.
    pub rate_limit: f64,
    /// Burst allowance of the rate limit.
    pub rate_burst: f64,
    /// Serve the demo chat page at `/demo/`.
    pub demo: bool,
}

impl WorkerConfig {
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<WorkerConfig, ConfigError> {
        let f = Flags::parse(args, OPTIONS, &[])?;
        if let Some(extra) = f.positional.first() {
            return Err(ConfigError::Unknown(extra.clone()));
        }
        let database_url = f
            .raw("database-url", "DATABASE_URL")
            .ok_or_else(|| ConfigError::MissingValue("--database-url (or DATABASE_URL)".into()))?;
        let secret = f
            .raw("secret", "TETHER_SECRET")
            .ok_or_else(|| ConfigError::MissingValue("--secret (or TETHER_SECRET)".into()))?;
        Ok(WorkerConfig {
            listen: f.get("listen", "TETHER_LISTEN", "127.0.0.1:8080".to_string())?,
            database_url,
            secret,
            worker_id: f
                .raw("worker-id", ENV_WORKER_ID)
                .unwrap_or_else(|| format!("w{}", std::process::id())),
            drain: Duration::from_millis(f.get("drain-ms", "TETHER_DRAIN_MS", 10_000u64)?),
            max_body_bytes: f.get("max-body-bytes", "TETHER_MAX_BODY_BYTES", 64 * 1024)?,
            max_frame_bytes: f.get("max-frame-bytes", "TETHER_MAX_FRAME_BYTES", 256 * 1024)?,
            outbound_queue: f.get("outbound-queue", "TETHER_OUTBOUND_QUEUE", 4096)?,
            max_connections: f.get("max-connections", "TETHER_MAX_CONNECTIONS", 20_000)?,
            idle_timeout: Duration::from_secs(f.get(
                "idle-timeout-secs",
                "TETHER_IDLE_TIMEOUT_SECS",
                60u64,
            )?),
            handshake_timeout: Duration::from_millis(f.get(
                "handshake-timeout-ms",
                "TETHER_HANDSHAKE_TIMEOUT_MS",
                5_000u64,
            )?),
            pool_size: f.get("pool-size", "TETHER_POOL_SIZE", 16)?,
            commit_lanes: f.get("commit-lanes", "TETHER_COMMIT_LANES", 2usize)?.max(1),
            max_batch: f.get("max-batch", "TETHER_MAX_BATCH", 512usize)?.max(1),
            max_inflight: f
                .get("max-inflight", "TETHER_MAX_INFLIGHT", 256usize)?
                .max(1),
            rate_limit: f.get("rate-limit", "TETHER_RATE_LIMIT", 0.0)?,
            rate_burst: f.get("rate-burst", "TETHER_RATE_BURST", 100.0)?,
            demo: match f.raw("demo", "TETHER_DEMO").as_deref() {
                None | Some("on" | "1" | "true" | "yes") => true,
                Some("off" | "0" | "false" | "no") => false,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        name: "--demo/TETHER_DEMO".into(),
                        value: other.into(),
                        reason: "expected on or off".into(),
                    })
                }
            },
        })
    }
}
