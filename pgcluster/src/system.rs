//! Finding the server binaries and running them: as the `postgres` system
//! user when we are root (initdb and postgres refuse root), in directories
//! that user owns and can reach.

use super::*;

impl PgBins {
    pub(crate) fn find() -> Result<PgBins, PgError> {
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

pub(crate) fn find_pg_bin_in(
    name: &str,
    path: Option<OsString>,
    lib: &Path,
) -> Result<PathBuf, PgError> {
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

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `Some(postgres user)` when we are root, `None` when we run as ourselves.
pub(crate) fn run_as() -> Result<Option<RunAs>, PgError> {
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
pub(crate) fn prepare_dir(dir: &Path, run_as: Option<RunAs>) -> Result<(), PgError> {
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
pub(crate) fn check_reachable(dir: &Path, run_as: Option<RunAs>) -> Result<(), PgError> {
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

pub(crate) fn command(program: &Path, cwd: &Path, run_as: Option<RunAs>) -> Command {
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
pub(crate) fn run(mut cmd: Command, binary: &Path, dir: &Path) -> Result<(), PgError> {
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
pub(crate) fn initdb(
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
