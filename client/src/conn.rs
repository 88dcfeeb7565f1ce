//! The background task that owns the socket: connect, read the backlog,
//! deliver, ack, write sends, reconnect.

use crate::backoff::Rng;
use crate::outbox::{retryable, Outbox, Pending};
use crate::tracker::{AckPolicy, Seen, Tracker};
use crate::{
    ClientError, ClientEvent, ClientOptions, Cmd, ConnState, EventFrame, SendError, Sent, Stats,
};
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;
type Sink = SplitSink<Ws, Message>;

/// A connection that stayed up this long after `synced` resets the backoff.
const HEALTHY: Duration = Duration::from_secs(1);
/// Frames handled per wake-up before writing (batches reads and commands).
const BATCH: usize = 256;

/// A frame from the server.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame {
    Hello {
        #[serde(default)]
        user: String,
        #[serde(default)]
        worker: String,
    },
    Event(EventFrame),
    Synced,
    Sent {
        client_msg_id: String,
        conversation_id: i64,
        seq: i64,
        #[serde(default)]
        duplicate: bool,
    },
    Error {
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        client_msg_id: Option<String>,
        #[serde(default)]
        retry_after: Option<f64>,
    },
    Pong,
    #[serde(other)]
    Unknown,
}

/// How a session ended.
enum End {
    /// Closed by the application (or every handle dropped).
    User,
    Lost {
        code: Option<u16>,
        reason: String,
        synced_at: Option<Instant>,
    },
}

enum OpenError {
    Unauthorized(String),
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
}

impl Task {
    pub fn new(
        opts: ClientOptions,
        cmd_rx: mpsc::UnboundedReceiver<Cmd>,
        ev_tx: mpsc::Sender<ClientEvent>,
        pending: Arc<AtomicUsize>,
        stats: Arc<Stats>,
    ) -> Task {
        let tracker = Tracker::new(AckPolicy {
            every: opts.ack_every.max(1),
            interval: opts.ack_interval,
        });
        Task {
            opts,
            cmd_rx,
            ev_tx,
            pending,
            stats,
            tracker,
            outbox: Outbox::default(),
            rng: Rng::from_os(),
            conn: 0,
        }
    }

    async fn emit(&self, ev: ClientEvent) {
        // A dropped receiver is fine: the application only sends.
        let _ = self.ev_tx.send(ev).await;
    }

    fn answer(&self, p: Pending, result: Result<Sent, SendError>) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        let _ = p.reply.send(result);
    }

    pub async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut auth_failures: u32 = 0;
        'life: loop {
            self.emit(ClientEvent::State(ConnState::Connecting)).await;
            let mut auth_failed = None;
            match self.opts.token.get().await {
                Err(e) => {
                    self.emit(ClientEvent::Error(ClientError::Token(e.to_string())))
                        .await;
                }
                Ok(token) => match self.open(&token).await {
                    Ok(ws) => {
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        match self.session(ws, &mut auth_failures).await {
                            End::User => break 'life,
                            End::Lost {
                                code,
                                reason,
                                synced_at,
                            } => {
                                self.outbox.connection_lost();
                                self.emit(ClientEvent::Error(ClientError::Disconnected {
                                    code,
                                    reason: reason.clone(),
                                }))
                                .await;
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
                    Err(OpenError::Other(why)) => {
                        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        self.emit(ClientEvent::Error(ClientError::Connect(why)))
                            .await;
                    }
                },
            }
            let delay = match auth_failed {
                Some(why) => {
                    auth_failures += 1;
                    if !self.opts.token.refreshable() || auth_failures >= 2 {
                        self.emit(ClientEvent::Error(ClientError::Unauthorized(why)))
                            .await;
                        break 'life;
                    }
                    // Once more, right away, with a fresh token.
                    self.opts.backoff.floor
                }
                None => self.opts.backoff.delay(attempt, &mut self.rng),
            };
            attempt = attempt.saturating_add(1);
            self.emit(ClientEvent::State(ConnState::Reconnecting {
                delay,
                attempt,
            }))
            .await;
            if !self.pause(delay).await {
                break 'life;
            }
        }
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
        self.emit(ClientEvent::State(ConnState::Closed)).await;
    }

    /// Waits `delay`, taking commands meanwhile. False: close requested.
    async fn pause(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.cmd_rx.recv() => if !self.on_cmd(cmd) { return false },
            }
        }
    }

    /// Applies a command; false for close (or every handle dropped).
    fn on_cmd(&mut self, cmd: Option<Cmd>) -> bool {
        match cmd {
            None | Some(Cmd::Close) => false,
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

    async fn open(&self, token: &str) -> Result<Ws, OpenError> {
        let url = with_token(&self.opts.url, token);
        let request = url
            .as_str()
            .into_client_request()
            .map_err(|e| OpenError::Other(format!("bad URL {}: {e}", self.opts.url)))?;
        if request.uri().scheme_str() != Some("ws") {
            return Err(OpenError::Other(format!(
                "only ws:// URLs are supported, not {}",
                self.opts.url
            )));
        }
        let host = request
            .uri()
            .host()
            .unwrap_or("127.0.0.1")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = request.uri().port_u16().unwrap_or(80);
        let config = WebSocketConfig::default().read_buffer_size(self.opts.read_buffer.max(256));
        let bind = self.opts.bind;
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
            let stream = socket
                .connect(addr)
                .await
                .map_err(|e| OpenError::Other(format!("connect {addr}: {e}")))?;
            let _ = stream.set_nodelay(true);
            match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
                Ok((ws, _)) => Ok(ws),
                Err(WsError::Http(r)) => {
                    let body = r
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    let status = r.status().as_u16();
                    if status == 401 {
                        Err(OpenError::Unauthorized(format!("HTTP 401: {body}")))
                    } else {
                        Err(OpenError::Other(format!("HTTP {status}: {body}")))
                    }
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
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "client closed".into() };
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            let _ = sink.send(Message::Close(Some(frame))).await;
                            let _ = sink.close().await;
                        }).await;
                        return End::User;
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

    async fn on_event(&mut self, e: EventFrame) {
        let now = std::time::Instant::now();
        match self
            .tracker
            .observe(e.conversation_id, e.seq, self.opts.auto_ack, now)
        {
            Seen::Duplicate => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Seen::Gap { expected } => {
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                self.emit(ClientEvent::Error(ClientError::Gap {
                    conversation_id: e.conversation_id,
                    expected,
                    got: e.seq,
                }))
                .await;
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.emit(ClientEvent::Event(e)).await;
            }
            Seen::New => {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.emit(ClientEvent::Event(e)).await;
            }
        }
    }

    /// Handles one read; `Some` ends the session.
    async fn on_message(
        &mut self,
        msg: Option<Result<Message, WsError>>,
        conn: u64,
        synced_at: &mut Option<Instant>,
        auth_failures: &mut u32,
    ) -> Option<End> {
        let text = match msg {
            None => return Some(lost_reason(None, "connection closed", *synced_at)),
            Some(Err(e)) => return Some(lost(None, e, *synced_at)),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = match frame {
                    Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                    None => (None, "closed without a code".to_string()),
                };
                return Some(End::Lost {
                    code,
                    reason,
                    synced_at: *synced_at,
                });
            }
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => return None,
        };
        // Fast path for the bulk of the traffic: an event parses straight
        // into its struct (no buffering of an internally tagged enum). The
        // pattern cannot occur inside a JSON string (its quotes would be
        // escaped).
        if text.as_str().contains(r#""type":"event""#) {
            if let Ok(e) = serde_json::from_str::<EventFrame>(text.as_str()) {
                self.on_event(e).await;
                return None;
            }
        }
        let frame: ServerFrame = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("unreadable frame from the server ({e}): {}", text.as_str());
                return None;
            }
        };
        match frame {
            ServerFrame::Hello { user, worker } => {
                *auth_failures = 0;
                self.emit(ClientEvent::Hello { user, worker }).await;
                self.emit(ClientEvent::State(ConnState::Open)).await;
            }
            ServerFrame::Event(e) => self.on_event(e).await,
            ServerFrame::Synced => {
                *synced_at = Some(Instant::now());
                self.emit(ClientEvent::Synced).await;
                self.emit(ClientEvent::State(ConnState::Synced)).await;
            }
            ServerFrame::Sent {
                client_msg_id,
                conversation_id,
                seq,
                duplicate,
            } => {
                if let Some(p) = self.outbox.complete(&client_msg_id, conn) {
                    self.answer(
                        p,
                        Ok(Sent {
                            conversation_id,
                            seq,
                            duplicate,
                            client_msg_id,
                        }),
                    );
                }
            }
            ServerFrame::Error {
                code,
                message,
                client_msg_id,
                retry_after,
            } => {
                let mine = client_msg_id.filter(|id| self.outbox.contains(id));
                match mine {
                    Some(id) if retryable(&code) => {
                        let secs = retry_after.unwrap_or(1.0).clamp(0.05, 60.0);
                        let at = std::time::Instant::now() + Duration::from_secs_f64(secs);
                        self.outbox.retry(&id, conn, Some(at));
                    }
                    Some(id) => {
                        if let Some(p) = self.outbox.complete(&id, conn) {
                            self.answer(p, Err(SendError::Rejected { code, message }));
                        }
                    }
                    None => {
                        self.emit(ClientEvent::Error(ClientError::Server { code, message }))
                            .await;
                    }
                }
            }
            ServerFrame::Pong | ServerFrame::Unknown => {}
        }
        None
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

/// `url` with `token=TOKEN` added to its query.
fn with_token(url: &str, token: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut out = String::with_capacity(url.len() + token.len() + 8);
    out.push_str(url);
    out.push(sep);
    out.push_str("token=");
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_goes_in_the_query_encoded() {
        assert_eq!(
            with_token("ws://h:1/v1/ws", "a.b_c-d"),
            "ws://h:1/v1/ws?token=a.b_c-d"
        );
        assert_eq!(
            with_token("ws://h:1/v1/ws?x=1", "a+b/="),
            "ws://h:1/v1/ws?x=1&token=a%2Bb%2F%3D"
        );
    }

    #[test]
    fn server_frames_parse() {
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"event","conversation_id":3,"seq":7,"event":"message.created","sender":"a","created_at":"t","body":"hi","client_msg_id":"m"}"#,
        )
        .unwrap();
        assert!(
            matches!(f, ServerFrame::Event(e) if e.seq == 7 && e.body.as_deref() == Some("hi"))
        );
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"sent","client_msg_id":"m","conversation_id":3,"seq":7,"duplicate":true}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            ServerFrame::Sent {
                duplicate: true,
                ..
            }
        ));
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"error","code":"rate_limited","message":"m","client_msg_id":"x","retry_after":2}"#,
        )
        .unwrap();
        assert!(
            matches!(f, ServerFrame::Error { retry_after: Some(r), .. } if (r - 2.0).abs() < 1e-9)
        );
        let f: ServerFrame = serde_json::from_str(r#"{"type":"whatever","x":1}"#).unwrap();
        assert!(matches!(f, ServerFrame::Unknown));
    }
}
