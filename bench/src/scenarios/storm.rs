//! The reconnect storm: every client reconnects at once and replays its
//! backlog; how long until all are synced, and that none failed.

use super::*;

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
