//! tether-pgcluster: a private PostgreSQL cluster of our own: `initdb`,
//! start, stop, clean up.
//!
//! Used by the tests and the load tool (a throwaway cluster per test,
//! [`PgCluster::start_temp`]) and by the supervisor's dev mode (a
//! persistent cluster in its data directory, [`PgCluster::start_in`]). A
//! crate of its own so that neither the worker nor the protocol links it:
//! it is tooling, not the gateway. This crate owns:
//!
//! - finding the server binaries ([`find_pg_bin`]: `PATH` first, then
//!   Debian's `/usr/lib/postgresql/<version>/bin`, highest version);
//! - the cluster's directory, laid out as `ROOT/pgdata` (the data directory,
//!   mode 0700) and `ROOT/pg-run` (the unix socket and `postgresql.log`);
//! - running `initdb`, `pg_ctl` and therefore `postgres` as the `postgres`
//!   system user when we are root (both refuse to run as root), with the
//!   directories chowned to that user;
//! - the listening port (a free one unless given; kept across
//!   [`PgCluster::stop`] / [`PgCluster::start`]) on 127.0.0.1 only;
//! - the server's lifetime: `pg_ctl start -w` (waits for the server to
//!   report ready, 30 s timeout) and a TCP connect check, `pg_ctl stop -m
//!   fast` on request, and a stop on drop (plus removal of a temp cluster's
//!   directory).
//!
//! Throwaway clusters are cheap: `initdb` runs once per process into a
//! template directory, and each [`PgCluster::start_temp`] copies it
//! (`cp -a`), then starts the copy. They live in `/dev/shm` when that is a
//! tmpfs with room (no disk I/O), else in the temp dir; `TETHER_PG_TMPDIR`
//! overrides. Temp dirs carry the owning pid in their name, so a process
//! cleans up what a killed predecessor left behind.

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, geteuid, Gid, Pid, Uid, User};
mod bouncer;
mod replica;
mod system;
mod temp;
#[cfg(test)]
mod tests;

pub use bouncer::PgBouncer;
pub use system::find_pg_bin;
use system::*;
use temp::*;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a start may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many free ports to try when the chosen one is taken meanwhile.
const PORT_ATTEMPTS: usize = 5;
/// The database superuser `initdb` creates (and the system user we run as
/// when root).
const PG_USER: &str = "postgres";
/// Lines of a log or of a command's output quoted in errors.
const TAIL_LINES: usize = 30;
/// Longest unix socket path (sun_path is 108 bytes, NUL included).
const MAX_SOCKET_PATH: usize = 107;

/// Something went wrong while setting up, starting or stopping a cluster.
/// Every variant names what it was doing and where, and quotes the tail of
/// the command's output or of the server log.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "PostgreSQL server binary `{name}` not found on PATH nor under \
         /usr/lib/postgresql/*/bin (install the server package, e.g. Debian's `postgresql`)"
    )]
    BinaryNotFound { name: String },

    #[error(
        "running as root, but there is no `postgres` system user to run PostgreSQL as \
         (initdb and postgres refuse to run as root): {detail}"
    )]
    NoPostgresUser { detail: String },

    #[error("could not run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{binary} failed ({status}) for {dir}:\n{output_tail}")]
    CommandFailed {
        binary: PathBuf,
        dir: PathBuf,
        status: ExitStatus,
        /// The last lines of the command's stderr and stdout.
        output_tail: String,
    },

    #[error(
        "the `postgres` user (PostgreSQL must run as it, we are root) cannot reach {dir}: \
         it and every parent directory must be searchable by that user (e.g. not under \
         /root; or chmod o+x the parents)"
    )]
    NotReachable { dir: PathBuf },

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("could not find a free TCP port on 127.0.0.1: {0}")]
    NoFreePort(#[source] io::Error),

    #[error("port {port} is already in use (PostgreSQL in {dir} could not bind it); log tail:\n{log_tail}")]
    PortInUse {
        port: u16,
        dir: PathBuf,
        log_tail: String,
    },

    #[error("PostgreSQL in {dir} did not start on port {port}: {reason}; log tail:\n{log_tail}")]
    StartFailed {
        dir: PathBuf,
        port: u16,
        reason: String,
        log_tail: String,
    },

    #[error("PostgreSQL in {dir} did not stop: {reason}; log tail:\n{log_tail}")]
    StopFailed {
        dir: PathBuf,
        reason: String,
        log_tail: String,
    },

    #[error("the per-process template cluster could not be created: {0}")]
    Template(String),
}

/// How to run a cluster.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `false` adds `fsync=off`, `synchronous_commit=off` and
    /// `full_page_writes=off` (tests: fast, and nothing to lose).
    pub fsync: bool,
    pub max_connections: u32,
    /// `None`: pick a free port (and retry with another if it gets taken
    /// before the server binds it).
    pub port: Option<u16>,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            fsync: true,
            max_connections: 200,
            port: None,
        }
    }
}

/// The system user the server runs as, when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: Uid,
    gid: Gid,
}

/// `initdb` and `pg_ctl` from one installation (`pg_ctl` and `initdb` find
/// `postgres` next to themselves).
#[derive(Debug, Clone)]
struct PgBins {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

/// A running (or stopped) PostgreSQL cluster that this process owns.
///
/// Dropping it stops the server; a temp cluster's directory is removed too.
#[derive(Debug)]
pub struct PgCluster {
    bins: PgBins,
    run_as: Option<RunAs>,
    opts: PgOptions,
    port: u16,
    root: PathBuf,
    data_dir: PathBuf,
    run_dir: PathBuf,
    log_file: PathBuf,
    /// Whether the unix socket goes into `run_dir` (off when the path would
    /// be too long for a socket address).
    unix_socket: bool,
    /// No TCP listener at all: only the Unix socket in the run directory,
    /// which only the server's user (and root) can enter (mode 0700), so
    /// other local users cannot reach the server (dev mode). The port then
    /// only names the socket file. See [`PgCluster::start_in_unix_only`].
    unix_only: bool,
    /// Set for [`PgCluster::start_temp`]; dropped (removing the directory)
    /// after the server is stopped.
    temp: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// A throwaway cluster in a fresh temp dir; stopped and the dir removed
    /// on drop.
    pub fn start_temp(opts: PgOptions) -> Result<PgCluster, PgError> {
        let bins = PgBins::find()?;
        let run_as = run_as()?;
        let tmp = temp_dir("tether-pg")?;
        let root = tmp.path().to_path_buf();
        prepare_dir(&root, run_as)?;
        check_reachable(&root, run_as)?;
        let durable = opts.fsync;
        let mut cluster = PgCluster::new(bins, run_as, opts, root);
        cluster.temp = Some(tmp);
        if durable {
            // A durable cluster is for measuring: a fresh initdb with the
            // standard 16 MB WAL segments. The test template's 1 MB
            // segments make a write-heavy server create a WAL file many
            // times a second (a sustained-send benchmark ran 25 % slower).
            let root = cluster.root_dir().to_path_buf();
            initdb(&cluster.bins, run_as, &cluster.data_dir, &root, &[])?;
        } else {
            let template = template(&cluster.bins, run_as)?;
            let mut cp = cluster.command(Path::new("cp"));
            cp.arg("-a").arg(&template).arg(&cluster.data_dir);
            run(cp, Path::new("cp"), &cluster.data_dir)?;
        }
        cluster.prepare_run_dir()?;
        cluster.start_first()?;
        Ok(cluster)
    }

    /// A persistent cluster under `dir`: `initdb` if `dir` holds no cluster
    /// yet, else reuse it; then start it. Drop stops it but keeps the data.
    ///
    /// `dir` may hold other files (the cluster lives in `dir/pgdata` and
    /// `dir/pg-run`). A server left running there by a previous owner (say
    /// a killed supervisor) is stopped first, so this one runs with `opts`.
    pub fn start_in(dir: &Path, opts: PgOptions) -> Result<PgCluster, PgError> {
        PgCluster::start_in_with(dir, opts, false)
    }

    /// [`PgCluster::start_in`] without a TCP listener: the server answers
    /// only on its Unix socket, in a directory (mode 0700) of the server's
    /// user, so no other local user can reach it, whatever `pg_hba.conf`
    /// trusts. [`PgCluster::url`] is then a socket connection string.
    pub fn start_in_unix_only(dir: &Path, opts: PgOptions) -> Result<PgCluster, PgError> {
        PgCluster::start_in_with(dir, opts, true)
    }

    fn start_in_with(dir: &Path, opts: PgOptions, unix_only: bool) -> Result<PgCluster, PgError> {
        let bins = PgBins::find()?;
        let run_as = run_as()?;
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|source| PgError::Io {
                action: "creating",
                path: dir.to_path_buf(),
                source,
            })?;
            prepare_dir(dir, run_as)?;
        }
        let root = dir.canonicalize().map_err(|source| PgError::Io {
            action: "resolving",
            path: dir.to_path_buf(),
            source,
        })?;
        check_reachable(&root, run_as)?;
        let mut cluster = PgCluster::new(bins, run_as, opts, root);
        cluster.unix_only = unix_only;
        cluster.prepare_run_dir()?;
        if cluster.data_dir.join("PG_VERSION").exists() {
            if cluster.is_running() {
                log::warn!(
                    "a PostgreSQL server left running in {} is being stopped",
                    cluster.data_dir.display()
                );
                cluster.pg_ctl_stop("fast")?;
            }
        } else {
            if !cluster.data_dir.exists() {
                fs::create_dir(&cluster.data_dir).map_err(|source| PgError::Io {
                    action: "creating",
                    path: cluster.data_dir.clone(),
                    source,
                })?;
                prepare_dir(&cluster.data_dir, run_as)?;
            }
            initdb(&cluster.bins, run_as, &cluster.data_dir, &cluster.root, &[])?;
        }
        cluster.start_first()?;
        Ok(cluster)
    }

    fn new(bins: PgBins, run_as: Option<RunAs>, opts: PgOptions, root: PathBuf) -> PgCluster {
        let data_dir = root.join("pgdata");
        let run_dir = root.join("pg-run");
        let log_file = run_dir.join("postgresql.log");
        // The socket is run_dir/.s.PGSQL.NNNNN (at most 5 digits).
        let unix_socket = run_dir.as_os_str().len() + "/.s.PGSQL.65535".len() <= MAX_SOCKET_PATH;
        PgCluster {
            bins,
            run_as,
            port: opts.port.unwrap_or(0),
            opts,
            root,
            data_dir,
            run_dir,
            log_file,
            unix_socket,
            unix_only: false,
            temp: None,
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust auth, no
    /// password).
    ///
    /// Without TCP ([`PgCluster::start_in_unix_only`]), the connection string of the Unix
    /// socket instead: `host=RUN_DIR port=PORT user=postgres dbname=postgres`.
    pub fn url(&self) -> String {
        if self.unix_only {
            let dir = self
                .run_dir
                .to_string_lossy()
                .replace('\\', "\\\\")
                .replace('\'', "\\'");
            return format!(
                "host='{dir}' port={} user={PG_USER} dbname=postgres",
                self.port
            );
        }
        format!("postgres://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The directory of the Unix socket (mode 0700, the server's user's).
    pub fn socket_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PostgreSQL data directory (`PGDATA`), i.e. `root_dir()/pgdata`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory this cluster owns: the temp dir, or `start_in`'s `dir`.
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// The server log (stdout and stderr of `postgres`).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_file, 0, lines)
    }

    /// Fast shutdown (`pg_ctl stop -m fast -w`); the data stays. Stopping a
    /// stopped cluster is a no-op.
    pub fn stop(&mut self) -> Result<(), PgError> {
        if !self.is_running() {
            return Ok(());
        }
        self.pg_ctl_stop("fast")
    }

    /// Starts the cluster again on the same port and waits until it accepts
    /// connections. Starting a running cluster is a no-op.
    pub fn start(&mut self) -> Result<(), PgError> {
        if self.is_running() {
            return Ok(());
        }
        self.start_on(self.port)
    }

    /// Whether the server is up: its `postmaster.pid` names a live process.
    pub fn is_running(&self) -> bool {
        match postmaster_pid(&self.data_dir) {
            Some(pid) => !matches!(kill(pid, None), Err(nix::errno::Errno::ESRCH)),
            None => false,
        }
    }

    /// The first start: on `opts.port`, or on a free port with retries.
    fn start_first(&mut self) -> Result<(), PgError> {
        if let Some(port) = self.opts.port {
            return self.start_on(port);
        }
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match self.start_on(port) {
                Ok(()) => return Ok(()),
                Err(e @ PgError::PortInUse { .. }) => {
                    log::debug!("retrying with another port: {e}");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn start_on(&mut self, port: u16) -> Result<(), PgError> {
        self.port = port;
        let log_offset = fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0);
        let socket_dirs = if self.unix_socket {
            self.run_dir.to_string_lossy().into_owned()
        } else if self.unix_only {
            return Err(PgError::StartFailed {
                dir: self.data_dir.clone(),
                port,
                reason: format!(
                    "the socket path under {} is too long for a Unix socket",
                    self.run_dir.display()
                ),
                log_tail: String::new(),
            });
        } else {
            String::new()
        };
        let listen = if self.unix_only { "" } else { "127.0.0.1" };
        // pg_ctl hands -o to /bin/sh, hence the quoting.
        let mut o = format!(
            "-c {} -c port={port} -c max_connections={} -c {} -c unix_socket_permissions=0700",
            sh_quote(&format!("listen_addresses={listen}")),
            self.opts.max_connections,
            sh_quote(&format!("unix_socket_directories={socket_dirs}")),
        );
        if !self.opts.fsync {
            o.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let mut cmd = self.command(&self.bins.pg_ctl);
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-w")
            .arg("-t")
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("-s")
            .arg("-o")
            .arg(&o);
        let deadline = Instant::now() + START_TIMEOUT;
        if let Err(e) = run(cmd, &self.bins.pg_ctl, &self.data_dir) {
            let log_tail = file_tail(&self.log_file, log_offset, TAIL_LINES);
            // If pg_ctl gave up while the server lives on, don't leave it.
            if self.is_running() {
                let _ = self.pg_ctl_stop("immediate");
            }
            if log_tail.contains("Address already in use") {
                return Err(PgError::PortInUse {
                    port,
                    dir: self.data_dir.clone(),
                    log_tail,
                });
            }
            return Err(PgError::StartFailed {
                dir: self.data_dir.clone(),
                port,
                reason: e.to_string(),
                log_tail,
            });
        }
        // pg_ctl -w returned once the server reported "ready"; confirm that
        // it is the one answering on our port (or socket).
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let socket = self.run_dir.join(format!(".s.PGSQL.{port}"));
        loop {
            let answered = if self.unix_only {
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            } else {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            };
            if answered {
                return Ok(());
            }
            if Instant::now() >= deadline || !self.is_running() {
                let _ = self.pg_ctl_stop("immediate");
                return Err(PgError::StartFailed {
                    dir: self.data_dir.clone(),
                    port,
                    reason: "the server reported ready but does not accept connections".into(),
                    log_tail: file_tail(&self.log_file, log_offset, TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), PgError> {
        let mut cmd = self.command(&self.bins.pg_ctl);
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-m")
            .arg(mode)
            .arg("-w")
            .arg("-t")
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("-s");
        run(cmd, &self.bins.pg_ctl, &self.data_dir).map_err(|e| PgError::StopFailed {
            dir: self.data_dir.clone(),
            reason: e.to_string(),
            log_tail: self.log_tail(TAIL_LINES),
        })
    }

    fn prepare_run_dir(&self) -> Result<(), PgError> {
        if !self.run_dir.exists() {
            fs::create_dir(&self.run_dir).map_err(|source| PgError::Io {
                action: "creating",
                path: self.run_dir.clone(),
                source,
            })?;
        }
        prepare_dir(&self.run_dir, self.run_as)
    }

    fn command(&self, program: &Path) -> Command {
        command(program, &self.root, self.run_as)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.is_running() {
            // A temp cluster's data is about to go: no need for a clean
            // shutdown. A persistent one gets a fast (clean) shutdown.
            let first = if self.temp.is_some() {
                "immediate"
            } else {
                "fast"
            };
            if let Err(e) = self.pg_ctl_stop(first) {
                log::warn!("stopping PostgreSQL: {e}");
                let _ = self.pg_ctl_stop("immediate");
            }
            if let Some(pid) = postmaster_pid(&self.data_dir) {
                if self.is_running() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
        }
        // self.temp (if any) drops after this, removing the directory.
    }
}

/// Binds 127.0.0.1:0 and returns the port the kernel chose.
fn free_port() -> Result<u16, PgError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(PgError::NoFreePort)?;
    let port = listener.local_addr().map_err(PgError::NoFreePort)?.port();
    Ok(port)
}

/// The postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_pid(data_dir: &Path) -> Option<Pid> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

/// The last `lines` lines of `path` from byte `offset` on ("" if unreadable).
fn file_tail(path: &Path, offset: u64, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = (offset as usize).min(bytes.len());
            tail(&String::from_utf8_lossy(&bytes[start..]), lines)
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
