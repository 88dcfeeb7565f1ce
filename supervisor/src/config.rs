//! The supervisor's command line, declared once with clap: [`Cli`] (the
//! options, each also an environment variable, the flag winning; their doc
//! comments are `tether --help`), its subcommands ([`Sub`]), and
//! [`Config`], the typed settings of a run with the defaults of
//! docs/LIFECYCLE.md.
//!
//! The worker's options are not repeated here: [`Cli`] flattens the
//! worker's own [`WorkerOptions`], so `tether --help` lists them with their
//! variables and defaults, and [`Parsed::worker_env`] hands their values on
//! to every worker (as the options' environment variables).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use tether_worker::config::WorkerOptions;

/// The `--help` heading of the supervisor's own options (restart policy,
/// timeouts, dev-mode data, which worker to run): docs/LIFECYCLE.md
/// describes them. Every other option is part of the contract, in
/// docs/PROTOCOL.md's options table (a test below checks it).
const SUPERVISOR_HEADING: &str = "Supervisor options";

/// The `--help` heading of the worker's options, which `tether` passes on.
const WORKER_HEADING: &str = "Worker options (passed on to every worker)";

/// What `tether --help` shows after the options.
const AFTER_HELP: &str = "\
Signals:
  SIGTERM, SIGINT  drain the workers and exit 0 (a second one kills them now);
                   with --drain-delay-ms, /ready says 503 for that long first
                   while the workers keep serving
  SIGHUP           replace the workers one at a time

Without --database-url, tether runs a private PostgreSQL in --data-dir
(dev mode) and generates the secret there.";

/// `tether`: the tether WebSocket gateway supervisor.
#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "tether: the WebSocket gateway supervisor. Runs N workers on one socket, \
             restarts those that die, rolls them on SIGHUP and drains them on SIGTERM.",
    long_about = None,
    after_help = AFTER_HELP,
    // As always: an option given twice takes its last value.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Sub>,

    /// Address to bind (ignored under systemd socket activation).
    #[arg(
        long,
        env = "TETHER_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: String,
    /// Worker processes [default: the number of CPUs].
    #[arg(long, env = "TETHER_WORKERS", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: Option<u32>,
    /// PostgreSQL URL; without it tether runs a private PostgreSQL in the
    /// data dir (dev mode).
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "URL",
        hide_env_values = true,
        global = true
    )]
    pub database_url: Option<String>,
    /// HS256 token key, at least 32 bytes (`tether secret` makes one); in
    /// dev mode generated and kept in <data-dir>/secret.
    #[arg(
        long,
        env = "TETHER_SECRET",
        value_name = "KEY",
        hide_env_values = true,
        global = true
    )]
    pub secret: Option<String>,
    /// Dev-mode data: the private PostgreSQL and the secret.
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_DATA_DIR", value_name = "DIR", default_value = ".tether", global = true)]
    pub data_dir: PathBuf,
    /// Give up after more than N worker deaths within the restart window.
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_MAX_RESTARTS", value_name = "N", default_value_t = 10)]
    pub max_restarts: u32,
    /// That window (s).
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_RESTART_WINDOW_SECS", value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub restart_window_secs: u64,
    /// Kill a worker whose heartbeat is silent this long (ms).
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_HEARTBEAT_TIMEOUT_MS", value_name = "MS", default_value_t = 5_000)]
    pub heartbeat_timeout_ms: u64,
    /// On SIGTERM/SIGINT, `/ready` answers 503 this long while the workers
    /// keep accepting and serving, so load balancers take the host out
    /// before it stops accepting; then the drain (ms). Set it to at least
    /// the balancer's check interval × fall + one interval.
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_DRAIN_DELAY_MS", value_name = "MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// Kill a worker not ready this long after its start (ms).
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_READY_TIMEOUT_MS", value_name = "MS", default_value_t = 30_000)]
    pub ready_timeout_ms: u64,
    /// First non-zero restart delay (ms); it doubles up to the maximum.
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_RESTART_BACKOFF_MS", value_name = "MS", default_value_t = 100)]
    pub restart_backoff_ms: u64,
    /// Longest restart delay (ms).
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_RESTART_BACKOFF_MAX_MS", value_name = "MS", default_value_t = 5_000)]
    pub restart_backoff_max_ms: u64,
    /// Worker executable, e.g. tether-worker [default: this binary, run as
    /// `tether worker`].
    #[arg(long, help_heading = SUPERVISOR_HEADING, env = "TETHER_WORKER_BIN", value_name = "PATH")]
    pub worker_bin: Option<PathBuf>,
    /// Do not serve the demo page at /demo/ (the same as --demo off).
    #[arg(long, help_heading = SUPERVISOR_HEADING)]
    pub no_demo: bool,

    #[command(flatten, next_help_heading = WORKER_HEADING)]
    pub worker: WorkerOptions,
}

/// `tether`'s subcommands; without one it runs the gateway.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Print a token for USER, signed with --secret/TETHER_SECRET or else
    /// the dev-mode secret in <data-dir>/secret.
    Token {
        /// The user id (1 to 64 characters of [A-Za-z0-9_.@-]).
        user: String,
        /// Lifetime of the token (s).
        #[arg(long, env = "TETHER_TOKEN_TTL", value_name = "SECS",
              default_value_t = crate::token::DEFAULT_TTL_SECS,
              value_parser = clap::value_parser!(u64).range(1..))]
        ttl: u64,
    },
    /// Print a fresh random key for TETHER_SECRET (32 bytes, hex).
    Secret,
    /// Run one worker (what the supervisor starts; see `tether worker
    /// --help`). `worker` must come first: `tether worker [OPTIONS]`.
    #[command(disable_help_flag = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<OsString>,
    },
    /// Apply the pending migrations to --database-url/DATABASE_URL and exit
    /// (for deploy pipelines; tether also does it at every start).
    #[command(alias = "schema")]
    Migrate,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot locate this executable (the default worker): {0}")]
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
    /// `/ready` 503 this long before the SIGTERMs of a stop.
    pub drain_delay: Duration,
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
    /// Serve the demo chat page at `/demo/` (off with `--no-demo` or
    /// `--demo off`).
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

/// A parsed command line: the typed options and the matches they came
/// from (which know where each value came from).
#[derive(Debug)]
pub struct Parsed {
    pub cli: Cli,
    matches: ArgMatches,
}

impl Parsed {
    /// Parses `argv` (program name first). A clap error carries its exit
    /// code: 0 for `--help`/`--version`, 2 for a bad command line.
    pub fn from_argv<I, T>(argv: I) -> Result<Parsed, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut cmd = Cli::command();
        let matches = cmd.try_get_matches_from_mut(argv)?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
        // The flag wins over the environment, as for every option; but
        // `--no-demo` and `--demo on` on one command line contradict.
        if cli.no_demo
            && cli.worker.demo
            && matches.value_source("demo") == Some(ValueSource::CommandLine)
        {
            return Err(cmd.error(
                clap::error::ErrorKind::ArgumentConflict,
                "--no-demo cannot be used with --demo on",
            ));
        }
        Ok(Parsed { cli, matches })
    }

    /// The worker options as their environment variables, for every worker
    /// this supervisor starts: each from the command line, the environment
    /// or its default, and `TETHER_DEMO=off` under `--no-demo`.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let mut env = WorkerOptions::env(&self.matches);
        if self.cli.no_demo {
            for (var, value) in &mut env {
                if var == "TETHER_DEMO" {
                    *value = "off".to_string();
                }
            }
        }
        env
    }

    /// The typed settings of a gateway run.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let cli = &self.cli;
        let (worker_bin, worker_args) = match &cli.worker_bin {
            Some(p) => (p.clone(), Vec::new()),
            None => (default_worker_bin()?, vec!["worker".to_string()]),
        };
        Ok(Config {
            listen: cli.listen.clone(),
            workers: cli.workers.unwrap_or_else(default_workers),
            database_url: cli.database_url.clone(),
            secret: cli.secret.clone(),
            data_dir: cli.data_dir.clone(),
            drain: Duration::from_millis(cli.worker.drain_ms),
            drain_delay: Duration::from_millis(cli.drain_delay_ms),
            max_restarts: cli.max_restarts,
            restart_window: Duration::from_secs(cli.restart_window_secs),
            heartbeat_timeout: Duration::from_millis(cli.heartbeat_timeout_ms),
            ready_timeout: Duration::from_millis(cli.ready_timeout_ms),
            backoff_initial: Duration::from_millis(cli.restart_backoff_ms),
            backoff_max: Duration::from_millis(cli.restart_backoff_max_ms),
            worker_bin,
            worker_args,
            demo: cli.worker.demo && !cli.no_demo,
        })
    }
}

impl Config {
    /// How long after its SIGTERM a worker is SIGKILLed.
    pub fn kill_after(&self) -> Duration {
        self.drain + Duration::from_secs(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Parsed, clap::Error> {
        Parsed::from_argv(std::iter::once("tether").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Config {
        parse(args).unwrap().config().unwrap()
    }

    #[test]
    fn the_declaration_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_overrides() {
        let c = config(&["--workers", "3", "--worker-bin", "/x/w", "--drain-ms=250"]);
        assert_eq!(c.workers, 3);
        assert_eq!(c.worker_bin, PathBuf::from("/x/w"));
        assert!(c.worker_args.is_empty());
        assert_eq!(c.drain, Duration::from_millis(250));
        assert_eq!(c.kill_after(), Duration::from_millis(2250));
        assert!(c.demo);
        let d = config(&["--worker-bin", "/x"]);
        assert_eq!(d.listen, "127.0.0.1:8080");
        assert_eq!(d.data_dir, PathBuf::from(".tether"));
        assert_eq!(d.max_restarts, 10);
        assert_eq!(d.restart_window, Duration::from_secs(60));
        assert_eq!(d.heartbeat_timeout, Duration::from_millis(5000));
        assert_eq!(d.ready_timeout, Duration::from_millis(30_000));
        assert_eq!(d.backoff_initial, Duration::from_millis(100));
        assert_eq!(d.backoff_max, Duration::from_millis(5000));
        assert_eq!(d.drain, Duration::from_millis(10_000));
        assert_eq!(d.drain_delay, Duration::ZERO);
        assert_eq!(
            config(&["--drain-delay-ms", "5000"]).drain_delay,
            Duration::from_millis(5000)
        );
        assert!(d.workers >= 1);
        let own = config(&[]);
        assert_eq!(own.worker_args, vec!["worker"]);
    }

    #[test]
    fn bad_values_unknown_options_and_conflicts_are_usage_errors() {
        let err = |args: &[&str]| parse(args).unwrap_err();
        assert_eq!(err(&["--workers", "0"]).kind(), ErrorKind::ValueValidation);
        assert_eq!(err(&["--workers", "x"]).kind(), ErrorKind::ValueValidation);
        assert_eq!(
            err(&["--restart-window-secs", "0"]).kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(err(&["--nope"]).kind(), ErrorKind::UnknownArgument);
        assert_eq!(err(&["--nope"]).exit_code(), 2);
        assert_eq!(err(&["stray"]).kind(), ErrorKind::InvalidSubcommand);
        let conflict = err(&["--no-demo", "--demo", "on"]);
        assert_eq!(conflict.kind(), ErrorKind::ArgumentConflict);
        assert_eq!(conflict.exit_code(), 2);
        assert_eq!(err(&["--help"]).exit_code(), 0);
        // Given twice, the last one counts (as it always has).
        assert_eq!(config(&["--workers", "1", "--workers", "2"]).workers, 2);
    }

    #[test]
    fn worker_options_are_handed_on_and_no_demo_turns_the_page_off() {
        let p = parse(&["--max-body-bytes", "100", "--rate-limit=5", "--no-demo"]).unwrap();
        let env = p.worker_env();
        let get = |k: &str| env.iter().find(|(v, _)| v == k).map(|(_, x)| x.as_str());
        assert_eq!(get("TETHER_MAX_BODY_BYTES"), Some("100"));
        assert_eq!(get("TETHER_RATE_LIMIT"), Some("5"));
        assert_eq!(get("TETHER_DRAIN_MS"), Some("10000"));
        assert_eq!(get("TETHER_DEMO"), Some("off"));
        assert!(!p.config().unwrap().demo);
        let off = parse(&["--demo", "off"]).unwrap();
        assert!(!off.config().unwrap().demo);
        assert_eq!(
            off.worker_env()
                .iter()
                .find(|(v, _)| v == "TETHER_DEMO")
                .map(|(_, x)| x.as_str()),
            Some("off")
        );
    }

    #[test]
    fn token_takes_the_secret_before_or_after_it() {
        for args in [
            &["token", "alice", "--secret", "k", "--ttl", "60"][..],
            &["--secret", "k", "token", "alice", "--ttl=60"][..],
        ] {
            let p = parse(args).unwrap();
            assert_eq!(p.cli.secret.as_deref(), Some("k"));
            match p.cli.command {
                Some(Sub::Token { ref user, ttl }) => {
                    assert_eq!(user, "alice");
                    assert_eq!(ttl, 60);
                }
                ref other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            parse(&["token"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            parse(&["token", "a", "--ttl", "0"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
    }

    /// `(--name, variable, default)` of every option of `tether` under
    /// `heading`s (`None`: the options without one), as `--help` shows them.
    fn options(headings: &[Option<&str>]) -> Vec<(String, Option<String>, Option<String>)> {
        let cmd = Cli::command();
        cmd.get_arguments()
            .filter(|a| headings.contains(&a.get_help_heading()))
            .filter_map(|a| {
                let long = a.get_long()?;
                if matches!(long, "help" | "version") {
                    return None;
                }
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                let default = (!a.get_default_values().is_empty()).then(|| {
                    let values: Vec<_> = a
                        .get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect();
                    values.join(",")
                });
                Some((format!("--{long}"), env, default))
            })
            .collect()
    }

    /// The options table of docs/PROTOCOL.md: its rows, split into cells.
    fn protocol_options_table() -> Vec<Vec<String>> {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let start = doc
            .find("| flag | variable | default | meaning |")
            .expect("docs/PROTOCOL.md has its options table");
        doc[start..]
            .lines()
            .skip(2) // the header and |---|
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    }

    /// The words of a table cell (`0 (off) / 100` → 0, off, 100).
    fn words(cell: &str) -> Vec<&str> {
        cell.split(|c: char| !(c.is_alphanumeric() || matches!(c, '.' | ':' | '_' | '-')))
            .filter(|w| !w.is_empty())
            .collect()
    }

    /// Every option of the contract (all but the supervisor's own) has a
    /// row in docs/PROTOCOL.md's options table with its variable and its
    /// default, as declared here.
    #[test]
    fn the_protocol_options_table_matches_the_declaration() {
        let rows = protocol_options_table();
        let checked = options(&[None, Some(WORKER_HEADING)]);
        assert!(checked.len() >= 17, "{checked:?}");
        let mut wrong = Vec::new();
        for (flag, env, default) in &checked {
            let Some(row) = rows.iter().find(|r| r[0].contains(&format!("`{flag}`"))) else {
                wrong.push(format!("{flag}: no row"));
                continue;
            };
            if let Some(env) = env {
                if !row[1].contains(&format!("`{env}`")) {
                    wrong.push(format!("{flag}: variable {env} not in {:?}", row[1]));
                }
            }
            if let Some(default) = default {
                if !words(&row[2]).contains(&default.as_str()) {
                    wrong.push(format!("{flag}: default {default} not in {:?}", row[2]));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "docs/PROTOCOL.md's options table disagrees with the options `tether` declares:\n{}",
            wrong.join("\n")
        );
    }

    /// systemd/tether.env.example names every variable `tether` reads, with
    /// the default (commented out) where there is one.
    #[test]
    fn the_environment_example_matches_the_declaration() {
        let example = include_str!("../../systemd/tether.env.example");
        let all = options(&[None, Some(SUPERVISOR_HEADING), Some(WORKER_HEADING)]);
        let mut wrong = Vec::new();
        for (flag, env, default) in &all {
            let Some(env) = env else { continue };
            let line = example
                .lines()
                .map(|l| l.trim_start_matches('#'))
                .find(|l| l.starts_with(&format!("{env}=")));
            match (line, default) {
                (None, _) => wrong.push(format!("{env} ({flag}) is missing")),
                (Some(l), Some(d)) if l != format!("{env}={d}") => {
                    wrong.push(format!("{l:?}: the default is {d}"))
                }
                _ => {}
            }
        }
        assert!(
            wrong.is_empty(),
            "systemd/tether.env.example:\n{}",
            wrong.join("\n")
        );
    }
}
