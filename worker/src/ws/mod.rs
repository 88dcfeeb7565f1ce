//! One connection, once upgraded ([`crate::upgrade`]) or opened as an
//! event stream ([`crate::sse`]): `hello`, the backlog, `synced`, then live
//! events (and, on a WebSocket, sends and acks) until either side closes
//! or the worker drains. The transport is only the [`Wire`]: every
//! guarantee below holds for both.
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

mod catchup;

use crate::commit::{ConnReply, ReplyTo, SendRequest};
use crate::fanout::{ConnMsg, QueueState};
use crate::request::check_body;
use crate::sequencer::Sequencer;
use crate::store::StoreFailure;
use crate::store::{NewMessage, StoreError};
use crate::wire::{Close as End, Gone, Out, Wire};
use crate::App;
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_protocol::frames::{server, ClientFrame};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub(crate) type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Events read per query when replaying a backlog or filling a gap.
const PAGE: i64 = 1000;

/// Client frames kept while a repair waits for the database.
const MAX_DEFERRED: usize = 64;

/// How often an event stream gets a comment line when nothing else is
/// written (at most; half the idle timeout when that is shorter): proxies
/// close streams silent for longer.
const SSE_PING: Duration = Duration::from_secs(15);

pub(crate) struct Connection {
    app: Arc<App>,
    id: u64,
    user: Arc<str>,
    /// The socket or stream, not split: reads happen only inside
    /// `select!` (whose futures are dropped before a branch's handler runs)
    /// and writes only in handlers, so one owner suffices and no lock sits
    /// between them.
    wire: Wire,
    /// What this connection has written, per conversation, and may write.
    seq: Sequencer,
    /// Client frames read while a repair waited, handled after it.
    deferred: VecDeque<Message>,
    inflight: usize,
    reply_tx: mpsc::Sender<Box<ConnReply>>,
    unflushed: usize,
    /// Shared with the dispatcher: the queue's bytes, and whether it
    /// overflowed (the connection is cut).
    queue: Arc<QueueState>,
}

/// Runs a socket write, checking every second whether the dispatcher has
/// cut this connection meanwhile: a client that stops reading blocks our
/// writes, and must not keep its task (and queue) alive forever.
async fn guarded<F>(cut: &AtomicBool, fut: F) -> Result<(), Gone>
where
    F: std::future::Future<Output = Result<(), Gone>>,
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
            Err(_) if cut.load(Ordering::Acquire) => return Err(Gone),
            Err(_) => {}
        }
    }
}

impl Connection {
    /// Serves one client of `user` from client address `ip` (for the logs)
    /// on `wire` until it goes, is cut, or the worker drains.
    pub(crate) async fn run(app: Arc<App>, wire: Wire, user: Arc<str>, ip: IpAddr) {
        let id = app.next_conn_id();
        let (tx, rx) = mpsc::channel(app.config.outbound_queue);
        let (reply_tx, reply_rx) = mpsc::channel(app.config.max_inflight);
        let queue = Arc::new(QueueState::default());
        app.dispatcher
            .register(id, user.clone(), tx, queue.clone())
            .await;
        app.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        app.metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        log::debug!("user={user} conn={id} ip={ip}: connected");
        let mut conn = Connection {
            app: app.clone(),
            id,
            user: user.clone(),
            wire,
            seq: Sequencer::new(&user),
            deferred: VecDeque::new(),
            inflight: 0,
            reply_tx,
            unflushed: 0,
            queue: queue.clone(),
        };
        let mut end = conn.serve(rx, reply_rx, &queue.cut).await;
        if queue.cut.load(Ordering::Acquire) && matches!(end, End::ClientClosed) {
            // Our writes failed because we gave up on a client that did
            // not read: tell it why, if it ever reads again.
            end = End::TooSlow;
        }
        Box::pin(conn.wire.close(end)).await;
        app.dispatcher.deregister(id).await;
        app.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        log::debug!("user={user} conn={id} ip={ip}: closed");
    }

    async fn write(&mut self, out: Out<'_>) -> Result<(), Gone> {
        self.unflushed += 1;
        let queue = self.queue.clone();
        guarded(&queue.cut, self.wire.feed(out)).await
    }

    /// Writes a frame other than an event.
    async fn write_control(&mut self, kind: &'static str, text: String) -> Result<(), Gone> {
        self.write(Out::Control(kind, text)).await
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        if self.unflushed > 0 {
            self.unflushed = 0;
            let queue = self.queue.clone();
            guarded(&queue.cut, self.wire.flush()).await?;
        }
        Ok(())
    }

    async fn write_now(&mut self, kind: &'static str, text: String) -> Result<(), Gone> {
        self.write_control(kind, text).await?;
        self.flush().await
    }

    /// A WebSocket ping or an event stream's comment, written at once.
    async fn keepalive(&mut self) -> Result<(), Gone> {
        let queue = self.queue.clone();
        guarded(&queue.cut, self.wire.keepalive()).await
    }

    /// The connection's life; returns why it ended.
    async fn serve(
        &mut self,
        mut rx: mpsc::Receiver<ConnMsg>,
        mut reply_rx: mpsc::Receiver<Box<ConnReply>>,
        cut: &AtomicBool,
    ) -> End {
        let hello = server::hello(&self.user, &self.app.config.worker_id);
        if self.write_now("hello", hello).await.is_err() {
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
        // A WebSocket is checked for silence; an event stream, whose
        // client never talks, gets a comment every period instead.
        let period = if self.wire.has_inbound() {
            idle / 4
        } else {
            SSE_PING.min(idle / 2)
        };
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
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
                inbound = self.wire.next(), if can_read => {
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
                    if !self.wire.has_inbound() {
                        if self.keepalive().await.is_err() { return End::ClientClosed; }
                        continue;
                    }
                    let silent = last_inbound.elapsed();
                    if silent >= idle {
                        log::info!("user={} conn={}: silent for {}s, closing", self.user, self.id, silent.as_secs());
                        self.app.metrics.idle_closes.fetch_add(1, Ordering::Relaxed);
                        return End::Idle;
                    }
                    if silent >= idle / 2 && !pinged {
                        pinged = true;
                        if self.keepalive().await.is_err() {
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
                self.write_control("error", f)
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
                    .write_control("error", f)
                    .await
                    .map_err(|_| End::ClientClosed);
            }
        };
        let reply = match frame {
            ClientFrame::Ping => ("pong", server::pong()),
            // Members only (the sequencer knows: the same rule as acks);
            // forwarded at most once per 2 s, silently dropped beyond.
            ClientFrame::Typing { conversation_id } => {
                if self.seq.last(conversation_id).is_none() {
                    (
                        "error",
                        server::error(
                            "not_found",
                            &format!("conversation {conversation_id} not found"),
                            None,
                            None,
                        ),
                    )
                } else {
                    self.app.signals.typing(&self.user, conversation_id);
                    return Ok(());
                }
            }
            ClientFrame::Ack {
                conversation_id,
                seq,
            } => match self.seq.last(conversation_id) {
                Some(last) if seq <= last => {
                    self.app.cursors.ack(conversation_id, &self.user, seq);
                    return Ok(());
                }
                Some(last) => (
                    "error",
                    server::error(
                        "invalid_seq",
                        &format!("seq {seq} is beyond the last delivered seq {last}"),
                        None,
                        None,
                    ),
                ),
                _ => (
                    "error",
                    server::error(
                        "not_found",
                        &format!("conversation {conversation_id} not found"),
                        None,
                        None,
                    ),
                ),
            },
            ClientFrame::Send {
                conversation_id,
                body,
                client_msg_id,
            } => {
                if let Err((code, msg)) = check_body(&self.app, &body) {
                    (
                        "error",
                        server::error(code.as_str(), &msg, Some(&client_msg_id), None),
                    )
                } else if let Err(secs) = self.app.rate.check(&self.user) {
                    self.app
                        .metrics
                        .rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    (
                        "error",
                        server::error(
                            "rate_limited",
                            "too many sends; slow down",
                            Some(&client_msg_id),
                            Some(secs),
                        ),
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
                        Err(req) => (
                            "error",
                            server::error(
                                "database_unavailable",
                                "commit lanes stopped",
                                Some(&req.message.client_msg_id),
                                Some(1),
                            ),
                        ),
                    }
                }
            }
        };
        self.write_control(reply.0, reply.1)
            .await
            .map_err(|_| End::ClientClosed)
    }

    async fn on_reply(&mut self, r: Box<ConnReply>) -> Result<(), Gone> {
        let frame = match r.result {
            Ok(a) => (
                "sent",
                server::sent(
                    &r.client_msg_id,
                    r.conversation_id,
                    a.event.seq,
                    a.duplicate,
                ),
            ),
            Err(e) => {
                if let StoreError::Internal(m) = &e {
                    log::error!("user={} conn={}: send failed: {m}", self.user, self.id);
                }
                let f = StoreFailure::from(&e);
                (
                    "error",
                    server::error(
                        f.code.as_str(),
                        &f.message,
                        Some(&r.client_msg_id),
                        f.retry_after,
                    ),
                )
            }
        };
        self.write_control(frame.0, frame.1).await
    }
}
