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

mod connections;
mod crash;
mod storm;

pub use connections::{connections_report, connections_shard, server_rss, RssSample};
pub use crash::crash;
pub use storm::{storm_report, storm_shard};

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
