//! Where throwaway clusters live: a per-process template made by one
//! `initdb` (copied per cluster), temp dirs on `/dev/shm` when it has room,
//! and the sweep of what killed predecessors left behind.

use super::*;

/// The template data directory, created once per process: `ROOT/pgdata`
/// of a temp dir that is removed at exit.
pub(crate) fn template(bins: &PgBins, run_as: Option<RunAs>) -> Result<PathBuf, PgError> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| make_template(bins, run_as).map_err(|e| e.to_string()))
        .clone()
        .map_err(PgError::Template)
}

/// The template's root, removed by an `atexit` handler.
pub(crate) static TEMPLATE_ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_template() {
    if let Ok(mut root) = TEMPLATE_ROOT.lock() {
        if let Some(root) = root.take() {
            let _ = fs::remove_dir_all(root);
        }
    }
}

pub(crate) fn make_template(bins: &PgBins, run_as: Option<RunAs>) -> Result<PathBuf, PgError> {
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
pub(crate) fn temp_base() -> PathBuf {
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
pub(crate) const SHM_MIN_FREE: u64 = 2 << 30;

/// A fresh `BASE/{prefix}-{our pid}-XXXXXX` (the pid lets a later process
/// clean up after one that was killed).
pub(crate) fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, PgError> {
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
pub(crate) fn sweep_stale_temp_dirs(base: &Path) {
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
