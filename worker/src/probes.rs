//! What operators and load balancers read: `/health`, `/ready`,
//! `/metrics`. No token needed.

use crate::phase::Phase;
use crate::respond::{json_response, Body};
use crate::App;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering;
use tether_protocol::exposition::{file_name, merge, ENV_METRICS_DIR};

pub fn health(app: &App) -> Response<Body> {
    let db_ok = app.health.connected();
    let ms = app.health.response_ms();
    let cluster = app.cluster.get();
    let fanout_ok = app.dispatcher.listener_alive();
    let status = if !db_ok || !fanout_ok {
        "unhealthy"
    } else if cluster.alive < cluster.configured || ms > crate::health::SLOW_DB_MS as f64 {
        "degraded"
    } else {
        "healthy"
    };
    let code = if db_ok && fanout_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        code,
        json!({
            "status": status,
            "database": {"connected": db_ok, "response_ms": ms},
            "fanout": {"listening": fanout_ok},
            "workers": {
                "configured": cluster.configured,
                "alive": cluster.alive,
                "restarts": cluster.restarts,
            },
            "connections": app.metrics.connections_open.load(Ordering::Relaxed),
            "worker": app.config.worker_id,
            "pid": std::process::id(),
            "phase": match app.phase.get() {
                Phase::Serving => "serving",
                Phase::Leaving => "leaving",
                Phase::Draining => "draining",
            },
        })
        .to_string(),
    )
}

pub fn ready(app: &App) -> Response<Body> {
    let db_ok = app.health.connected();
    let serving = app.phase.get() == Phase::Serving;
    let fanout_ok = app.dispatcher.listener_alive();
    let schema_ok = app.schema_ready.load(Ordering::Acquire);
    let ready = db_ok && serving && fanout_ok && schema_ok;
    json_response(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        json!({
            "ready": ready,
            "worker": app.config.worker_id,
            "checks": {"database": db_ok, "draining": !serving, "fanout": fanout_ok, "schema": schema_ok},
        })
        .to_string(),
    )
}

/// `/metrics`: this worker's own series, live, and (under a supervisor)
/// the rest of the host's from their files: the whole host in one scrape.
pub fn metrics(app: &App) -> Response<Body> {
    let own = render_own(app);
    let text = match std::env::var_os(ENV_METRICS_DIR) {
        Some(dir) => {
            let others = host_files(std::path::Path::new(&dir), &app.config.worker_id);
            let mut all: Vec<&str> = vec![&own];
            all.extend(others.iter().map(String::as_str));
            merge(&all)
        }
        None => own,
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// A file older than this belongs to a process that stopped writing.
const STALE: std::time::Duration = std::time::Duration::from_secs(5);

/// The other processes' expositions in `dir` (not this worker's own, not
/// stale ones).
fn host_files(dir: &std::path::Path, own: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let own = file_name(own);
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".prom"))
        .filter(|e| e.file_name().to_string_lossy() != own)
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < STALE)
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

/// Writes this worker's exposition to the host's directory every second
/// (atomically: a temporary file renamed), so any worker's `/metrics`
/// shows it.
pub fn spawn_exposition_writer(app: std::sync::Arc<App>) {
    let Some(dir) = std::env::var_os(ENV_METRICS_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let target = dir.join(file_name(&app.config.worker_id));
        let tmp = dir.join(format!(".{}.tmp", app.config.worker_id));
        loop {
            tick.tick().await;
            let text = render_own(&app);
            let (t, dest) = (tmp.clone(), target.clone());
            let written = tokio::task::spawn_blocking(move || {
                std::fs::write(&t, text).and_then(|_| std::fs::rename(&t, &dest))
            })
            .await;
            if let Ok(Err(e)) = written {
                log::debug!("metrics: writing {}: {e}", target.display());
            }
        }
    });
}

/// Measures the runtime's lateness: a 100 ms interval's ticks, each
/// observed as how late it fired.
pub fn spawn_lag_probe(app: std::sync::Arc<App>) {
    tokio::spawn(async move {
        let period = std::time::Duration::from_millis(100);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = tokio::time::Instant::now();
            let late = now.saturating_duration_since(last + period);
            app.metrics.event_loop_lag.observe_duration(late);
            last = now;
        }
    });
}

/// This worker's own exposition.
fn render_own(app: &App) -> String {
    let state = app.pool.state();
    let cluster = app.cluster.get();
    let extra = [
        (
            "tether_db_pool_connections",
            "Connections in the read pool.",
            state.connections as f64,
        ),
        (
            "tether_db_pool_idle",
            "Idle connections in the read pool.",
            state.idle_connections as f64,
        ),
        (
            "tether_db_pool_in_use",
            "Read pool connections in use.",
            (state.connections - state.idle_connections) as f64,
        ),
        (
            "tether_db_up",
            "1 if the last database probe succeeded.",
            if app.health.connected() { 1.0 } else { 0.0 },
        ),
        (
            "tether_db_response_ms",
            "Last database probe round trip.",
            app.health.response_ms(),
        ),
        (
            "tether_commit_queue",
            "Sends waiting for a commit lane.",
            app.committer.queued() as f64,
        ),
        (
            "tether_workers_configured",
            "Workers the supervisor runs.",
            cluster.configured as f64,
        ),
        (
            "tether_workers_alive",
            "Workers alive and ready.",
            cluster.alive as f64,
        ),
        (
            "tether_worker_restarts",
            "Worker replacements since the supervisor started.",
            cluster.restarts as f64,
        ),
        (
            "tether_listener_up",
            "1 while the LISTEN thread (cross-worker fan-out) runs.",
            if app.dispatcher.listener_alive() {
                1.0
            } else {
                0.0
            },
        ),
        (
            "tether_db_pool_saturation",
            "Share of the read pool in use (0 to 1).",
            if state.connections == 0 {
                0.0
            } else {
                (state.connections - state.idle_connections) as f64
                    / app.config.pool_size.max(1) as f64
            },
        ),
    ];
    app.metrics.render(&app.config.worker_id, &extra)
}
