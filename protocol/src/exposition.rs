//! The Prometheus text exposition of a whole host.
//!
//! Every process of a `tether` instance (the supervisor and each worker)
//! writes its own exposition, at most a second old, to a file of its own
//! in a private directory the supervisor makes and names in
//! [`ENV_METRICS_DIR`]; whichever worker answers `/metrics` serves its own
//! live exposition merged ([`merge`]) with the others' files, so every
//! scrape, through any address, covers the whole host. Series carry a
//! `worker` label (`w1`, …, `supervisor`).
//!
//! [`process_metrics`] renders the standard process series from
//! `/proc/self` (the one thing here that reads anything).

use std::fmt::Write;

/// Names the directory of per-process expositions (set by the supervisor
/// on every worker it starts).
pub const ENV_METRICS_DIR: &str = "TETHER_METRICS_DIR";

/// The file a process writes its exposition to, in that directory.
pub fn file_name(process: &str) -> String {
    format!("{process}.prom")
}

/// Merges expositions into one: each metric family's `# HELP` and
/// `# TYPE` once (from its first appearance), then every sample of that
/// family from every input, families in first-seen order. A sample
/// belongs to the family of the `# TYPE` line before it in its input.
pub fn merge(texts: &[&str]) -> String {
    struct Family {
        header: String,
        samples: String,
    }
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, Family> = Default::default();
    for text in texts {
        let mut current: Option<String> = None;
        for line in text.lines() {
            let header = line
                .strip_prefix("# HELP ")
                .map(|rest| ("# HELP ", rest))
                .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
            if let Some((kind, rest)) = header {
                let name = rest.split(' ').next().unwrap_or_default().to_string();
                let family = families.entry(name.clone()).or_insert_with(|| {
                    order.push(name.clone());
                    Family {
                        header: String::new(),
                        samples: String::new(),
                    }
                });
                // The first HELP and the first TYPE of a family only.
                if !family.header.contains(kind) {
                    family.header.push_str(line);
                    family.header.push('\n');
                }
                current = Some(name);
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else if let Some(f) = current.as_ref().and_then(|n| families.get_mut(n)) {
                f.samples.push_str(line);
                f.samples.push('\n');
            }
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some(f) = families.get(&name) {
            out.push_str(&f.header);
            out.push_str(&f.samples);
        }
    }
    out
}

/// `process_resident_memory_bytes`, `process_cpu_seconds_total`,
/// `process_open_fds` and `process_start_time_seconds` of this process,
/// labelled `worker="{label}"`. Empty where `/proc` cannot be read.
pub fn process_metrics(label: &str) -> String {
    let mut out = String::new();
    let page = 4096.0; // the kernel's page size on every target we build for
    let ticks = 100.0; // USER_HZ
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(rss) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
        {
            let _ = writeln!(
                out,
                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes{{worker=\"{label}\"}} {}",
                rss * page
            );
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): state is
        // field 3; utime, stime are 14 and 15; starttime is 22.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (field(14), field(15)) {
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total{{worker=\"{label}\"}} {}",
                (u + s) / ticks
            );
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let (Some(start), Some(boot)) = (field(22), boot) {
            let _ = writeln!(
                out,
                "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds{{worker=\"{label}\"}} {}",
                boot + start / ticks
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds{{worker=\"{label}\"}} {}",
            fds.count()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_merge_with_one_header_each() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{worker=\"w1\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{worker=\"w1\",le=\"1\"} 2\nh_count{worker=\"w1\"} 2\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{worker=\"w2\"} 5\n# HELP y Y.\n# TYPE y gauge\ny{worker=\"w2\"} 3\n";
        let m = merge(&[a, b]);
        assert_eq!(m.matches("# TYPE x_total").count(), 1);
        assert_eq!(m.matches("# HELP x_total").count(), 1);
        let x = m.find("# TYPE x_total").unwrap();
        let h = m.find("# TYPE h ").unwrap();
        assert!(
            m.find("x_total{worker=\"w2\"}").unwrap() < h,
            "samples stay under their family: {m}"
        );
        assert!(m[x..].contains("x_total{worker=\"w1\"} 1"));
        assert!(m.contains("h_bucket{worker=\"w1\",le=\"1\"} 2"));
        assert!(m.contains("y{worker=\"w2\"} 3"));
    }

    #[test]
    fn process_metrics_read_this_process() {
        let m = process_metrics("test");
        assert!(m.contains("process_resident_memory_bytes{worker=\"test\"}"));
        assert!(m.contains("process_open_fds{worker=\"test\"}"));
        assert!(m.contains("process_cpu_seconds_total{worker=\"test\"}"));
    }
}
