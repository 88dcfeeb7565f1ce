//! Streaming replication, for tests of failover and replicas: a standby
//! of a running cluster (`pg_basebackup -R`, so it follows the primary),
//! its promotion, and a crash of a server (SIGKILL of the postmaster).

use super::*;

impl PgCluster {
    /// A hot standby of this running cluster in a fresh temp dir, on a
    /// free port, connected as `application_name` (the name
    /// `synchronous_standby_names` refers to). Removed on drop.
    pub fn start_standby(&self, application_name: &str) -> Result<PgCluster, PgError> {
        let tmp = temp_dir("tether-pg-standby")?;
        let root = tmp.path().to_path_buf();
        prepare_dir(&root, self.run_as)?;
        check_reachable(&root, self.run_as)?;
        let opts = PgOptions {
            port: None,
            ..self.opts.clone()
        };
        let mut standby = PgCluster::new(self.bins.clone(), self.run_as, opts, root);
        standby.temp = Some(tmp);
        let basebackup = self.bins.pg_ctl.with_file_name("pg_basebackup");
        let mut cmd = standby.command(&basebackup);
        cmd.arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={} user={PG_USER} application_name={application_name}",
                self.port
            ))
            .arg("-D")
            .arg(&standby.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(cmd, &basebackup, &standby.data_dir)?;
        standby.prepare_run_dir()?;
        standby.start_first()?;
        Ok(standby)
    }

    /// Promotes a standby to primary and waits until it is one.
    pub fn promote(&mut self) -> Result<(), PgError> {
        let mut cmd = self.command(&self.bins.pg_ctl);
        cmd.arg("promote").arg("-D").arg(&self.data_dir).arg("-w");
        run(cmd, &self.bins.pg_ctl, &self.data_dir)
    }

    /// Crashes the server: SIGKILL to the postmaster (its backends notice
    /// and exit). Nothing is flushed; `start` recovers from the WAL.
    pub fn crash(&mut self) {
        if let Some(pid) = postmaster_pid(&self.data_dir) {
            let _ = kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(kill(pid, None), Err(nix::errno::Errno::ESRCH))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
