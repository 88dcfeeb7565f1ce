//! The worker's configuration, declared once with clap.
//!
//! - [`WorkerOptions`]: every option that tunes a worker (limits, pools,
//!   rate limit, drain time, the demo page). `tether` flattens the same
//!   struct into its own command line, so `tether --help` lists them too,
//!   and hands them on to the workers it starts (see [`WorkerOptions::env`]).
//! - [`WorkerArgs`]: the worker's whole command line (`tether worker`,
//!   `tether-worker`): those options plus where to listen, the database,
//!   the secret and the worker's name.
//! - [`WorkerConfig`]: the typed settings the worker runs with.
//!
//! Every option is also an environment variable (the flag wins); the doc
//! comments are the `--help` text, and the defaults are the contract's
//! (docs/PROTOCOL.md, checked by a test against this declaration). An
//! environment variable set to the empty string counts as unset
//! ([`unset_empty_env`]), as it always has.

use std::ffi::OsString;
use std::time::Duration;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser};
use tether_protocol::control::ENV_WORKER_ID;

/// The options that tune a worker, shared by `tether worker`,
/// `tether-worker` and `tether` (which passes them on to its workers).
#[derive(Debug, Clone, PartialEq, Args)]
pub struct WorkerOptions {
    /// Bound on a drain (stop or reload): a worker exits this long after it
    /// stopped accepting, open connections or not (ms).
    #[arg(
        long,
        env = "TETHER_DRAIN_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub drain_ms: u64,
    /// Largest message body, in bytes of UTF-8 (413 beyond).
    #[arg(long, env = "TETHER_MAX_BODY_BYTES", value_name = "BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Largest WebSocket message accepted, in bytes (close 1009 beyond).
    #[arg(long, env = "TETHER_MAX_FRAME_BYTES", value_name = "BYTES", default_value_t = 256 * 1024)]
    pub max_frame_bytes: usize,
    /// Events queued for one connection before it counts as too slow and is
    /// closed with 1013.
    #[arg(
        long,
        env = "TETHER_OUTBOUND_QUEUE",
        value_name = "N",
        default_value_t = 4096
    )]
    pub outbound_queue: usize,
    /// Open WebSocket and SSE connections per worker (503 beyond).
    #[arg(
        long,
        env = "TETHER_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 20_000
    )]
    pub max_connections: usize,
    /// A WebSocket silent this long is closed; it is pinged at half of it
    /// (an SSE stream gets a comment every 15 s, or half of it if shorter) (s).
    #[arg(
        long,
        env = "TETHER_IDLE_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 60
    )]
    pub idle_timeout_secs: u64,
    /// A client must send its request headers within this (ms).
    #[arg(
        long,
        env = "TETHER_HANDSHAKE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 5_000
    )]
    pub handshake_timeout_ms: u64,
    /// Sends per second per user, per worker (sustained); 0 = unlimited.
    #[arg(
        long,
        env = "TETHER_RATE_LIMIT",
        value_name = "N",
        default_value_t = 50.0
    )]
    pub rate_limit: f64,
    /// Burst allowance of the rate limit.
    #[arg(
        long,
        env = "TETHER_RATE_BURST",
        value_name = "N",
        default_value_t = 200.0
    )]
    pub rate_burst: f64,
    /// Conversation creates and membership changes per second per user,
    /// per worker (sustained); 0 = unlimited.
    #[arg(
        long,
        env = "TETHER_MEMBERSHIP_RATE",
        value_name = "N",
        default_value_t = 10.0
    )]
    pub membership_rate: f64,
    /// Burst allowance of the membership rate.
    #[arg(
        long,
        env = "TETHER_MEMBERSHIP_BURST",
        value_name = "N",
        default_value_t = 100.0
    )]
    pub membership_burst: f64,
    /// Members of one conversation (422 too_many_members beyond); 0 =
    /// unlimited.
    #[arg(
        long,
        env = "TETHER_MAX_MEMBERS",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_members: usize,
    /// Open WebSocket and SSE connections of one user, per worker (429
    /// too_many_connections beyond); 0 = unlimited.
    #[arg(
        long,
        env = "TETHER_MAX_CONNECTIONS_PER_USER",
        value_name = "N",
        default_value_t = 64
    )]
    pub max_connections_per_user: usize,
    /// Open WebSocket and SSE connections from one client address, per worker
    /// (429 too_many_connections beyond); 0 = unlimited. The address is
    /// the one `--proxy-protocol-from` peers vouch for, else the peer's.
    #[arg(
        long,
        env = "TETHER_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 256
    )]
    pub max_connections_per_ip: usize,
    /// Load balancers (comma-separated CIDRs) whose PROXY protocol v2
    /// header and X-Forwarded-For are believed; from anyone else both are
    /// ignored [default: nobody].
    #[arg(
        long,
        env = "TETHER_PROXY_PROTOCOL_FROM",
        value_name = "CIDR,...",
        value_parser = crate::client_addr::TrustedNets::parse
    )]
    pub proxy_protocol_from: Option<crate::client_addr::TrustedNets>,
    /// Bytes of recent frames cached per worker for backlog replays.
    #[arg(long, env = "TETHER_RECENT_CACHE_BYTES", value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    pub recent_cache_bytes: usize,
    /// Bytes of events queued for one connection before it counts as too
    /// slow and is closed with 1013 (one event always fits).
    #[arg(long, env = "TETHER_OUTBOUND_QUEUE_BYTES", value_name = "BYTES", default_value_t = 8 * 1024 * 1024)]
    pub outbound_queue_bytes: usize,
    /// A request body must arrive whole within this (ms; 408 beyond).
    #[arg(
        long,
        env = "TETHER_BODY_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub body_timeout_ms: u64,
    /// PEM public key (RSA or EC P-256) of an identity provider whose
    /// RS256/ES256 tokens are accepted besides HS256 ones.
    #[arg(long, env = "TETHER_TOKEN_PUBLIC_KEY", value_name = "PATH")]
    pub token_public_key: Option<std::path::PathBuf>,
    /// Required `iss` of every token, when set.
    #[arg(long, env = "TETHER_TOKEN_ISSUER", value_name = "ISS")]
    pub token_issuer: Option<String>,
    /// Required `aud` of every token (or one of its values), when set.
    #[arg(long, env = "TETHER_TOKEN_AUDIENCE", value_name = "AUD")]
    pub token_audience: Option<String>,
    /// Read connections in each worker's database pool.
    #[arg(long, env = "TETHER_POOL_SIZE", value_name = "N", default_value_t = 16)]
    pub pool_size: u32,
    /// Dedicated committing connections per worker (group commit lanes; 0
    /// counts as 1).
    #[arg(
        long,
        env = "TETHER_COMMIT_LANES",
        value_name = "N",
        default_value_t = 2
    )]
    pub commit_lanes: usize,
    /// Threads of each worker's async runtime (0: one per core). The
    /// default, 1, is one event loop per process with as many worker
    /// processes as cores (the supervisor's default), the nginx model: no
    /// cross-thread wakeups. Database calls run on the blocking pool
    /// either way.
    #[arg(
        long,
        env = "TETHER_RUNTIME_THREADS",
        value_name = "N",
        default_value_t = 1
    )]
    pub runtime_threads: usize,
    /// Most messages in one group commit (0 counts as 1).
    #[arg(
        long,
        env = "TETHER_MAX_BATCH",
        value_name = "N",
        default_value_t = 512
    )]
    pub max_batch: usize,
    /// Sends one connection may have awaiting COMMIT (0 counts as 1).
    #[arg(
        long,
        env = "TETHER_MAX_INFLIGHT",
        value_name = "N",
        default_value_t = 256
    )]
    pub max_inflight: usize,
    /// Serve the demo chat page at /demo/ (on|off; also 1/0, true/false,
    /// yes/no).
    #[arg(
        long,
        env = "TETHER_DEMO",
        value_name = "on|off",
        default_value = "on",
        value_parser = parse_on_off,
        action = clap::ArgAction::Set
    )]
    pub demo: bool,
    /// Log lines: human-readable, or one JSON object per line for an
    /// aggregator (the supervisor and every worker).
    #[arg(
        long,
        env = "TETHER_LOG_FORMAT",
        value_name = "human|json",
        default_value = "human",
        value_enum
    )]
    pub log_format: crate::logging::LogFormat,
    /// A read replica for history: REST pages and backlog reads go there
    /// when it has every event they need, else to the primary.
    #[arg(
        long,
        env = "TETHER_READ_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub read_database_url: Option<String>,
    /// What stands between tether and PostgreSQL at DATABASE_URL (and
    /// --read-database-url): `none`, or `transaction` for a pooler in
    /// transaction mode such as PgBouncer's `pool_mode = transaction`
    /// (no named prepared statements, no session settings; LISTEN then
    /// needs --listen-database-url).
    #[arg(
        long,
        env = "TETHER_DATABASE_POOLER",
        value_name = "none|transaction",
        default_value = "none",
        value_enum
    )]
    pub database_pooler: crate::store::Pooler,
    /// A direct connection to the primary for LISTEN (notifications need
    /// a session of their own, which a transaction-mode pooler does not
    /// give) [default: DATABASE_URL].
    #[arg(
        long,
        env = "TETHER_LISTEN_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub listen_database_url: Option<String>,
    /// Retention: events kept per conversation, the newest (0 = keep
    /// all). Older ones are pruned; a member behind gets `truncated`.
    #[arg(
        long,
        env = "TETHER_RETENTION_MAX_EVENTS",
        value_name = "N",
        default_value_t = 0
    )]
    pub retention_max_events: u64,
    /// Retention: days an event is kept (0 = forever).
    #[arg(
        long,
        env = "TETHER_RETENTION_DAYS",
        value_name = "DAYS",
        default_value_t = 0
    )]
    pub retention_days: u64,
    /// How often a worker runs the retention job (one worker at a time
    /// prunes), in seconds.
    #[arg(
        long,
        env = "TETHER_PRUNE_INTERVAL_SECS",
        value_name = "SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub prune_interval_secs: u64,
    /// Presence, typing and read receipts (on|off).
    #[arg(
        long,
        env = "TETHER_PRESENCE",
        value_name = "on|off",
        default_value = "on",
        value_parser = parse_on_off,
        action = clap::ArgAction::Set
    )]
    pub presence: bool,
    /// A user is shown offline only after this long with no connection on
    /// any worker of any host (s).
    #[arg(
        long,
        env = "TETHER_PRESENCE_GRACE_SECS",
        value_name = "SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub presence_grace_secs: u64,
    /// A worker's presence lease lasts this long unless renewed (renewed
    /// every third of it): how long a killed worker's users stay online
    /// at most, if longer than the grace period (s).
    #[arg(
        long,
        env = "TETHER_PRESENCE_LEASE_SECS",
        value_name = "SECS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(3..)
    )]
    pub presence_lease_secs: u64,
    /// Presence and typing are pushed in conversations of
    /// at most this many members (larger ones: GET
    /// /v1/conversations/{id}/presence).
    #[arg(
        long,
        env = "TETHER_PRESENCE_PUSH_MAX_MEMBERS",
        value_name = "N",
        default_value_t = 200
    )]
    pub presence_push_max_members: u64,
    /// Read receipts are pushed in conversations of at most this many
    /// members: each goes to every other member, so their cost grows with
    /// the square of the size (larger ones: `read_seq` in GET
    /// /v1/conversations/{id}/presence).
    #[arg(
        long,
        env = "TETHER_READ_RECEIPTS_MAX_MEMBERS",
        value_name = "N",
        default_value_t = 20
    )]
    pub read_receipts_max_members: u64,
}

/// `--demo`'s values: on/1/true/yes and off/0/false/no.
fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "1" | "true" | "yes" => Ok(true),
        "off" | "0" | "false" | "no" => Ok(false),
        _ => Err("expected on or off".to_string()),
    }
}

impl WorkerOptions {
    /// The options as environment variables (each option's own variable,
    /// with the value from `matches`: given on the command line, read from
    /// the environment, or the default), for a supervisor to hand on to
    /// the workers it starts. `matches` must come from a command that
    /// flattens [`WorkerOptions`]. Driven by the declaration above, so an
    /// option added there is passed on without further code.
    pub fn env(matches: &ArgMatches) -> Vec<(String, String)> {
        let cmd = WorkerOptions::augment_args(clap::Command::new("worker-options"));
        cmd.get_arguments()
            .filter_map(|arg| {
                let var = arg.get_env()?.to_str()?.to_string();
                let value = matches.get_raw(arg.get_id().as_str())?.next_back()?;
                Some((var, value.to_str()?.to_string()))
            })
            .collect()
    }
}

/// The worker's command line: `tether worker [OPTIONS]`, `tether-worker
/// [OPTIONS]`. A supervisor passes the listening socket (fd 3), the control
/// socket (fd 4) and the worker's name in the environment.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tether-worker",
    version,
    // As always: an option given twice takes its last value.
    args_override_self = true,
    about = "One worker of the tether WebSocket gateway: the HTTP API and WebSocket \
             connections over the PostgreSQL event log.",
    long_about = None
)]
pub struct WorkerArgs {
    /// Address to bind when no socket is inherited (from a supervisor or
    /// systemd).
    #[arg(
        long,
        env = "TETHER_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: String,
    /// PostgreSQL URL (the shared event log).
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,
    /// HS256 key that signs and checks client tokens (at least 32 bytes;
    /// `tether secret` makes one).
    #[arg(
        long,
        env = "TETHER_SECRET",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub secret: String,
    /// The worker's name in logs and `hello` (a supervisor sets it: w1,
    /// w2...) [default: w<pid>].
    #[arg(long, env = ENV_WORKER_ID, value_name = "ID")]
    pub worker_id: Option<String>,
    #[command(flatten)]
    pub options: WorkerOptions,
}

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
    /// Open WebSocket and SSE connections this worker accepts (503 beyond).
    pub max_connections: usize,
    /// A connection silent this long is closed (pinged at half of it).
    pub idle_timeout: Duration,
    /// A client must finish its request headers within this.
    pub handshake_timeout: Duration,
    /// Read connections in the pool.
    pub pool_size: u32,
    /// Dedicated committing connections (group commit lanes).
    pub commit_lanes: usize,
    /// Async runtime threads (0: one per core).
    pub runtime_threads: usize,
    /// Most messages in one committed batch.
    pub max_batch: usize,
    /// Sends one connection may have awaiting COMMIT.
    pub max_inflight: usize,
    /// Sends per second per user (sustained), 0 = unlimited.
    pub rate_limit: f64,
    /// Burst allowance of the rate limit.
    pub rate_burst: f64,
    /// Membership writes per second per user (sustained), 0 = unlimited.
    pub membership_rate: f64,
    /// Burst allowance of the membership rate.
    pub membership_burst: f64,
    /// Members of one conversation, 0 = unlimited.
    pub max_members: usize,
    /// Open WebSocket and SSE connections of one user, 0 = unlimited.
    pub max_connections_per_user: usize,
    /// Open WebSocket and SSE connections from one client address, 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Peers whose PROXY headers and X-Forwarded-For are believed.
    pub trusted_proxies: crate::client_addr::TrustedNets,
    /// Bytes of the recent-frames cache.
    pub recent_cache_bytes: usize,
    /// Bytes queued for one connection before 1013.
    pub outbound_queue_bytes: usize,
    /// A request body must arrive within this (408 beyond).
    pub body_timeout: Duration,
    /// An identity provider's public key (RS256/ES256), a PEM file.
    pub token_public_key: Option<std::path::PathBuf>,
    /// Required `iss`.
    pub token_issuer: Option<String>,
    /// Required `aud`.
    pub token_audience: Option<String>,
    /// Serve the demo chat page at `/demo/`.
    pub demo: bool,
    pub log_format: crate::logging::LogFormat,
    pub read_database_url: Option<String>,
    /// What stands between tether and PostgreSQL.
    pub database_pooler: crate::store::Pooler,
    /// The direct connection LISTEN uses (None: `database_url`).
    pub listen_database_url: Option<String>,
    /// What the retention job keeps.
    pub retention: crate::store::retain::Retention,
    /// How often the retention job runs.
    pub prune_interval: Duration,
    pub presence: crate::presence::PresenceConfig,
}

impl WorkerArgs {
    /// Parses a command line (`argv[0]` first), with `bin_name` in help and
    /// errors (`tether-worker`, or `tether worker`). A clap error carries
    /// its exit code: 0 for `--help`/`--version`, 2 otherwise.
    pub fn parse_from_args<I, T>(bin_name: &str, argv: I) -> Result<WorkerArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut cmd = WorkerArgs::command().bin_name(bin_name.to_string());
        let matches = cmd.try_get_matches_from_mut(argv)?;
        WorkerArgs::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
    }

    /// The typed settings.
    pub fn into_config(self) -> WorkerConfig {
        let o = self.options;
        WorkerConfig {
            listen: self.listen,
            database_url: self.database_url,
            secret: self.secret,
            worker_id: self
                .worker_id
                .unwrap_or_else(|| format!("w{}", std::process::id())),
            drain: Duration::from_millis(o.drain_ms),
            max_body_bytes: o.max_body_bytes,
            max_frame_bytes: o.max_frame_bytes,
            outbound_queue: o.outbound_queue,
            max_connections: o.max_connections,
            idle_timeout: Duration::from_secs(o.idle_timeout_secs),
            handshake_timeout: Duration::from_millis(o.handshake_timeout_ms),
            pool_size: o.pool_size,
            commit_lanes: o.commit_lanes.max(1),
            runtime_threads: o.runtime_threads,
            max_batch: o.max_batch.max(1),
            max_inflight: o.max_inflight.max(1),
            rate_limit: o.rate_limit,
            rate_burst: o.rate_burst,
            membership_rate: o.membership_rate,
            membership_burst: o.membership_burst,
            max_members: o.max_members,
            max_connections_per_user: o.max_connections_per_user,
            max_connections_per_ip: o.max_connections_per_ip,
            trusted_proxies: o.proxy_protocol_from.unwrap_or_default(),
            recent_cache_bytes: o.recent_cache_bytes,
            outbound_queue_bytes: o.outbound_queue_bytes,
            body_timeout: Duration::from_millis(o.body_timeout_ms),
            token_public_key: o.token_public_key,
            token_issuer: o.token_issuer,
            token_audience: o.token_audience,
            demo: o.demo,
            log_format: o.log_format,
            read_database_url: o.read_database_url,
            database_pooler: o.database_pooler,
            listen_database_url: o.listen_database_url,
            retention: crate::store::retain::Retention {
                max_events: o.retention_max_events.min(i64::MAX as u64) as i64,
                max_age: Duration::from_secs(o.retention_days.saturating_mul(86_400)),
            },
            prune_interval: Duration::from_secs(o.prune_interval_secs),
            presence: crate::presence::PresenceConfig {
                enabled: o.presence,
                grace: Duration::from_secs(o.presence_grace_secs),
                lease: Duration::from_secs(o.presence_lease_secs),
                push_max_members: o.presence_push_max_members.min(i64::MAX as u64) as i64,
                receipts_max_members: o.read_receipts_max_members.min(i64::MAX as u64) as i64,
            },
        }
    }
}

/// Removes the environment variables of `cmd`'s options (and its
/// subcommands') that are set to the empty string, so that they count as
/// unset, as they always have (clap would otherwise take `""` as the
/// value). Call it at the very start of `main`, while the process has one
/// thread.
pub fn unset_empty_env(cmd: &clap::Command) {
    for arg in cmd.get_arguments() {
        if let Some(var) = arg.get_env() {
            if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
                std::env::remove_var(var);
            }
        }
    }
    for sub in cmd.get_subcommands() {
        unset_empty_env(sub);
    }
}

#[cfg(test)]
mod tests;
