//! The supervisor's configuration: every option is a `--flag` that falls
//! back to an environment variable (flag wins), via
//! [`tether_shared::config::Flags`].
//!
//! [`USAGE`] is what `tether --help` prints; [`Config::from_flags`] turns the
//! parsed flags into typed settings with the defaults of docs/LIFECYCLE.md.

use std::path::PathBuf;
use std::time::Duration;

use tether_shared::config::{ConfigError as FlagError, Flags};

/// Options that take a value (without `--`).
pub const VALUE_OPTIONS: &[&str] = &[
    "listen",
    "workers",
    "database-url",
    "secret",
    "data-dir",
    "drain-ms",
    "max-restarts",
    "restart-window-secs",
    "heartbeat-timeout-ms",
    "ready-timeout-ms",
    "restart-backoff-ms",
    "restart-backoff-max-ms",
    "worker-bin",
    "ttl",
];

/// Options without a value.
pub const SWITCHES: &[&str] = &["help", "no-demo"];

/// `tether --help`.
pub const USAGE: &str = "\
tether: the tether WebSocket gateway supervisor.

USAGE:
    tether [OPTIONS]                 run the gateway (N workers on one socket)
    tether token USER [--ttl SECS]   print a token for USER (default ttl 86400)
    tether --help                    this text

Every option can also be given by the environment variable shown (the flag wins).

OPTIONS:
    --listen ADDR                 TETHER_LISTEN                 address to bind [127.0.0.1:8080]
                                  (ignored under systemd socket activation)
    --workers N                   TETHER_WORKERS                worker processes [number of CPUs]
    --database-url URL            DATABASE_URL                  PostgreSQL URL; without it tether runs
                                                                a private PostgreSQL in the data dir
    --secret KEY                  TETHER_SECRET                 HS256 token key; in dev mode generated
                                                                and kept in <data-dir>/secret
    --data-dir DIR                TETHER_DATA_DIR               dev-mode data [.tether]
    --drain-ms MS                 TETHER_DRAIN_MS               worker drain time on stop [10000]
    --max-restarts N              TETHER_MAX_RESTARTS           give up after more than N worker
                                                                deaths within the window [10]
    --restart-window-secs S       TETHER_RESTART_WINDOW_SECS    that window [60]
    --heartbeat-timeout-ms MS     TETHER_HEARTBEAT_TIMEOUT_MS   kill a worker silent this long [5000]
    --ready-timeout-ms MS         TETHER_READY_TIMEOUT_MS       kill a worker not ready this long [30000]
    --restart-backoff-ms MS       TETHER_RESTART_BACKOFF_MS     first non-zero restart delay [100]
    --restart-backoff-max-ms MS   TETHER_RESTART_BACKOFF_MAX_MS longest restart delay [5000]
    --worker-bin PATH             TETHER_WORKER_BIN             worker executable, e.g. tether-worker
                                                                [this binary, run as `tether worker`]
    --no-demo                     TETHER_DEMO=off               do not serve the demo page at /demo/

SIGNALS:
    SIGTERM, SIGINT   drain the workers and exit 0 (a second one kills them now)
    SIGHUP            replace the workers one at a time
";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Flag(#[from] FlagError),
    #[error("--workers/TETHER_WORKERS must be at least 1 (got {0})")]
    NoWorkers(u32),
    #[error("--restart-window-secs/TETHER_RESTART_WINDOW_SECS must be at least 1")]
    EmptyWindow,
    #[error("cannot locate the tether-worker binary next to this executable: {0}")]
    WorkerBin(#[source] std::io::Error),
}

/// Typed settings for a supervisor run.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub workers: u32,
    pub database_url: Option<String>,
    pub secret: Option<String>,
    pub data_dir: PathBuf,
    pub drain: Duration,
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub heartbeat_timeout: Duration,
    pub ready_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub worker_bin: PathBuf,
    /// Arguments before the worker's own: `worker` when the worker is this
    /// executable, none for a `--worker-bin`.
    pub worker_args: Vec<String>,
    /// Serve the demo chat page at `/demo/` (off with `--no-demo`).
    pub demo: bool,
}

/// A worker that stays up this long resets the restart backoff.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);

/// The default worker count: one per CPU.
fn default_workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// The default worker: this very executable, run as `tether worker`
/// (see `main.rs`). The `tether` binary contains the worker, so a worker is
/// always the same build as its supervisor, and `cargo run` (which builds
/// only the binary it runs) needs nothing else. The supervisor process
/// itself never runs worker code: it only ever fork+execs it.
fn default_worker_bin() -> Result<PathBuf, ConfigError> {
    std::env::current_exe().map_err(ConfigError::WorkerBin)
}

fn ms(flags: &Flags, name: &str, env: &str, default: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(flags.get(name, env, default)?))
}

/// Only the secret-related settings, for `tether token` (which must not
/// need the worker binary or anything else).
pub fn secret_and_data_dir(flags: &Flags) -> (Option<String>, PathBuf) {
    (
        flags.raw("secret", "TETHER_SECRET"),
        flags
            .raw("data-dir", "TETHER_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".tether")),
    )
}

impl Config {
    /// Reads every setting from the flags, then the environment, then the
    /// defaults.
    pub fn from_flags(flags: &Flags) -> Result<Config, ConfigError> {
        let workers = flags.get("workers", "TETHER_WORKERS", default_workers())?;
        if workers == 0 {
            return Err(ConfigError::NoWorkers(workers));
        }
        let window = flags.get("restart-window-secs", "TETHER_RESTART_WINDOW_SECS", 60u64)?;
        if window == 0 {
            return Err(ConfigError::EmptyWindow);
        }
        let (worker_bin, worker_args) = match flags.raw("worker-bin", "TETHER_WORKER_BIN") {
            Some(p) => (PathBuf::from(p), Vec::new()),
            None => (default_worker_bin()?, vec!["worker".to_string()]),
        };
        let (secret, data_dir) = secret_and_data_dir(flags);
        Ok(Config {
            listen: flags
                .raw("listen", "TETHER_LISTEN")
                .unwrap_or_else(|| "127.0.0.1:8080".to_string()),
            workers,
            database_url: flags.raw("database-url", "DATABASE_URL"),
            secret,
            data_dir,
            drain: ms(flags, "drain-ms", "TETHER_DRAIN_MS", 10_000)?,
            max_restarts: flags.get("max-restarts", "TETHER_MAX_RESTARTS", 10u32)?,
            restart_window: Duration::from_secs(window),
            heartbeat_timeout: ms(
                flags,
                "heartbeat-timeout-ms",
                "TETHER_HEARTBEAT_TIMEOUT_MS",
                5_000,
            )?,
            ready_timeout: ms(flags, "ready-timeout-ms", "TETHER_READY_TIMEOUT_MS", 30_000)?,
            backoff_initial: ms(
                flags,
                "restart-backoff-ms",
                "TETHER_RESTART_BACKOFF_MS",
                100,
            )?,
            backoff_max: ms(
                flags,
                "restart-backoff-max-ms",
                "TETHER_RESTART_BACKOFF_MAX_MS",
                5_000,
            )?,
            worker_bin,
            worker_args,
            demo: !flags.switch("no-demo")
                && !matches!(
                    std::env::var("TETHER_DEMO").as_deref(),
                    Ok("off" | "0" | "false" | "no")
                ),
        })
    }

    /// How long after its SIGTERM a worker is SIGKILLed.
    pub fn kill_after(&self) -> Duration {
        self.drain + Duration::from_secs(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let flags = Flags::parse(args.iter().map(|s| s.to_string()), VALUE_OPTIONS, SWITCHES)?;
        Config::from_flags(&flags)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(&["--workers", "3", "--worker-bin", "/x/w", "--drain-ms=250"]).unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.worker_bin, PathBuf::from("/x/w"));
        assert_eq!(c.drain, Duration::from_millis(250));
        assert_eq!(c.kill_after(), Duration::from_millis(2250));
        assert!(matches!(
            parse(&["--workers", "0", "--worker-bin", "/x"]),
            Err(ConfigError::NoWorkers(0))
        ));
        assert!(parse(&["--workers", "x"]).is_err());
        assert!(matches!(
            parse(&["--restart-window-secs", "0", "--worker-bin", "/x"]),
            Err(ConfigError::EmptyWindow)
        ));
    }
}
