//! `tether-client`: a Rust client for the tether WebSocket gateway, with
//! the semantics of the JavaScript SDK (`clients/js`); docs/SDK.md is the
//! spec both follow.
//!
//! - [`Client::connect`] spawns a background task that owns the socket. The
//!   URL is a base URL (`http://host:port`, `https://...` with the `tls`
//!   feature, or the WebSocket URL itself): `/v1/ws` is appended. The token
//!   is offered as a subprotocol (`tether.v1, tether.token.<JWT>`), never in
//!   the URL. It reconnects with full-jitter exponential backoff
//!   ([`Backoff`]: base 100 ms, cap 5 s), soon after a `1001` (server
//!   draining) or `1013` (client too slow), never in a tight loop. A
//!   configuration error (a bad scheme, a handshake answered 4xx other than
//!   401/429) ends the client at once with [`ClientError::Config`].
//! - Per conversation it keeps the highest seq delivered, drops anything at
//!   or below it and reports a gap as [`ClientError::Gap`] (never hides it).
//! - **Acks follow consumption**: with `auto_ack` (the default) an event is
//!   acknowledged once [`Client::next_event`] has returned it to the
//!   application; with `auto_ack: false` only what [`Client::ack`] names.
//!   Acks are coalesced (every [`ClientOptions::ack_every`] events or after
//!   [`ClientOptions::ack_interval`]) and flushed by [`Client::close`].
//! - The event channel is bounded and a full one never blocks the socket:
//!   events that do not fit are not delivered (nor acknowledged) on this
//!   connection, which goes on reading (so `sent` and `synced` still
//!   arrive); once the application has drained the channel to half, the
//!   client reconnects and the server replays from the cursor.
//! - [`Client::send`] generates a `client_msg_id` once (128 random bits,
//!   hex) and retries with it across reconnects until `sent` or a final
//!   error ([`SendError`]); the outbox is bounded
//!   ([`SendError::OutboxFull`]).
//! - [`Client::conversation`]: one conversation's view (its events, send,
//!   history in both directions, mark-read).
//! - [`Rest`]: the HTTP API with typed answers (hyper-util, keep-alive).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_client::{Client, ClientEvent, ClientOptions};
//! let mut client = Client::connect(ClientOptions::new("http://127.0.0.1:8080", "TOKEN"));
//! // Sending from another task: the loop below keeps reading meanwhile.
//! let handle = client.handle();
//! tokio::spawn(async move {
//!     match handle.send(42, "hello").await {
//!         Ok(sent) => println!("stored as seq {}", sent.seq),
//!         Err(e) => eprintln!("not stored: {e}"),
//!     }
//! });
//! while let Some(ev) = client.next_event().await {
//!     if let ClientEvent::Event(e) = ev {
//!         println!("{}#{} {}: {:?}", e.conversation_id, e.seq, e.sender, e.body);
//!     }
//! }
//! # Ok(()) }
//! ```

mod backoff;
mod conn;
mod conversation;
mod outbox;
pub mod rest;
pub mod tracker;
pub mod transport;

pub use backoff::{random_id, Backoff, Rng};
pub use conversation::Conversation;
pub use rest::{Page, Rest, RestError};
pub use tether_protocol::frames::Event;

use futures_util::future::BoxFuture;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// Boxed error of a token callback.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the token for each (re)connect comes from.
#[derive(Clone)]
pub enum TokenSource {
    /// The same token every time.
    Fixed(String),
    /// Called when there is no token yet, when the last one expires within
    /// [`ClientOptions::token_refresh_margin`], and once more after an
    /// authentication failure before giving up.
    Fetch(Arc<dyn Fn() -> BoxFuture<'static, Result<String, BoxError>> + Send + Sync>),
}

impl TokenSource {
    pub fn fixed(token: impl Into<String>) -> TokenSource {
        TokenSource::Fixed(token.into())
    }

    /// An async token callback.
    pub fn fetch<F, Fut>(f: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        TokenSource::Fetch(Arc::new(move || Box::pin(f())))
    }

    fn refreshable(&self) -> bool {
        matches!(self, TokenSource::Fetch(_))
    }

    async fn get(&self) -> Result<String, BoxError> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::Fetch(f) => f().await,
        }
    }
}

impl From<String> for TokenSource {
    fn from(t: String) -> Self {
        TokenSource::Fixed(t)
    }
}

impl From<&str> for TokenSource {
    fn from(t: &str) -> Self {
        TokenSource::Fixed(t.to_string())
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Fixed(_) => f.write_str("TokenSource::Fixed(..)"),
            TokenSource::Fetch(_) => f.write_str("TokenSource::Fetch(..)"),
        }
    }
}

/// How a [`Client`] behaves. [`ClientOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The gateway: `http://host:port` (or `https://`, `ws://`, `wss://`;
    /// `/v1/ws` is appended unless there).
    pub url: String,
    pub token: TokenSource,
    /// A fetched token is reused until this long before its `exp`.
    pub token_refresh_margin: Duration,
    pub backoff: Backoff,
    /// Sends not yet answered; beyond it [`SendError::OutboxFull`].
    pub outbox_limit: usize,
    /// Sends written on one connection and not yet answered (the rest wait
    /// in the outbox); keep it below the server's `--max-inflight`.
    pub max_inflight_sends: usize,
    /// Ack after this many events of a conversation...
    pub ack_every: usize,
    /// ...or when the oldest unacknowledged one is this old.
    pub ack_interval: Duration,
    /// Acknowledge every event once [`Client::next_event`] returned it
    /// (otherwise only what [`Client::ack`] says).
    pub auto_ack: bool,
    /// Events the channel holds; beyond it events wait on the server (the
    /// client reconnects once the application has read half of them).
    pub event_capacity: usize,
    /// TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// A `{"type":"ping"}` after this much silence of our own.
    pub ping_interval: Duration,
    /// Local address to connect from (e.g. 127.0.0.2 to get past one
    /// address's ephemeral ports).
    pub bind: Option<IpAddr>,
    /// Largest send frame accepted locally (bigger: refused at once with
    /// `payload_too_large` instead of a 1009 from the server).
    pub max_frame_bytes: usize,
    /// WebSocket read buffer (small keeps many idle clients cheap).
    pub read_buffer: usize,
    /// TLS settings for `wss://` (default: the webpki roots).
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientOptions {
    pub fn new(url: impl Into<String>, token: impl Into<TokenSource>) -> ClientOptions {
        ClientOptions {
            url: url.into(),
            token: token.into(),
            token_refresh_margin: Duration::from_secs(30),
            backoff: Backoff::default(),
            outbox_limit: 1000,
            max_inflight_sends: 128,
            ack_every: 64,
            ack_interval: Duration::from_millis(1000),
            auto_ack: true,
            event_capacity: 4096,
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            bind: None,
            max_frame_bytes: 256 * 1024,
            read_buffer: 8 * 1024,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// The connection's state, reported on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    /// Handshake done, `hello` received; the backlog follows.
    Open,
    /// Backlog delivered; live from here.
    Synced,
    /// Waiting `delay` before attempt `attempt` (1-based).
    Reconnecting {
        delay: Duration,
        attempt: u32,
    },
    /// For good: [`Client::close`], authentication failed twice, or a
    /// configuration error.
    Closed,
}

/// Something the application should know about, none of which stops the
/// client (except [`ClientError::Unauthorized`] and
/// [`ClientError::Config`], which come with [`ConnState::Closed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// Events `expected..got` of a conversation never arrived. `got` was
    /// delivered after this.
    Gap {
        conversation_id: i64,
        expected: i64,
        got: i64,
    },
    /// An `error` frame that belongs to no send.
    Server { code: String, message: String },
    /// A connect attempt failed.
    Connect(String),
    /// The connection ended (`code` of the close frame, if any).
    Disconnected { code: Option<u16>, reason: String },
    /// The token callback failed.
    Token(String),
    /// The server refused the token twice: the client gave up.
    Unauthorized(String),
    /// The configuration cannot work (a bad URL scheme, a handshake refused
    /// with 4xx other than 401/429): the client gave up at once.
    Config(String),
    /// The event channel was full: the rest of this connection's events
    /// were left on the server, to be replayed once the application has
    /// read the channel down to half.
    Overflow { capacity: usize },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Gap {
                conversation_id,
                expected,
                got,
            } => write!(
                f,
                "gap in conversation {conversation_id}: expected seq {expected}, got {got}"
            ),
            ClientError::Server { code, message } => write!(f, "server error {code}: {message}"),
            ClientError::Connect(e) => write!(f, "connect failed: {e}"),
            ClientError::Disconnected { code, reason } => {
                write!(f, "disconnected (close code {code:?}): {reason}")
            }
            ClientError::Token(e) => write!(f, "token callback failed: {e}"),
            ClientError::Unauthorized(e) => write!(f, "unauthorized: {e}"),
            ClientError::Config(e) => write!(f, "configuration error: {e}"),
            ClientError::Overflow { capacity } => write!(
                f,
                "the event channel ({capacity}) is full: events wait on the server until it drains"
            ),
        }
    }
}

/// What [`Client::next_event`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The server's `hello` on each connection.
    Hello {
        user: String,
        worker: String,
    },
    /// A new event (duplicates are never surfaced).
    Event(Event),
    /// The backlog of this connection is delivered.
    Synced,
    /// The server's history of the conversation starts at `from_seq`
    /// (older events were pruned by its retention): events continue from
    /// there, gap-free. Shown to a member who was behind the horizon.
    Truncated {
        conversation_id: i64,
        from_seq: i64,
    },
    /// Another member's presence changed (or, right after `Synced`, is):
    /// `online` while they hold a connection anywhere, offline only after
    /// the server's grace period. Pushed in conversations of at most the
    /// server's `--presence-push-max-members`.
    Presence {
        conversation_id: i64,
        user: String,
        online: bool,
        /// RFC 3339; `None` for a user never seen.
        last_seen: Option<String>,
    },
    /// Another member is typing (show it for 5 s unless renewed).
    Typing {
        conversation_id: i64,
        user: String,
    },
    /// Another member has read the conversation up to `seq`.
    Read {
        conversation_id: i64,
        user: String,
        seq: i64,
    },
    State(ConnState),
    Error(ClientError),
}

/// A send stored by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub conversation_id: i64,
    pub seq: i64,
    /// The server had already stored this `client_msg_id` (a retry).
    pub duplicate: bool,
    pub client_msg_id: String,
}

/// Why a send will never be stored by this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The outbox holds `limit` unanswered sends already.
    OutboxFull { limit: usize },
    /// A final error from the server (`not_found`, `invalid_field`,
    /// `payload_too_large`, ...): retrying cannot help.
    Rejected { code: String, message: String },
    /// The client was closed (or gave up) before the send was answered. It
    /// may or may not have been stored; a new client can retry it with the
    /// same id ([`Client::send_with_id`]).
    Closed,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::OutboxFull { limit } => {
                write!(f, "outbox full ({limit} sends awaiting an answer)")
            }
            SendError::Rejected { code, message } => write!(f, "send rejected: {code}: {message}"),
            SendError::Closed => write!(f, "client closed before the send was answered"),
        }
    }
}

impl std::error::Error for SendError {}

/// Counters of one client (cheap to read at any time).
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful WebSocket handshakes.
    pub connects: AtomicU64,
    /// Failed connect attempts.
    pub connect_failures: AtomicU64,
    /// Events dropped as duplicates (at or below the highest seq seen).
    pub duplicates: AtomicU64,
    /// Gaps reported.
    pub gaps: AtomicU64,
    /// Events delivered.
    pub events: AtomicU64,
    /// Send frames written (first tries and retries).
    pub send_writes: AtomicU64,
    /// Ack frames written.
    pub acks: AtomicU64,
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub(crate) enum Cmd {
    Send {
        id: String,
        conversation_id: i64,
        body: String,
        reply: outbox::Reply,
    },
    Ack {
        conversation_id: i64,
        seq: i64,
    },
    Typing {
        conversation_id: i64,
    },
    /// Skip the backoff wait now under way (if any).
    ReconnectNow,
    /// The caller dropped a send's future: forget the send.
    Cancel {
        id: String,
    },
    Close,
}

/// Cancels a send whose future is dropped before its answer (a timeout, a
/// `select!` that went the other way): it leaves the outbox. It may have
/// been stored already; a retry with the same id tells.
struct CancelOnDrop {
    cmd: mpsc::UnboundedSender<Cmd>,
    id: Option<String>,
}

impl CancelOnDrop {
    /// The send was answered (or never queued): nothing to cancel.
    fn disarm(&mut self) {
        self.id = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = self.cmd.send(Cmd::Cancel { id });
        }
    }
}

/// The cloneable sending half of a [`Client`].
#[derive(Clone)]
pub struct ClientHandle {
    cmd: mpsc::UnboundedSender<Cmd>,
    pending: Arc<AtomicUsize>,
    outbox_limit: usize,
    stats: Arc<Stats>,
}

impl ClientHandle {
    /// Sends `body` to a conversation with a fresh `client_msg_id`; resolves
    /// once the server has committed it (or with a final error). Dropping
    /// the future (e.g. `tokio::time::timeout`) cancels the send: it leaves
    /// the outbox (it may have been stored already).
    pub fn send(
        &self,
        conversation_id: i64,
        body: impl Into<String>,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send + 'static {
        self.send_with_id(conversation_id, body, random_id())
    }

    /// [`ClientHandle::send`] with the caller's `client_msg_id` (to retry a
    /// send across client instances).
    pub fn send_with_id(
        &self,
        conversation_id: i64,
        body: impl Into<String>,
        client_msg_id: impl Into<String>,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let client_msg_id: String = client_msg_id.into();
        let mut guard = CancelOnDrop {
            cmd: self.cmd.clone(),
            id: Some(client_msg_id.clone()),
        };
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.outbox_limit).then_some(n + 1)
            })
            .is_ok();
        let early = if !admitted {
            Some(SendError::OutboxFull {
                limit: self.outbox_limit,
            })
        } else {
            let cmd = Cmd::Send {
                id: client_msg_id,
                conversation_id,
                body: body.into(),
                reply: tx,
            };
            match self.cmd.send(cmd) {
                Ok(()) => None,
                Err(_) => {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    Some(SendError::Closed)
                }
            }
        };
        async move {
            if let Some(e) = early {
                guard.disarm();
                return Err(e);
            }
            let result = rx.await.unwrap_or(Err(SendError::Closed));
            guard.disarm();
            result
        }
    }

    /// Acknowledges a conversation up to `seq` (only needed with
    /// `auto_ack: false`; clamped to what was delivered).
    pub fn ack(&self, conversation_id: i64, seq: i64) {
        let _ = self.cmd.send(Cmd::Ack {
            conversation_id,
            seq,
        });
    }

    /// Tells the other members the user is typing (members only; the
    /// server forwards it at most once every 2 s; nothing is sent while
    /// disconnected).
    pub fn typing(&self, conversation_id: i64) {
        let _ = self.cmd.send(Cmd::Typing { conversation_id });
    }

    /// Closes the connection (1000, after writing the acks due) and stops
    /// reconnecting; unanswered sends fail with [`SendError::Closed`].
    pub fn close(&self) {
        let _ = self.cmd.send(Cmd::Close);
    }

    /// Ends a backoff wait under way and connects now (e.g. when the
    /// network is known to be back).
    pub fn reconnect_now(&self) {
        let _ = self.cmd.send(Cmd::ReconnectNow);
    }

    /// Sends not yet answered.
    pub fn outbox_len(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

/// Extra room in the channel for state changes and errors, which never
/// wait: events may fill `event_capacity`, these the rest.
pub(crate) const CONTROL_ROOM: usize = 64;

/// The receiving half of a [`Client`]: [`Events::recv`] is
/// [`Client::next_event`], acks included.
pub struct Events {
    rx: mpsc::Receiver<ClientEvent>,
    cmd: mpsc::UnboundedSender<Cmd>,
    auto_ack: bool,
    /// Wakes the socket task waiting for the channel to drain.
    room: Arc<Notify>,
}

impl Events {
    /// The next event; `None` once the client is closed and everything was
    /// read. With `auto_ack`, an event returned here counts as consumed.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        let ev = self.rx.recv().await;
        self.room.notify_one();
        if let (true, Some(ClientEvent::Event(e))) = (self.auto_ack, &ev) {
            let _ = self.cmd.send(Cmd::Ack {
                conversation_id: e.conversation_id,
                seq: e.seq,
            });
        }
        ev
    }
}

/// A connection to tether that survives reconnects. Must be created inside
/// a tokio runtime. Dropping it (and every [`ClientHandle`]) closes it.
pub struct Client {
    handle: ClientHandle,
    events: Events,
}

impl Client {
    /// Starts the background task; the first [`ClientEvent`] is
    /// `State(Connecting)`.
    pub fn connect(options: ClientOptions) -> Client {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(options.event_capacity.max(1) + CONTROL_ROOM);
        let pending = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let room = Arc::new(Notify::new());
        let handle = ClientHandle {
            cmd: cmd_tx.clone(),
            pending: pending.clone(),
            outbox_limit: options.outbox_limit,
            stats: stats.clone(),
        };
        let events = Events {
            rx: ev_rx,
            cmd: cmd_tx,
            auto_ack: options.auto_ack,
            room: room.clone(),
        };
        tokio::spawn(conn::Task::new(options, cmd_rx, ev_tx, pending, stats, room).run());
        Client { handle, events }
    }

    /// The next event; `None` once the client is closed and everything was
    /// read. With `auto_ack`, an event returned here counts as consumed and
    /// is acknowledged (coalesced; [`Client::close`] flushes).
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// One conversation's view over this client.
    pub fn conversation(&self, conversation_id: i64, rest: Rest) -> Conversation {
        Conversation::new(conversation_id, self.handle.clone(), rest)
    }

    /// A cloneable handle for sending from other tasks.
    pub fn handle(&self) -> ClientHandle {
        self.handle.clone()
    }

    /// The handle and the receiving half (which acks as
    /// [`Client::next_event`] does).
    pub fn into_parts(self) -> (ClientHandle, Events) {
        (self.handle, self.events)
    }

    /// See [`ClientHandle::send`].
    pub fn send(
        &self,
        conversation_id: i64,
        body: impl Into<String>,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send + 'static {
        self.handle.send(conversation_id, body)
    }

    /// See [`ClientHandle::send_with_id`].
    pub fn send_with_id(
        &self,
        conversation_id: i64,
        body: impl Into<String>,
        client_msg_id: impl Into<String>,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send + 'static {
        self.handle
            .send_with_id(conversation_id, body, client_msg_id)
    }

    /// See [`ClientHandle::ack`].
    pub fn ack(&self, conversation_id: i64, seq: i64) {
        self.handle.ack(conversation_id, seq)
    }

    /// See [`ClientHandle::typing`].
    pub fn typing(&self, conversation_id: i64) {
        self.handle.typing(conversation_id)
    }

    /// See [`ClientHandle::close`].
    pub fn close(&self) {
        self.handle.close()
    }

    /// See [`ClientHandle::reconnect_now`].
    pub fn reconnect_now(&self) {
        self.handle.reconnect_now()
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.handle.stats
    }

    /// Waits for the next [`ClientEvent::Synced`], returning the events
    /// delivered meanwhile (other client events are dropped). `None` on
    /// timeout or when the client closed.
    pub async fn wait_synced(&mut self, timeout: Duration) -> Option<Vec<Event>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.next_event()).await {
                Ok(Some(ClientEvent::Synced)) => return Some(out),
                Ok(Some(ClientEvent::Event(e))) => out.push(e),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
