//! The servers under test: either given (`--url`), or started by the bench
//! (`--spawn`): a PostgreSQL (`--database-url`, else a private one), then
//! the supervisor `tether` (`--supervisor`) or N standalone `tether-worker`
//! processes on consecutive ports sharing the database (each has its own
//! LISTEN connection, so fan-out crosses processes as it would across
//! hosts).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The load tool measures throughput, not the per-user and per-address
/// limits, which would refuse its senders and its thousands of connections
/// from a few loopback addresses: spawned servers run without the send and
/// membership rate limits and the per-address connection limit (a
/// `--worker-arg` given after these wins).
const UNLIMITED_RATES: [&str; 6] = [
    "--rate-limit",
    "0",
    "--membership-rate",
    "0",
    "--max-connections-per-ip",
    "0",
];

use tether_client::Rest;
use tether_pgcluster::{PgCluster, PgOptions};

pub struct SpawnOptions {
    pub tether_bin: Option<PathBuf>,
    pub database_url: Option<String>,
    pub secret: String,
    pub workers: usize,
    pub supervisor: bool,
    /// Durable PostgreSQL (fsync and synchronous_commit on, on disk).
    pub durable: bool,
    pub worker_args: Vec<String>,
}

pub struct ServerProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub worker_id: String,
    args: Vec<String>,
    bin: PathBuf,
    log: PathBuf,
}

/// What the bench started; everything is killed on drop.
pub struct Cluster {
    pub procs: Vec<ServerProc>,
    pub supervisor: bool,
    _pg: Option<PgCluster>,
    _logs: tempfile_dir::Dir,
}

/// A temp directory for the server logs (kept with `TETHER_BENCH_KEEP_LOGS`).
mod tempfile_dir {
    use std::path::{Path, PathBuf};
    pub struct Dir(pub PathBuf, bool);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&p);
            Dir(p, std::env::var_os("TETHER_BENCH_KEEP_LOGS").is_some())
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_dir_all(&self.0);
            } else {
                eprintln!("server logs kept in {}", self.0.display());
            }
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// `dir/name`, or next to this executable, or on PATH.
fn find_bin(dir: Option<&Path>, name: &str) -> PathBuf {
    if let Some(d) = dir {
        return d.join(name);
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = d.join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

impl Cluster {
    /// Starts everything (blocking: call before entering the runtime).
    pub fn spawn(o: &SpawnOptions) -> Result<Cluster, String> {
        let (pg, db_url) = match &o.database_url {
            Some(u) => (None, u.clone()),
            None => {
                if o.durable && std::env::var_os("TETHER_PG_TMPDIR").is_none() {
                    // /dev/shm would make fsync meaningless.
                    std::env::set_var("TETHER_PG_TMPDIR", "/var/tmp");
                }
                let pg = PgCluster::start_temp(PgOptions {
                    fsync: o.durable,
                    max_connections: 400,
                    port: None,
                })
                .map_err(|e| format!("starting PostgreSQL: {e}"))?;
                let url = pg.url();
                (Some(pg), url)
            }
        };
        let mut c = db_url
            .parse::<postgres::Config>()
            .map_err(|e| e.to_string())?
            .connect(postgres::NoTls)
            .map_err(|e| format!("connecting to {db_url}: {e}"))?;
        tether_worker::store::apply_schema(&mut c)
            .map_err(|e| format!("applying the schema: {e}"))?;
        drop(c);
        let dir = o.tether_bin.as_ref().and_then(|p| {
            if p.is_dir() {
                Some(p.clone())
            } else {
                p.parent().map(Path::to_path_buf)
            }
        });
        let logs = tempfile_dir::Dir::new();
        let mut procs = Vec::new();
        if o.supervisor {
            let bin = match &o.tether_bin {
                Some(p) if p.is_file() => p.clone(),
                _ => find_bin(dir.as_deref(), "tether"),
            };
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let mut args = vec![
                "--listen".to_string(),
                addr.to_string(),
                "--workers".into(),
                o.workers.to_string(),
                "--database-url".into(),
                db_url.clone(),
                "--secret".into(),
                o.secret.clone(),
            ];
            args.extend(UNLIMITED_RATES.iter().map(|a| a.to_string()));
            args.extend(o.worker_args.iter().cloned());
            procs.push(ServerProc::start(
                bin,
                args,
                addr,
                "tether".into(),
                logs.path(),
            )?);
        } else {
            let bin = find_bin(dir.as_deref(), "tether-worker");
            for i in 0..o.workers {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
                let id = format!("w{}", i + 1);
                let mut args = vec![
                    "--listen".to_string(),
                    addr.to_string(),
                    "--database-url".into(),
                    db_url.clone(),
                    "--secret".into(),
                    o.secret.clone(),
                    "--worker-id".into(),
                    id.clone(),
                ];
                args.extend(UNLIMITED_RATES.iter().map(|a| a.to_string()));
                args.extend(o.worker_args.iter().cloned());
                procs.push(ServerProc::start(bin.clone(), args, addr, id, logs.path())?);
            }
        }
        for p in &mut procs {
            p.wait_ready_blocking(Duration::from_secs(60))?;
        }
        Ok(Cluster {
            procs,
            supervisor: o.supervisor,
            _pg: pg,
            _logs: logs,
        })
    }

    pub fn urls(&self) -> Vec<String> {
        self.procs
            .iter()
            .map(|p| format!("http://{}", p.addr))
            .collect()
    }

    /// The private PostgreSQL's processes (the postmaster and its
    /// children), if the bench started one.
    pub fn pg_pids(&self) -> Vec<i32> {
        let Some(pg) = &self._pg else {
            return Vec::new();
        };
        let pid = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        match pid {
            Some(p) => {
                let mut v = vec![p];
                v.extend(children_of(p));
                v
            }
            None => Vec::new(),
        }
    }

    /// The server's processes: the supervisor and its children, or the
    /// standalone workers.
    pub fn server_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for p in &self.procs {
            let pid = p.child.id() as i32;
            pids.push(pid);
            if self.supervisor {
                pids.extend(children_of(pid));
            }
        }
        pids
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
    }
}

impl ServerProc {
    fn start(
        bin: PathBuf,
        args: Vec<String>,
        addr: SocketAddr,
        worker_id: String,
        log_dir: &Path,
    ) -> Result<ServerProc, String> {
        let log = log_dir.join(format!("{worker_id}-{}.log", addr.port()));
        let child = spawn(&bin, &args, &log)?;
        Ok(ServerProc {
            child,
            addr,
            worker_id,
            args,
            bin,
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn wait_ready_blocking(&mut self, timeout: Duration) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(self.wait_ready(timeout))
    }

    /// Polls `/ready` every 2 ms until 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let rest = Rest::new(&format!("http://{}", self.addr), "");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = rest.get("/ready").await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}); log:\n{}",
                    self.bin.display(),
                    tail(&self.log)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} not ready in {timeout:?}", self.addr));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same command again (same port).
    pub fn restart(&mut self) -> Result<(), String> {
        self.child = spawn(&self.bin, &self.args, &self.log)?;
        Ok(())
    }

    fn stop(&mut self) {
        // SIGTERM first (the supervisor drains its workers), then SIGKILL.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for c in children_of(self.pid()) {
            unsafe {
                libc::kill(c, libc::SIGKILL);
            }
        }
        self.kill();
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("TETHER_SECRET")
        .env_remove("TETHER_LISTEN")
        .env_remove("TETHER_WORKERS")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    cmd.spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Child processes of `pid` (scanning /proc for PPid).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces; split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// VmRSS of `pid` in KiB (0 if gone).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The `TETHER_WORKER_ID` in a process's environment (supervised workers).
pub fn worker_id_of(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let s = std::str::from_utf8(kv).ok()?;
        s.strip_prefix("TETHER_WORKER_ID=").map(str::to_string)
    })
}
