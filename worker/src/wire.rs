//! The outbound side of a connection, whatever carries it: a WebSocket
//! (`GET /v1/ws`, [`crate::upgrade`]) or an event stream (`GET /v1/sse`,
//! [`crate::sse`]). The connection ([`crate::ws`]) decides what to write,
//! in what order, to whom (its sequencer, catch-up, the dispatcher's
//! queue): one delivery path, so both transports have the same guarantees
//! and the same membership rules. A [`Wire`] only encodes and writes.
//!
//! An event stream has no inbound side: its client sends over HTTP
//! (`POST .../messages`, `POST .../cursor`). Its [`Wire::next`] only
//! resolves when the client has gone (hyper dropped the body).

use crate::frame::Frame;
use crate::sse::SseSink;
use crate::ws::Socket;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The client is gone (or was cut): nothing more can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// One thing a connection writes.
pub enum Out<'a> {
    /// A committed event; its text is the WebSocket frame
    /// `{"type":"event",...}`, which is also an event stream's `data`.
    Event(&'a Frame),
    /// Any other server frame, with its `type` (`hello`, `synced`,
    /// `error`, `sent`, `pong`), which names an event stream's event.
    Control(&'static str, String),
    /// A signal the dispatcher relays (`presence`, `typing`, `read`),
    /// serialized once for all its recipients; its `type` is in the JSON.
    Signal(&'a Utf8Bytes),
}

/// Why a connection ends, as far as the wire says it: a WebSocket close
/// frame, or an event stream's last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client went; nothing to say.
    ClientClosed,
    Draining,
    TooSlow,
    TooLarge,
    InvalidUtf8,
    Idle,
    /// History was pruned past the connection and its user's membership
    /// may have changed inside the pruned range: reconnect, and the
    /// backlog starts from what the membership table says.
    Resync,
    Internal(&'static str),
}

/// What carries a connection's frames.
// The WebSocket is the common case and stays inline, as before the enum: an
// event stream leaves some 290 bytes unused rather than every WebSocket
// paying an allocation and an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Wire {
    WebSocket(Socket),
    EventStream(SseSink),
}

impl Wire {
    /// Queues one frame (written by [`Wire::flush`], or sooner when the
    /// buffer is full).
    pub async fn feed(&mut self, out: Out<'_>) -> Result<(), Gone> {
        match self {
            Wire::WebSocket(ws) => {
                let text = match out {
                    Out::Event(f) => f.text.clone(),
                    Out::Control(_, s) => Utf8Bytes::from(s),
                    Out::Signal(t) => t.clone(),
                };
                ws.feed(Message::Text(text)).await.map_err(|_| Gone)
            }
            Wire::EventStream(s) => s.feed(out).await,
        }
    }

    pub async fn flush(&mut self) -> Result<(), Gone> {
        match self {
            Wire::WebSocket(ws) => ws.flush().await.map_err(|_| Gone),
            Wire::EventStream(s) => s.flush().await,
        }
    }

    /// The next message from the client; `None` when it has gone. An event
    /// stream never has one: this resolves only when its client has gone.
    pub async fn next(&mut self) -> Option<Result<Message, WsError>> {
        match self {
            Wire::WebSocket(ws) => ws.next().await,
            Wire::EventStream(s) => {
                s.closed().await;
                None
            }
        }
    }

    /// Whether the client talks on this wire (a WebSocket), so silence
    /// means it may be gone. An event stream's client never does.
    pub fn has_inbound(&self) -> bool {
        matches!(self, Wire::WebSocket(_))
    }

    /// Keeps the connection (and the proxies on its way) alive: a
    /// WebSocket ping, or an event stream's comment line.
    pub async fn keepalive(&mut self) -> Result<(), Gone> {
        match self {
            Wire::WebSocket(ws) => ws
                .send(Message::Ping(Vec::new().into()))
                .await
                .map_err(|_| Gone),
            Wire::EventStream(s) => s.ping().await,
        }
    }

    /// Says why the connection ends, within a grace time, and closes.
    pub async fn close(&mut self, why: Close) {
        if why == Close::ClientClosed {
            return;
        }
        // A client cut for being slow gets longer: the last words wait
        // behind what it has not read yet.
        let grace = if matches!(why, Close::TooSlow | Close::Resync) {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(2)
        };
        let _ = tokio::time::timeout(grace, async {
            match self {
                Wire::WebSocket(ws) => {
                    let (code, reason) = close_frame(why);
                    let frame = CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    };
                    let _ = ws.send(Message::Close(Some(frame))).await;
                    let _ = ws.close(None).await;
                }
                Wire::EventStream(s) => s.end(why).await,
            }
        })
        .await;
    }
}

/// A WebSocket's close code and reason.
fn close_frame(why: Close) -> (CloseCode, &'static str) {
    match why {
        Close::ClientClosed => (CloseCode::Normal, ""),
        Close::Draining => (CloseCode::Away, "server draining; reconnect"),
        Close::TooSlow => (
            CloseCode::Again,
            "client too slow; reconnect to replay from your cursor",
        ),
        Close::TooLarge => (CloseCode::Size, "frame too large"),
        Close::InvalidUtf8 => (CloseCode::Invalid, "invalid UTF-8"),
        Close::Idle => (CloseCode::Normal, "idle timeout"),
        Close::Resync => (CloseCode::Again, "history was pruned; reconnect to resync"),
        Close::Internal(why) => (CloseCode::Error, why),
    }
}
