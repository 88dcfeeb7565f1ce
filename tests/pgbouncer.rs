//! tether behind a real PgBouncer (Debian's 1.18) in transaction mode, in
//! front of a throwaway cluster: two workers share a pool of 4 server
//! connections (`--database-pooler transaction`), with
//! LISTEN on a direct connection (`--listen-database-url`). Sends over
//! REST and WebSocket, fan-out across the two workers, a membership change
//! and an offline member's catch-up are all gap-free, exactly once and in
//! order; PgBouncer's own statistics show the traffic went through it.
//!
//! Without `pgbouncer` the test says SKIPPED and passes, unless
//! `TETHER_REQUIRE_ALL=1` (as in .ci/run).

use serde_json::json;
use std::time::Duration;
use tether_pgcluster::{PgBouncer, PgCluster, PgOptions};
use tether_testkit::*;

const T: Duration = Duration::from_secs(30);
/// Server connections PgBouncer keeps per (database, user): far fewer
/// than the clients tether opens (2 workers × (pool + lanes)).
const POOL: u32 = 4;

fn have_pgbouncer() -> bool {
    let found = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file());
    if !found {
        assert!(
            std::env::var("TETHER_REQUIRE_ALL").as_deref() != Ok("1"),
            "pgbouncer is not installed (apt-get install pgbouncer) and TETHER_REQUIRE_ALL=1"
        );
        eprintln!("SKIPPED tether_runs_behind_pgbouncer_in_transaction_mode: pgbouncer not installed (apt-get install pgbouncer)");
    }
    found
}

/// A number from PgBouncer's admin console (`SHOW <what>`): the column
/// `column` of the row whose first column is `key`.
fn admin_number(bouncer: &PgBouncer, what: &str, key: &str, column: &str) -> i64 {
    let url = format!("postgres://postgres@127.0.0.1:{}/pgbouncer", bouncer.port());
    let (what, key, column) = (what.to_string(), key.to_string(), column.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("admin console");
        for m in c.simple_query(&format!("SHOW {what}")).expect("SHOW") {
            if let postgres::SimpleQueryMessage::Row(r) = m {
                if r.get(0) == Some(key.as_str()) {
                    let i = r
                        .columns()
                        .iter()
                        .position(|c| c.name() == column)
                        .expect("column");
                    return r.get(i).unwrap().parse().unwrap();
                }
            }
        }
        panic!("no {key} row in SHOW {what}")
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_runs_behind_pgbouncer_in_transaction_mode() {
    if !have_pgbouncer() {
        return;
    }
    let (cluster, bouncer) = tokio::task::spawn_blocking(|| {
        let cluster = PgCluster::start_temp(PgOptions {
            fsync: false,
            max_connections: 100,
            port: None,
        })
        .expect("cluster");
        let bouncer = cluster
            .start_pgbouncer("transaction", POOL)
            .expect("pgbouncer");
        (cluster, bouncer)
    })
    .await
    .unwrap();
    let direct = cluster.url();
    let pooled = bouncer.url();
    // Two workers (two processes, each with its own pools and LISTEN),
    // each on its own port so that subscribers are on both for sure.
    let args = [
        "--database-pooler",
        "transaction",
        "--listen-database-url",
        direct.as_str(),
    ];
    let w1 = WorkerProc::spawn(&pooled, TEST_SECRET, &args, &[]);
    let w2 = WorkerProc::spawn(&pooled, TEST_SECRET, &args, &[]);
    let a = w1.addr();

    // Subscribers on both workers.
    let c = create_conversation(a, "alice", &["bob", "carol"]).await;
    let mut subs: Vec<(String, WsClient)> = Vec::new();
    for w in [&w1, &w2, &w1, &w2] {
        let mut ws = WsClient::connect(&w.ws_url(), &tok("bob"))
            .await
            .expect("connect");
        ws.read_until_synced(T).await;
        subs.push((w.worker_id().to_string(), ws));
    }

    // Sends: REST, with one retry each (exactly once), and WebSocket.
    for i in 0..30 {
        let id = format!("r{i}");
        let first = send_message(a, "alice", c, &id).await.1;
        let again = send_message(a, "alice", c, &id).await.1;
        assert_eq!(first["seq"], again["seq"], "a retry is the same event");
    }
    let mut alice = WsClient::connect(&w2.ws_url(), &tok("alice"))
        .await
        .expect("alice");
    alice.read_until_synced(T).await;
    for i in 0..30 {
        alice
            .send_json(&json!({"type":"send","conversation_id":c,"body":"ws","client_msg_id":format!("w{i}")}))
            .await;
    }
    for _ in 0..30 {
        alice
            .recv_until(T, |v| v["type"] == "sent")
            .await
            .expect("sent");
    }
    // A membership change through the pooler too.
    let r = http(
        a,
        "POST",
        &format!("/v1/conversations/{c}/members"),
        Some(&tok("alice")),
        Some(&json!({"user": "dave"})),
    )
    .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    // conversation.created, 30 + 30 messages, member.joined.
    let last = 62;

    // Every subscriber, on either worker, gets everything in order.
    for (w, ws) in subs.iter_mut() {
        let got = receive_upto(ws, c, 1, last, &format!("bob on {w}")).await;
        assert_eq!(got, last);
    }
    // Carol was offline throughout: her backlog is the whole log.
    let mut carol = WsClient::connect(&w2.ws_url(), &tok("carol"))
        .await
        .expect("carol");
    let backlog = carol.read_until_synced(T).await;
    assert_eq!(event_seqs(&backlog), (1..=last).collect::<Vec<_>>());
    // And the REST page agrees.
    let r = http(
        a,
        "GET",
        &format!("/v1/conversations/{c}/events?after_seq=0&limit=200"),
        Some(&tok("carol")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let page: Vec<i64> = r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(page, (1..=last).collect::<Vec<_>>());

    // The traffic went through PgBouncer, over at most POOL server
    // connections.
    let bouncer = tokio::task::spawn_blocking(move || {
        let xacts = admin_number(&bouncer, "STATS", "postgres", "total_xact_count");
        assert!(xacts >= 60, "transactions through pgbouncer: {xacts}");
        let servers = admin_number(&bouncer, "POOLS", "postgres", "sv_active")
            + admin_number(&bouncer, "POOLS", "postgres", "sv_idle")
            + admin_number(&bouncer, "POOLS", "postgres", "sv_used");
        assert!(servers <= POOL as i64, "server connections: {servers}");
        bouncer
    })
    .await
    .unwrap();
    drop((w1, w2));
    drop((bouncer, cluster));
}
