//! nginx + Nchan as the peer under test: a private nginx (2 workers,
//! in-memory channels) with a config written here, in a temp directory of
//! its own, on a free port. It runs as a non-daemon child and is killed
//! (with its workers) on drop, so nothing outlives the run.

use crate::cluster::children_of;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `nginx-light` and `libnginx-mod-nchan` put things.
pub const DEFAULT_NGINX: &str = "/usr/sbin/nginx";
pub const DEFAULT_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

pub struct NchanOptions {
    pub nginx: PathBuf,
    pub module: PathBuf,
    pub workers: usize,
}

pub struct Nchan {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

/// The config: subscribers over WebSocket at `/sub?id=ROOM`, publishers
/// over HTTP POST at `/pub?id=ROOM`. Channels live in shared memory only.
/// Descriptors: at most 20,000 per process (this machine's limit).
fn config(dir: &Path, port: u16, o: &NchanOptions) -> String {
    let d = dir.display();
    format!(
        "load_module {module};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 19000;
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256m;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /sub {{
            nchan_subscriber websocket;
            nchan_channel_id $arg_id;
        }}
        location = /pub {{
            nchan_publisher http;
            nchan_channel_id $arg_id;
            nchan_message_buffer_length 100;
            nchan_message_timeout 60s;
        }}
    }}
}}
",
        module = o.module.display(),
        workers = o.workers,
    )
}

impl Nchan {
    /// Writes the config, starts nginx and waits until it answers.
    pub fn start(o: &NchanOptions) -> Result<Nchan, String> {
        if !o.nginx.exists() || !o.module.exists() {
            return Err(format!(
                "{} or {} missing: apt-get install nginx-light libnginx-mod-nchan",
                o.nginx.display(),
                o.module.display()
            ));
        }
        let dir = std::env::temp_dir().join(format!("tether-bench-nchan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = crate::cluster::free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&dir, port, o)).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&o.nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", o.nginx.display()))?;
        let mut n = Nchan { child, port, dir };
        n.wait_ready(Duration::from_secs(20))?;
        Ok(n)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let workers = children_of(self.pid()).len();
            if workers > 0 && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
                    + &std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                return Err(format!("nginx exited ({status}):\n{log}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx not listening on {} in {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<i32> {
        let mut v = vec![self.pid()];
        v.extend(children_of(self.pid()));
        v
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self, room: &str) -> String {
        format!("ws://127.0.0.1:{}/sub?id={room}", self.port)
    }
}

impl Drop for Nchan {
    fn drop(&mut self) {
        // SIGQUIT would wait for the subscribers; the run is over.
        let workers = children_of(self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            unsafe {
                libc::kill(w, libc::SIGKILL);
            }
        }
        if std::env::var_os("TETHER_BENCH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("nginx files kept in {}", self.dir.display());
        }
    }
}
