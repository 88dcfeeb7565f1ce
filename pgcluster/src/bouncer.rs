//! PgBouncer in front of a cluster, for tests of tether behind a pooler:
//! Debian's `pgbouncer`, run (as the `postgres` user when we are root)
//! with a configuration written next to the cluster, listening on a free
//! port of 127.0.0.1. Stopped (SIGTERM, then SIGKILL) on drop.

use super::*;
use std::process::Child;

/// A running PgBouncer this process owns.
#[derive(Debug)]
pub struct PgBouncer {
    child: Child,
    port: u16,
    log_file: PathBuf,
}

impl PgCluster {
    /// Starts PgBouncer in front of this cluster with `pool_mode`
    /// (`transaction`, `session`) and `pool_size` server connections per
    /// (database, user), and waits until it accepts connections.
    pub fn start_pgbouncer(&self, pool_mode: &str, pool_size: u32) -> Result<PgBouncer, PgError> {
        let binary = which("pgbouncer").ok_or_else(|| PgError::BinaryNotFound {
            name: "pgbouncer".into(),
        })?;
        let port = free_port()?;
        let dir = self.root.join(format!("pgbouncer-{port}"));
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| PgError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        prepare_dir(&dir, self.run_as)?;
        let users = dir.join("userlist.txt");
        fs::write(&users, format!("\"{PG_USER}\" \"\"\n")).map_err(io("writing", &users))?;
        let log_file = dir.join("pgbouncer.log");
        let config = dir.join("pgbouncer.ini");
        // No unix socket (unix_socket_dir empty): TCP on 127.0.0.1 only.
        let text = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={pg}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 2000\n\
             logfile = {log}\n\
             admin_users = {PG_USER}\n",
            pg = self.port,
            users = users.display(),
            log = log_file.display(),
        );
        fs::write(&config, text).map_err(io("writing", &config))?;
        if let Some(r) = self.run_as {
            for f in [&users, &config] {
                chown(f.as_path(), Some(r.uid), Some(r.gid)).map_err(|e| PgError::Io {
                    action: "changing the owner of",
                    path: f.to_path_buf(),
                    source: e.into(),
                })?;
            }
        }
        let mut cmd = command(&binary, &dir, self.run_as);
        cmd.arg(&config).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().map_err(|source| PgError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        let mut bouncer = PgBouncer {
            child,
            port,
            log_file,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(bouncer);
            }
            if let Ok(Some(status)) = bouncer.child.try_wait() {
                return Err(PgError::StartFailed {
                    dir,
                    port,
                    reason: format!("pgbouncer exited: {status}"),
                    log_tail: file_tail(&bouncer.log_file, 0, 20),
                });
            }
            if Instant::now() > deadline {
                return Err(PgError::StartFailed {
                    dir,
                    port,
                    reason: "pgbouncer did not listen within 10 s".into(),
                    log_tail: file_tail(&bouncer.log_file, 0, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl PgBouncer {
    /// `postgres://postgres@127.0.0.1:PORT/postgres`, through the pooler.
    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last `lines` lines of PgBouncer's log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_file, 0, lines)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` on `PATH`, or in /usr/sbin (where Debian puts pgbouncer, and
/// which a non-root PATH may lack).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}
