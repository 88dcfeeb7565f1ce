//! `tether`: the supervisor. It binds the listening socket once (or takes it
//! from systemd), starts `--workers` `tether-worker` processes that all
//! accept on it, restarts those that die, rolls them on SIGHUP and drains
//! them on SIGTERM. Single-threaded, no async runtime: see
//! docs/LIFECYCLE.md for the whole lifecycle.
//!
//! This file only parses the command line and wires the modules together:
//!
//! - [`config`]: the command line (clap) and environment → [`config::Config`];
//! - [`listener`]: bind, or systemd socket activation;
//! - [`devmode`]: the private PostgreSQL, the secret, the schema;
//! - [`spawn`]: fork+exec of one worker with fds 3 and 4;
//! - [`supervise`]: the loop;
//! - [`channel`], [`policy`], [`notify`]: its parts;
//! - [`token`]: `tether token USER`.

mod channel;
mod cluster;
mod config;
mod devmode;
mod listener;
mod notify;
mod policy;
mod spawn;
mod supervise;
mod token;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::process::ExitCode;

use tether_protocol::auth::{self, Secret};

use crate::config::{Parsed, Sub};
use crate::devmode::DevCluster;
use crate::listener::Origin;
use crate::spawn::WorkerTemplate;
use crate::supervise::{Signals, Supervisor};

fn main() -> ExitCode {
    // `tether worker ...` is a worker process, exec'd by a supervisor:
    // hand over before anything of the supervisor's runs.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("worker")) {
        return tether_worker::main_with_args("tether worker", std::env::args_os().skip(2));
    }
    tether_worker::config::unset_empty_env(&<config::Cli as clap::CommandFactory>::command());
    let parsed = match Parsed::from_argv(std::env::args_os()) {
        Ok(p) => p,
        // Help and version to stdout (exit 0), errors to stderr (exit 2).
        Err(e) => e.exit(),
    };
    match &parsed.cli.command {
        Some(Sub::Token { user, ttl }) => token::main(user, *ttl, &parsed.cli),
        Some(Sub::Migrate) => devmode::migrate_main(parsed.cli.database_url.as_deref()),
        Some(Sub::Secret) => {
            println!("{}", Secret::generate_hex());
            ExitCode::SUCCESS
        }
        Some(Sub::Worker { .. }) => {
            eprintln!(
                "tether: `worker` must come first, followed by worker options only: \
                 tether worker [OPTIONS] (see tether worker --help)"
            );
            ExitCode::from(2)
        }
        None => {
            tether_worker::logging::init("sup", parsed.cli.worker.log_format);
            serve(&parsed)
        }
    }
}

/// Logs `msg` and returns exit code `code`.
fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    log::error!("sup: {msg}");
    ExitCode::from(code)
}

/// Runs the gateway until stopped.
fn serve(parsed: &Parsed) -> ExitCode {
    let cfg = match parsed.config() {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    // A given secret is checked before anything starts (dev mode's own is
    // generated strong, and checked when read: the file may be edited).
    if let Some(s) = &cfg.secret {
        if let Err(e) = auth::check_secret(s) {
            eprintln!("tether: {}", auth::weak_secret_message(&e));
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &parsed.cli.worker.token_public_key {
        if let Err(e) = auth::PublicKey::from_file(path) {
            eprintln!("tether: TETHER_TOKEN_PUBLIC_KEY (--token-public-key): {e}");
            return ExitCode::from(2);
        }
    }
    if !cfg.worker_bin.is_file() {
        return fail(
            2,
            format!(
                "worker binary {} not found (build it with `cargo build`, or set --worker-bin/TETHER_WORKER_BIN)",
                cfg.worker_bin.display()
            ),
        );
    }
    // Handlers first: a SIGTERM during the (slow) dev-mode start is kept
    // for the loop, which then starts no worker and exits.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => return fail(1, e),
    };
    let listener = match listener::open(&cfg.listen) {
        Ok(l) => l,
        Err(e) => return fail(1, e),
    };
    let listen_desc = match (listener.local, listener.origin) {
        (Some(a), Origin::Bound) => a.to_string(),
        (Some(a), Origin::Systemd) => format!("{a} (from systemd)"),
        (None, _) => "the systemd socket".to_string(),
    };

    // Dev mode: a private PostgreSQL, started before any worker and
    // stopped after the last one (it is dropped at the end of this function).
    let dev = match &cfg.database_url {
        Some(_) => None,
        None => {
            log::info!(
                "sup: no DATABASE_URL: dev mode, private PostgreSQL in {}",
                cfg.data_dir.join("pg").display()
            );
            match DevCluster::start(&cfg.data_dir) {
                Ok(d) => Some(d),
                Err(e) => return fail(1, e),
            }
        }
    };
    let database_url = match (&cfg.database_url, &dev) {
        (Some(url), _) => url.clone(),
        (None, Some(d)) => d.url(),
        (None, None) => unreachable!("dev mode always has a cluster"),
    };
    let secret = match (&cfg.secret, &dev) {
        (Some(s), _) => s.clone(),
        (None, Some(_)) => match devmode::load_or_create_secret(&cfg.data_dir) {
            Ok((s, _)) if auth::check_secret(&s).is_err() => {
                eprintln!(
                    "tether: the dev-mode secret in {} is too weak; delete it and a strong one is generated",
                    devmode::secret_path(&cfg.data_dir).display()
                );
                return ExitCode::from(2);
            }
            Ok((s, created)) => {
                if created {
                    log::info!(
                        "sup: dev mode: generated a secret in {}",
                        devmode::secret_path(&cfg.data_dir).display()
                    );
                }
                s
            }
            Err(e) => return fail(1, e),
        },
        (None, None) => {
            return fail(
                2,
                "--secret or TETHER_SECRET is required with a DATABASE_URL",
            )
        }
    };

    // The migrations, before any worker starts. In dev mode a failure is fatal;
    // with an external database the workers report it as unavailable and
    // keep retrying, so it is only logged.
    match devmode::apply_schema(&database_url) {
        Ok(()) => log::info!("sup: schema up to date"),
        Err(e) if dev.is_some() => return fail(1, e),
        Err(e) => log::error!("sup: {e}; starting the workers anyway"),
    }

    if let Some(d) = &dev {
        let key = Secret::new(secret.clone().into_bytes());
        match auth::issue(&key, "demo", 24 * 3600)
            .and_then(|t| Ok((t, auth::issue(&key, "friend", 24 * 3600)?)))
        {
            Ok((t, friend)) => println!(
                "{}",
                devmode::banner(
                    listener.local,
                    d.port(),
                    d.dir(),
                    &devmode::secret_path(&cfg.data_dir),
                    &t,
                    &friend,
                    cfg.demo,
                )
            ),
            Err(e) => log::warn!("sup: dev mode: demo token: {e}"),
        }
    }

    // Every worker option (flag, environment or default) as its variable,
    // then what the supervisor decided.
    let mut env: BTreeMap<String, String> = parsed.worker_env().into_iter().collect();
    env.insert("DATABASE_URL".to_string(), database_url);
    env.insert("TETHER_SECRET".to_string(), secret);
    // The host's metrics: every process writes its exposition here, and
    // whichever worker answers /metrics serves them all. Private (0700),
    // removed on exit.
    let metrics_dir = match tempfile::Builder::new().prefix("tether-metrics-").tempdir() {
        Ok(d) => Some(d),
        Err(e) => {
            log::warn!("sup: no metrics directory ({e}): /metrics shows one worker per scrape");
            None
        }
    };
    if let Some(d) = &metrics_dir {
        env.insert(
            tether_protocol::exposition::ENV_METRICS_DIR.to_string(),
            d.path().to_string_lossy().into_owned(),
        );
    }
    let template = WorkerTemplate {
        bin: cfg.worker_bin.clone(),
        args: cfg.worker_args.clone(),
        env,
    };
    let sup = Supervisor::new(
        cfg,
        template,
        listener.fd.as_fd(),
        listen_desc,
        signals,
        metrics_dir.as_ref().map(|d| d.path().to_path_buf()),
    );
    let outcome = match sup.run() {
        Ok(o) => o,
        Err(e) => return fail(1, e),
    };
    drop(metrics_dir);
    drop(dev);
    ExitCode::from(outcome.exit_code())
}
