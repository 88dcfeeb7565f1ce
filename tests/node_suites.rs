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
//! runs first when a suite's `node_modules` is missing.
//!
//! Without `node` (or, for the browser, without Chromium) a suite cannot
//! run: plain `cargo test` then passes it, printing to stderr what was
//! skipped and what to install (`SKIPPED js_sdk_suite: node not installed
//! (apt-get install nodejs npm)`), so that the Rust tests pass on a machine
//! without them. With `TETHER_REQUIRE_ALL=1` (which `.ci/run` sets: CI
//! installs both) a missing tool fails the test instead, so a skip never
//! hides a gap there.
//!
//! The two run one at a time (each starts PostgreSQL, a cluster and, for
//! the page tests, a browser), and each is stopped after `SUITE_TIMEOUT`:
//! SIGTERM to the node processes (their exit handlers stop what they
//! started), SIGKILL a few seconds later.

use std::fs::File;
use std::io::Write;
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

/// Set to `1`, a suite whose tools are missing fails instead of skipping.
const REQUIRE_ALL: &str = "TETHER_REQUIRE_ALL";

/// Why a suite cannot run here: what is missing and how to install it.
#[derive(Debug)]
struct Missing {
    what: String,
    install: &'static str,
}

/// Whether a missing tool must fail the test (`TETHER_REQUIRE_ALL=1`).
fn require_all() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1")
}

/// Unwraps what a suite needs; when it is missing, fails under
/// `TETHER_REQUIRE_ALL=1` and otherwise prints the skip to stderr and
/// returns `None` (the test then passes without running the suite).
fn needed<T>(test: &str, found: Result<T, Missing>) -> Option<T> {
    match found {
        Ok(t) => Some(t),
        Err(m) if require_all() => panic!(
            "{test}: {} ({}; {REQUIRE_ALL}=1 makes this a failure; .ci/run installs it)",
            m.what, m.install
        ),
        Err(m) => {
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of a passing test, and this line must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {} ({})",
                m.what,
                m.install
            );
            None
        }
    }
}

/// `node --version`, or what is missing. A `node` that is there but fails
/// is a failure, not a skip.
fn find_node() -> Result<String, Missing> {
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => panic!(
            "`node --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Missing {
            what: "node not installed".to_string(),
            install: "apt-get install nodejs npm",
        }),
        Err(e) => panic!("`node --version` could not run: {e}"),
    }
}

/// The Chromium the browser test drives (`CHROMIUM`, default
/// /usr/bin/chromium), or what is missing.
fn find_chromium() -> Result<PathBuf, Missing> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Missing {
            what: format!("{} not installed", path.display()),
            install: "apt-get install chromium, or CHROMIUM=/path/to/chromium",
        })
    }
}

/// Whether the suite in `dir` can get its packages: they are there, or
/// `npm` is there to install them.
fn find_npm(dir: &Path) -> Result<(), Missing> {
    if dir.join("node_modules").is_dir() {
        return Ok(());
    }
    match Command::new("npm").arg("--version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Missing {
            what: format!("npm not installed (for `npm ci` in {})", dir.display()),
            install: "apt-get install npm",
        }),
        _ => Ok(()),
    }
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

/// Runs `node --test TESTS` for the test `test`, after `npm ci` in
/// `package` if needed (skipped, or failed, like a missing node without npm).
fn node_suite(test: &str, name: &str, package: &str, tests: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo();
    if needed(test, find_npm(&root.join(package))).is_none() {
        return;
    }
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
    let Some(version) = needed("js_sdk_suite", find_node()) else {
        return;
    };
    println!("node {version}");
    node_suite(
        "js_sdk_suite",
        "the JS SDK",
        "clients/js",
        "clients/js/test/",
    );
}

#[test]
fn browser_demo() {
    let Some(version) = needed("browser_demo", find_node()) else {
        return;
    };
    let Some(chromium) = needed("browser_demo", find_chromium()) else {
        return;
    };
    println!("node {version}, {}", chromium.display());
    node_suite(
        "browser_demo",
        "the demo page in Chromium",
        "tests/browser",
        "tests/browser/",
    );
}
