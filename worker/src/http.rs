//! HTTP: the accept loop, the REST API of the contract, `/health`,
//! `/ready`, `/metrics`, and the route to the WebSocket upgrade.
//!
//! Every error is JSON `{"error":code,"message":...}` with the contract's
//! status; 429 and 503 carry `Retry-After` (and `retry_after` in the body).

use crate::commit::{ReplyTo, SendRequest};
use crate::phase::Phase;
use crate::store::StoreFailure;
use crate::store::{self, NewMessage, StoreError};
use crate::{members, ws, App};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tether_protocol::auth;
use tether_protocol::frames::{http_error_body, validate_client_msg_id};
use tokio::net::TcpListener;

pub type Body = Full<Bytes>;

/// How long a draining worker still answers requests on connections it
/// already accepted.
const DRAIN_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Largest request body read (JSON around a message body of the maximum size).
fn body_limit(app: &App) -> usize {
    app.config.max_body_bytes * 2 + 4096
}

/// Accepts connections until the worker drains.
pub async fn accept_loop(app: Arc<App>, listener: TcpListener) {
    let mut phase = app.phase.subscribe();
    loop {
        if app.phase.get() == Phase::Draining {
            break;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(app.clone(), stream));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = phase.changed() => {}
        }
    }
    log::info!("stopped accepting");
}

/// Counts an open HTTP connection for as long as it lives.
struct HttpConnGuard(Arc<App>);

impl Drop for HttpConnGuard {
    fn drop(&mut self) {
        self.0.live_http.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(app: Arc<App>, stream: tokio::net::TcpStream) {
    app.live_http.fetch_add(1, Ordering::AcqRel);
    let _guard = HttpConnGuard(app.clone());
    let svc_app = app.clone();
    let svc = service_fn(move |req| {
        let app = svc_app.clone();
        async move { Ok::<_, Infallible>(handle(app, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.handshake_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let mut phase = app.phase.subscribe();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = crate::phase::until_draining(&mut phase) => {
            // A connection accepted just before the drain may not have sent
            // (or we may not have read) its first request yet; hyper would
            // count it as idle and close it unanswered. Give requests a
            // moment to arrive and be answered, then close.
            let grace = tokio::time::sleep(DRAIN_REQUEST_GRACE);
            tokio::pin!(grace);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = &mut grace => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error response of the contract.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, http_error_body(code, message, None))
}

fn retry_response(status: StatusCode, code: &str, message: &str, secs: u64) -> Response<Body> {
    let mut r = json_response(status, http_error_body(code, message, Some(secs)));
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// The response for a store error (the mapping is
/// [`StoreFailure`]'s, shared with the WebSocket).
pub fn store_error_response(e: &StoreError) -> Response<Body> {
    if let StoreError::Internal(m) = e {
        log::error!("internal error: {m}");
    }
    let f = StoreFailure::from(e);
    let status =
        StatusCode::from_u16(f.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match f.retry_after {
        Some(secs) => retry_response(status, f.code.as_str(), &f.message, secs),
        None => error_response(status, f.code.as_str(), &f.message),
    }
}

/// Decodes `%XX` and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `name` in a query string.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// The bearer token of a request (header only; `?token=` is accepted on
/// the WebSocket route alone).
pub fn bearer(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let t = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))?;
    Some(t.trim().to_string())
}

/// Verifies a token; on failure the 401 response. The token itself is
/// never logged.
pub fn authenticate(app: &App, token: Option<String>) -> Result<Arc<str>, Response<Body>> {
    let token = token.unwrap_or_default();
    match auth::verify(&app.secret, &token) {
        Ok(user) => Ok(Arc::from(user)),
        Err(e) => {
            app.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            log::debug!("auth refused: {e}");
            let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            Err(r)
        }
    }
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    if app.config.demo && method == Method::GET && (path == "/demo" || path.starts_with("/demo/")) {
        return crate::demo::serve(&path)
            .unwrap_or_else(|| error_response(StatusCode::NOT_FOUND, "not_found", "no such file"));
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => return health(&app),
        (&Method::GET, ["ready"]) => return ready(&app),
        (&Method::GET, ["metrics"]) => return metrics(&app),
        (&Method::GET, ["v1", "ws"]) => return ws::upgrade(app, req),
        _ => {}
    }
    let known = matches!(
        segments.as_slice(),
        ["v1", "conversations"]
            | ["v1", "conversations", _, "members"]
            | ["v1", "conversations", _, "members", _]
            | ["v1", "conversations", _, "messages"]
            | ["v1", "conversations", _, "events"]
    );
    if !known {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such route");
    }
    let user = match authenticate(&app, bearer(&req)) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let query = req.uri().query().map(str::to_owned);
    let conv = |s: &str| s.parse::<i64>().ok().filter(|c| *c > 0);
    match (method, segments.as_slice()) {
        (Method::POST, ["v1", "conversations"]) => members::create(app, user, req).await,
        (Method::GET, ["v1", "conversations"]) => {
            list_conversations(app, user, query.as_deref()).await
        }
        (Method::POST, ["v1", "conversations", id, "members"]) => match conv(id) {
            Some(c) => members::add(app, user, c, req).await,
            None => unknown_conversation(id),
        },
        (Method::DELETE, ["v1", "conversations", id, "members", member]) => match conv(id) {
            Some(c) => members::remove(app, user, c, percent_decode(member)).await,
            None => unknown_conversation(id),
        },
        (Method::PATCH, ["v1", "conversations", id, "members", member]) => match conv(id) {
            Some(c) => members::set_role(app, user, c, percent_decode(member), req).await,
            None => unknown_conversation(id),
        },
        (Method::POST, ["v1", "conversations", id, "messages"]) => match conv(id) {
            Some(c) => send_message(app, user, c, req).await,
            None => unknown_conversation(id),
        },
        (Method::GET, ["v1", "conversations", id, "events"]) => match conv(id) {
            Some(c) => list_events(app, user, c, query.as_deref()).await,
            None => unknown_conversation(id),
        },
        _ => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ),
    }
}

fn unknown_conversation(id: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!(
            "conversation {:?} not found",
            id.chars().take(40).collect::<String>()
        ),
    )
}

/// Reads a JSON object body: 413 past the limit, 400 if not JSON or not
/// an object.
pub(crate) async fn read_json(
    app: &App,
    req: Request<Incoming>,
) -> Result<serde_json::Map<String, Value>, Response<Body>> {
    let limit = body_limit(app);
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body too large",
            ));
        }
    }
    let bytes = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body too large",
                ));
            }
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "could not read the request body",
            ));
        }
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be a JSON object",
        )),
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("malformed JSON: {e}"),
        )),
    }
}

pub(crate) fn invalid(message: &str) -> Response<Body> {
    error_response(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
}

/// Validates a message body against the size limit: `Err` is the
/// (status-worthy) code and message.
pub fn check_body(app: &App, body: &str) -> Result<(), (&'static str, String)> {
    if body.contains('\0') {
        return Err((
            "invalid_field",
            "message body must not contain NUL characters".into(),
        ));
    }
    if body.len() > app.config.max_body_bytes {
        return Err((
            "payload_too_large",
            format!(
                "message body is {} bytes; the limit is {}",
                body.len(),
                app.config.max_body_bytes
            ),
        ));
    }
    Ok(())
}

async fn send_message(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match read_json(&app, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let text = match body.get("body") {
        Some(Value::String(s)) => s.clone(),
        _ => return invalid("body must be a string"),
    };
    if let Err((code, msg)) = check_body(&app, &text) {
        let status = if code == "payload_too_large" {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        return error_response(status, code, &msg);
    }
    let client_msg_id = match body.get("client_msg_id") {
        Some(Value::String(s)) => {
            if let Err(m) = validate_client_msg_id(s) {
                return invalid(m);
            }
            s.clone()
        }
        // Without a key the send is not idempotent; give it a unique one.
        None | Some(Value::Null) => {
            let mut b = [0u8; 16];
            if getrandom::fill(&mut b).is_err() {
                return store_error_response(&StoreError::Internal("no randomness".into()));
            }
            format!(
                "srv-{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )
        }
        Some(_) => return invalid("client_msg_id must be a string"),
    };
    if let Err(secs) = app.rate.check(&user) {
        app.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return retry_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many sends; slow down",
            secs,
        );
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = SendRequest {
        message: NewMessage {
            conversation_id,
            sender: user.to_string(),
            body: text,
            client_msg_id,
        },
        reply: ReplyTo::Once(tx),
        queued_at: Instant::now(),
    };
    if app.committer.submit(req).await.is_err() {
        return store_error_response(&StoreError::Unavailable("commit lanes stopped".into()));
    }
    match rx.await {
        Ok(Ok(appended)) => {
            let status = if appended.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            json_response(status, appended.event.to_json())
        }
        Ok(Err(e)) => store_error_response(&e),
        Err(_) => store_error_response(&StoreError::Unavailable("commit lane stopped".into())),
    }
}

fn parse_i64_param(query: Option<&str>, name: &str) -> Result<Option<i64>, Response<Body>> {
    match query_param(query, name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Some(n)),
            _ => Err(error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("{name} must be a non-negative integer"),
            )),
        },
    }
}

fn limit_param(query: Option<&str>) -> Result<i64, Response<Body>> {
    Ok(parse_i64_param(query, "limit")?.unwrap_or(50).clamp(1, 200))
}

async fn list_conversations(app: Arc<App>, user: Arc<str>, query: Option<&str>) -> Response<Body> {
    let after = match parse_i64_param(query, "after") {
        Ok(a) => a.unwrap_or(0),
        Err(r) => return r,
    };
    let limit = match limit_param(query) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let u = user.to_string();
    match app
        .db(move |c| store::conversations_page(c, &u, after, limit + 1))
        .await
    {
        Ok(mut rows) => {
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let next = if more {
                rows.last().map(|r| r.id.to_string())
            } else {
                None
            };
            json_response(
                StatusCode::OK,
                json!({"conversations": rows, "next": next}).to_string(),
            )
        }
        Err(e) => store_error_response(&e),
    }
}

async fn list_events(
    app: Arc<App>,
    user: Arc<str>,
    conversation_id: i64,
    query: Option<&str>,
) -> Response<Body> {
    let before = match parse_i64_param(query, "before_seq") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let after = match parse_i64_param(query, "after_seq") {
        Ok(v) => v,
        Err(r) => return r,
    };
    if before.is_some() && after.is_some() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "give before_seq or after_seq, not both",
        );
    }
    let limit = match limit_param(query) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let u = user.to_string();
    match app
        .db(move |c| store::events_page(c, &u, conversation_id, before, after, limit + 1))
        .await
    {
        Ok(mut events) => {
            let more = events.len() as i64 > limit;
            events.truncate(limit as usize);
            let last = events.last().map(|e| e.seq);
            let body = if after.is_some() {
                json!({"events": events, "next_after_seq": if more { last } else { None }})
            } else {
                json!({"events": events, "next_before_seq": if more { last } else { None }})
            };
            json_response(StatusCode::OK, body.to_string())
        }
        Err(e) => store_error_response(&e),
    }
}

fn health(app: &App) -> Response<Body> {
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
            "phase": match app.phase.get() { Phase::Serving => "serving", Phase::Draining => "draining" },
        })
        .to_string(),
    )
}

fn ready(app: &App) -> Response<Body> {
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

fn metrics(app: &App) -> Response<Body> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_decodes() {
        assert_eq!(
            query_param(Some("a=1&token=x%2Ey+z"), "token").as_deref(),
            Some("x.y z")
        );
        assert_eq!(query_param(Some("a=1"), "b"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
