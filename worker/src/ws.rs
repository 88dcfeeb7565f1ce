//! One WebSocket connection: authenticate before the upgrade, `hello`, the
//! backlog, `synced`, then live events, sends and acks until either side
//! closes or the worker drains.
//!
//! Every event the connection writes, on every path (backlog, cache,
//! repair, live), goes through its [`Sequencer`]: only `last + 1` is
//! written, duplicates from the backlog/live overlap are dropped, a gap is
//! repaired from the event log rather than passed on, and nothing of a
//! conversation is written after the user's own `member.left` (until they
//! join again).
//!
//! Waiting (the database is down during the backlog or a repair) is
//! bounded by the client and the worker: a wait ends when the client
//! closes or the worker drains. Frames the client sends while a repair
//! waits are kept (a few) and handled after it.

use crate::commit::{ConnReply, ReplyTo, SendRequest};
use crate::fanout::ConnMsg;
use crate::frame::Frame;
use crate::http::{
    authenticate, bearer, check_body, error_response, json_response, query_param, Body,
};
use crate::phase::Phase;
use crate::sequencer::{Sequencer, Verdict};
use crate::store::StoreFailure;
use crate::store::{self, NewMessage, StoreError};
use crate::App;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_protocol::frames::{server, ClientFrame};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Events read per query when replaying a backlog or filling a gap.
const PAGE: i64 = 1000;

/// Answers `GET /v1/ws`: 401 before any upgrade without a valid token,
/// 503 when draining or full, 400 for a request that is not a WebSocket
/// handshake; otherwise 101 and the connection runs in its own task.
pub fn upgrade(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let offered = Subprotocols::offered(&req);
    let token = bearer(&req)
        .or_else(|| offered.token.clone())
        .or_else(|| query_param(req.uri().query(), "token"));
    let user = match authenticate(&app, token) {
        Ok(u) => u,
        Err(r) => return r,
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
    if app.phase.get() == Phase::Draining {
        app.metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this worker is draining; reconnect",
        );
    }
    // Reserve the slot now so concurrent upgrades cannot overshoot.
    let open = app.live_conns.fetch_add(1, Ordering::AcqRel);
    if open as usize >= app.config.max_connections {
        app.live_conns.fetch_sub(1, Ordering::AcqRel);
        app.metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        let mut r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "this worker is full",
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return r;
    }
    let on_upgrade = hyper::upgrade::on(req);
    let config = WebSocketConfig::default()
        // Idle sockets are most of a gateway's memory: start small (client
        // frames are small), grow on demand.
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(app.config.max_frame_bytes.max(64 * 1024) * 4)
        .max_message_size(Some(app.config.max_frame_bytes))
        .max_frame_size(Some(app.config.max_frame_bytes));
    let task = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                Connection::run(app.clone(), socket, user).await;
            }
            Err(e) => log::debug!("user={user}: upgrade failed: {e}"),
        }
        app.live_conns.fetch_sub(1, Ordering::AcqRel);
    };
    // An idle connection costs this task (about 2.3 KB of future state),
    // its socket's buffers and two channels: see README, Performance.
    tokio::spawn(task);
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

/// Client frames kept while a repair waits for the database.
const MAX_DEFERRED: usize = 64;

/// How a connection ended, for the close frame.
enum End {
    ClientClosed,
    Draining,
    TooSlow,
    TooLarge,
    InvalidUtf8,
    Idle,
    Internal(&'static str),
}

struct Connection {
    app: Arc<App>,
    id: u64,
    user: Arc<str>,
    /// The socket, not split: reads happen only inside `select!` (whose
    /// futures are dropped before a branch's handler runs) and writes only
    /// in handlers, so one owner suffices and no lock sits between them.
    ws: Socket,
    /// What this connection has written, per conversation, and may write.
    seq: Sequencer,
    /// Client frames read while a repair waited, handled after it.
    deferred: VecDeque<Message>,
    inflight: usize,
    reply_tx: mpsc::Sender<Box<ConnReply>>,
    unflushed: usize,
    /// Set by the dispatcher when this connection's queue overflowed.
    cut: Arc<AtomicBool>,
}

/// Runs a socket write, checking every second whether the dispatcher has
/// cut this connection meanwhile: a client that stops reading blocks our
/// writes, and must not keep its task (and queue) alive forever.
async fn guarded<F>(cut: &AtomicBool, fut: F) -> Result<(), WsError>
where
    F: std::future::Future<Output = Result<(), WsError>>,
{
    tokio::pin!(fut);
    // Most writes complete at once (the socket has room): try before arming
    // a timer, which would cost a timer-wheel entry per write.
    if let std::task::Poll::Ready(r) =
        std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await
    {
        return r;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(1), &mut fut).await {
            Ok(r) => return r,
            Err(_) if cut.load(Ordering::Acquire) => {
                return Err(WsError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client too slow",
                )))
            }
            Err(_) => {}
        }
    }
}

impl Connection {
    async fn run(app: Arc<App>, socket: Socket, user: Arc<str>) {
        let id = app.next_conn_id();
        let (tx, rx) = mpsc::channel(app.config.outbound_queue);
        let (reply_tx, reply_rx) = mpsc::channel(app.config.max_inflight);
        let cut = Arc::new(AtomicBool::new(false));
        app.dispatcher
            .register(id, user.clone(), tx, cut.clone())
            .await;
        app.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        app.metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        log::debug!("user={user} conn={id}: connected");
        let mut conn = Connection {
            app: app.clone(),
            id,
            user: user.clone(),
            ws: socket,
            seq: Sequencer::new(&user),
            deferred: VecDeque::new(),
            inflight: 0,
            reply_tx,
            unflushed: 0,
            cut: cut.clone(),
        };
        let mut end = conn.serve(rx, reply_rx, &cut).await;
        if cut.load(Ordering::Acquire) && matches!(end, End::ClientClosed) {
            // Our writes failed because we gave up on a client that did
            // not read: tell it why, if it ever reads again.
            end = End::TooSlow;
        }
        Box::pin(conn.close(end)).await;
        app.dispatcher.deregister(id).await;
        app.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        log::debug!("user={user} conn={id}: closed");
    }

    async fn write(&mut self, text: Utf8Bytes) -> Result<(), WsError> {
        self.unflushed += 1;
        let cut = self.cut.clone();
        guarded(&cut, self.ws.feed(Message::Text(text))).await
    }

    async fn flush(&mut self) -> Result<(), WsError> {
        if self.unflushed > 0 {
            self.unflushed = 0;
            let cut = self.cut.clone();
            guarded(&cut, self.ws.flush()).await?;
        }
        Ok(())
    }

    async fn write_now(&mut self, text: String) -> Result<(), WsError> {
        self.write(Utf8Bytes::from(text)).await?;
        self.flush().await
    }

    async fn close(&mut self, end: End) {
        let (code, reason) = match end {
            End::ClientClosed => return,
            End::Draining => (CloseCode::Away, "server draining; reconnect"),
            End::TooSlow => (
                CloseCode::Again,
                "client too slow; reconnect to replay from your cursor",
            ),
            End::TooLarge => (CloseCode::Size, "frame too large"),
            End::InvalidUtf8 => (CloseCode::Invalid, "invalid UTF-8"),
            End::Idle => (CloseCode::Normal, "idle timeout"),
            End::Internal(why) => (CloseCode::Error, why),
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // A client cut for being slow gets longer: the close frame waits
        // behind what it has not read yet.
        let grace = if code == CloseCode::Again {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(2)
        };
        let _ = tokio::time::timeout(grace, async {
            let _ = self.ws.send(Message::Close(Some(frame))).await;
            let _ = self.ws.close(None).await;
        })
        .await;
    }

    /// The connection's life; returns why it ended.
    async fn serve(
        &mut self,
        mut rx: mpsc::Receiver<ConnMsg>,
        mut reply_rx: mpsc::Receiver<Box<ConnReply>>,
        cut: &AtomicBool,
    ) -> End {
        let hello = server::hello(&self.user, &self.app.config.worker_id);
        if self.write_now(hello).await.is_err() {
            return End::ClientClosed;
        }
        // Boxed, like every rarely taken path below: a future's size is its
        // largest state, and an idle connection should not carry the
        // backlog replay's or a repair's state for its whole life.
        if let Err(end) = Box::pin(self.replay_backlog()).await {
            return end;
        }

        // One future for the whole loop (not one per iteration).
        let mut phase = self.app.phase.subscribe();
        let drain = crate::phase::until_draining(&mut phase);
        tokio::pin!(drain);
        let idle = self.app.config.idle_timeout;
        let mut last_inbound = Instant::now();
        let mut ticker = tokio::time::interval(idle / 4);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pinged = false;
        loop {
            let can_read = self.inflight < self.app.config.max_inflight;
            if can_read {
                if let Some(m) = self.deferred.pop_front() {
                    match self.on_client_message(m).await {
                        Ok(true) => {}
                        Ok(false) => return End::ClientClosed,
                        Err(end) => return end,
                    }
                    if self.flush().await.is_err() {
                        return End::ClientClosed;
                    }
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = &mut drain => {
                    Box::pin(self.finish_inflight(&mut reply_rx)).await;
                    return End::Draining;
                }
                reply = reply_rx.recv() => {
                    if let Some(r) = reply {
                        self.inflight -= 1;
                        if self.on_reply(r).await.is_err() { return End::ClientClosed; }
                        if self.flush().await.is_err() { return End::ClientClosed; }
                    }
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else {
                        return if cut.load(Ordering::Acquire) { End::TooSlow } else { End::Internal("fan-out stopped") };
                    };
                    if let Err(end) = self.on_conn_msg(msg).await { return end; }
                    // Write whatever else is queued, then flush once.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(m) => if let Err(end) = self.on_conn_msg(m).await { return end; },
                            Err(_) => break,
                        }
                    }
                    if self.flush().await.is_err() { return End::ClientClosed; }
                }
                inbound = self.ws.next(), if can_read => {
                    last_inbound = Instant::now();
                    pinged = false;
                    match inbound {
                        None => return End::ClientClosed,
                        Some(Ok(m)) => {
                            match self.on_client_message(m).await {
                                Ok(true) => {}
                                Ok(false) => return End::ClientClosed,
                                Err(end) => return end,
                            }
                            if self.flush().await.is_err() { return End::ClientClosed; }
                        }
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. })))
                            => return End::TooLarge,
                        Some(Err(WsError::Utf8(_))) => return End::InvalidUtf8,
                        Some(Err(e)) => {
                            log::debug!("user={} conn={}: read error: {e}", self.user, self.id);
                            return End::ClientClosed;
                        }
                    }
                }
                _ = ticker.tick() => {
                    let silent = last_inbound.elapsed();
                    if silent >= idle {
                        log::info!("user={} conn={}: silent for {}s, closing", self.user, self.id, silent.as_secs());
                        self.app.metrics.idle_closes.fetch_add(1, Ordering::Relaxed);
                        return End::Idle;
                    }
                    if silent >= idle / 2 && !pinged {
                        pinged = true;
                        if self.ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                            return End::ClientClosed;
                        }
                    }
                }
            }
        }
    }

    /// Waits (bounded by the drain time) for sends already submitted, so
    /// their senders get `sent` before the 1001.
    async fn finish_inflight(&mut self, reply_rx: &mut mpsc::Receiver<Box<ConnReply>>) {
        let deadline = tokio::time::Instant::now() + self.app.config.drain;
        while self.inflight > 0 {
            match tokio::time::timeout_at(deadline, reply_rx.recv()).await {
                Ok(Some(r)) => {
                    self.inflight -= 1;
                    if self.on_reply(r).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
        let _ = self.flush().await;
    }

    /// Registers interest, reads memberships, subscribes, replays every
    /// event above the cursor of every conversation, says `synced`.
    /// Retries while the database is down (the socket stays open).
    async fn replay_backlog(&mut self) -> Result<(), End> {
        let mut told_unavailable = false;
        let memberships = loop {
            let user = self.user.to_string();
            match self.app.db(move |c| store::memberships(c, &user)).await {
                Ok(m) => break m,
                Err(e) if e.is_unavailable() => {
                    if !told_unavailable {
                        told_unavailable = true;
                        let f = server::error(
                            "database_unavailable",
                            "the database is unavailable; your backlog follows when it returns",
                            None,
                            Some(1),
                        );
                        self.write_now(f).await.map_err(|_| End::ClientClosed)?;
                    }
                    self.pause(Duration::from_millis(500), false).await?;
                }
                Err(e) => {
                    log::error!("user={} conn={}: memberships: {e}", self.user, self.id);
                    return Err(End::Internal("could not read memberships"));
                }
            }
        };
        for m in &memberships {
            self.seq.start(m.conversation_id, m.cursor);
        }
        #[cfg(feature = "fault-injection")]
        self.fault_hold_before_subscribe().await;
        self.app
            .dispatcher
            .subscribe(
                self.id,
                memberships
                    .iter()
                    .map(|m| (m.conversation_id, m.last_seq))
                    .collect(),
            )
            .await;
        let mut replayed = 0u64;
        for m in &memberships {
            let (c, upto) = (m.conversation_id, m.last_seq);
            // Members of one conversation missed the same events: the
            // first to reconnect reads them, the rest are served from memory.
            if let Some(frames) = self.app.recent.get(c, m.cursor, upto) {
                for f in &frames {
                    replayed += 1;
                    self.write_frame(f).await?;
                }
                self.flush().await.map_err(|_| End::ClientClosed)?;
                continue;
            }
            let mut after = m.cursor;
            while after < upto {
                let page = match self
                    .app
                    .db(move |cl| store::events_range(cl, c, after, upto, PAGE))
                    .await
                {
                    Ok(p) => p,
                    Err(e) if e.is_unavailable() => {
                        self.pause(Duration::from_millis(500), false).await?;
                        continue;
                    }
                    Err(e) => {
                        log::error!("user={} conn={}: backlog of {c}: {e}", self.user, self.id);
                        return Err(End::Internal("could not read the backlog"));
                    }
                };
                if page.is_empty() {
                    break;
                }
                let now = Instant::now();
                let frames: Vec<Arc<Frame>> = page
                    .iter()
                    .map(|e| Arc::new(Frame::from_event(e, now)))
                    .collect();
                self.app.recent.put(c, &frames);
                for f in &frames {
                    after = f.seq;
                    replayed += 1;
                    self.write_frame(f).await?;
                }
                self.flush().await.map_err(|_| End::ClientClosed)?;
            }
        }
        self.app.metrics.backlog_events.observe(replayed as f64);
        self.write_now(server::synced())
            .await
            .map_err(|_| End::ClientClosed)?;
        log::debug!(
            "user={} conn={}: synced after {replayed} backlog events",
            self.user,
            self.id
        );
        Ok(())
    }

    /// Test-only (fault injection): with `TETHER_FAULT_HOLD_SUBSCRIBE_DIR`
    /// set (and `TETHER_FAULT_HOLD_SUBSCRIBE_USER` naming this user, if
    /// set), hold this connection between its memberships read and its
    /// subscribe until the file `release` appears there (at most 30 s),
    /// after saying so with a file `held-<user>-<conn>`: the test widens
    /// the race between reading memberships and subscribing at will.
    #[cfg(feature = "fault-injection")]
    async fn fault_hold_before_subscribe(&mut self) {
        let Some(dir) = std::env::var_os("TETHER_FAULT_HOLD_SUBSCRIBE_DIR") else {
            return;
        };
        if std::env::var("TETHER_FAULT_HOLD_SUBSCRIBE_USER").is_ok_and(|u| u != *self.user) {
            return;
        }
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::write(dir.join(format!("held-{}-{}", self.user, self.id)), b"");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("release").exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sleeps `d`, but ends early, with the reason, if the client closes
    /// or the worker drains. Frames the client sends meanwhile are refused
    /// before `synced` (the client must wait for its backlog) and kept for
    /// later after it (up to [`MAX_DEFERRED`]; beyond, they wait in the
    /// socket).
    async fn pause(&mut self, d: Duration, synced: bool) -> Result<(), End> {
        let sleep = tokio::time::sleep(d);
        tokio::pin!(sleep);
        let mut phase = self.app.phase.subscribe();
        let drain = crate::phase::until_draining(&mut phase);
        tokio::pin!(drain);
        loop {
            let can_read = !synced || self.deferred.len() < MAX_DEFERRED;
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                _ = &mut drain => return Err(End::Draining),
                m = self.ws.next(), if can_read => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(End::ClientClosed),
                    Some(Ok(m)) if synced => self.deferred.push_back(m),
                    Some(Ok(Message::Text(_))) | Some(Ok(Message::Binary(_))) => {
                        let f = server::error("not_synced", "wait for synced before sending", None, Some(1));
                        self.write_now(f).await.map_err(|_| End::ClientClosed)?;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Writes a frame of the backlog or a repair (contiguous, read from
    /// the log or the cache) if the sequencer allows it.
    async fn write_frame(&mut self, f: &Frame) -> Result<(), End> {
        match self.seq.offer(f) {
            Verdict::Write => self
                .write(f.text.clone())
                .await
                .map_err(|_| End::ClientClosed),
            Verdict::Skip => Ok(()),
            Verdict::Gap { after, upto } => {
                // A contiguous read has no gap: the log changed under us,
                // which it never does. Refuse to skip anything.
                log::error!(
                    "user={} conn={} conversation={}: gap {}..{} inside a contiguous read",
                    self.user,
                    self.id,
                    f.conversation_id,
                    after + 1,
                    upto
                );
                Err(End::Internal("event log read out of order"))
            }
        }
    }

    async fn on_conn_msg(&mut self, msg: ConnMsg) -> Result<(), End> {
        match msg {
            ConnMsg::Event(f) => self.on_event(f).await,
            ConnMsg::Backfill {
                conversation_id,
                after,
                upto,
            } => {
                let start = self.seq.replay_start(conversation_id, after);
                if start < upto {
                    Box::pin(self.repair(conversation_id, start, upto)).await?;
                }
                Ok(())
            }
        }
    }

    /// Reads (after, upto] from the log and writes what the sequencer
    /// allows (nothing after the user's own `member.left` unless they join
    /// again within the range). Waits for
    /// an unavailable database only while the client stays and the worker
    /// serves.
    async fn repair(&mut self, c: i64, mut after: i64, upto: i64) -> Result<(), End> {
        while after < upto {
            self.app
                .metrics
                .catchup_reads
                .fetch_add(1, Ordering::Relaxed);
            let page = loop {
                match self
                    .app
                    .db(move |cl| store::events_range(cl, c, after, upto, PAGE))
                    .await
                {
                    Ok(p) => break p,
                    Err(e) if e.is_unavailable() => {
                        self.pause(Duration::from_millis(250), true).await?
                    }
                    Err(e) => {
                        log::error!("user={} conn={}: repair of {c}: {e}", self.user, self.id);
                        return Err(End::Internal("could not read the event log"));
                    }
                }
            };
            if page.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            for e in &page {
                after = e.seq;
                self.write_frame(&Frame::from_event(e, now)).await?;
            }
        }
        Ok(())
    }

    /// A frame from the dispatcher: written in order, after repairing any
    /// gap before it, if the sequencer allows it.
    async fn on_event(&mut self, f: Arc<Frame>) -> Result<(), End> {
        loop {
            match self.seq.offer(&f) {
                Verdict::Write => {
                    return self
                        .write(f.text.clone())
                        .await
                        .map_err(|_| End::ClientClosed)
                }
                Verdict::Skip => return Ok(()),
                Verdict::Gap { after, upto } => {
                    log::debug!(
                        "user={} conn={} conversation={}: gap {}..{}, repairing",
                        self.user,
                        self.id,
                        f.conversation_id,
                        after + 1,
                        upto
                    );
                    Box::pin(self.repair(f.conversation_id, after, upto)).await?;
                    match self.seq.last(f.conversation_id) {
                        // The log ended before `upto`: it cannot, but never
                        // loop on it.
                        Some(last) if last < upto => {
                            return Err(End::Internal("event log shorter than announced"))
                        }
                        _ => {} // repaired, or left: offer `f` again
                    }
                }
            }
        }
    }

    /// Handles one frame from the client. `Ok(false)`: the client closed.
    async fn on_client_message(&mut self, m: Message) -> Result<bool, End> {
        match m {
            Message::Text(t) => {
                self.on_text(t.as_str()).await?;
                Ok(true)
            }
            Message::Binary(_) => {
                self.app.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                let f = server::error(
                    "bad_frame",
                    "binary frames are not supported; send JSON text frames",
                    None,
                    None,
                );
                self.write(Utf8Bytes::from(f))
                    .await
                    .map_err(|_| End::ClientClosed)?;
                Ok(true)
            }
            Message::Close(_) => Ok(false),
            // Pings are answered by the WebSocket layer; pongs just count
            // as the client being alive.
            _ => Ok(true),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let frame = match ClientFrame::parse(text) {
            Ok(f) => f,
            Err(e) => {
                self.app.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                let f = server::error(e.code, &e.message, e.client_msg_id.as_deref(), None);
                return self
                    .write(Utf8Bytes::from(f))
                    .await
                    .map_err(|_| End::ClientClosed);
            }
        };
        let reply = match frame {
            ClientFrame::Ping => server::pong(),
            ClientFrame::Ack {
                conversation_id,
                seq,
            } => match self.seq.last(conversation_id) {
                Some(last) if seq <= last => {
                    self.app.cursors.ack(conversation_id, &self.user, seq);
                    return Ok(());
                }
                Some(last) => server::error(
                    "invalid_seq",
                    &format!("seq {seq} is beyond the last delivered seq {last}"),
                    None,
                    None,
                ),
                _ => server::error(
                    "not_found",
                    &format!("conversation {conversation_id} not found"),
                    None,
                    None,
                ),
            },
            ClientFrame::Send {
                conversation_id,
                body,
                client_msg_id,
            } => {
                if let Err((code, msg)) = check_body(&self.app, &body) {
                    server::error(code, &msg, Some(&client_msg_id), None)
                } else if let Err(secs) = self.app.rate.check(&self.user) {
                    self.app
                        .metrics
                        .rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    server::error(
                        "rate_limited",
                        "too many sends; slow down",
                        Some(&client_msg_id),
                        Some(secs),
                    )
                } else {
                    let req = SendRequest {
                        message: NewMessage {
                            conversation_id,
                            sender: self.user.to_string(),
                            body,
                            client_msg_id,
                        },
                        reply: ReplyTo::Conn(self.reply_tx.clone()),
                        queued_at: Instant::now(),
                    };
                    match self.app.committer.submit(req).await {
                        Ok(()) => {
                            self.inflight += 1;
                            return Ok(());
                        }
                        Err(req) => server::error(
                            "database_unavailable",
                            "commit lanes stopped",
                            Some(&req.message.client_msg_id),
                            Some(1),
                        ),
                    }
                }
            }
        };
        self.write(Utf8Bytes::from(reply))
            .await
            .map_err(|_| End::ClientClosed)
    }

    async fn on_reply(&mut self, r: Box<ConnReply>) -> Result<(), WsError> {
        let frame = match r.result {
            Ok(a) => server::sent(
                &r.client_msg_id,
                r.conversation_id,
                a.event.seq,
                a.duplicate,
            ),
            Err(e) => {
                if let StoreError::Internal(m) = &e {
                    log::error!("user={} conn={}: send failed: {m}", self.user, self.id);
                }
                let f = StoreFailure::from(&e);
                server::error(
                    f.code.as_str(),
                    &f.message,
                    Some(&r.client_msg_id),
                    f.retry_after,
                )
            }
        };
        self.write(Utf8Bytes::from(frame)).await
    }
}
