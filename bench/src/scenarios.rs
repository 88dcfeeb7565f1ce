//! The five scenarios. Each is bounded in count and time and fills a
//! [`Report`]; correctness checks (no gaps, no duplicates after dedup,
//! delivered == expected) become failures, speed never does.

use crate::cluster::{children_of, rss_kib, worker_id_of, Cluster};
use crate::load::*;
use crate::shard::{Coord, Shard};
use crate::Opts;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tether_client::Client;

fn ms(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1000.0)
}

/// Waits until every reader has `expected(reader)` messages (or timeout).
async fn drain(readers: &[Reader], timeout: Duration, expected: impl Fn(&Reader) -> u64) -> bool {
    wait_for(timeout, || {
        readers
            .iter()
            .all(|r| r.state.messages.load(Ordering::Relaxed) >= expected(r))
    })
    .await
}

/// Delivered, missing, extra, gaps, duplicates surfaced over `readers`.
fn delivery_checks(
    report: &mut Report,
    readers: &[Reader],
    expected: impl Fn(&Reader) -> u64,
) -> (u64, u64) {
    let (mut delivered, mut want, mut missing, mut extra, mut gaps, mut dups) = (0, 0, 0, 0, 0, 0);
    for r in readers {
        let got = r.state.messages.load(Ordering::Relaxed);
        let e = expected(r);
        delivered += got;
        want += e;
        missing += e.saturating_sub(got);
        extra += got.saturating_sub(e);
        gaps += r.state.gaps.load(Ordering::Relaxed);
        dups += r.state.dup_surfaced.load(Ordering::Relaxed);
    }
    report.put("delivered", "events delivered", json!(delivered));
    report.put("expected", "events expected", json!(want));
    report.put("missing", "events missing", json!(missing));
    report.put("gaps", "gaps reported", json!(gaps));
    report.put("duplicates", "duplicates surfaced", json!(dups));
    report.check(missing == 0, format!("{missing} events not delivered"));
    report.check(
        extra == 0,
        format!("{extra} events delivered beyond the acknowledged ones"),
    );
    report.check(gaps == 0, format!("{gaps} gaps"));
    report.check(dups == 0, format!("{dups} duplicates surfaced"));
    (delivered, want)
}

/// Acked seqs per conversation must be distinct.
fn send_checks(report: &mut Report, t: &SendTotals) {
    let rep = t.repeated_seqs();
    report.check(rep == 0, format!("{rep} acknowledged sends share a seq"));
    report.check(t.failed == 0, format!("{} sends failed for good", t.failed));
    report.check(t.acked > 0, "nothing was acknowledged".into());
}

/// `send`: durable acknowledged sends, at a rate or as fast as possible.
pub async fn send(o: &Opts, target: &Target) -> Result<Report, String> {
    let mut report = Report::new("send");
    let senders = o.clients;
    let specs: Vec<(String, Vec<String>)> = (0..senders)
        .map(|i| (target.user("s", i), Vec::new()))
        .collect();
    let convs = create_conversations(target, specs).await?;
    let clients: Vec<_> = (0..senders)
        .map(|i| {
            let mut opts = target.options(i, &target.user("s", i));
            opts.outbox_limit = 100_000;
            opts.max_inflight_sends = o.window.min(200);
            (opts, convs[i])
        })
        .collect();
    let readers = connect_readers(clients, 500, false, Duration::from_secs(60)).await?;
    let per_rate = o.rate / senders as f64;
    let started = Instant::now();
    let tasks: Vec<_> = readers
        .iter()
        .map(|r| {
            tokio::spawn(send_loop(
                r.handle.clone(),
                r.conversation,
                per_rate,
                o.window,
                o.duration,
                o.body,
            ))
        })
        .collect();
    let mut totals = SendTotals::default();
    for t in tasks {
        totals.merge(t.await.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed();
    let seqs = totals.seqs.clone();
    let expected = |r: &Reader| seqs.get(&r.conversation).map_or(0, |v| v.len() as u64);
    drain(&readers, o.drain_timeout, &expected).await;
    report.put("senders", "sending clients", json!(senders));
    report.put("target_rate", "target rate (msg/s, 0 = max)", json!(o.rate));
    report.put(
        "duration_s",
        "duration (s)",
        json!(round3(elapsed.as_secs_f64())),
    );
    report.put("acked", "sends acknowledged", json!(totals.acked));
    report.put(
        "throughput",
        "acknowledged sends/s",
        json!(round3(totals.acked as f64 / elapsed.as_secs_f64())),
    );
    report.put(
        "outbox_full",
        "sends refused (outbox full)",
        json!(totals.outbox_full),
    );
    report.put_latency("ack_latency_ms", "ack latency", &mut totals.latencies_us);
    send_checks(&mut report, &totals);
    // Every sender is a member of its conversation: its own sends come back.
    delivery_checks(&mut report, &readers, expected);
    // The seqs of a conversation's messages are 2..=n+1 (1 is its creation).
    let contiguous = totals.seqs.values().all(|v| {
        let mut v = v.clone();
        v.sort_unstable();
        v.iter().enumerate().all(|(i, s)| *s == i as i64 + 2)
    });
    report.check(contiguous, "acknowledged seqs are not contiguous".into());
    for r in &readers {
        r.handle.close();
    }
    Ok(report)
}

/// Readers in conversations of `members`, one sender per conversation on
/// the next worker (so messages cross workers when there are several).
async fn fanout_setup(
    o: &Opts,
    target: &Target,
    record_latency: bool,
) -> Result<(Vec<Reader>, Vec<Reader>, usize), String> {
    let members = o.members.max(1);
    let conversations = o.clients.div_ceil(members);
    let specs: Vec<(String, Vec<String>)> = (0..conversations)
        .map(|c| {
            let readers = (c * members..((c + 1) * members).min(o.clients))
                .map(|i| target.user("r", i))
                .collect();
            (target.user("s", c), readers)
        })
        .collect();
    let convs = create_conversations(target, specs).await?;
    let reader_specs = (0..o.clients)
        .map(|i| {
            let c = i / members;
            let mut opts = target.options(c, &target.user("r", i));
            opts.event_capacity = 1024;
            if o.source_addrs {
                opts.bind = Some(source_addr(i, o.per_addr));
            }
            (opts, convs[c])
        })
        .collect();
    let readers =
        connect_readers(reader_specs, 1000, record_latency, Duration::from_secs(120)).await?;
    let sender_specs = (0..conversations)
        .map(|c| {
            let mut opts = target.options(c + 1, &target.user("s", c));
            opts.outbox_limit = 100_000;
            (opts, convs[c])
        })
        .collect();
    let senders = connect_readers(sender_specs, 1000, false, Duration::from_secs(60)).await?;
    Ok((readers, senders, conversations))
}

async fn run_senders(
    o: &Opts,
    senders: &[Reader],
    rate: f64,
    duration: Duration,
) -> Result<SendTotals, String> {
    let per = rate / senders.len().max(1) as f64;
    let tasks: Vec<_> = senders
        .iter()
        .map(|s| {
            tokio::spawn(send_loop(
                s.handle.clone(),
                s.conversation,
                per,
                o.window,
                duration,
                o.body,
            ))
        })
        .collect();
    let mut totals = SendTotals::default();
    for t in tasks {
        totals.merge(t.await.map_err(|e| e.to_string())?);
    }
    Ok(totals)
}

/// `fanout`: deliveries/s and send-to-receive latency.
pub async fn fanout(o: &Opts, target: &Target) -> Result<Report, String> {
    let mut report = Report::new("fanout");
    let (readers, senders, conversations) = fanout_setup(o, target, true).await?;
    let started = Instant::now();
    let mut totals = run_senders(o, &senders, o.rate, o.duration).await?;
    let seqs = totals.seqs.clone();
    let expected = |r: &Reader| seqs.get(&r.conversation).map_or(0, |v| v.len() as u64);
    drain(&readers, o.drain_timeout, &expected).await;
    let elapsed = started.elapsed();
    let mut lat: Vec<u32> = readers.iter().flat_map(|r| r.flush_latencies()).collect();
    report.put("clients", "reading clients", json!(o.clients));
    report.put("members", "readers per conversation", json!(o.members));
    report.put("conversations", "conversations", json!(conversations));
    report.put("workers", "workers (URLs)", json!(target.urls.len()));
    report.put("target_rate", "target send rate (msg/s)", json!(o.rate));
    report.put("acked", "sends acknowledged", json!(totals.acked));
    report.put(
        "send_rate",
        "acknowledged sends/s",
        json!(round3(totals.acked as f64 / totals.elapsed.as_secs_f64())),
    );
    let (delivered, _) = delivery_checks(&mut report, &readers, expected);
    report.put(
        "deliveries_per_s",
        "deliveries/s",
        json!(round3(delivered as f64 / elapsed.as_secs_f64())),
    );
    report.put_latency("latency_ms", "send-to-receive latency", &mut lat);
    report.put_latency("ack_latency_ms", "ack latency", &mut totals.latencies_us);
    send_checks(&mut report, &totals);
    for r in readers.iter().chain(senders.iter()) {
        r.handle.close();
    }
    Ok(report)
}

/// `crash`: SIGKILL a worker under load.
pub async fn crash(
    o: &Opts,
    target: &Target,
    cluster: Option<&mut Cluster>,
) -> Result<Report, String> {
    let cluster = cluster.ok_or("crash needs --spawn (the bench kills one of its workers)")?;
    let mut report = Report::new("crash");
    let (readers, senders, conversations) = fanout_setup(o, target, false).await?;
    let load = {
        let o2 = o.clone();
        let handles: Vec<_> = senders
            .iter()
            .map(|s| (s.handle.clone(), s.conversation))
            .collect();
        let per = o.rate / handles.len().max(1) as f64;
        tokio::spawn(async move {
            let tasks: Vec<_> = handles
                .into_iter()
                .map(|(h, c)| tokio::spawn(send_loop(h, c, per, o2.window, o2.duration, o2.body)))
                .collect();
            let mut totals = SendTotals::default();
            for t in tasks {
                if let Ok(t) = t.await {
                    totals.merge(t);
                }
            }
            totals
        })
    };
    tokio::time::sleep(o.duration / 3).await;

    // Kill worker 1 (the first child of the supervisor, or the first
    // standalone worker).
    let victim_pid;
    let victim_id;
    let old_children: HashSet<i32>;
    if cluster.supervisor {
        let sup = cluster.procs[0].pid();
        old_children = children_of(sup).into_iter().collect();
        victim_pid = *old_children
            .iter()
            .min()
            .ok_or("the supervisor has no workers")?;
        victim_id = worker_id_of(victim_pid).unwrap_or_default();
    } else {
        old_children = HashSet::new();
        victim_pid = cluster.procs[0].pid();
        victim_id = cluster.procs[0].worker_id.clone();
    }
    let kill_us = now_us();
    for r in readers.iter() {
        r.state.watch_from_us.store(kill_us, Ordering::Relaxed);
    }
    let killed_at = Instant::now();
    let mut replacement_spawn_ms = Value::Null;
    let replacement_ready_ms;
    if cluster.supervisor {
        // Watched from a thread of its own, polling every millisecond: the
        // bench's runtime is busy with thousands of reconnecting clients
        // just now, and its timers would measure that instead.
        let sup = cluster.procs[0].pid();
        let addr = target.urls[0].trim_start_matches("http://").to_string();
        let watcher = tokio::task::spawn_blocking(move || {
            watch_replacement(sup, &old_children, &addr, killed_at)
        });
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        unsafe {
            libc::kill(victim_pid, libc::SIGKILL);
        }
        let (spawned, ready) = watcher.await.map_err(|e| e.to_string())?;
        if let Some(t) = spawned {
            replacement_spawn_ms = json!(ms(t));
        }
        replacement_ready_ms = ready.map_or(Value::Null, |t| json!(ms(t)));
    } else {
        // Standalone workers: the bench plays the supervisor and starts a
        // replacement on the same port at once.
        let p = &mut cluster.procs[0];
        p.kill();
        p.restart()?;
        p.wait_ready(Duration::from_secs(30)).await?;
        replacement_ready_ms = json!(ms(killed_at.elapsed()));
    }
    let mut totals = load.await.map_err(|e| e.to_string())?;
    let seqs = totals.seqs.clone();
    let expected = |r: &Reader| seqs.get(&r.conversation).map_or(0, |v| v.len() as u64);
    drain(&readers, o.drain_timeout, &expected).await;
    let affected: Vec<&Reader> = readers
        .iter()
        .filter(|r| r.state.last_disconnect_us.load(Ordering::Relaxed) >= kill_us)
        .collect();
    let resynced = affected
        .iter()
        .filter(|r| r.state.resynced_us.load(Ordering::Relaxed) > 0)
        .count();
    let all_synced_ms = affected
        .iter()
        .map(|r| {
            r.state
                .resynced_us
                .load(Ordering::Relaxed)
                .saturating_sub(kill_us)
        })
        .max()
        .map(|us| round3(us as f64 / 1000.0));
    report.put("clients", "reading clients", json!(o.clients));
    report.put("conversations", "conversations", json!(conversations));
    report.put(
        "workers",
        "workers",
        json!(cluster.procs.len().max(o.workers)),
    );
    report.put(
        "victim",
        "worker killed",
        json!(format!("{victim_id} (pid {victim_pid})")),
    );
    report.put(
        "replacement_spawn_ms",
        "replacement process seen (ms)",
        replacement_spawn_ms,
    );
    report.put(
        "replacement_ready_ms",
        "replacement accepting (ms after SIGKILL)",
        replacement_ready_ms,
    );
    report.put("affected", "clients disconnected", json!(affected.len()));
    report.put("resynced", "of them synced again", json!(resynced));
    report.put(
        "all_synced_ms",
        "all affected synced again (ms after SIGKILL)",
        json!(all_synced_ms),
    );
    report.put("acked", "sends acknowledged", json!(totals.acked));
    report.check(
        resynced == affected.len(),
        format!(
            "{} disconnected clients never synced again",
            affected.len() - resynced
        ),
    );
    report.check(
        !affected.is_empty() || o.clients == 0,
        "the kill disconnected no client".into(),
    );
    let (_, _) = delivery_checks(&mut report, &readers, expected);
    let lost = report.json["missing"].clone();
    report.put("events_lost", "acknowledged events lost", lost);
    report.put_latency("ack_latency_ms", "ack latency", &mut totals.latencies_us);
    send_checks(&mut report, &totals);
    for r in readers.iter().chain(senders.iter()) {
        r.handle.close();
    }
    Ok(report)
}

/// One shard of `connections`: open and hold idle connections.
pub async fn connections_shard(
    o: &Opts,
    target: &Target,
    shard: Shard,
    coord: &mut Coord<'_>,
) -> Result<Value, String> {
    let (lo, hi) = shard.range(o.clients);
    let started = Instant::now();
    let mut clients = Vec::with_capacity(hi - lo);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let want = hi - lo;
    let (mut opened, mut failed_attempts) = (0usize, 0u64);
    let deadline = tokio::time::Instant::now() + o.open_timeout;
    let take = |opened: &mut usize, failed: &mut u64, r: Option<bool>| match r {
        Some(true) => *opened += 1,
        Some(false) => *failed += 1,
        None => {}
    };
    for i in lo..hi {
        let mut opts = target.options(i, &target.user("c", i));
        opts.event_capacity = 8;
        opts.read_buffer = 1024;
        opts.backoff.cap = Duration::from_secs(2);
        if o.source_addrs {
            opts.bind = Some(source_addr(i, o.per_addr));
        }
        let mut client = Client::connect(opts);
        let handle = client.handle();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut told = false;
            while let Some(ev) = client.next_event().await {
                match ev {
                    tether_client::ClientEvent::Synced if !told => {
                        told = true;
                        let _ = tx.send(true);
                    }
                    tether_client::ClientEvent::Error(tether_client::ClientError::Connect(_)) => {
                        let _ = tx.send(false);
                    }
                    _ => {}
                }
            }
        });
        clients.push(handle);
        // At most `o.wave` handshakes in progress (the listen backlog and
        // the accept loops are finite; a flood only produces retries).
        while clients.len() >= opened + o.wave && tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(r) => take(&mut opened, &mut failed_attempts, r),
                Err(_) => break,
            }
        }
    }
    drop(tx);
    while opened < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => take(&mut opened, &mut failed_attempts, Some(r)),
            _ => break,
        }
    }
    let open_ms = ms(started.elapsed());
    coord.barrier("open").await;
    tokio::time::sleep(o.hold).await;
    for c in &clients {
        c.close();
    }
    Ok(
        json!({"clients": want, "opened": opened, "failed_attempts": failed_attempts, "open_ms": open_ms}),
    )
}

/// `connections`: N idle connections, time to open, server RSS each.
pub fn connections_report(o: &Opts, results: &[Value], rss: &RssSample) -> Report {
    let mut report = Report::new("connections");
    let sum = |k: &str| {
        results
            .iter()
            .map(|r| r[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let opened = sum("opened");
    let open_ms = results
        .iter()
        .map(|r| r["open_ms"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    report.put("clients", "connections wanted", json!(o.clients));
    report.put("opened", "connections open and synced", json!(opened));
    report.put(
        "failed_attempts",
        "failed connect attempts",
        json!(sum("failed_attempts")),
    );
    report.put("processes", "load processes", json!(results.len()));
    report.put("open_ms", "time to open all (ms)", json!(open_ms));
    report.put(
        "server_rss_before_kib",
        "server RSS before (KiB)",
        json!(rss.before_kib),
    );
    report.put(
        "server_rss_after_kib",
        "server RSS with all open (KiB)",
        json!(rss.after_kib),
    );
    report.put(
        "server_processes",
        "server processes measured",
        json!(rss.processes),
    );
    let per = if opened > 0 {
        round3(rss.after_kib.saturating_sub(rss.before_kib) as f64 / opened as f64)
    } else {
        0.0
    };
    report.put(
        "rss_per_connection_kib",
        "server RSS per connection (KiB)",
        json!(per),
    );
    report.check(
        opened == o.clients as u64,
        format!("only {opened} of {} connections opened", o.clients),
    );
    report
}

#[derive(Default, Clone)]
pub struct RssSample {
    pub before_kib: u64,
    pub after_kib: u64,
    pub processes: usize,
}

pub fn server_rss(pids: &[i32]) -> u64 {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// One shard of `storm`: clients miss events, then reconnect at once.
pub async fn storm_shard(
    o: &Opts,
    target: &Target,
    shard: Shard,
    coord: &mut Coord<'_>,
) -> Result<Value, String> {
    let (lo, hi) = shard.range(o.clients);
    let members = o.members.max(1);
    // Conversations of this shard's readers (by global index).
    let c_lo = lo / members;
    let c_hi = hi.div_ceil(members);
    let specs: Vec<(String, Vec<String>)> = (c_lo..c_hi)
        .map(|c| {
            let rs = ((c * members).max(lo)..((c + 1) * members).min(hi))
                .map(|i| target.user("r", i))
                .collect();
            (target.user(&format!("s{}x", shard.index), c), rs)
        })
        .collect();
    let convs = create_conversations(target, specs).await?;
    let conv_of = |i: usize| convs[i / members - c_lo];
    let reader_opts = |i: usize| {
        let mut opts = target.options(i, &target.user("r", i));
        opts.ack_interval = Duration::from_millis(50);
        opts.event_capacity = 1024;
        if o.source_addrs {
            opts.bind = Some(source_addr(i, o.per_addr));
        }
        opts
    };
    // Connect, sync, ack, leave.
    let first = connect_readers(
        (lo..hi).map(|i| (reader_opts(i), conv_of(i))).collect(),
        1000,
        false,
        Duration::from_secs(120),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for r in &first {
        r.handle.close();
    }
    drop(first);
    // Meanwhile `missed` messages arrive in every conversation.
    let senders = connect_readers(
        (c_lo..c_hi)
            .enumerate()
            .map(|(k, c)| {
                let mut opts = target.options(c, &target.user(&format!("s{}x", shard.index), c));
                opts.outbox_limit = 100_000;
                (opts, convs[k])
            })
            .collect(),
        1000,
        false,
        Duration::from_secs(60),
    )
    .await?;
    let mut failed = 0u64;
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for s in &senders {
        for _ in 0..o.missed {
            pending.push(s.handle.send(s.conversation, stamp_body(o.body)));
        }
    }
    use futures_util::StreamExt;
    while let Some(r) = pending.next().await {
        if r.is_err() {
            failed += 1;
        }
    }
    for s in &senders {
        s.handle.close();
    }
    coord.barrier("storm").await;
    // Everyone back at once.
    let started = Instant::now();
    let back: Vec<Reader> = (lo..hi)
        .map(|i| Reader::start(reader_opts(i), conv_of(i), false))
        .collect();
    let missed = o.missed as u64;
    let all = wait_for(o.open_timeout, || {
        back.iter().all(|r| {
            r.state.synced.load(Ordering::Relaxed) > 0
                && r.state.messages.load(Ordering::Relaxed) >= missed
        })
    })
    .await;
    let synced_ms = ms(started.elapsed());
    let synced = back
        .iter()
        .filter(|r| r.state.synced.load(Ordering::Relaxed) > 0)
        .count();
    let sum = |f: &dyn Fn(&Reader) -> u64| back.iter().map(f).sum::<u64>();
    let out = json!({
        "clients": hi - lo,
        "synced": synced,
        "all_synced": all,
        "time_to_all_synced_ms": synced_ms,
        "failed_connects": sum(&|r| r.state.connect_errors.load(Ordering::Relaxed)),
        "delivered": sum(&|r| r.state.messages.load(Ordering::Relaxed)),
        "expected": (hi - lo) as u64 * missed,
        "missing": sum(&|r| missed.saturating_sub(r.state.messages.load(Ordering::Relaxed))),
        "extra": sum(&|r| r.state.messages.load(Ordering::Relaxed).saturating_sub(missed)),
        "gaps": sum(&|r| r.state.gaps.load(Ordering::Relaxed)),
        "duplicates": sum(&|r| r.state.dup_surfaced.load(Ordering::Relaxed)),
        "send_failures": failed,
    });
    for r in &back {
        r.handle.close();
    }
    Ok(out)
}

pub fn storm_report(o: &Opts, results: &[Value]) -> Report {
    let mut report = Report::new("storm");
    let sum = |k: &str| {
        results
            .iter()
            .map(|r| r[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let t = results
        .iter()
        .map(|r| r["time_to_all_synced_ms"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    report.put("clients", "reconnecting clients", json!(o.clients));
    report.put("missed", "missed events per client", json!(o.missed));
    report.put("processes", "load processes", json!(results.len()));
    report.put("synced", "synced again", json!(sum("synced")));
    report.put(
        "time_to_all_synced_ms",
        "time until all synced with their backlog (ms)",
        json!(t),
    );
    report.put(
        "failed_connects",
        "failed connect attempts",
        json!(sum("failed_connects")),
    );
    report.put(
        "delivered",
        "backlog events delivered",
        json!(sum("delivered")),
    );
    report.put(
        "expected",
        "backlog events expected",
        json!(sum("expected")),
    );
    report.put("gaps", "gaps reported", json!(sum("gaps")));
    report.put(
        "duplicates",
        "duplicates surfaced",
        json!(sum("duplicates")),
    );
    report.check(
        sum("synced") == o.clients as u64,
        format!("{} of {} clients synced", sum("synced"), o.clients),
    );
    report.check(
        sum("missing") == 0,
        format!("{} backlog events missing", sum("missing")),
    );
    report.check(
        sum("extra") == 0,
        format!("{} events beyond the backlog", sum("extra")),
    );
    report.check(sum("gaps") == 0, format!("{} gaps", sum("gaps")));
    report.check(
        sum("duplicates") == 0,
        format!("{} duplicates surfaced", sum("duplicates")),
    );
    report.check(
        sum("send_failures") == 0,
        format!("{} sends failed", sum("send_failures")),
    );
    report.check(
        results
            .iter()
            .all(|r| r["all_synced"].as_bool() == Some(true)),
        "not every client synced with its whole backlog in time".into(),
    );
    report
}

/// Polls (every millisecond, for at most 10 s) for the supervisor's new
/// child and then for `/health` to count every worker alive again; returns
/// both times since `killed_at`.
fn watch_replacement(
    sup: i32,
    old_children: &HashSet<i32>,
    addr: &str,
    killed_at: Instant,
) -> (Option<Duration>, Option<Duration>) {
    use std::io::{Read, Write};
    let mut spawned = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        if spawned.is_none() {
            let children = std::fs::read_to_string(format!("/proc/{sup}/task/{sup}/children"))
                .unwrap_or_default();
            if children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .any(|p| !old_children.contains(&p))
            {
                spawned = Some(killed_at.elapsed());
            }
        } else if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
            if let Ok(v) = serde_json::from_str::<Value>(body) {
                let w = &v["workers"];
                if w["alive"].as_u64().is_some() && w["alive"] == w["configured"] {
                    return (spawned, Some(killed_at.elapsed()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (spawned, None)
}
