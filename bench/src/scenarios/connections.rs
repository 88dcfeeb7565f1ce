//! The connections scenario: many idle connections (one shard of them
//! per load process) and the server's resident memory per connection.

use super::*;

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
