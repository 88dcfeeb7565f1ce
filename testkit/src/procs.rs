//! The real binaries as child processes: [`Proc`] (a process group, its
//! log, signals, waits), [`WorkerProc`] (`tether-worker` on its own) and
//! [`ClusterProc`] (`tether` with its workers).

use super::*;

/// A child process, SIGKILLed (with its process group) and reaped on drop.
/// Its stdout and stderr go to a log file; dropped while the test panics,
/// it prints the log's tail to stderr.
pub struct Proc {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    log_dir: Option<tempfile::TempDir>,
}

/// Lines of a process log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

impl Proc {
    /// Spawns `cmd` in its own process group (so dropping it also kills
    /// the processes it started), output to a log file.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let log_dir = tempfile::Builder::new()
            .prefix("tether-test-log-")
            .tempdir()
            .expect("creating a log dir");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("creating the log file");
        let log2 = log.try_clone().expect("dup of the log file");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        let keep = std::env::var_os("TETHER_TEST_KEEP_LOGS").is_some();
        let log_dir = if keep {
            eprintln!("{name} (pid {}) logs to {}", child.id(), log_path.display());
            let _ = log_dir.keep();
            None
        } else {
            Some(log_dir)
        };
        Proc {
            child,
            name: name.to_string(),
            status: None,
            log_path,
            log_dir,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the process; false if that
    /// failed (e.g. it is gone).
    pub fn signal(&self, sig: i32) -> bool {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), sig) == 0 }
    }

    /// Sends `sig` to the process's whole process group.
    pub fn signal_group(&self, sig: i32) -> bool {
        // SAFETY: as above.
        unsafe { libc::kill(-self.pid(), sig) == 0 }
    }

    /// The exit status if it has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_alive(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, Duration::from_millis(10), || {
            self.try_status().is_some()
        });
        self.status
    }

    /// [`Proc::wait_exit`] without blocking the runtime.
    pub async fn wait_exit_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs the process group and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        if self.status.is_none() {
            self.signal_group(libc::SIGKILL);
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait"));
        }
        self.status.unwrap()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_contents();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(20), || {
            self.log_contents().contains(needle)
        })
    }

    fn dump_log(&self) {
        eprintln!(
            "----- last {LOG_TAIL_LINES} lines of {} (pid {}, {}) -----\n{}\n----- end of {} -----",
            self.name,
            self.pid(),
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES),
            self.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        // The group too: a supervisor's workers must not outlive the test,
        // even when the supervisor itself has already exited.
        self.signal_group(libc::SIGKILL);
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        drop(self.log_dir.take());
    }
}

/// Environment variables of the test process that must not leak into the
/// processes under test.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("TETHER_")
                || matches!(
                    k,
                    "DATABASE_URL"
                        | "NOTIFY_SOCKET"
                        | "LISTEN_FDS"
                        | "LISTEN_PID"
                        | "LISTEN_FDNAMES"
                        | "WATCHDOG_USEC"
                        | "WATCHDOG_PID"
                )
            {
                cmd.env_remove(&key);
            }
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
}

/// Spawns what `make(port)` builds on a free port and waits for `/ready`
/// 200; retries with another port if the process died because the port
/// was taken meanwhile. Panics (printing the log) if it never gets ready.
fn spawn_ready(
    name: &str,
    wait: bool,
    mut make: impl FnMut(u16) -> (Command, SocketAddr),
) -> (Proc, SocketAddr) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (cmd, addr) = make(free_port());
        let mut proc = Proc::spawn(name, cmd);
        if !wait {
            return (proc, addr);
        }
        match wait_ready(&mut proc, addr, READY_TIMEOUT) {
            Ok(()) => return (proc, addr),
            Err(why) => {
                let log = proc.log_contents();
                if attempt < 3 && log.contains("in use") && !proc.is_alive() {
                    continue;
                }
                panic!("{name} at {addr} did not get ready: {why}");
            }
        }
    }
}

/// Polls `GET /ready` until it answers 200.
fn wait_ready(proc: &mut Proc, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(status) = proc.try_status() {
            return Err(format!("it exited ({status}); last: {last}"));
        }
        match http_blocking(addr, "GET", "/ready", None, None) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("{} {}", r.status, r.body),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?}; last: {last}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Sets `env` on a command.
fn add_env(cmd: &mut Command, env: &[(&str, &str)]) {
    for (k, v) in env {
        cmd.env(k, v);
    }
}

static WORKER_SEQ: AtomicU32 = AtomicU32::new(1);

// ---------------------------------------------------------------------------
// WorkerProc

/// A `tether-worker` started on its own (no supervisor), listening on a
/// free port of 127.0.0.1.
pub struct WorkerProc {
    pub proc: Proc,
    addr: SocketAddr,
    worker_id: String,
}

impl WorkerProc {
    /// `tether-worker --listen 127.0.0.1:PORT --database-url URL --secret S
    /// --worker-id wN EXTRA...` with `env`; returns once `/ready` is 200.
    pub fn spawn(
        db_url: &str,
        secret: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProc {
        Self::spawn_inner(db_url, secret, extra_args, env, true)
    }

    /// Like [`WorkerProc::spawn`] but does not wait for readiness (e.g. the
    /// database is down on purpose).
    pub fn spawn_no_wait(
        db_url: &str,
        secret: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProc {
        Self::spawn_inner(db_url, secret, extra_args, env, false)
    }

    fn spawn_inner(
        db_url: &str,
        secret: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        wait: bool,
    ) -> WorkerProc {
        let worker_id = format!("w{}", WORKER_SEQ.fetch_add(1, Ordering::Relaxed));
        let (proc, addr) = spawn_ready(&format!("tether-worker-{worker_id}"), wait, |port| {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut cmd = Command::new(bin("tether-worker"));
            scrub_env(&mut cmd);
            cmd.arg("--listen")
                .arg(addr.to_string())
                .arg("--database-url")
                .arg(db_url)
                .arg("--secret")
                .arg(secret)
                .arg("--worker-id")
                .arg(&worker_id)
                .args(extra_args);
            add_env(&mut cmd, UNLIMITED_RATES);
            add_env(&mut cmd, env);
            (cmd, addr)
        });
        WorkerProc {
            proc,
            addr,
            worker_id,
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Waits (again) until `/ready` answers 200, e.g. after the database
    /// came back.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        wait_ready(&mut self.proc, self.addr, timeout)
    }
}

impl std::ops::Deref for WorkerProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for WorkerProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

// ---------------------------------------------------------------------------
// ClusterProc

/// The supervisor `tether` with its workers.
pub struct ClusterProc {
    pub proc: Proc,
    addr: SocketAddr,
}

impl ClusterProc {
    /// `tether ARGS...` with `env`; if `args` has no `--listen`, the harness
    /// adds `--listen 127.0.0.1:PORT` with a free port. Returns once
    /// `/ready` is 200.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> ClusterProc {
        Self::spawn_inner(args, env, true)
    }

    /// Like [`ClusterProc::spawn`] but does not wait for readiness.
    pub fn spawn_no_wait(args: &[&str], env: &[(&str, &str)]) -> ClusterProc {
        Self::spawn_inner(args, env, false)
    }

    /// The usual start: `--database-url URL --secret S --workers N EXTRA...`.
    pub fn spawn_with(
        db_url: &str,
        secret: &str,
        workers: u32,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ClusterProc {
        let workers = workers.to_string();
        let mut args = vec![
            "--database-url",
            db_url,
            "--secret",
            secret,
            "--workers",
            &workers,
        ];
        args.extend_from_slice(extra_args);
        Self::spawn(&args, env)
    }

    fn spawn_inner(args: &[&str], env: &[(&str, &str)], wait: bool) -> ClusterProc {
        let given = listen_arg(args);
        let (proc, addr) = spawn_ready("tether", wait, |port| {
            let mut cmd = Command::new(bin("tether"));
            scrub_env(&mut cmd);
            let addr = match given {
                Some(addr) => addr,
                None => {
                    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    cmd.arg("--listen").arg(addr.to_string());
                    addr
                }
            };
            cmd.args(args);
            add_env(&mut cmd, UNLIMITED_RATES);
            add_env(&mut cmd, env);
            (cmd, addr)
        });
        ClusterProc { proc, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Waits (again) until `/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        wait_ready(&mut self.proc, self.addr, timeout)
    }
}

impl std::ops::Deref for ClusterProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for ClusterProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// The address of a `--listen ADDR` / `--listen=ADDR` in `args`.
fn listen_arg(args: &[&str]) -> Option<SocketAddr> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if *a == "--listen" {
            it.next().copied()
        } else {
            a.strip_prefix("--listen=")
        };
        if let Some(v) = value {
            return Some(v.parse().unwrap_or_else(|e| panic!("--listen {v:?}: {e}")));
        }
    }
    None
}
