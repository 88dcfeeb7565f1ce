//! Server CPU from /proc/<pid>/stat: user + system ticks of a set of
//! processes, sampled before and after a run (cores = ticks / tick rate /
//! wall time). Processes that exit in between lose their ticks, so the sets
//! measured are long-lived: workers, nginx, PostgreSQL's pooled backends.

use std::time::Instant;

/// utime + stime of `pid` in clock ticks (0 if gone).
fn ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // pid (comm) state ppid ...: after ')' utime is the 12th field, stime the 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn tick_rate() -> f64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// A sample of named groups of processes.
pub struct CpuSample {
    at: Instant,
    groups: Vec<(String, Vec<i32>, u64)>,
}

impl CpuSample {
    /// `groups`: (name, pids); the pids are kept for the second sample.
    pub fn start(groups: Vec<(String, Vec<i32>)>) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            groups: groups
                .into_iter()
                .map(|(n, p)| {
                    let t = p.iter().map(|p| ticks(*p)).sum();
                    (n, p, t)
                })
                .collect(),
        }
    }

    /// Processes per group (same order).
    pub fn counts(&self) -> Vec<usize> {
        self.groups.iter().map(|(_, p, _)| p.len()).collect()
    }

    /// CPU time used per group since `start` (same order), divided by
    /// `over` (e.g. the sending period: the cores it takes to keep up
    /// with that load, work left over for the drain included).
    pub fn cores(&self, over: Option<f64>) -> Vec<(String, f64)> {
        let secs = over
            .unwrap_or_else(|| self.at.elapsed().as_secs_f64())
            .max(1e-3);
        let hz = tick_rate();
        self.groups
            .iter()
            .map(|(n, pids, before)| {
                let now: u64 = pids.iter().map(|p| ticks(*p)).sum();
                (n.clone(), now.saturating_sub(*before) as f64 / hz / secs)
            })
            .collect()
    }
}
