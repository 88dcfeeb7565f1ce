//! The crash scenario: a worker SIGKILLed under load; how fast its
//! replacement serves and every affected client is synced again, with
//! nothing lost.

use super::*;

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
