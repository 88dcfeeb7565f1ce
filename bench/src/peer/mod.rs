//! `peer`: the same load against tether and against nginx + Nchan (started
//! here, see [`nchan`]), one after the other in one invocation, printing
//! both figures and tether's ratio to Nchan. Shapes:
//! - `fanout`: --clients subscribers in rooms of --members, --rate msg/s
//!   for --duration: publish-to-receipt p50/p99, server CPU (tether's
//!   workers and its PostgreSQL; nginx's master and workers: CPU time until
//!   everything is delivered, over the sending period);
//! - `max-rate`: the same shape ramped (--ramp-start, ×--ramp-factor per
//!   --step seconds) until p99 > --p99-limit ms or anything is lost;
//! - `write`: rooms of 2 (--write-clients subscribers), ramped the same way;
//! - `connections`: --conn-clients in rooms of --conn-members: time until
//!   all are connected and synced, server RSS per connection.
//!
//! Correctness (the exit status): tether loses nothing, shows no gap and no
//! duplicate in any shape; Nchan loses nothing at the fixed-rate shapes.
//! Timings never fail.

mod cpu;
mod nchan;
mod nchan_client;
mod sides;

use crate::cluster::Cluster;
use crate::load::{percentiles, round3, Report, Target};
use crate::scenarios::server_rss;
use crate::Opts;
use cpu::CpuSample;
use nchan::{Nchan, NchanOptions};
use serde_json::json;
use sides::{NchanSide, Shape, Side, Step, TetherSide};
use std::path::PathBuf;
use std::time::Duration;

/// Peer-mode options (from `--name value`; defaults full / --smoke).
pub struct PeerOpts {
    shapes: Vec<String>,
    nginx: NchanOptions,
    step: Duration,
    drain: Duration,
    /// Unmeasured load first (fresh connections, cold caches and
    /// statements), on both systems alike.
    warmup: Duration,
    ramp_start: f64,
    write_ramp_start: f64,
    ramp_factor: f64,
    ramp_steps: usize,
    p99_limit_ms: f64,
    /// `--systems tether`: tether alone (e.g. presence on vs off).
    pub tether_only: bool,
    write_clients: usize,
    conn_clients: usize,
    conn_members: usize,
}

impl PeerOpts {
    pub fn parse(o: &Opts) -> Result<PeerOpts, String> {
        let get = |k: &str| {
            o.kv.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let pick = |full: f64, small: f64| if o.smoke { small } else { full };
        let num = |k: &str, d: f64| -> Result<f64, String> {
            match get(k) {
                Some(v) => v.parse().map_err(|_| format!("--{k}: not a number: {v:?}")),
                None => Ok(d),
            }
        };
        let shape = get("shape").unwrap_or_else(|| "all".into());
        let shapes = match shape.as_str() {
            "all" => vec!["fanout", "max-rate", "write", "connections"],
            s => s.split(',').collect(),
        };
        for s in &shapes {
            if !["fanout", "max-rate", "write", "connections"].contains(s) {
                return Err(format!("--shape: unknown {s:?}"));
            }
        }
        Ok(PeerOpts {
            shapes: shapes.into_iter().map(String::from).collect(),
            nginx: NchanOptions {
                nginx: PathBuf::from(get("nginx").unwrap_or(nchan::DEFAULT_NGINX.into())),
                module: PathBuf::from(get("nchan-module").unwrap_or(nchan::DEFAULT_MODULE.into())),
                workers: num("nginx-workers", 2.0)? as usize,
            },
            step: Duration::from_secs_f64(num("step", pick(5.0, 1.0))?),
            drain: Duration::from_secs_f64(num("step-drain", 5.0)?),
            warmup: Duration::from_secs_f64(num("warmup", pick(3.0, 0.5))?),
            ramp_start: num("ramp-start", pick(100.0, 50.0))?,
            write_ramp_start: num("write-ramp-start", pick(500.0, 50.0))?,
            ramp_factor: num("ramp-factor", 1.25)?.max(1.01),
            ramp_steps: num("ramp-steps", pick(20.0, 2.0))? as usize,
            p99_limit_ms: num("p99-limit", 100.0)?,
            tether_only: match get("systems").as_deref() {
                None | Some("both") => false,
                Some("tether") => true,
                Some(v) => return Err(format!("--systems: both or tether, not {v:?}")),
            },
            write_clients: num("write-clients", pick(2000.0, 40.0))? as usize,
            conn_clients: num("conn-clients", pick(10000.0, 300.0))? as usize,
            conn_members: num("conn-members", pick(1000.0, 100.0))? as usize,
        })
    }
}

/// One figure for both systems: a table row and `{tether, nchan, ratio}`.
fn pair(report: &mut Report, key: &str, label: &str, tether: f64, nchan: f64, unit: &str) {
    let ratio = if nchan > 0.0 {
        round3(tether / nchan)
    } else {
        0.0
    };
    // Nchan at 0: not run (--systems tether), or nothing passed.
    let nchan = nchan.max(0.0);
    let shown = if nchan > 0.0 {
        format!(
            "tether {} · Nchan {} · tether/Nchan {ratio}×",
            round3(tether),
            round3(nchan)
        )
    } else {
        format!("tether {} · Nchan 0", round3(tether))
    };
    report.put_shown(
        key,
        label,
        shown,
        json!({"tether": round3(tether), "nchan": round3(nchan), "ratio": ratio, "unit": unit}),
    );
}

fn p(v: &mut [u32], q: &str) -> f64 {
    percentiles(v)[q].as_f64().unwrap_or(0.0)
}

/// Everything both systems need to be driven.
struct Both<'a> {
    o: &'a Opts,
    t: &'a Target,
    cluster: Option<&'a Cluster>,
    /// None with `--systems tether`.
    nchan: Option<&'a Nchan>,
}

impl Both<'_> {
    fn shape(&self, clients: usize, members: usize) -> Shape {
        Shape {
            clients,
            members,
            wave: self.o.wave,
            source_addrs: self.o.source_addrs,
            body: self.o.body,
        }
    }

    async fn side(
        &self,
        tether: bool,
        shape: Shape,
        tag: &str,
        senders: bool,
    ) -> Result<(Side, Duration), String> {
        if tether {
            let (s, d) = TetherSide::setup(self.t, shape, tag, senders).await?;
            Ok((Side::Tether(s), d))
        } else {
            let n = self.nchan.ok_or("Nchan is not running")?;
            let (s, d) = NchanSide::setup(n, shape, tag, &self.t.prefix).await?;
            Ok((Side::Nchan(s), d))
        }
    }

    /// CPU groups of one system: tether's workers and PostgreSQL, or nginx.
    fn cpu_groups(&self, tether: bool) -> Vec<(String, Vec<i32>)> {
        if tether {
            match self.cluster {
                Some(c) => vec![
                    ("workers".into(), c.server_pids()),
                    ("postgres".into(), c.pg_pids()),
                ],
                None => Vec::new(),
            }
        } else {
            vec![(
                "nginx".into(),
                self.nchan.map(Nchan::pids).unwrap_or_default(),
            )]
        }
    }

    fn rss_pids(&self, tether: bool) -> Vec<i32> {
        if tether {
            self.cluster.map(|c| c.server_pids()).unwrap_or_default()
        } else {
            self.nchan.map(Nchan::pids).unwrap_or_default()
        }
    }

    /// tether (true) and, unless skipped, Nchan (false).
    fn systems(&self) -> Vec<bool> {
        if self.nchan.is_some() {
            vec![true, false]
        } else {
            vec![true]
        }
    }
}

/// Fixed rate: latency percentiles, CPU, delivered.
async fn fanout(b: &Both<'_>, report: &mut Report, po: &PeerOpts) -> Result<(), String> {
    let shape = b.shape(b.o.clients, b.o.members);
    let mut res = Vec::new();
    for tether in b.systems() {
        let (mut side, _) = b.side(tether, shape, "f", true).await?;
        let warm = side.step(b.o.rate, po.warmup, b.o.drain_timeout).await;
        if tether {
            check_order(report, "fanout warmup", &warm);
        }
        let cpu = CpuSample::start(b.cpu_groups(tether));
        let mut step = side.step(b.o.rate, b.o.duration, b.o.drain_timeout).await;
        let cores: Vec<(String, f64, usize)> = cpu
            .cores(Some(b.o.duration.as_secs_f64()))
            .into_iter()
            .zip(cpu.counts())
            .map(|((n, c), k)| (n, c, k))
            .collect();
        side.close();
        eprintln!(
            "tether-bench peer fanout {}: {} published, {}/{} delivered, p99 {} ms",
            side.name(),
            step.published,
            step.delivered,
            step.expected,
            p(&mut step.latencies_us, "p99")
        );
        res.push((step, cores));
    }
    if res.len() < 2 {
        res.push((Step::default(), Vec::new()));
    }
    let (mut ts, tc) = res.remove(0);
    let (mut ns, nc) = res.remove(0);
    report.put(
        "fanout_shape",
        "fanout: shape",
        json!(format!(
            "{} subscribers, {} rooms, {} msg/s for {:?}",
            shape.clients,
            shape.rooms(),
            b.o.rate,
            b.o.duration
        )),
    );
    pair(
        report,
        "fanout_p50_ms",
        "fanout: p50 publish→receipt (ms)",
        p(&mut ts.latencies_us, "p50"),
        p(&mut ns.latencies_us, "p50"),
        "ms",
    );
    pair(
        report,
        "fanout_p99_ms",
        "fanout: p99 publish→receipt (ms)",
        p(&mut ts.latencies_us, "p99"),
        p(&mut ns.latencies_us, "p99"),
        "ms",
    );
    let sum = |c: &[(String, f64, usize)]| c.iter().map(|(_, v, _)| v).sum::<f64>();
    pair(
        report,
        "fanout_cpu_cores",
        "fanout: server CPU (cores)",
        sum(&tc),
        sum(&nc),
        "cores",
    );
    let split: Vec<String> = tc
        .iter()
        .map(|(n, v, k)| format!("{n} {v:.2} ({k} processes)"))
        .collect();
    report.put(
        "fanout_tether_cpu_split",
        "fanout: tether CPU split (cores)",
        json!(split.join(", ")),
    );
    pair(
        report,
        "fanout_delivered",
        "fanout: delivered",
        ts.delivered as f64,
        ns.delivered as f64,
        "events",
    );
    check_step(report, "fanout", "tether", &ts);
    if b.nchan.is_some() {
        check_step(report, "fanout", "Nchan", &ns);
    }
    let secs = b.o.duration.as_secs_f64().max(1e-3);
    report.put(
        "fanout_tether_signals_per_s",
        "fanout: tether read / presence frames received per s",
        json!(format!(
            "{:.0} / {:.0}",
            ts.read_frames as f64 / secs,
            ts.presence_frames as f64 / secs
        )),
    );
    Ok(())
}

/// tether, always: no gap, no duplicate.
fn check_order(report: &mut Report, what: &str, s: &Step) {
    report.check(
        s.duplicates == 0 && s.gaps == 0,
        format!(
            "{what}: tether: {} duplicates, {} gaps",
            s.duplicates, s.gaps
        ),
    );
}

fn check_step(report: &mut Report, shape: &str, who: &str, s: &Step) {
    report.put(
        &format!("{shape}_{}_lost", who.to_lowercase()),
        &format!("{shape}: {who} lost / failed / duplicates / gaps"),
        json!(format!(
            "{} / {} / {} / {}",
            s.missing, s.failed, s.duplicates, s.gaps
        )),
    );
    report.check(
        s.missing == 0,
        format!("{shape}: {who} lost {} deliveries", s.missing),
    );
    report.check(
        s.failed == 0,
        format!("{shape}: {who}: {} publishes failed", s.failed),
    );
    report.check(
        s.duplicates == 0,
        format!("{shape}: {who}: {} duplicates", s.duplicates),
    );
    report.check(s.gaps == 0, format!("{shape}: {who}: {} gaps", s.gaps));
}

/// Ramps until p99 > limit or anything is lost; the highest clean rate.
async fn ramp(
    b: &Both<'_>,
    report: &mut Report,
    po: &PeerOpts,
    key: &str,
    shape: Shape,
    start: f64,
) -> Result<(), String> {
    let mut best = [0.0f64; 2];
    let mut stop = [
        format!("none in {} steps", po.ramp_steps),
        format!("none in {} steps", po.ramp_steps),
    ];
    for (k, tether) in b.systems().into_iter().enumerate() {
        let (mut side, _) = b.side(tether, shape, &key[..1], true).await?;
        let warm = side.step(start, po.warmup, po.drain).await;
        if tether {
            check_order(report, &format!("{key} warmup"), &warm);
        }
        let mut rate = start;
        for _ in 0..po.ramp_steps {
            let mut s = side.step(rate, po.step, po.drain).await;
            let p99 = p(&mut s.latencies_us, "p99");
            eprintln!(
                "tether-bench peer {key} {}: {rate:.0} msg/s ({:.0} published/s): {} published, {}/{} delivered, {} lost, {} failed, p99 {p99} ms",
                side.name(), s.published as f64 / po.step.as_secs_f64(), s.published, s.delivered, s.expected, s.missing, s.failed
            );
            if tether && (s.duplicates > 0 || s.gaps > 0) {
                report.check(
                    false,
                    format!(
                        "{key}: tether: {} duplicates, {} gaps at {rate:.0} msg/s",
                        s.duplicates, s.gaps
                    ),
                );
            }
            if tether {
                eprintln!(
                    "tether-bench peer {key} tether: {:.0} read frames/s, {:.0} presence frames/s",
                    s.read_frames as f64 / po.step.as_secs_f64(),
                    s.presence_frames as f64 / po.step.as_secs_f64()
                );
            }
            if !s.clean() || p99 > po.p99_limit_ms {
                stop[k] = format!(
                    "{rate:.0} msg/s: p99 {p99} ms, {} lost, {} failed",
                    s.missing, s.failed
                );
                break;
            }
            // What was published, not the target: a step of a few seconds
            // at a fraction of a message per second per room rounds.
            best[k] = s.published as f64 / po.step.as_secs_f64();
            rate *= po.ramp_factor;
        }
        if tether {
            // Late is not lost: everything acknowledged must arrive.
            let s = side.step(0.0, Duration::ZERO, b.o.drain_timeout).await;
            report.check(
                s.missing == 0,
                format!("{key}: tether lost {} acknowledged deliveries", s.missing),
            );
        }
        side.close();
    }
    report.put(
        &format!("{key}_shape"),
        &format!("{key}: shape"),
        json!(format!(
            "{} subscribers, {} rooms; from {start} msg/s ×{} per {:?} step",
            shape.clients,
            shape.rooms(),
            po.ramp_factor,
            po.step
        )),
    );
    pair(
        report,
        &format!("{key}_msgs"),
        &format!(
            "{key}: highest rate, p99 ≤ {} ms, nothing lost (msg/s)",
            po.p99_limit_ms
        ),
        best[0],
        best[1],
        "msg/s",
    );
    report.put(
        &format!("{key}_stop"),
        &format!("{key}: first step over (tether | Nchan)"),
        json!(format!(
            "{} | {}",
            stop[0],
            if b.nchan.is_some() {
                &stop[1]
            } else {
                "not run"
            }
        )),
    );
    Ok(())
}

/// Connect everything, time until synced, RSS per connection.
async fn connections(b: &Both<'_>, report: &mut Report, po: &PeerOpts) -> Result<(), String> {
    let shape = b.shape(po.conn_clients, po.conn_members);
    let mut res = Vec::new();
    for tether in b.systems() {
        let before = server_rss(&b.rss_pids(tether));
        let (side, synced) = b.side(tether, shape, "c", false).await?;
        let after = server_rss(&b.rss_pids(tether));
        side.close();
        let per = after.saturating_sub(before) as f64 / shape.clients.max(1) as f64;
        eprintln!(
            "tether-bench peer connections {}: synced in {synced:?}, {per:.2} KiB each",
            side.name()
        );
        res.push((synced, per));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if res.len() < 2 {
        res.push((Duration::ZERO, 0.0));
    }
    report.put(
        "connections_shape",
        "connections: shape",
        json!(format!(
            "{} connections, {} rooms of {}",
            shape.clients,
            shape.rooms(),
            shape.members
        )),
    );
    pair(
        report,
        "connections_synced_s",
        "connections: time until all synced (s)",
        res[0].0.as_secs_f64(),
        res[1].0.as_secs_f64(),
        "s",
    );
    pair(
        report,
        "connections_rss_kib",
        "connections: server RSS per connection (KiB; tether: workers)",
        res[0].1,
        res[1].1,
        "KiB",
    );
    Ok(())
}

/// The peer scenario: starts nginx + Nchan, runs each shape on both.
pub async fn run(
    o: &Opts,
    po: &PeerOpts,
    t: &Target,
    cluster: Option<&Cluster>,
    nchan: Option<&Nchan>,
) -> Result<Report, String> {
    let mut report = Report::new("peer");
    let b = Both {
        o,
        t,
        cluster,
        nchan,
    };
    let about = match nchan {
        Some(n) => format!("nginx {} workers, port {}", po.nginx.workers, n.port),
        None => "not run (--systems tether)".into(),
    };
    report.put("nchan", "Nchan", json!(about));
    for s in &po.shapes {
        let r = match s.as_str() {
            "fanout" => fanout(&b, &mut report, po).await,
            "max-rate" => {
                let shape = b.shape(o.clients, o.members);
                ramp(&b, &mut report, po, "max_rate", shape, po.ramp_start).await
            }
            "write" => {
                let shape = b.shape(po.write_clients, 2);
                ramp(&b, &mut report, po, "write", shape, po.write_ramp_start).await
            }
            _ => connections(&b, &mut report, po).await,
        };
        // One shape's setup failing does not hide the others' figures.
        if let Err(e) = r {
            eprintln!("tether-bench peer {s}: {e}");
            report.check(false, format!("{s}: {e}"));
        }
    }
    Ok(report)
}

/// Starts nginx + Nchan (blocking; before the runtime).
pub fn start_nchan(po: &PeerOpts) -> Result<Option<Nchan>, String> {
    if po.tether_only {
        return Ok(None);
    }
    Nchan::start(&po.nginx).map(Some)
}
