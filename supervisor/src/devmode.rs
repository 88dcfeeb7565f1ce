//! Dev mode (no `DATABASE_URL`) and the schema.
//!
//! - [`DevCluster::start`]: a private PostgreSQL in `<data-dir>/pg` through
//!   [`tether_pgcluster::PgCluster::start_in`], on the fixed port
//!   [`DEV_PG_PORT`] (or the next free one), so the same cluster and port
//!   are reused across runs. It is stopped when the `DevCluster` is
//!   dropped, which `main` does after every worker has exited.
//! - [`load_or_create_secret`]: the token key kept in `<data-dir>/secret`
//!   (mode 0600), generated on first use.
//! - [`apply_schema`]: applies `schema.sql` (as every worker does: [`tether_worker::store::apply_schema`]) before any
//!   worker starts. The `postgres` client runs a tokio runtime inside, and
//!   the supervisor process stays free of tokio and threads, so the schema
//!   is applied by a short-lived child: `tether migrate` ([`migrate_main`]).
//! - [`banner`]: the demo token and copy-paste examples.

use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use tether_pgcluster::{PgCluster, PgError, PgOptions};

/// The private PostgreSQL's preferred port; the next free one is taken if
/// it is busy.
pub const DEV_PG_PORT: u16 = 54329;
/// How many ports from [`DEV_PG_PORT`] on are tried.
const DEV_PG_PORTS: u16 = 20;

/// What can go wrong in dev mode or while applying the schema.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("creating the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the secret file {path}: {source}")]
    SecretFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the secret file {0} is empty")]
    EmptySecret(PathBuf),
    #[error("starting the private PostgreSQL in {dir}: {source}")]
    Postgres {
        dir: PathBuf,
        #[source]
        source: Box<PgError>,
    },
    #[error("no free port for the private PostgreSQL in {first}..{last}")]
    NoPort { first: u16, last: u16 },
    #[error("running `{exe} schema`: {source}")]
    SchemaSpawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("applying the schema failed ({0}); see the line above")]
    SchemaFailed(std::process::ExitStatus),
}

/// The private PostgreSQL of a dev-mode run; stopped on drop.
pub struct DevCluster {
    pg: PgCluster,
}

impl DevCluster {
    /// Starts (creating on first use) the cluster in `<data_dir>/pg`.
    pub fn start(data_dir: &Path) -> Result<DevCluster, DevError> {
        ensure_dir(data_dir)?;
        let dir = data_dir.join("pg");
        let last = DEV_PG_PORT + DEV_PG_PORTS - 1;
        for port in DEV_PG_PORT..=last {
            // No TCP: only the Unix socket in a directory of the
            // server's user (0700), so no other local user can reach a
            // server that trusts every local connection.
            let opts = PgOptions {
                port: Some(port),
                ..PgOptions::default()
            };
            match PgCluster::start_in_unix_only(&dir, opts) {
                Ok(pg) => return Ok(DevCluster { pg }),
                Err(PgError::PortInUse { .. }) => {
                    log::info!("sup: dev mode: port {port} is busy, trying the next");
                }
                Err(e) => {
                    return Err(DevError::Postgres {
                        dir,
                        source: Box::new(e),
                    })
                }
            }
        }
        Err(DevError::NoPort {
            first: DEV_PG_PORT,
            last,
        })
    }

    pub fn url(&self) -> String {
        self.pg.url()
    }

    pub fn port(&self) -> u16 {
        self.pg.port()
    }

    pub fn dir(&self) -> &Path {
        self.pg.root_dir()
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        log::info!("sup: dev mode: stopping PostgreSQL");
        if let Err(e) = self.pg.stop() {
            log::error!("sup: dev mode: stopping PostgreSQL: {e}");
        }
    }
}

/// Creates the data directory (mode 0711: others may pass through it but
/// not list it; the secret inside is 0600). Run as root, PostgreSQL runs as
/// the `postgres` user, which must be able to reach `<data-dir>/pg`: a data
/// directory left at 0700 by an earlier version gets that search bit too.
fn ensure_dir(dir: &Path) -> Result<(), DevError> {
    let err = |source| DevError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(err)?;
    if nix::unistd::geteuid().is_root() {
        let mut perms = fs::metadata(dir).map_err(err)?.permissions();
        if perms.mode() & 0o001 == 0 {
            perms.set_mode(perms.mode() | 0o011);
            fs::set_permissions(dir, perms).map_err(err)?;
        }
    }
    Ok(())
}

/// The path of the dev-mode secret.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secret")
}

/// Reads `<data_dir>/secret`; `Ok(None)` if there is none yet.
pub fn read_secret(data_dir: &Path) -> Result<Option<String>, DevError> {
    let path = secret_path(data_dir);
    match fs::read_to_string(&path) {
        Ok(s) if s.trim().is_empty() => Err(DevError::EmptySecret(path)),
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DevError::SecretFile { path, source }),
    }
}

/// The secret kept in `<data_dir>/secret`, generated (mode 0600) if absent.
/// Returns it and whether it was created now.
pub fn load_or_create_secret(data_dir: &Path) -> Result<(String, bool), DevError> {
    if let Some(s) = read_secret(data_dir)? {
        return Ok((s, false));
    }
    ensure_dir(data_dir)?;
    let path = secret_path(data_dir);
    let secret = tether_protocol::auth::Secret::generate_hex();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| DevError::SecretFile {
            path: path.clone(),
            source,
        })?;
    writeln!(f, "{secret}").map_err(|source| DevError::SecretFile { path, source })?;
    Ok((secret, true))
}

/// Applies the pending migrations to `url` in a child process (`tether
/// migrate`), so that this process never runs the client's tokio runtime.
pub fn apply_schema(url: &str) -> Result<(), DevError> {
    let exe = std::env::current_exe().map_err(|source| DevError::SchemaSpawn {
        exe: PathBuf::from("tether"),
        source,
    })?;
    let status = Command::new(&exe)
        .arg("migrate")
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .status()
        .map_err(|source| DevError::SchemaSpawn { exe, source })?;
    if status.success() {
        Ok(())
    } else {
        Err(DevError::SchemaFailed(status))
    }
}

/// `tether migrate`: connects to `--database-url`/`DATABASE_URL` and
/// applies the pending migrations. Exit 0 on success, 1 on failure, 2
/// without URL.
pub fn migrate_main(database_url: Option<&str>) -> ExitCode {
    let Some(url) = database_url else {
        eprintln!("tether migrate: --database-url or DATABASE_URL is required");
        return ExitCode::from(2);
    };
    let mut config: postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether migrate: bad database URL: {e}");
            return ExitCode::from(2);
        }
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    let result = config
        .connect(postgres::NoTls)
        .map_err(tether_worker::store::StoreError::from)
        .and_then(|mut client| tether_worker::store::migrate::migrate(&mut client));
    match result {
        Ok(applied) if applied.is_empty() => {
            println!(
                "tether migrate: up to date (version {})",
                tether_worker::store::migrate::latest()
            );
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!("tether migrate: applied {applied:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether migrate: {e}");
            ExitCode::from(1)
        }
    }
}

/// The dev-mode greeting: where things are, a demo token, and examples.
pub fn banner(
    listen: Option<SocketAddr>,
    pg_port: u16,
    pg_dir: &Path,
    secret_file: &Path,
    demo_token: &str,
    friend_token: &str,
    demo_page: bool,
) -> String {
    let base = match listen {
        Some(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        Some(a) => a.to_string(),
        None => "127.0.0.1:8080".to_string(),
    };
    format!(
        "\
tether dev mode
  PostgreSQL: Unix socket only, {pg_dir}/pg-run/.s.PGSQL.{pg_port} (no TCP; data in {pg_dir}, stopped on exit)
  secret:     {secret_file}

Token for user \"demo\" (24 h; `tether token USER` makes more):

  export TOKEN={demo_token}

Try it:

  curl -s -X POST http://{base}/v1/conversations \\
       -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\
       -d '{{\"members\":[\"bob\"],\"title\":\"hello\"}}'
  curl -s -X POST http://{base}/v1/conversations/1/messages \\
       -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\
       -d '{{\"body\":\"hi bob\",\"client_msg_id\":\"m1\"}}'
  websocat \"ws://{base}/v1/ws?token=$TOKEN\"
{page}",
        page = if demo_page {
            format!(
                "
Chat in a browser: open these in two windows (user \"demo\" and user \"friend\";
the token is in the fragment, which browsers never send to the server):

  http://{base}/demo/#token={demo_token}
  http://{base}/demo/#token={friend_token}
"
            )
        } else {
            String::new()
        },
        pg_dir = pg_dir.display(),
        secret_file = secret_file.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert!(read_secret(&data).unwrap().is_none());
        let (s1, created) = load_or_create_secret(&data).unwrap();
        assert!(created);
        assert_eq!(s1.len(), 64);
        let mode = fs::metadata(secret_path(&data))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (s2, created) = load_or_create_secret(&data).unwrap();
        assert!(!created);
        assert_eq!(s1, s2);
        fs::write(secret_path(&data), "\n").unwrap();
        assert!(matches!(read_secret(&data), Err(DevError::EmptySecret(_))));
    }

    #[test]
    fn the_banner_has_copy_paste_examples() {
        let b = banner(
            Some("0.0.0.0:9000".parse().unwrap()),
            54329,
            Path::new(".tether/pg"),
            Path::new(".tether/secret"),
            "T.O.K",
            "F.R.D",
            true,
        );
        assert!(b.contains("export TOKEN=T.O.K"));
        assert!(b.contains("http://127.0.0.1:9000/demo/#token=T.O.K"));
        assert!(b.contains("http://127.0.0.1:9000/demo/#token=F.R.D"));
        assert!(b.contains("http://127.0.0.1:9000/v1/conversations "));
        assert!(b.contains("/v1/conversations/1/messages"));
        assert!(b.contains("websocat \"ws://127.0.0.1:9000/v1/ws?token=$TOKEN\""));
    }
}
