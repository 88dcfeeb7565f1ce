//! Server-Sent Events, for clients behind proxies that refuse WebSocket:
//! `GET /v1/sse` (`text/event-stream`) and `POST /v1/sse/tickets`.
//!
//! The stream is the WebSocket's, carried differently: the connection is
//! the same [`Connection`] (its sequencer, the dispatcher's queue,
//! catch-up, limits, drain), only its [`Wire`] is an [`SseSink`]. So
//! delivery, order, gap repair and the membership rules are one code path
//! for both transports. Each frame becomes one event: `event:` is the
//! frame's `type` (`hello`, `synced`, `event`; `failure` for an `error`
//! frame, since `error` is `EventSource`'s own event), `data:` its JSON
//! (one line: JSON escapes every line break), and an event of the log also
//! carries `id: <conversation_id>:<seq>`. The stream starts with `retry:`
//! so an `EventSource` comes back within a second, and ends after `event:
//! draining` when the worker drains.
//!
//! A client sends and acknowledges over HTTP (`POST .../messages`,
//! `POST .../cursor`); the stream only reads.
//!
//! Buffers are bounded in bytes: frames are gathered into chunks of at most
//! [`CHUNK`] bytes (or one frame), and at most [`CHUNKS`] chunks wait for
//! the socket; past that the connection waits, its queue fills, and the
//! dispatcher cuts it as it cuts a slow WebSocket (the stream ends; the
//! client reconnects and replays from its cursor).

use crate::request::{authenticate, bearer, query_param};
use crate::respond::{error_response, json_response, store_error_response, Body};
use crate::tickets::{now_ms, TicketError, TTL};
use crate::upgrade::Admission;
use crate::wire::{Close, Gone, Out, Wire};
use crate::ws::Connection;
use crate::App;
use bytes::{Bytes, BytesMut};
use hyper::body::{Frame as BodyFrame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Bytes gathered before a chunk goes to the socket.
pub const CHUNK: usize = 64 * 1024;
/// Chunks waiting for the socket before the connection waits.
pub const CHUNKS: usize = 4;
/// What an `EventSource` waits before reconnecting, in milliseconds.
pub const RETRY_MS: u64 = 1000;

/// A response body: a whole one, or an event stream.
pub type Outgoing = http_body_util::Either<Body, SseBody>;

/// The writing end of an event stream.
pub struct SseSink {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
}

impl SseSink {
    fn new(tx: mpsc::Sender<Bytes>) -> SseSink {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
        SseSink { tx, buf }
    }

    pub(crate) async fn feed(&mut self, out: Out<'_>) -> Result<(), Gone> {
        encode(&mut self.buf, out);
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), Gone> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx.send(chunk).await.map_err(|_| Gone)
    }

    /// Resolves when the client has gone (hyper dropped the body).
    pub(crate) async fn closed(&self) {
        self.tx.closed().await
    }

    /// A comment line, which keeps proxies from closing a quiet stream,
    /// in an event `ping`, which tells a client (an `EventSource` hides
    /// comments) that the stream is alive: one that hears nothing for
    /// twice the period may drop it, as a WebSocket client whose ping goes
    /// unanswered.
    pub(crate) async fn ping(&mut self) -> Result<(), Gone> {
        self.buf
            .extend_from_slice(b": ping\nevent: ping\ndata: {\"type\":\"ping\"}\n\n");
        self.flush().await
    }

    /// The stream's last words; the stream ends when the sink is dropped.
    pub(crate) async fn end(&mut self, why: Close) {
        let last = match why {
            Close::Draining => Some(("draining", r#"{"type":"draining"}"#.to_string())),
            // As `draining`: come back (the backlog starts from the
            // membership table).
            Close::Resync => Some(("resync", r#"{"type":"resync"}"#.to_string())),
            Close::Internal(m) => Some((
                "error",
                tether_protocol::frames::server::error("internal", m, None, None),
            )),
            // A slow client is not reading; a gone one cannot.
            _ => None,
        };
        if let Some((kind, text)) = last {
            encode(&mut self.buf, Out::Control(kind, text));
        }
        let _ = self.flush().await;
    }
}

/// Appends one frame as an event.
fn encode(buf: &mut BytesMut, out: Out<'_>) {
    match out {
        Out::Event(f) => {
            buf.extend_from_slice(
                format!("id: {}:{}\nevent: event\ndata: ", f.conversation_id, f.seq).as_bytes(),
            );
            buf.extend_from_slice(f.text.as_bytes());
        }
        Out::Signal(text) => {
            // Named by its `type` (a few per second at most: parsing is cheap).
            #[derive(serde::Deserialize)]
            struct Kind<'a> {
                #[serde(rename = "type", borrow)]
                kind: std::borrow::Cow<'a, str>,
            }
            let kind = serde_json::from_str::<Kind>(text.as_str())
                .map_or(std::borrow::Cow::Borrowed("signal"), |k| k.kind);
            buf.extend_from_slice(b"event: ");
            buf.extend_from_slice(kind.as_bytes());
            buf.extend_from_slice(b"\ndata: ");
            buf.extend_from_slice(text.as_bytes());
        }
        Out::Control(kind, text) => {
            // `error` is EventSource's own event (a lost connection): the
            // WebSocket's error frame is named `failure` here.
            let name = if kind == "error" { "failure" } else { kind };
            buf.extend_from_slice(b"event: ");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\ndata: ");
            buf.extend_from_slice(text.as_bytes());
        }
    }
    buf.extend_from_slice(b"\n\n");
}

/// The reading end: the response body hyper writes out as the socket
/// takes it.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(BodyFrame::data(b))))
    }
}

/// 401 for a ticket, without saying more than why.
fn refused(app: &App, e: TicketError) -> Response<Outgoing> {
    app.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
    log::debug!("sse: ticket refused: {e}");
    let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
    r.headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    r.map(Outgoing::Left)
}

/// Answers `GET /v1/sse`: 401 without a valid ticket (`?ticket=`, once) or
/// token (`Authorization: Bearer`, or `?token=` for tools), then the
/// limits every connection has (per client address `ip`, per user, per
/// worker: 429/503, as on `/v1/ws`), then 200 and the stream, served by its
/// own task.
pub async fn open(app: Arc<App>, req: Request<Incoming>, ip: IpAddr) -> Response<Outgoing> {
    let query = req.uri().query();
    let mut ticket = None;
    let user = match query_param(query, "ticket") {
        Some(t) => match app.ticket_key.check(&t, now_ms()) {
            Ok(t) => {
                let user: Arc<str> = Arc::from(t.user.as_str());
                ticket = Some(t);
                user
            }
            Err(e) => return refused(&app, e),
        },
        None => match authenticate(&app, bearer(&req).or_else(|| query_param(query, "token"))) {
            Ok(u) => u,
            Err(r) => return r.map(Outgoing::Left),
        },
    };
    let admission = match Admission::take(&app, &user, ip) {
        Ok(a) => a,
        Err(r) => return r.map(Outgoing::Left),
    };
    if let Some(t) = ticket {
        let (id, expires) = (t.id.clone(), t.expires_ms);
        match app
            .db_write(move |c| crate::store::redeem_ticket(c, &id, expires))
            .await
        {
            Ok(true) => {}
            Ok(false) => return refused(&app, TicketError::Used),
            Err(e) => return store_error_response(&e).map(Outgoing::Left),
        }
    }
    app.metrics.sse_streams.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(CHUNKS);
    let wire = Wire::EventStream(SseSink::new(tx));
    let task_app = app.clone();
    app.tasks.spawn(async move {
        Connection::run(task_app, wire, user, ip).await;
        drop(admission);
    });
    let mut r = Response::new(Outgoing::Right(SseBody { rx }));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    // nginx buffers responses unless told not to; a stream must not wait.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Answers `POST /v1/sse/tickets` (the caller authenticated): a ticket
/// for one stream, valid for [`TTL`].
pub fn issue_ticket(app: &App, user: &str) -> Response<Body> {
    match app.ticket_key.issue(user, now_ms()) {
        Some(ticket) => json_response(
            StatusCode::OK,
            serde_json::json!({"ticket": ticket, "expires_in": TTL.as_secs()}).to_string(),
        ),
        None => store_error_response(&crate::store::StoreError::Internal(
            "no randomness for a ticket".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, MembershipChange};

    #[test]
    fn frames_become_events_with_ids() {
        let mut buf = BytesMut::new();
        let f = Frame::test(7, 42, MembershipChange::None);
        encode(&mut buf, Out::Event(&f));
        encode(
            &mut buf,
            Out::Control("synced", r#"{"type":"synced"}"#.into()),
        );
        let typing = tokio_tungstenite::tungstenite::Utf8Bytes::from(
            tether_protocol::frames::server::typing(7, "bob"),
        );
        encode(&mut buf, Out::Signal(&typing));
        let text = std::str::from_utf8(&buf).unwrap();
        assert_eq!(
            text,
            format!(
                "id: 7:42\nevent: event\ndata: 7:42\n\nevent: synced\ndata: {{\"type\":\"synced\"}}\n\nevent: typing\ndata: {typing}\n\n"
            )
        );
    }
}
