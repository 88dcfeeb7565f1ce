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
mod replica;

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

impl PgBins {
    fn find() -> Result<PgBins, PgError> {
        let initdb = find_pg_bin("initdb")?;
        // Take pg_ctl from the same installation as initdb.
        let dir = initdb
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let pg_ctl = match dir.map(|d| d.join("pg_ctl")) {
            Some(p) if is_executable(&p) => p,
            _ => find_pg_bin("pg_ctl")?,
        };
        Ok(PgBins { initdb, pg_ctl })
    }
}

/// Finds a PostgreSQL server binary: on `PATH` first, then under
/// `/usr/lib/postgresql/*/bin` (Debian's layout), highest version first.
pub fn find_pg_bin(name: &str) -> Result<PathBuf, PgError> {
    find_pg_bin_in(
        name,
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
    )
}

fn find_pg_bin_in(name: &str, path: Option<OsString>, lib: &Path) -> Result<PathBuf, PgError> {
    if let Some(path) = path {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir(lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: Option<Vec<u64>> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect();
            let candidate = entry.path().join("bin").join(name);
            is_executable(&candidate).then_some((version?, candidate))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| PgError::BinaryNotFound { name: name.into() })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `Some(postgres user)` when we are root, `None` when we run as ourselves.
fn run_as() -> Result<Option<RunAs>, PgError> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name(PG_USER) {
        Ok(Some(user)) => Ok(Some(RunAs {
            uid: user.uid,
            gid: user.gid,
        })),
        Ok(None) => Err(PgError::NoPostgresUser {
            detail: "no such user in the password database (install Debian's `postgresql` package, or create the user)".into(),
        }),
        Err(e) => Err(PgError::NoPostgresUser {
            detail: format!("looking it up failed: {e}"),
        }),
    }
}

/// Makes `dir` ours (or the postgres user's, when root), mode 0700.
fn prepare_dir(dir: &Path, run_as: Option<RunAs>) -> Result<(), PgError> {
    if let Some(r) = run_as {
        chown(dir, Some(r.uid), Some(r.gid)).map_err(|e| PgError::Io {
            action: "changing the owner of",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| PgError::Io {
        action: "setting the mode of",
        path: dir.to_path_buf(),
        source,
    })
}

/// When we run PostgreSQL as another user, checks (as that user) that it
/// can get to `dir`, so a parent like `/root` (0700) gives a clear error
/// instead of a puzzling one from initdb.
fn check_reachable(dir: &Path, run_as: Option<RunAs>) -> Result<(), PgError> {
    let Some(r) = run_as else {
        return Ok(());
    };
    let status = Command::new("test")
        .arg("-x")
        .arg(dir)
        .current_dir("/")
        .uid(r.uid.as_raw())
        .gid(r.gid.as_raw())
        .status()
        .map_err(|source| PgError::Spawn {
            binary: "test".into(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(PgError::NotReachable {
            dir: dir.to_path_buf(),
        })
    }
}

fn command(program: &Path, cwd: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .env("LC_ALL", "C")
        .env_remove("LANG");
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(r) = run_as {
        cmd.uid(r.uid.as_raw()).gid(r.gid.as_raw());
    }
    // Its own process group: a terminal's Ctrl-C goes to the foreground
    // group (tether and its workers), and must not stop the database while
    // the workers are still draining onto it. The owner stops it last.
    cmd.process_group(0);
    cmd
}

/// Runs `cmd` to completion; a non-zero exit becomes `CommandFailed` with
/// the tail of its output.
fn run(mut cmd: Command, binary: &Path, dir: &Path) -> Result<(), PgError> {
    let out = cmd.output().map_err(|source| PgError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.stdout.is_empty() {
        let _ = write!(text, "\n{}", String::from_utf8_lossy(&out.stdout));
    }
    Err(PgError::CommandFailed {
        binary: binary.to_path_buf(),
        dir: dir.to_path_buf(),
        status: out.status,
        output_tail: tail(&text, TAIL_LINES),
    })
}

/// `initdb` with trust auth for local connections (the server listens on
/// 127.0.0.1 only). `extra`: more flags.
fn initdb(
    bins: &PgBins,
    run_as: Option<RunAs>,
    data_dir: &Path,
    cwd: &Path,
    extra: &[&str],
) -> Result<(), PgError> {
    let mut cmd = command(&bins.initdb, cwd, run_as);
    cmd.arg("-D")
        .arg(data_dir)
        .args([
            "--no-sync",
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .args(extra);
    run(cmd, &bins.initdb, data_dir)
}

/// The template data directory, created once per process: `ROOT/pgdata`
/// of a temp dir that is removed at exit.
fn template(bins: &PgBins, run_as: Option<RunAs>) -> Result<PathBuf, PgError> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| make_template(bins, run_as).map_err(|e| e.to_string()))
        .clone()
        .map_err(PgError::Template)
}

/// The template's root, removed by an `atexit` handler.
static TEMPLATE_ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_template() {
    if let Ok(mut root) = TEMPLATE_ROOT.lock() {
        if let Some(root) = root.take() {
            let _ = fs::remove_dir_all(root);
        }
    }
}

fn make_template(bins: &PgBins, run_as: Option<RunAs>) -> Result<PathBuf, PgError> {
    sweep_stale_temp_dirs(&temp_base());
    let root = temp_dir("tether-pg-template")?.keep();
    *TEMPLATE_ROOT.lock().unwrap_or_else(|e| e.into_inner()) = Some(root.clone());
    // SAFETY: registers a plain `extern "C" fn()` with the C runtime.
    unsafe {
        libc::atexit(remove_template);
    }
    prepare_dir(&root, run_as)?;
    let data_dir = root.join("pgdata");
    // 1 MiB WAL segments instead of 16: the template (copied for every
    // temp cluster) shrinks by a third; throwaway clusters don't care.
    initdb(bins, run_as, &data_dir, &root, &["--wal-segsize=1"])?;
    Ok(data_dir)
}

/// Where temp clusters (and the template) go: `$TETHER_PG_TMPDIR` if set,
/// else `/dev/shm` when it is a tmpfs with room (copying the template and
/// the server's own writes then cost no disk I/O), else the usual temp dir.
fn temp_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_PG_TMPDIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    // The casts are no-ops on 64-bit Linux, not everywhere.
    #[allow(clippy::unnecessary_cast)]
    let roomy = nix::sys::statvfs::statvfs(shm)
        .map(|v| v.blocks_available() as u64 * v.fragment_size() as u64 >= SHM_MIN_FREE)
        .unwrap_or(false);
    if roomy && nix::unistd::access(shm, nix::unistd::AccessFlags::W_OK).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// `/dev/shm` is used only with at least this much free.
const SHM_MIN_FREE: u64 = 2 << 30;

/// A fresh `BASE/{prefix}-{our pid}-XXXXXX` (the pid lets a later process
/// clean up after one that was killed).
fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, PgError> {
    let base = temp_base();
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-{}-", std::process::id()))
        .tempdir_in(&base)
        .map_err(|source| PgError::Io {
            action: "creating a temp dir in",
            path: base,
            source,
        })
}

/// Removes temp clusters left behind by processes that died without
/// dropping them (SIGKILL, abort), first stopping a server still running
/// there. Directories of live (or unknown) processes are left alone.
fn sweep_stale_temp_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("tether-pg-")) else {
            continue;
        };
        let rest = rest.strip_prefix("template-").unwrap_or(rest);
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if owner <= 0 || kill(Pid::from_raw(owner), None) != Err(nix::errno::Errno::ESRCH) {
            continue;
        }
        let path = entry.path();
        if let Some(pid) = postmaster_pid(&path.join("pgdata")) {
            // Immediate shutdown; it also notices its directory vanishing.
            let _ = kill(pid, Signal::SIGQUIT);
        }
        log::debug!("removing stale temp cluster {}", path.display());
        let _ = fs::remove_dir_all(&path);
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

#[cfg(test)]
mod tests {
    use super::*;
    use postgres::{Client, NoTls};

    fn test_opts() -> PgOptions {
        PgOptions {
            fsync: false,
            ..PgOptions::default()
        }
    }

    fn connect(url: &str) -> Result<Client, postgres::Error> {
        let mut config: postgres::Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        config.connect(NoTls)
    }

    #[test]
    fn temp_cluster_connects_stops_restarts_and_is_removed() {
        let started = Instant::now();
        let mut pg = PgCluster::start_temp(test_opts()).expect("start_temp");
        eprintln!("start_temp took {:?}", started.elapsed());
        assert!(pg.is_running());
        let url = pg.url();
        let port = pg.port();
        assert!(url.contains(&format!(":{port}/")), "{url}");

        let mut client = connect(&url).expect("connect");
        let one: i32 = client.query_one("SELECT 1", &[]).unwrap().get(0);
        assert_eq!(one, 1);
        let fsync: String = client.query_one("SHOW fsync", &[]).unwrap().get(0);
        assert_eq!(fsync, "off");
        drop(client);

        pg.stop().expect("stop");
        assert!(!pg.is_running());
        assert!(connect(&url).is_err(), "connect after stop must fail");
        pg.stop().expect("second stop is a no-op");

        pg.start().expect("start again");
        assert_eq!(pg.port(), port, "restart keeps the port");
        assert!(pg.is_running());
        let mut client = connect(&url).expect("connect after restart");
        client.batch_execute("SELECT 1").unwrap();
        drop(client);

        let root = pg.root_dir().to_path_buf();
        assert!(pg.data_dir().join("PG_VERSION").exists());
        drop(pg);
        assert!(!root.exists(), "temp dir {} left behind", root.display());
        assert!(connect(&url).is_err(), "server still up after drop");
    }

    #[test]
    fn temp_clusters_in_parallel() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let started = Instant::now();
                    let pg = PgCluster::start_temp(PgOptions {
                        fsync: false,
                        max_connections: 300,
                        port: None,
                    })
                    .expect("start_temp");
                    let took = started.elapsed();
                    let mut client = connect(&pg.url()).expect("connect");
                    let max: String = client
                        .query_one("SHOW max_connections", &[])
                        .unwrap()
                        .get(0);
                    assert_eq!(max, "300");
                    (pg.port(), took)
                })
            })
            .collect();
        let mut ports = Vec::new();
        for h in handles {
            let (port, took) = h.join().unwrap();
            eprintln!("parallel start_temp took {took:?}");
            ports.push(port);
        }
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 4, "each cluster has its own port");
    }

    #[test]
    fn later_temp_clusters_copy_the_template() {
        // The first start_temp of the process may pay for initdb; the
        // following ones only copy the template.
        for i in 0..3 {
            let started = Instant::now();
            let pg = PgCluster::start_temp(test_opts()).expect("start_temp");
            eprintln!("sequential start_temp #{i} took {:?}", started.elapsed());
            connect(&pg.url()).expect("connect");
        }
    }

    #[test]
    fn start_in_reuses_the_data() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("tether-data");
        {
            let started = Instant::now();
            let mut pg = PgCluster::start_in(&dir, test_opts()).expect("start_in (initdb)");
            eprintln!("start_in with initdb took {:?}", started.elapsed());
            let mut client = connect(&pg.url()).unwrap();
            client
                .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
                .unwrap();
            drop(client);
            pg.stop().unwrap();
        }
        {
            let pg = PgCluster::start_in(&dir, test_opts()).expect("start_in (reuse)");
            let mut client = connect(&pg.url()).unwrap();
            let v: i32 = client.query_one("SELECT v FROM kept", &[]).unwrap().get(0);
            assert_eq!(v, 42);
            // Dropped while running: stopped, data kept.
        }
        assert!(dir.join("pgdata").join("PG_VERSION").exists());
        let pg = PgCluster::start_in(&dir, test_opts()).expect("start_in (third)");
        let mut client = connect(&pg.url()).unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM kept", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }

    #[test]
    fn fixed_port_is_used() {
        let port = free_port().unwrap();
        let pg = PgCluster::start_temp(PgOptions {
            fsync: false,
            max_connections: 20,
            port: Some(port),
        })
        .expect("start_temp on a given port");
        assert_eq!(pg.port(), port);
        connect(&pg.url()).expect("connect");
    }

    #[test]
    fn taken_fixed_port_is_reported() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = PgCluster::start_temp(PgOptions {
            fsync: false,
            max_connections: 20,
            port: Some(port),
        })
        .expect_err("the port is taken");
        assert!(matches!(err, PgError::PortInUse { .. }), "{err}");
    }

    #[test]
    fn finds_binaries() {
        let initdb = find_pg_bin("initdb").expect("initdb");
        assert!(is_executable(&initdb));
        // Debian's layout, without PATH.
        if Path::new("/usr/lib/postgresql").exists() {
            let p = find_pg_bin_in("pg_ctl", None, Path::new("/usr/lib/postgresql")).unwrap();
            assert!(p.starts_with("/usr/lib/postgresql"));
        }
        let err = find_pg_bin("no-such-pg-binary").unwrap_err();
        assert!(matches!(err, PgError::BinaryNotFound { .. }));
        assert!(err.to_string().contains("no-such-pg-binary"));
    }

    #[test]
    fn stale_temp_dirs_are_swept() {
        let base = tempfile::tempdir().unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = base.path().join(format!("tether-pg-{dead}-abc"));
        let stale_template = base.path().join(format!("tether-pg-template-{dead}-abc"));
        let live = base
            .path()
            .join(format!("tether-pg-{}-abc", std::process::id()));
        let other = base.path().join("unrelated-1-abc");
        for d in [&stale, &stale_template, &live, &other] {
            fs::create_dir_all(d.join("pgdata")).unwrap();
        }
        sweep_stale_temp_dirs(base.path());
        assert!(!stale.exists() && !stale_template.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn unreachable_dir_is_reported_when_root() {
        if !geteuid().is_root() {
            return;
        }
        let parent = tempfile::tempdir().unwrap();
        fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let err = PgCluster::start_in(&parent.path().join("a").join("b"), test_opts())
            .expect_err("postgres cannot enter a root-only 0700 dir");
        assert!(matches!(err, PgError::NotReachable { .. }), "{err}");
    }

    #[test]
    fn helpers() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 2), "");
    }
}
