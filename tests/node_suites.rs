//! The Node test suites, run by `cargo test` so that `cargo test --workspace
//! --all-features` (and so `.ci/run`) covers them:
//!
//! - `js_sdk_suite`: `node --test clients/js/test/` (the JavaScript SDK
//!   against the real cluster);
//! - `browser_demo`: `node --test tests/browser/` (the demo page in headless
//!   Chromium: two users chat while the worker serving one is SIGKILLed).
//!
//! Both start the binaries cargo built for this package; their paths go to
//! node as `TETHER_BIN`, `TETHER_WORKER_BIN` and `TETHER_BIN_DIR`. `npm ci`
//! runs first when a suite's `node_modules` is missing. A missing `node` (or,
//! for the browser, a missing Chromium) fails the test with a message saying
//! what to install: CI installs them, so a silent skip would hide a gap.
//!
//! The two run one at a time (each starts PostgreSQL, a cluster and, for
//! the page tests, a browser), and each is stopped after `SUITE_TIMEOUT`:
//! SIGTERM to the node processes (their exit handlers stop what they
//! started), SIGKILL a few seconds later.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SUITE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// One node suite at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dir.canonicalize().unwrap_or(dir)
}

/// `node --version`, or a failed test saying what to install.
fn require_node() -> String {
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => panic!(
            "`node --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "node is not installed ({e}): the node suites need Node.js 18+ and npm \
             (`apt-get install -y nodejs npm`; .ci/run installs them)"
        ),
    }
}

/// The Chromium the browser test drives (`CHROMIUM`, default
/// /usr/bin/chromium), or a failed test saying what to install.
fn require_chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "{} is missing: the browser test needs Debian's chromium \
         (`apt-get install -y chromium`; .ci/run installs it) or CHROMIUM=/path/to/chromium",
        path.display()
    );
    path
}

/// The environment every suite gets: the binaries this package built.
fn tether_env(cmd: &mut Command) -> &mut Command {
    let tether = Path::new(env!("CARGO_BIN_EXE_tether"));
    cmd.env("TETHER_BIN", tether)
        .env("TETHER_WORKER_BIN", env!("CARGO_BIN_EXE_tether-worker"))
        .env(
            "TETHER_BIN_DIR",
            tether.parent().expect("the binary has a directory"),
        )
}

/// Runs `cmd` in `dir` in a process group of its own, with a deadline;
/// asserts exit 0 and shows the output (always: cargo prints it for a failed
/// test, and for every test with --nocapture).
fn run(what: &str, cmd: &mut Command, timeout: Duration) {
    let logs = tempfile::tempdir().expect("a temporary directory");
    let out_path = logs.path().join("out");
    let out = File::create(&out_path).expect("an output file");
    let err = out.try_clone().expect("the output file again");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: could not start: {e}"));
    let pgid = child.id() as libc::pid_t;
    let mut timed_out = false;
    let mut term_sent: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the suite") {
            break status;
        }
        if started.elapsed() > timeout {
            timed_out = true;
            match term_sent {
                None => {
                    // SAFETY: signalling our own child's process group.
                    unsafe { libc::kill(-pgid, libc::SIGTERM) };
                    term_sent = Some(Instant::now());
                }
                Some(at) if at.elapsed() > Duration::from_secs(10) => {
                    // SAFETY: as above.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    println!(
        "--- {what} ({:.1} s, {status}) ---\n{output}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        !timed_out,
        "{what}: still running after {timeout:?} (stopped); its output is above"
    );
    assert!(status.success(), "{what}: {status}; its output is above");
}

/// `npm ci` in `dir` unless its node_modules is there already.
fn npm_ci_if_missing(dir: &Path) {
    if dir.join("node_modules").is_dir() {
        return;
    }
    let mut cmd = Command::new("npm");
    cmd.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
    run(
        &format!("npm ci in {}", dir.display()),
        &mut cmd,
        Duration::from_secs(600),
    );
}

fn node_suite(name: &str, package: &str, tests: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo();
    npm_ci_if_missing(&root.join(package));
    let mut cmd = Command::new("node");
    cmd.args(["--test", tests]).current_dir(&root);
    tether_env(&mut cmd);
    run(
        &format!("{name}: node --test {tests}"),
        &mut cmd,
        SUITE_TIMEOUT,
    );
}

#[test]
fn js_sdk_suite() {
    let version = require_node();
    println!("node {version}");
    node_suite("the JS SDK", "clients/js", "clients/js/test/");
}

#[test]
fn browser_demo() {
    let version = require_node();
    let chromium = require_chromium();
    println!("node {version}, {}", chromium.display());
    node_suite(
        "the demo page in Chromium",
        "tests/browser",
        "tests/browser/",
    );
}
