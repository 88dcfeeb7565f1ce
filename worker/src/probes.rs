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
            "phase": match app.phase.get() { Phase::Serving => "serving", Phase::Draining => "draining" },
        })
        .to_string(),
    )
}

pub fn ready(app: &App) -> Response<Body> {
    let db_ok = app.health.connected();
    let serving = app.phase.get() == Phase::Serving;
    let fanout_ok = app.dispatcher.listener_alive();
    let ready = db_ok && serving && fanout_ok;
    json_response(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        json!({
            "ready": ready,
            "worker": app.config.worker_id,
            "checks": {"database": db_ok, "draining": !serving, "fanout": fanout_ok},
        })
        .to_string(),
    )
}

pub fn metrics(app: &App) -> Response<Body> {
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
    ];
    let mut r = Response::new(Full::new(Bytes::from(
        app.metrics.render(&app.config.worker_id, &extra),
    )));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
