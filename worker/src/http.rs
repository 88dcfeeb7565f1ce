//! HTTP: the accept loop, each connection's lifetime (header timeout,
//! drain), and dispatch of every request by its [`Route`] to the module
//! that answers it: [`crate::probes`], [`crate::demo`], [`crate::ws`],
//! [`crate::sse`], [`crate::members`], [`crate::conversations`].
//!
//! Every error is JSON `{"error":code,"message":...}` with the contract's
//! status ([`crate::respond`]); 429 and 503 carry `Retry-After` (and
//! `retry_after` in the body).

use crate::client_addr::{client_ip, read_proxy_header, HeaderError};
use crate::phase::Phase;
use crate::request::{authenticate, bearer};
use crate::respond::{error_response, fail, retry_response, Body};
use crate::routes::{ConversationRef, Route};
use crate::sse::Outgoing;
use crate::{conversations, demo, members, probes, sse, upgrade, App};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_protocol::error_code::ErrorCode;
use tokio::net::TcpListener;

/// How long a draining worker still answers requests on connections it
/// already accepted.
const DRAIN_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

/// Accepts connections until the worker drains.
pub async fn accept_loop(app: Arc<App>, listener: TcpListener) {
    let mut phase = app.phase.subscribe();
    loop {
        if app.phase.get() == Phase::Draining {
            break;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    app.tasks.spawn(serve_connection(app.clone(), stream, peer));
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

async fn serve_connection(app: Arc<App>, mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    // A trusted balancer's PROXY header first (within the header timeout);
    // a bad one ends this connection and nothing else.
    let trusted = &app.config.trusted_proxies;
    let within = app.config.handshake_timeout;
    let conn_addr = match read_proxy_header(&mut stream, peer, trusted, within).await {
        Ok(addr) => addr,
        Err(e @ HeaderError::Silent(_)) => {
            log::debug!("peer={peer}: {e}; closing the connection");
            return;
        }
        Err(e) => {
            app.metrics
                .proxy_header_errors
                .fetch_add(1, Ordering::Relaxed);
            log::warn!("peer={peer}: {e}; closing the connection");
            return;
        }
    };
    let svc_app = app.clone();
    let svc = service_fn(move |req| {
        let app = svc_app.clone();
        async move { Ok::<_, Infallible>(handle(app, req, conn_addr.ip()).await) }
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

async fn handle(app: Arc<App>, req: Request<Incoming>, conn_ip: IpAddr) -> Response<Outgoing> {
    if req.method() == Method::GET && req.uri().path().trim_end_matches('/') == "/v1/sse" {
        let ip = request_ip(&app, &req, conn_ip);
        return sse::open(app, req, ip).await;
    }
    answer(app, req, conn_ip).await.map(Outgoing::Left)
}

/// The client's address: the connection's (a trusted balancer's PROXY
/// header already applied), or what a trusted balancer says in
/// `X-Forwarded-For`.
fn request_ip(app: &App, req: &Request<Incoming>, conn_ip: IpAddr) -> IpAddr {
    let forwarded = req.headers().get_all("x-forwarded-for");
    let trusted = &app.config.trusted_proxies;
    client_ip(conn_ip, forwarded.iter().map(|v| v.as_bytes()), trusted)
}

/// Every request but an event stream: a whole response.
async fn answer(app: Arc<App>, req: Request<Incoming>, conn_ip: IpAddr) -> Response<Body> {
    let method = req.method().clone();
    let Some(route) = Route::parse(&method, req.uri().path(), app.config.demo) else {
        return fail(ErrorCode::NotFound, "no such route");
    };
    match route {
        Route::Health => return probes::health(&app),
        Route::Ready => return probes::ready(&app),
        Route::Metrics => return probes::metrics(&app),
        Route::Demo => {
            return demo::serve(req.uri().path())
                .unwrap_or_else(|| fail(ErrorCode::NotFound, "no such file"))
        }
        Route::WebSocket => {
            let ip = request_ip(&app, &req, conn_ip);
            return upgrade::upgrade(app, req, ip);
        }
        // Answered by `handle`, which streams.
        Route::EventStream => return fail(ErrorCode::NotFound, "no such route"),
        _ => {}
    }
    let user = match authenticate(&app, bearer(&req)) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    // Conversation creates and membership changes: per user, per worker.
    let membership_write = matches!(
        (&method, &route),
        (&Method::POST, Route::Conversations)
            | (&Method::POST, Route::Members(_))
            | (&Method::DELETE, Route::Member(..))
            | (&Method::PATCH, Route::Member(..))
    );
    if membership_write {
        if let Err(secs) = app.membership_rate.check(&user) {
            app.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return retry_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many membership changes; slow down",
                secs,
            );
        }
    }
    match (method, route) {
        (Method::POST, Route::Conversations) => members::create(app, user, req).await,
        (Method::GET, Route::Conversations) => {
            conversations::list_conversations(app, user, query).await
        }
        (Method::POST, Route::Members(c)) => match c.id() {
            Ok(c) => members::add(app, user, c, req).await,
            Err(r) => r,
        },
        (Method::DELETE, Route::Member(c, member)) => match c.id() {
            Ok(c) => members::remove(app, user, c, member).await,
            Err(r) => r,
        },
        (Method::PATCH, Route::Member(c, member)) => match c.id() {
            Ok(c) => members::set_role(app, user, c, member, req).await,
            Err(r) => r,
        },
        (Method::POST, Route::Messages(c)) => match c.id() {
            Ok(c) => conversations::send_message(app, user, c, req).await,
            Err(r) => r,
        },
        (Method::GET, Route::Events(c)) => match c.id() {
            Ok(c) => conversations::list_events(app, user, c, query).await,
            Err(r) => r,
        },
        (Method::GET, Route::Presence(c)) => match c.id() {
            Ok(c) => conversations::presence(app, user, c).await,
            Err(r) => r,
        },
        (Method::POST, Route::Cursor(c)) => match c.id() {
            Ok(c) => conversations::move_cursor(app, user, c, req).await,
            Err(r) => r,
        },
        (Method::POST, Route::Typing(c)) => match c.id() {
            Ok(c) => conversations::typing(app, user, c).await,
            Err(r) => r,
        },
        (Method::POST, Route::Tickets) => sse::issue_ticket(&app, &user),
        _ => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ),
    }
}

impl ConversationRef {
    /// The conversation id, or the 404 for an id that cannot exist.
    fn id(&self) -> Result<i64, Response<Body>> {
        match self {
            ConversationRef::Id(c) => Ok(*c),
            ConversationRef::Invalid(raw) => Err(fail(
                ErrorCode::NotFound,
                &format!(
                    "conversation {:?} not found",
                    raw.chars().take(40).collect::<String>()
                ),
            )),
        }
    }
}
