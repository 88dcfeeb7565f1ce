//! The background task that owns the socket: connect, read the backlog,
//! deliver (never waiting on the application's channel), ack what was
//! consumed, write sends, reconnect.

use crate::backoff::Rng;
use crate::outbox::{retryable, Outbox, Pending};
use crate::tracker::{AckPolicy, Seen, Tracker};
use crate::transport::{self, Endpoints, Stream};
use crate::{
    ClientError, ClientEvent, ClientOptions, Cmd, ConnState, Event, SendError, Sent, Stats,
    CONTROL_ROOM,
};
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_protocol::frames::ServerFrame;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

mod inbound;

type Ws = WebSocketStream<Stream>;
type Sink = SplitSink<Ws, Message>;
type WsStream = futures_util::stream::SplitStream<Ws>;

/// A connection that stayed up this long after `synced` resets the backoff.
const HEALTHY: Duration = Duration::from_secs(1);
/// Frames handled per wake-up before writing (batches reads and commands).
const BATCH: usize = 256;

/// How a session ended.
enum End {
    /// Closed by the application (or every handle dropped).
    User,
    /// Closed by us to replay what did not fit in the event channel.
    Resume,
    Lost {
        code: Option<u16>,
        reason: String,
        synced_at: Option<Instant>,
    },
}

enum OpenError {
    Unauthorized(String),
    /// Retrying cannot help (a 4xx other than 401/429 on the handshake).
    Config(String),
    Other(String),
}

pub(crate) struct Task {
    opts: ClientOptions,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    ev_tx: mpsc::Sender<ClientEvent>,
    pending: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    tracker: Tracker,
    outbox: Outbox,
    rng: Rng,
    conn: u64,
    endpoints: Result<Endpoints, String>,
    /// Signalled by the application's reads (room in the channel).
    room: Arc<Notify>,
    /// This connection stopped delivering: the channel was full.
    overflowed: bool,
    /// Conversations to say `typing` in, on the next write (ephemeral:
    /// dropped when the connection ends).
    typing: Vec<i64>,
}

impl Task {
    pub fn new(
        opts: ClientOptions,
        cmd_rx: mpsc::UnboundedReceiver<Cmd>,
        ev_tx: mpsc::Sender<ClientEvent>,
        pending: Arc<AtomicUsize>,
        stats: Arc<Stats>,
        room: Arc<Notify>,
    ) -> Task {
        let tracker = Tracker::new(AckPolicy {
            every: opts.ack_every.max(1),
            interval: opts.ack_interval,
        });
        Task {
            cmd_rx,
            ev_tx,
            pending,
            stats,
            tracker,
            outbox: Outbox::default(),
            rng: Rng::from_os(),
            conn: 0,
            typing: Vec::new(),
            endpoints: transport::endpoints(&opts.url),
            opts,
            room,
            overflowed: false,
        }
    }

    /// Queues a state change or error; never waits. Events keep
    /// `CONTROL_ROOM` slots free for these, so only an application that
    /// reads nothing through many reconnects loses some (the oldest stay).
    fn emit(&self, ev: ClientEvent) {
        // A dropped receiver is fine: the application only sends.
        if let Err(mpsc::error::TrySendError::Full(ev)) = self.ev_tx.try_send(ev) {
            log::debug!("event channel full: dropped {ev:?}");
        }
    }

    /// Room for `n` more events (the control slots excluded).
    fn room_for(&self, n: usize) -> bool {
        self.ev_tx.capacity() >= CONTROL_ROOM + n
    }

    fn answer(&self, p: Pending, result: Result<Sent, SendError>) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        let _ = p.reply.send(result);
    }

    pub async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut auth_failures: u32 = 0;
        let endpoints = match self.endpoints.clone() {
            Ok(e) => e,
            Err(why) => {
                self.emit(ClientEvent::Error(ClientError::Config(why)));
                return self.finish();
            }
        };
        // The last token fetched, reused until shortly before its exp.
        let mut cached: Option<String> = None;
        'life: loop {
            self.emit(ClientEvent::State(ConnState::Connecting));
            let mut auth_failed = None;
            let mut soon = false;
            let token = match cached.take() {
                Some(t) if auth_failures == 0 && !self.expiring(&t) => Ok(t),
                _ => self.opts.token.get().await,
            };
            if let Ok(t) = &token {
                cached = Some(t.clone());
            }
            match token {
                Err(e) => {
                    self.emit(ClientEvent::Error(ClientError::Token(e.to_string())));
                }
                Ok(token) => match self.open(&endpoints, &token).await {
                    Ok(ws) => {
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        match self.session(ws, &mut auth_failures).await {
                            End::User => break 'life,
                            End::Resume => {
                                self.outbox.connection_lost();
                                soon = true;
                            }
                            End::Lost {
                                code,
                                reason,
                                synced_at,
                            } => {
                                self.outbox.connection_lost();
                                self.emit(ClientEvent::Error(ClientError::Disconnected {
                                    code,
                                    reason: reason.clone(),
                                }));
                                if code == Some(1008) {
                                    auth_failed = Some(reason);
                                } else if synced_at.is_some_and(|t| t.elapsed() >= HEALTHY) {
                                    // A healthy connection ended (1001 draining,
                                    // 1013 too slow, a crash): come back soon.
                                    attempt = 0;
                                }
                            }
                        }
                    }
                    Err(OpenError::Unauthorized(why)) => auth_failed = Some(why),
                    Err(OpenError::Config(why)) => {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        self.emit(ClientEvent::Error(ClientError::Config(why)));
                        break 'life;
                    }
                    Err(OpenError::Other(why)) => {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        self.emit(ClientEvent::Error(ClientError::Connect(why)));
                    }
                },
            }
            let delay = match auth_failed {
                Some(why) => {
                    auth_failures += 1;
                    if !self.opts.token.refreshable() || auth_failures >= 2 {
                        self.emit(ClientEvent::Error(ClientError::Unauthorized(why)));
                        break 'life;
                    }
                    // Once more, right away, with a fresh token.
                    self.opts.backoff.floor
                }
                None if soon => self.opts.backoff.floor,
                None => self.opts.backoff.delay(attempt, &mut self.rng),
            };
            if !soon {
                attempt = attempt.saturating_add(1);
            }
            self.emit(ClientEvent::State(ConnState::Reconnecting {
                delay,
                attempt: attempt.max(1),
            }));
            if !self.pause(delay).await {
                break 'life;
            }
        }
        self.finish()
    }

    /// Whether `token` expires within the refresh margin (or says nothing).
    fn expiring(&self, token: &str) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        match tether_protocol::auth::unverified_exp(token) {
            Some(exp) => Duration::from_secs(exp) < now + self.opts.token_refresh_margin,
            None => true,
        }
    }

    /// The end: every unanswered send fails with `Closed`.
    fn finish(mut self) {
        for p in self.outbox.drain() {
            self.answer(p, Err(SendError::Closed));
        }
        self.cmd_rx.close();
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            if let Cmd::Send { reply, .. } = cmd {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                let _ = reply.send(Err(SendError::Closed));
            }
        }
        self.emit(ClientEvent::State(ConnState::Closed));
    }

    /// Waits `delay`, taking commands meanwhile. False: close requested.
    async fn pause(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Cmd::ReconnectNow) => return true,
                    cmd => if !self.on_cmd(cmd) { return false },
                },
            }
        }
    }

    /// Applies a command; false for close (or every handle dropped).
    fn on_cmd(&mut self, cmd: Option<Cmd>) -> bool {
        match cmd {
            None | Some(Cmd::Close) => false,
            Some(Cmd::ReconnectNow) => true,
            Some(Cmd::Cancel { id }) => {
                if self.outbox.complete(&id, self.conn).is_some() {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                }
                true
            }
            Some(Cmd::Typing { conversation_id }) => {
                if !self.typing.contains(&conversation_id) && self.typing.len() < 64 {
                    self.typing.push(conversation_id);
                }
                true
            }
            Some(Cmd::Ack {
                conversation_id,
                seq,
            }) => {
                self.tracker
                    .ack(conversation_id, seq, std::time::Instant::now());
                true
            }
            Some(Cmd::Send {
                id,
                conversation_id,
                body,
                reply,
            }) => {
                let frame = serde_json::json!({
                    "type": "send",
                    "conversation_id": conversation_id,
                    "body": body,
                    "client_msg_id": id,
                })
                .to_string();
                let p = Pending {
                    id,
                    frame,
                    reply,
                    written_on: 0,
                };
                if p.frame.len() > self.opts.max_frame_bytes {
                    let message = format!(
                        "the send frame is {} bytes; the limit is {}",
                        p.frame.len(),
                        self.opts.max_frame_bytes
                    );
                    self.answer(
                        p,
                        Err(SendError::Rejected {
                            code: "payload_too_large".into(),
                            message,
                        }),
                    );
                } else {
                    self.outbox.push(p);
                }
                true
            }
        }
    }

    async fn open(&self, ep: &Endpoints, token: &str) -> Result<Ws, OpenError> {
        let mut request = ep
            .ws
            .as_str()
            .into_client_request()
            .map_err(|e| OpenError::Config(format!("bad URL {}: {e}", ep.ws)))?;
        // The token as a subprotocol, never in the URL (proxies log URLs).
        let mut offer = HeaderValue::from_str(&format!("tether.v1, tether.token.{token}"))
            .map_err(|_| OpenError::Config("the token is not a valid header value".into()))?;
        offer.set_sensitive(true);
        request
            .headers_mut()
            .insert("sec-websocket-protocol", offer);
        let (host, port, tls) = (ep.host.clone(), ep.port, ep.tls);
        let config = WebSocketConfig::default().read_buffer_size(self.opts.read_buffer.max(256));
        let bind = self.opts.bind;
        #[cfg(feature = "tls")]
        let tls_config = self.opts.tls.clone();
        let attempt = async move {
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| OpenError::Other(format!("resolving {host}: {e}")))?
                .next()
                .ok_or_else(|| OpenError::Other(format!("{host} has no address")))?;
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| OpenError::Other(format!("socket: {e}")))?;
            if let Some(ip) = bind {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|e| OpenError::Other(format!("bind {ip}: {e}")))?;
            }
            let tcp = socket
                .connect(addr)
                .await
                .map_err(|e| OpenError::Other(format!("connect {addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let stream = Stream::new(
                tcp,
                tls,
                &host,
                #[cfg(feature = "tls")]
                tls_config,
            )
            .await
            .map_err(|e| OpenError::Other(format!("TLS with {host}: {e}")))?;
            match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
                Ok((ws, _)) => Ok(ws),
                Err(WsError::Http(r)) => {
                    let body = r
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    let status = r.status().as_u16();
                    let why = format!("HTTP {status}: {body:.200}");
                    Err(match status {
                        401 => OpenError::Unauthorized(why),
                        429 | 503 => OpenError::Other(why),
                        400..=499 => OpenError::Config(format!(
                            "the handshake was refused ({why}); is the URL the gateway's?"
                        )),
                        _ => OpenError::Other(why),
                    })
                }
                Err(e) => Err(OpenError::Other(format!("handshake: {e}"))),
            }
        };
        match tokio::time::timeout(self.opts.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(OpenError::Other(format!(
                "connect timed out after {:?}",
                self.opts.connect_timeout
            ))),
        }
    }

    /// One connection's life.
    async fn session(&mut self, ws: Ws, auth_failures: &mut u32) -> End {
        self.conn += 1;
        let conn = self.conn;
        self.tracker.reconnected();
        self.outbox.connection_lost();
        self.overflowed = false;
        let (mut sink, mut stream) = ws.split();
        let mut synced_at: Option<Instant> = None;
        let mut last_write = Instant::now();
        loop {
            if synced_at.is_some() {
                match self.write_due(&mut sink, conn).await {
                    Ok(true) => last_write = Instant::now(),
                    Ok(false) => {}
                    Err(e) => return lost(None, e, synced_at),
                }
            }
            let mut wake = last_write + self.opts.ping_interval;
            if synced_at.is_some() {
                if let Some(t) = self.tracker.next_deadline() {
                    wake = wake.min(Instant::from_std(t));
                }
                if let Some(t) = self.outbox.next_retry() {
                    wake = wake.min(Instant::from_std(t));
                }
            }
            tokio::select! {
                cmd = self.cmd_rx.recv() => {
                    let mut go_on = self.on_cmd(cmd);
                    for _ in 0..BATCH {
                        if !go_on { break; }
                        match self.cmd_rx.try_recv() {
                            Ok(c) => go_on = self.on_cmd(Some(c)),
                            Err(_) => break,
                        }
                    }
                    if !go_on {
                        self.goodbye(&mut sink, &mut stream, "client closed").await;
                        return End::User;
                    }
                }
                _ = self.room.notified(), if self.overflowed => {
                    // Read down to half: reconnect, and the server replays
                    // what was left out from the cursor.
                    if self.room_for(self.opts.event_capacity.max(1).div_ceil(2)) {
                        self.goodbye(&mut sink, &mut stream, "resuming after a full event channel").await;
                        return End::Resume;
                    }
                }
                msg = stream.next() => {
                    let mut msg = msg;
                    for i in 0..BATCH {
                        if let Some(end) = self.on_message(msg, conn, &mut synced_at, auth_failures).await {
                            return end;
                        }
                        if i + 1 == BATCH { break; }
                        match stream.next().now_or_never() {
                            Some(m) => msg = m,
                            None => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if synced_at.is_some() && Instant::now() >= last_write + self.opts.ping_interval {
                        let ping = Message::text(r#"{"type":"ping"}"#);
                        if let Err(e) = sink.send(ping).await {
                            return lost(None, e, synced_at);
                        }
                        last_write = Instant::now();
                    }
                }
            }
        }
    }

    /// Writes every ack wanted, then a close frame (1000), and reads until
    /// the server's close answers it (within two seconds): dropping a
    /// socket with unread data resets it, and the server would lose the
    /// acks still in its receive buffer. What arrives meanwhile is not
    /// delivered (nor acknowledged): the server replays it next time.
    async fn goodbye(&mut self, sink: &mut Sink, stream: &mut WsStream, reason: &str) {
        let acks = self.tracker.take_all();
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: reason.to_string().into(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for (c, seq) in acks {
                let ack = format!(r#"{{"type":"ack","conversation_id":{c},"seq":{seq}}}"#);
                if sink.feed(Message::text(ack)).await.is_err() {
                    return;
                }
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
            }
            if sink.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = stream.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_millis(100), sink.close()).await;
    }

    /// Writes due sends and acks, one flush. Ok(true) if anything was written.
    async fn write_due(&mut self, sink: &mut Sink, conn: u64) -> Result<bool, WsError> {
        let now = std::time::Instant::now();
        self.outbox.promote(now);
        let mut wrote = false;
        while self.outbox.in_flight < self.opts.max_inflight_sends.max(1) {
            let Some(p) = self.outbox.next_to_write(conn) else {
                break;
            };
            let frame = Message::text(p.frame.clone());
            sink.feed(frame).await?;
            self.stats.send_writes.fetch_add(1, Ordering::Relaxed);
            wrote = true;
        }
        for c in std::mem::take(&mut self.typing) {
            let frame = format!(r#"{{"type":"typing","conversation_id":{c}}}"#);
            sink.feed(Message::text(frame)).await?;
            wrote = true;
        }
        let acks = self.tracker.take_due(now);
        for (c, seq) in &acks {
            let frame = format!(r#"{{"type":"ack","conversation_id":{c},"seq":{seq}}}"#);
            sink.feed(Message::text(frame)).await?;
            self.stats.acks.fetch_add(1, Ordering::Relaxed);
            wrote = true;
        }
        if wrote {
            sink.flush().await?;
        }
        if !acks.is_empty() {
            self.tracker.flushed();
        }
        Ok(wrote)
    }
}

fn lost(code: Option<u16>, e: WsError, synced_at: Option<Instant>) -> End {
    lost_reason(code, &e.to_string(), synced_at)
}

fn lost_reason(code: Option<u16>, reason: &str, synced_at: Option<Instant>) -> End {
    End::Lost {
        code,
        reason: reason.to_string(),
        synced_at,
    }
}
