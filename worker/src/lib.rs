//! tether-worker: one worker process of the tether gateway.
//!
//! It owns the HTTP API and the WebSocket connections of the clients that
//! reach it, writes their messages to the PostgreSQL event log (DB-first:
//! COMMIT, then acknowledge, then fan out), and delivers every committed
//! event to its connected members in seq order without gaps.
//!
//! Modules, one concept each:
//! - [`config`]: the command line and environment (clap), shared with `tether`;
//! - [`phase`]: serving / leaving / draining, read by `/ready` and every
//!   connection;
//! - [`commit`]: group commit lanes (the write path);
//! - [`frame`]: one committed event as delivered (serialized once, shared);
//! - [`dispatch`]: the dispatcher's rules, a pure state machine (order,
//!   gaps, membership);
//! - [`fanout`]: the dispatcher's shell (inbox, queues, log reads, the
//!   supervised LISTEN thread);
//! - [`sequencer`]: what one connection may write (order, membership);
//! - [`http`]: the accept loop and dispatch by [`routes`];
//! - [`client_addr`]: the client's address behind a load balancer (trusted
//!   peers, PROXY header, `X-Forwarded-For`), parsed by [`proxy_protocol`];
//! - [`request`] / [`respond`]: what a request carries (token, query,
//!   JSON) and the contract's responses (one mapping of errors);
//! - [`members`], [`conversations`], [`probes`]: the routes' answers;
//! - [`upgrade`]: the WebSocket upgrade (token, handshake) and the limits
//!   every connection takes (per user and per address, `Admission`);
//! - [`ws`]: one connection (backlog, synced, live, sends, acks), whatever
//!   its transport (`wire`: a WebSocket or an event stream);
//! - [`sse`]: Server-Sent Events (`GET /v1/sse`) and their one-time
//!   [`tickets`];
//! - [`cursors`]: coalesced cursor writes;
//! - [`health`]: the database probe;
//! - [`control`]: the supervisor's control socket (ready, heartbeat, status);
//! - [`ratelimit`]: per-user send rate;
//! - [`recent`]: recent frames per conversation, shared by backlog replays;
//! - [`store`]: the PostgreSQL event log (schema, write path, reads; the
//!   notification codec; membership writes and roles);
//! - [`socket`]: where the listening socket comes from;
//! - [`logging`]: log lines, human or JSON;
//! - [`demo`]: the demo chat page at `/demo/`.

// Handlers return a ready HTTP response as their error value; it is built
// only on the error path, so its size does not matter.
#![allow(clippy::result_large_err)]

pub mod client_addr;
pub mod commit;
pub mod config;
pub mod control;
pub mod conversations;
pub mod cursors;
pub mod demo;
pub mod dispatch;
pub mod fanout;
pub mod frame;
pub mod health;
pub mod http;
pub mod logging;
pub mod members;
pub mod metrics;
pub mod phase;
pub mod presence;
pub mod probes;
pub mod proxy_protocol;
pub mod prune;
pub mod ratelimit;
pub mod recent;
pub mod request;
pub mod respond;
pub mod routes;
pub mod sequencer;
pub mod socket;
pub mod sse;
pub mod store;
pub mod tickets;
pub mod upgrade;
mod wire;
pub mod ws;

use crate::commit::Committer;
use crate::config::WorkerConfig;
use crate::control::ClusterView;
use crate::cursors::CursorWriter;
use crate::fanout::Dispatcher;
use crate::health::DbHealth;
use crate::metrics::Metrics;
use crate::phase::{PhaseCell, ShutdownReason};
use crate::ratelimit::RateLimiter;
use crate::store::{DbSettings, NoticeKey, Pool};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_protocol::auth::{self, PublicKey, Secret, Verifier};
use tokio::net::TcpListener;

/// Everything a request or connection handler needs, shared by `Arc`.
pub struct App {
    pub config: WorkerConfig,
    /// The read replica for history, when configured.
    pub replica: Option<Pool>,
    /// Checks client tokens (HS256 under the secret; RS256/ES256 under a
    /// configured public key).
    pub verifier: Verifier,
    /// Authenticates the notifications this worker sends.
    pub notice_key: NoticeKey,
    /// Signs and checks SSE tickets.
    pub ticket_key: tickets::TicketKey,
    pub pool: Pool,
    pub committer: Committer,
    pub dispatcher: Dispatcher,
    pub cursors: CursorWriter,
    pub metrics: Arc<Metrics>,
    pub health: Arc<DbHealth>,
    pub phase: PhaseCell,
    pub cluster: Arc<ClusterView>,
    pub rate: RateLimiter,
    /// Conversation creates and membership changes, per user.
    pub membership_rate: RateLimiter,
    /// Open WebSocket connections per user (the per-user cap, and
    /// presence).
    pub user_conns: Arc<upgrade::UserConnections>,
    /// Presence, typing and read receipts.
    pub signals: Arc<presence::Signals>,
    /// Open WebSocket connections per client address (the per-IP cap).
    pub ip_conns: Arc<upgrade::IpConnections>,
    pub recent: Arc<recent::RecentFrames>,
    next_conn: AtomicU64,
    /// The schema is up to date (migrations applied): `/ready` waits for it.
    pub schema_ready: std::sync::atomic::AtomicBool,
    /// WebSocket connections open (the connection limit counts them).
    pub live_conns: AtomicU64,
    /// Every HTTP connection and WebSocket connection task: draining
    /// closes it and waits for it to empty.
    pub tasks: tokio_util::task::TaskTracker,
}

impl App {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs a blocking read on the blocking pool with a pooled connection
    /// (the `postgres` crate must never run on an async thread). A pooled
    /// connection may have died with the database (a restart): if the
    /// read fails that way, it is retried once on a fresh connection, so
    /// the first request after the database returns does not fail. Only
    /// for reads: a failed write is not retried (see [`App::db_write`]).
    pub async fn db<T, F>(&self, f: F) -> Result<T, store::StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut postgres::Client) -> Result<T, store::StoreError> + Send + 'static,
    {
        self.on_pool(move |pool, metrics| {
            let mut conn = checkout(pool, metrics)?;
            match f(&mut conn) {
                Err(e) if e.is_unavailable() && conn.is_closed() => {
                    drop(conn); // r2d2 discards it: it is closed
                    let mut conn = checkout(pool, metrics)?;
                    f(&mut conn)
                }
                r => r,
            }
        })
        .await
    }

    /// Runs a history read of conversation `conversation_id` that needs
    /// every event up to `upto`: on the read replica when one is configured
    /// and has reached `upto` (checked in the same session, right before),
    /// else (behind, or failing) on the primary. No read ever misses an
    /// event because a replica lags.
    pub async fn db_history<T, F>(
        &self,
        conversation_id: i64,
        upto: i64,
        f: F,
    ) -> Result<T, store::StoreError>
    where
        T: Send + 'static,
        F: Fn(&mut postgres::Client) -> Result<T, store::StoreError> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        if let Some(replica) = self.replica.clone() {
            let g = f.clone();
            let on_replica = tokio::task::spawn_blocking(move || {
                let mut conn = replica.get().ok()?;
                let reached = store::last_seq(&mut conn, conversation_id).ok()? >= upto;
                reached.then(|| g(&mut conn).ok()).flatten()
            })
            .await
            .ok()
            .flatten();
            if let Some(t) = on_replica {
                self.metrics
                    .history_reads_replica
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(t);
            }
            self.metrics
                .history_reads_primary
                .fetch_add(1, Ordering::Relaxed);
        }
        self.db(move |c| f(c)).await
    }

    /// Runs a blocking write. The connection is checked first (one empty
    /// round trip), since a write that fails half-way must not be retried
    /// blindly: the caller reports the error and the client retries.
    pub async fn db_write<T, F>(&self, f: F) -> Result<T, store::StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut postgres::Client) -> Result<T, store::StoreError> + Send + 'static,
    {
        self.on_pool(move |pool, metrics| {
            let mut conn = checkout(pool, metrics)?;
            if conn.simple_query("").is_err() {
                drop(conn);
                conn = checkout(pool, metrics)?;
            }
            f(&mut conn)
        })
        .await
    }

    async fn on_pool<T, F>(&self, f: F) -> Result<T, store::StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Pool, &Metrics) -> Result<T, store::StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        let result = tokio::task::spawn_blocking(move || f(&pool, &metrics))
            .await
            .unwrap_or_else(|e| {
                Err(store::StoreError::Internal(format!(
                    "database task failed: {e}"
                )))
            });
        if let Err(e) = &result {
            if e.is_unavailable() {
                self.health.mark_down();
            }
        }
        result
    }
}

/// A pooled connection, timing the wait.
fn checkout(pool: &Pool, metrics: &Metrics) -> Result<store::PooledClient, store::StoreError> {
    let waited = std::time::Instant::now();
    let conn = pool.get();
    metrics.pool_wait.observe_duration(waited.elapsed());
    Ok(conn?)
}

/// Large frames (a flood of escaped control characters makes 258 KB
/// ones) must not stay in the process after they are freed. glibc raises
/// its mmap threshold after each free of a mapped block (up to 32 MiB), so
/// such blocks end up in the heap arenas, fragmented, and are never
/// returned; a fixed threshold keeps every block of 128 KiB or more in its
/// own mapping, given back on free. (Only glibc has `mallopt`.)
fn return_large_blocks_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before the
    // runtime's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// The `tether-worker` entry point: parse the command line, get the
/// socket, run.
pub fn main() -> ExitCode {
    main_with_args("tether-worker", std::env::args_os().skip(1))
}

/// [`main`] with the arguments given (without the program name), and the
/// name that help and errors show: how the `tether` binary runs a worker
/// when the supervisor execs it as `tether worker`. `--help` prints the
/// options and exits 0; a bad command line prints why and exits 2.
pub fn main_with_args<I, T>(bin_name: &str, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    config::unset_empty_env(&<config::WorkerArgs as clap::CommandFactory>::command());
    let argv =
        std::iter::once(std::ffi::OsString::from(bin_name)).chain(args.into_iter().map(Into::into));
    let config = match config::WorkerArgs::parse_from_args(bin_name, argv) {
        Ok(args) => args.into_config(),
        // Help and version to stdout (exit 0), errors to stderr (exit 2).
        Err(e) => e.exit(),
    };
    // A weak secret or an unusable key: one line, exit 2, before anything
    // starts (the secret's value is never printed).
    if let Err(e) = auth::check_secret(&config.secret) {
        eprintln!("{bin_name}: {}", auth::weak_secret_message(&e));
        return ExitCode::from(2);
    }
    let public_key = match &config.token_public_key {
        None => None,
        Some(path) => match PublicKey::from_file(path) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("{bin_name}: TETHER_TOKEN_PUBLIC_KEY (--token-public-key): {e}");
                return ExitCode::from(2);
            }
        },
    };
    logging::init(&config.worker_id, config.log_format);
    return_large_blocks_to_the_os();
    #[cfg(feature = "fault-injection")]
    if std::env::var("TETHER_FAULT").as_deref() == Ok("die-at-start") {
        log::error!("fault injection: dying at start");
        return ExitCode::from(3);
    }
    let listener = match socket::acquire(&config.listen) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime_threads > 0 {
        // Still the multi-threaded scheduler: the blocking pool (database
        // calls) works the same; only the event loops are fewer.
        builder.worker_threads(config.runtime_threads);
    }
    let runtime = match builder
        .enable_all()
        .thread_name(format!("{}-rt", config.worker_id))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::error!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move {
        let listener = match listener.into_tokio() {
            Ok(l) => l,
            Err(e) => {
                log::error!("listening socket unusable: {e}");
                return 1;
            }
        };
        run(listener, config, public_key).await
    });
    // Exit without unwinding the runtime: everything that matters is
    // committed and flushed by now, and dropping the remaining tasks (and
    // with them pooled `postgres` clients, whose drop blocks) on runtime
    // threads would only risk a panic on the way out.
    std::process::exit(code.into());
}

/// Serves on `listener` until drained (SIGTERM/SIGINT, or the supervisor
/// going away).
pub async fn run(listener: TcpListener, config: WorkerConfig, public_key: Option<PublicKey>) -> u8 {
    let worker = config.worker_id.clone();
    let settings = DbSettings::new(&config.database_url).through(config.database_pooler);
    // LISTEN needs a session of its own: a direct connection.
    let listen_settings = DbSettings::new(
        config
            .listen_database_url
            .as_deref()
            .unwrap_or(&config.database_url),
    );
    let pool = match store::pool(
        &settings.named(&format!("tether-pool {worker}")),
        config.pool_size,
        Duration::from_secs(2),
    ) {
        Ok(p) => p,
        Err(e) => {
            log::error!("{e}");
            return 2;
        }
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(DbHealth::new());
    let recent = Arc::new(recent::RecentFrames::new(config.recent_cache_bytes));
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("TETHER_FAULT_NO_RECENT_CACHE").is_some() {
        recent.disable();
    }
    let key = NoticeKey::derive(config.secret.as_bytes());
    let dispatcher = Dispatcher::start(
        recent.clone(),
        pool.clone(),
        listen_settings.named(&format!("tether-listen {worker}")),
        key.clone(),
        metrics.clone(),
        &worker,
        config.outbound_queue_bytes,
        config.presence,
    );
    let committer = Committer::start(
        settings.named(&format!("tether-commit {worker}")),
        key.clone(),
        config.commit_lanes,
        config.max_batch,
        dispatcher.clone(),
        metrics.clone(),
        &worker,
    );
    let user_conns = Arc::new(upgrade::UserConnections::default());
    let signals = Arc::new(presence::Signals::start(
        config.presence,
        pool.clone(),
        key.clone(),
        user_conns.clone(),
        metrics.clone(),
        &worker,
    ));
    let cursors = CursorWriter::start(pool.clone(), signals.clone());
    let rate = RateLimiter::new(config.rate_limit, config.rate_burst);
    let replica = match &config.read_database_url {
        None => None,
        Some(url) => match store::pool(
            &DbSettings::new(url)
                .through(config.database_pooler)
                .named(&format!("tether-replica {worker}")),
            config.pool_size,
            Duration::from_secs(2),
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!("read replica: {e}");
                return 2;
            }
        },
    };
    let membership_rate = RateLimiter::new(config.membership_rate, config.membership_burst);
    if let Some(k) = &public_key {
        log::info!(
            "accepting {} tokens under the configured public key",
            k.algorithm()
        );
    }
    let verifier = Verifier::hs256(Secret::new(config.secret.clone().into_bytes()))
        .with_public_key(public_key)
        .with_issuer(config.token_issuer.clone())
        .with_audience(config.token_audience.clone());
    let app = Arc::new(App {
        replica,
        notice_key: key,
        ticket_key: tickets::TicketKey::derive(config.secret.as_bytes()),
        verifier,
        membership_rate,
        user_conns,
        signals,
        ip_conns: Arc::new(upgrade::IpConnections::default()),
        config,
        pool,
        committer,
        dispatcher,
        cursors,
        metrics,
        health: health.clone(),
        phase: PhaseCell::new(),
        cluster: Arc::new(ClusterView::standalone()),
        rate,
        recent,
        next_conn: AtomicU64::new(1),
        live_conns: AtomicU64::new(0),
        schema_ready: std::sync::atomic::AtomicBool::new(false),
        tasks: tokio_util::task::TaskTracker::new(),
    });
    health::spawn_probe(app.clone());
    probes::spawn_lag_probe(app.clone());
    probes::spawn_exposition_writer(app.clone());

    // Pending migrations, applied here too, let a worker run on its own
    // against an empty database; `/ready` says 503 until they are. The
    // database may be down: keep trying in the background rather than
    // refuse to start.
    {
        let settings = settings.clone();
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            for attempt in 0u32.. {
                match settings
                    .connect()
                    .and_then(|mut c| store::migrate::migrate(&mut c))
                {
                    Ok(applied) => {
                        if !applied.is_empty() {
                            log::info!("schema: applied migrations {applied:?}");
                        }
                        app.schema_ready.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) if attempt == 0 => log::warn!("schema not applied yet: {e}"),
                    Err(_) => {}
                }
                // Checked often: /ready waits for it.
                std::thread::sleep(Duration::from_millis(if attempt < 20 { 100 } else { 1000 }));
            }
        });
    }

    prune::spawn(
        app.pool.clone(),
        app.config.retention,
        app.config.prune_interval,
        app.metrics.clone(),
        &app.config.worker_id,
    );

    // The control socket to the supervisor, when there is one.
    let control = control::attach(app.clone());

    // A worker never serves without cross-worker fan-out: if the LISTEN
    // thread stops for good, drain and exit (non-zero) to be replaced.
    {
        let app = app.clone();
        tokio::spawn(async move {
            app.dispatcher.listener_lost().await;
            app.phase.start_draining(ShutdownReason::FanoutLost);
        });
    }

    // Signals: SIGTERM/SIGINT drain.
    {
        let app = app.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                log::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            app.phase.start_draining(ShutdownReason::Signal);
        });
    }

    match listener.local_addr() {
        Ok(addr) => log::info!("serving on {addr}"),
        Err(_) => log::info!("serving"),
    }
    if let Some(c) = &control {
        c.ready();
    }
    http::accept_loop(app.clone(), listener).await;

    // Draining: the accept loop returned. Tell the supervisor, wait for
    // connections to close (they send 1001 and wait for their in-flight
    // commits), then flush cursors.
    if let Some(c) = &control {
        c.draining();
    }
    app.tasks.close();
    let drained = async {
        app.tasks.wait().await;
        app.committer.idle().await;
    };
    if tokio::time::timeout(app.config.drain, drained)
        .await
        .is_err()
    {
        log::warn!(
            "drain time over with {} tasks and {} sends pending",
            app.tasks.len(),
            app.committer.pending()
        );
    }
    app.cursors.flush_now().await;
    if app.phase.reason() == Some(ShutdownReason::FanoutLost) {
        log::error!("exiting: cross-worker fan-out was lost");
        return 1;
    }
    log::info!("drained, exiting");
    0
}
