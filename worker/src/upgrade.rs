//! The WebSocket upgrade of `GET /v1/ws`: the token (header,
//! subprotocol, or `?token=`) is checked before anything else, then the
//! handshake, the worker's limits and the socket's buffers; the
//! connection itself runs in [`crate::ws`]. It also owns the connection
//! counts per user ([`UserConnections`]) and per client address
//! ([`IpConnections`]).

use crate::phase::Phase;
use crate::request::{authenticate, bearer, query_param};
use crate::respond::{error_response, json_response, retry_response, Body};
use crate::wire::Wire;
use crate::ws::Connection;
use crate::App;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// Open WebSocket connections per key (a user, a client address) on this
/// worker.
pub struct Connections<K: Hash + Eq + Clone> {
    open: Mutex<HashMap<K, usize>>,
}

/// Open WebSocket connections per user on this worker.
pub type UserConnections = Connections<Arc<str>>;
/// Open WebSocket connections per client address on this worker.
pub type IpConnections = Connections<IpAddr>;

impl<K: Hash + Eq + Clone> Default for Connections<K> {
    fn default() -> Self {
        Connections {
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Connections<K> {
    /// A slot for one more connection of `key`, unless `cap` (0 =
    /// unlimited) are open; the slot is given back when dropped.
    pub fn acquire(self: &Arc<Self>, key: &K, cap: usize) -> Option<Slot<K>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            key: key.clone(),
        })
    }

    /// Every key with a connection open here (presence: the users).
    pub fn keys(&self) -> Vec<K> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.keys().cloned().collect()
    }

    /// Open connections of `key`.
    pub fn count<Q>(&self, key: &Q) -> usize
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(key).copied().unwrap_or(0)
    }
}

/// One open connection; dropping it gives the slot back.
pub struct Slot<K: Hash + Eq + Clone> {
    owner: Arc<Connections<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A connection's places in the worker's limits (per client address, per
/// user, per worker), taken before it runs and given back when dropped.
/// WebSockets and event streams count alike.
pub struct Admission {
    app: Arc<App>,
    _ip_slot: Option<Slot<IpAddr>>,
    _user_slot: Slot<Arc<str>>,
}

impl Admission {
    /// 503 `draining` when the worker drains; 429 `too_many_connections`
    /// when the client address `ip` (see [`crate::client_addr`]) has
    /// `--max-connections-per-ip` open here, or the user
    /// `--max-connections-per-user`; 503 `too_many_connections` when the
    /// worker is full.
    pub fn take(app: &Arc<App>, user: &Arc<str>, ip: IpAddr) -> Result<Admission, Response<Body>> {
        let refused = || {
            app.metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
        };
        if app.phase.get() == Phase::Draining {
            refused();
            return Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this worker is draining; reconnect",
            ));
        }
        // The address's slot, unless it is one of our own balancers (their
        // own connections, health checks and all, are not a client's).
        let ip_slot = if app.config.trusted_proxies.contains(ip) {
            None
        } else {
            match app.ip_conns.acquire(&ip, app.config.max_connections_per_ip) {
                Some(slot) => Some(slot),
                None => {
                    refused();
                    log::info!(
                        "ip={ip} user={user}: refused, {} connections from this address open on this worker",
                        app.config.max_connections_per_ip
                    );
                    return Err(retry_response(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_connections",
                        "too many connections from this address on this worker",
                        1,
                    ));
                }
            }
        };
        // The user's slot: one user cannot take every connection.
        let Some(user_slot) = app
            .user_conns
            .acquire(user, app.config.max_connections_per_user)
        else {
            refused();
            log::info!(
                "ip={ip} user={user}: refused, {} connections open on this worker",
                app.config.max_connections_per_user
            );
            return Err(retry_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "too many connections of this user on this worker",
                1,
            ));
        };
        // Reserve the slot now so concurrent connects cannot overshoot.
        let open = app.live_conns.fetch_add(1, Ordering::AcqRel);
        let admission = Admission {
            app: app.clone(),
            _ip_slot: ip_slot,
            _user_slot: user_slot,
        };
        if open as usize >= app.config.max_connections {
            drop(admission);
            refused();
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "this worker is full",
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return Err(r);
        }
        Ok(admission)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.app.live_conns.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers `GET /v1/ws`: 401 before any upgrade without a valid token,
/// 429 when the user or the client address (`ip`, see
/// [`crate::client_addr`]) has too many connections here, 503 when
/// draining or full, 400 for a request that is not a WebSocket
/// handshake; otherwise 101 and the connection runs in its own task.
pub fn upgrade(app: Arc<App>, req: Request<Incoming>, ip: IpAddr) -> Response<Body> {
    let offered = Subprotocols::offered(&req);
    let token = bearer(&req)
        .or_else(|| offered.token.clone())
        .or_else(|| query_param(req.uri().query(), "token"));
    let user = match authenticate(&app, token) {
        Ok(u) => u,
        Err(r) => {
            log::debug!("ip={ip}: WebSocket upgrade refused: {}", r.status());
            return r;
        }
    };
    let headers = req.headers();
    let is_upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not a WebSocket handshake",
        );
    };
    if !is_upgrade || !version_ok {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not a WebSocket handshake (version 13)",
        );
    }
    let admission = match Admission::take(&app, &user, ip) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let on_upgrade = hyper::upgrade::on(req);
    let config = WebSocketConfig::default()
        // Idle sockets are most of a gateway's memory: start small (client
        // frames are small), grow on demand.
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(app.config.max_frame_bytes.max(64 * 1024) * 4)
        .max_message_size(Some(app.config.max_frame_bytes))
        .max_frame_size(Some(app.config.max_frame_bytes));
    let tasks = app.tasks.clone();
    let task = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                Connection::run(app.clone(), Wire::WebSocket(socket), user, ip).await;
            }
            Err(e) => log::debug!("ip={ip} user={user}: upgrade failed: {e}"),
        }
        drop(admission);
    };
    // An idle connection costs this task (about 2.3 KB of future state),
    // its socket's buffers and two channels: see README, Performance.
    tasks.spawn(task);
    let mut r = json_response(StatusCode::SWITCHING_PROTOCOLS, String::new());
    r.headers_mut().remove(hyper::header::CONTENT_TYPE);
    r.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static("websocket"));
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(&key)) {
        r.headers_mut().insert("sec-websocket-accept", v);
    }
    if offered.v1 {
        r.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    r
}

/// The subprotocol the server speaks, echoed when offered.
pub const SUBPROTOCOL: &str = "tether.v1";
/// A subprotocol `tether.token.<JWT>` carries the token (browsers cannot set
/// headers on a WebSocket, and a token in the URL lands in proxy logs).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "tether.token.";

/// What a client offered in `Sec-WebSocket-Protocol`.
struct Subprotocols {
    v1: bool,
    token: Option<String>,
}

impl Subprotocols {
    fn offered(req: &Request<Incoming>) -> Subprotocols {
        let mut out = Subprotocols {
            v1: false,
            token: None,
        };
        for value in req.headers().get_all("sec-websocket-protocol") {
            let Ok(list) = value.to_str() else { continue };
            for p in list.split(',').map(str::trim) {
                if p == SUBPROTOCOL {
                    out.v1 = true;
                } else if let Some(t) = p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX) {
                    out.token = Some(t.to_string());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_per_user_and_given_back() {
        let conns = Arc::new(UserConnections::default());
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let first = conns.acquire(&a, 2).unwrap();
        let _second = conns.acquire(&a, 2).unwrap();
        assert!(conns.acquire(&a, 2).is_none());
        assert!(conns.acquire(&b, 2).is_some(), "other users are unaffected");
        drop(first);
        assert_eq!(conns.count("a"), 1);
        assert!(conns.acquire(&a, 2).is_some());
        let many: Vec<_> = (0..100).map(|_| conns.acquire(&b, 0).unwrap()).collect();
        drop(many);
        assert_eq!(conns.count("b"), 0);
        let ips = Arc::new(IpConnections::default());
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        let one = ips.acquire(&ip, 1).unwrap();
        assert!(ips.acquire(&ip, 1).is_none());
        drop(one);
        assert_eq!(ips.count(&ip), 0);
    }
}
