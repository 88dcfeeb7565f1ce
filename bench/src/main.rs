//! `tether-bench`: tether's load tool. See `tether-bench --help`.

mod cluster;
mod load;
mod peer;
mod scenarios;
mod shard;

use cluster::{Cluster, SpawnOptions};
use load::Target;
use scenarios::RssSample;
use serde_json::Value;
use shard::{Coord, Shard};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tether_protocol::auth::Secret;

const USAGE: &str = "\
tether-bench SCENARIO [options]

Scenarios (each bounded in count and time; each ends with a table and one
JSON line; the exit status is non-zero when a correctness check fails:
gaps, duplicates after dedup, delivered != expected, lost events):
  send         durable acknowledged sends at --rate msg/s (0: as fast as
               possible, --window outstanding per client): throughput and
               ack latency percentiles
  fanout       --clients readers in conversations of --members, one sender
               per conversation on another worker than its readers:
               deliveries/s, send-to-receive latency, delivered vs expected
  connections  open and hold --clients idle connections (source addresses
               127.0.0.2... with --source-addrs): time to open, server RSS
               per connection (needs --spawn or --server-pid for RSS)
  crash        SIGKILL a worker under load (needs --spawn): time until the
               replacement accepts, until every affected client is synced,
               events lost
  storm        --clients with --missed events each reconnect at once: time
               until all are synced with their backlog, failed connects
  peer         the same load against tether and against nginx + Nchan
               (started here: --nginx, --nchan-module, 2 --nginx-workers,
               in-memory channels), one after the other; both figures and
               tether's ratio. --shape fanout,max-rate,write,connections
               [all]: fanout at --rate (p50/p99 publish->receipt, server
               CPU incl. PostgreSQL); max-rate: the same ramped from
               --ramp-start [100/50] x--ramp-factor [1.25] per --step s
               [5/1], at most --ramp-steps [20/2], until p99 > --p99-limit
               ms [100] or anything lost; write: --write-clients [2000/40]
               in rooms of 2, ramped from --write-ramp-start [500/50];
               connections: --conn-clients [10000/300] in rooms of
               --conn-members [1000/100]: time until synced, RSS each.
               --systems tether: tether alone (no nginx). fanout and
               the ramps start with --warmup s [3/0.5] of unmeasured load.
               Subscribers ack once a second. Defaults: --clients
               1000/100, --members 100/10, --rate 1000/50

Target:
  --url URL[,URL...]      the gateway, http://host:port (several: standalone
                          workers; clients are spread over them) [http://127.0.0.1:8080]
  --secret S              token key (env TETHER_SECRET)
  --spawn                 start a cluster of our own instead:
    --workers N           workers [2; connections: 4]
    --supervisor          run the supervisor `tether` (one port) instead of
                          N standalone `tether-worker`s on N ports
    --tether-bin PATH     the `tether` binary or its directory [next to tether-bench]
    --database-url URL    PostgreSQL to use [a private one, fsync on, on disk;
                          with --smoke: fsync off, in /dev/shm]
    --worker-arg ARG      pass ARG to every worker (repeatable)
  --server-pid PID        (without --spawn) server process for RSS; its children count too

Load (defaults: full run / --smoke):
  --smoke                 a small, fast run that checks correctness only
  --clients N             send 50/4, fanout 10000/200, connections 50000/300,
                          crash 10000/200, storm 20000/200
  --members M             readers per conversation [fanout 100/20, crash 10/10, storm 100/20]
  --rate R                total msg/s [send 0/200, fanout 1000/100, crash 500/100]
  --window W              outstanding sends per client when --rate 0 [128]
  --duration S            seconds of sending [30/2; crash 10/3]
  --body B                message body bytes [32]
  --missed K              storm: events missed per client [100/10]
  --hold S                connections: seconds to hold [5/1]
  --procs P               load processes for connections/storm [clients/16000 rounded up]
  --shard i/n             run only part i of n (with --child: used by --procs)
  --source-addrs          bind client sockets to 127.0.0.2, .3, ... [on for connections]
  --per-addr N            connections per source address [20000]
  --wave N                connections: handshakes in flight per load process [500]
";

/// Everything from the command line.
#[derive(Clone)]
pub struct Opts {
    pub scenario: String,
    pub smoke: bool,
    pub spawn: bool,
    pub supervisor: bool,
    pub urls: Vec<String>,
    pub secret: String,
    pub tether_bin: Option<PathBuf>,
    pub database_url: Option<String>,
    pub worker_args: Vec<String>,
    pub server_pid: Option<i32>,
    pub workers: usize,
    pub clients: usize,
    pub members: usize,
    pub rate: f64,
    pub window: usize,
    pub duration: Duration,
    pub body: usize,
    pub missed: usize,
    pub hold: Duration,
    pub procs: usize,
    pub shard: Shard,
    pub child: bool,
    pub source_addrs: bool,
    pub per_addr: usize,
    pub prefix: String,
    pub drain_timeout: Duration,
    pub open_timeout: Duration,
    /// connections: handshakes in progress at once per load process.
    pub wave: usize,
    /// Every `--name value` given (options only one scenario reads).
    pub kv: Vec<(String, String)>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut it = args.iter();
    let scenario = it.next().ok_or("no scenario")?.clone();
    if !["send", "fanout", "connections", "crash", "storm", "peer"].contains(&scenario.as_str()) {
        return Err(format!("unknown scenario {scenario:?}"));
    }
    let mut kv: Vec<(String, String)> = Vec::new();
    let mut flags = Vec::new();
    const SWITCHES: &[&str] = &["smoke", "spawn", "supervisor", "child", "source-addrs"];
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?}"));
        };
        if let Some((k, v)) = name.split_once('=') {
            kv.push((k.into(), v.into()));
        } else if SWITCHES.contains(&name) {
            flags.push(name.to_string());
        } else {
            let v = it.next().ok_or(format!("--{name} needs a value"))?;
            kv.push((name.into(), v.clone()));
        }
    }
    let get = |k: &str| {
        kv.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let flag = |k: &str| flags.iter().any(|f| f == k);
    let smoke = flag("smoke");
    let pick = |full: f64, small: f64| if smoke { small } else { full };
    let num = |k: &str, d: f64| -> Result<f64, String> {
        match get(k) {
            Some(v) => v.parse().map_err(|_| format!("--{k}: not a number: {v:?}")),
            None => Ok(d),
        }
    };
    let s = scenario.as_str();
    let clients = num(
        "clients",
        match s {
            "send" => pick(50.0, 4.0),
            "fanout" => pick(10000.0, 200.0),
            "peer" => pick(1000.0, 100.0),
            "connections" => pick(50000.0, 300.0),
            "crash" => pick(10000.0, 200.0),
            _ => pick(20000.0, 200.0),
        },
    )? as usize;
    let members = num(
        "members",
        match s {
            "crash" => 10.0,
            "peer" => pick(100.0, 10.0),
            _ => pick(100.0, 20.0),
        },
    )? as usize;
    let rate = num(
        "rate",
        match s {
            "send" => pick(0.0, 200.0),
            "crash" => pick(500.0, 100.0),
            "peer" => pick(1000.0, 50.0),
            _ => pick(1000.0, 100.0),
        },
    )?;
    let duration = num(
        "duration",
        if s == "crash" {
            pick(10.0, 3.0)
        } else {
            pick(30.0, 2.0)
        },
    )?;
    let workers = num(
        "workers",
        if s == "connections" {
            pick(4.0, 2.0)
        } else {
            2.0
        },
    )? as usize;
    let procs = match get("procs") {
        Some(p) => p.parse().map_err(|_| "--procs: not a number")?,
        None if matches!(s, "connections" | "storm") => clients.div_ceil(16_000).max(1),
        None => 1,
    };
    let shard = match get("shard") {
        Some(v) => Shard::parse(&v)?,
        None => Shard::WHOLE,
    };
    let secret = get("secret")
        .or_else(|| std::env::var("TETHER_SECRET").ok())
        .unwrap_or_else(|| {
            if flag("spawn") {
                Secret::generate_hex()
            } else {
                String::new()
            }
        });
    if secret.is_empty() {
        return Err("--secret (or TETHER_SECRET) is needed to mint tokens".into());
    }
    let urls: Vec<String> = get("url")
        .unwrap_or_else(|| "http://127.0.0.1:8080".into())
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let worker_args = kv
        .iter()
        .filter(|(k, _)| k == "worker-arg")
        .map(|(_, v)| v.clone())
        .collect();
    let prefix = get("prefix").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 100_000_000)
            .unwrap_or(0);
        format!("b{t}-")
    });
    Ok(Opts {
        smoke,
        spawn: flag("spawn"),
        supervisor: flag("supervisor"),
        urls,
        secret,
        tether_bin: get("tether-bin").map(PathBuf::from),
        database_url: get("database-url"),
        worker_args,
        server_pid: get("server-pid").and_then(|p| p.parse().ok()),
        workers: workers.max(1),
        clients,
        members,
        rate,
        window: num("window", 128.0)?.max(1.0) as usize,
        duration: Duration::from_secs_f64(duration),
        body: num("body", 32.0)? as usize,
        missed: num("missed", pick(100.0, 10.0))? as usize,
        hold: Duration::from_secs_f64(num("hold", pick(5.0, 1.0))?),
        procs: procs.max(1),
        shard,
        child: flag("child"),
        source_addrs: flag("source-addrs") || matches!(s, "connections" | "peer"),
        per_addr: num("per-addr", 20000.0)? as usize,
        prefix,
        drain_timeout: Duration::from_secs_f64(num("drain-timeout", 30.0)?),
        open_timeout: Duration::from_secs_f64(num("open-timeout", pick(120.0, 30.0))?),
        wave: num("wave", 500.0)?.max(1.0) as usize,
        scenario,
        kv,
    })
}

/// The arguments a load process gets (the parent's target, already spawned).
fn child_args(o: &Opts, urls: &[String]) -> Vec<String> {
    let mut a = vec![
        o.scenario.clone(),
        "--url".into(),
        urls.join(","),
        "--secret".into(),
        o.secret.clone(),
        "--prefix".into(),
        o.prefix.clone(),
        "--clients".into(),
        o.clients.to_string(),
        "--members".into(),
        o.members.to_string(),
        "--missed".into(),
        o.missed.to_string(),
        "--hold".into(),
        o.hold.as_secs_f64().to_string(),
        "--body".into(),
        o.body.to_string(),
        "--per-addr".into(),
        o.per_addr.to_string(),
        "--open-timeout".into(),
        o.open_timeout.as_secs_f64().to_string(),
        "--wave".into(),
        o.wave.to_string(),
    ];
    if o.source_addrs {
        a.push("--source-addrs".into());
    }
    if o.smoke {
        a.push("--smoke".into());
    }
    a
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return if args.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tether-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tether-bench: {e}");
            ExitCode::from(3)
        }
    }
}

/// Runs the scenario; Ok(false) when a correctness check failed.
fn run(o: Opts) -> Result<bool, String> {
    let target = |urls: Vec<String>| Target {
        urls,
        secret: Secret::new(o.secret.as_bytes().to_vec()),
        prefix: o.prefix.clone(),
    };
    if o.child {
        let t = target(o.urls.clone());
        let rt = runtime();
        let r = rt.block_on(async {
            let mut coord = Coord::Child;
            match o.scenario.as_str() {
                "connections" => scenarios::connections_shard(&o, &t, o.shard, &mut coord).await,
                "storm" => scenarios::storm_shard(&o, &t, o.shard, &mut coord).await,
                s => Err(format!("{s} does not run in load processes")),
            }
        })?;
        println!("RESULT {r}");
        rt.shutdown_timeout(Duration::from_millis(200));
        return Ok(true);
    }
    let peer_opts = if o.scenario == "peer" {
        Some(peer::PeerOpts::parse(&o)?)
    } else {
        None
    };
    let mut cluster = if o.spawn {
        let c = Cluster::spawn(&SpawnOptions {
            tether_bin: o.tether_bin.clone(),
            database_url: o.database_url.clone(),
            secret: o.secret.clone(),
            workers: o.workers,
            supervisor: o.supervisor,
            durable: !o.smoke,
            worker_args: o.worker_args.clone(),
        })?;
        eprintln!(
            "tether-bench: started {} ({} worker{}) at {}",
            if o.supervisor {
                "tether"
            } else {
                "tether-worker"
            },
            o.workers,
            if o.workers == 1 { "" } else { "s" },
            c.urls().join(", ")
        );
        Some(c)
    } else {
        None
    };
    let urls = cluster.as_ref().map_or(o.urls.clone(), |c| c.urls());
    let t = target(urls.clone());
    let server_pids = || -> Vec<i32> {
        match (&cluster, o.server_pid) {
            (Some(c), _) => c.server_pids(),
            (None, Some(p)) => {
                let mut v = vec![p];
                v.extend(cluster::children_of(p));
                v
            }
            _ => Vec::new(),
        }
    };
    let report = match o.scenario.as_str() {
        "connections" | "storm" => {
            let pids = server_pids();
            let mut rss = RssSample {
                before_kib: scenarios::server_rss(&pids),
                after_kib: 0,
                processes: pids.len(),
            };
            let hook = |name: &str| {
                if name == "open" {
                    let pids = server_pids();
                    rss.after_kib = scenarios::server_rss(&pids);
                    rss.processes = pids.len();
                }
            };
            let results: Vec<Value> = if o.procs > 1 && o.shard.count == 1 {
                shard::run_children(&child_args(&o, &urls), o.procs, hook)?
            } else {
                let rt = runtime();
                let r = rt.block_on(async {
                    let mut coord = Coord::Local(Box::new(hook));
                    if o.scenario == "connections" {
                        scenarios::connections_shard(&o, &t, o.shard, &mut coord).await
                    } else {
                        scenarios::storm_shard(&o, &t, o.shard, &mut coord).await
                    }
                })?;
                rt.shutdown_timeout(Duration::from_millis(200));
                vec![r]
            };
            if o.scenario == "connections" {
                scenarios::connections_report(&o, &results, &rss)
            } else {
                scenarios::storm_report(&o, &results)
            }
        }
        "peer" => {
            let po = peer_opts.as_ref().ok_or("peer options")?;
            let nchan = peer::start_nchan(po)?;
            if let Some(n) = &nchan {
                eprintln!(
                    "tether-bench: started nginx + Nchan (pid {}) on port {}",
                    n.pid(),
                    n.port
                );
            }
            let rt = runtime();
            let r = rt.block_on(peer::run(&o, po, &t, cluster.as_ref(), nchan.as_ref()))?;
            rt.shutdown_timeout(Duration::from_millis(500));
            drop(nchan);
            r
        }
        s => {
            let rt = runtime();
            let r = rt.block_on(async {
                match s {
                    "send" => scenarios::send(&o, &t).await,
                    "fanout" => scenarios::fanout(&o, &t).await,
                    _ => scenarios::crash(&o, &t, cluster.as_mut()).await,
                }
            })?;
            rt.shutdown_timeout(Duration::from_millis(500));
            r
        }
    };
    let ok = report.print();
    drop(cluster);
    Ok(ok)
}
