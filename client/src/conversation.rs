//! One conversation's view over a [`Client`](crate::Client): its message
//! events picked from the client-wide stream, send, history in both
//! directions, mark-read. The client-wide stream stays the one place events
//! come from (one order, one ack path); this only narrows it.

use crate::rest::{EventsPage, Page, Rest, RestError};
use crate::{ClientEvent, ClientHandle, Event, SendError, Sent};
use std::future::Future;
use tether_protocol::frames::EVENT_MESSAGE_CREATED;

/// A conversation, by id, over a client's connection and REST API.
#[derive(Clone, Debug)]
pub struct Conversation {
    id: i64,
    handle: ClientHandle,
    rest: Rest,
}

impl std::fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandle")
            .field("outbox_len", &self.outbox_len())
            .finish()
    }
}

impl Conversation {
    pub(crate) fn new(id: i64, handle: ClientHandle, rest: Rest) -> Conversation {
        Conversation { id, handle, rest }
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// The event, if it is one of this conversation's (any kind).
    pub fn event<'a>(&self, ev: &'a ClientEvent) -> Option<&'a Event> {
        match ev {
            ClientEvent::Event(e) if e.conversation_id == self.id => Some(e),
            _ => None,
        }
    }

    /// The event, if it is a message of this conversation.
    pub fn message<'a>(&self, ev: &'a ClientEvent) -> Option<&'a Event> {
        self.event(ev).filter(|e| e.kind == EVENT_MESSAGE_CREATED)
    }

    /// Sends over the WebSocket (idempotent retries, as
    /// [`ClientHandle::send`]).
    pub fn send(
        &self,
        body: impl Into<String>,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send + 'static {
        self.handle.send(self.id, body)
    }

    /// Sends with the caller's `client_msg_id` (optimistic UI: show the
    /// message under that id, replace it when `sent` comes).
    pub fn send_with_id(
        &self,
        body: impl Into<String>,
        client_msg_id: impl Into<String>,
    ) -> impl Future<Output = Result<Sent, SendError>> + Send + 'static {
        self.handle.send_with_id(self.id, body, client_msg_id)
    }

    /// A page of history: `Page::Before(None)` the newest, `Page::After(s)`
    /// forward from `s` (e.g. to back-fill a reported gap).
    pub async fn history(&self, page: Page, limit: u32) -> Result<EventsPage, RestError> {
        self.rest.events(self.id, page, limit).await
    }

    /// Every event in `from..=to`, oldest first (forward pages): what a
    /// [`ClientError::Gap`](crate::ClientError::Gap) reported missing.
    pub async fn backfill(&self, from: i64, to: i64) -> Result<Vec<Event>, RestError> {
        let mut out = Vec::new();
        let mut after = from - 1;
        while after < to {
            let page = self.rest.events(self.id, Page::After(after), 200).await?;
            out.extend(page.events.into_iter().filter(|e| e.seq <= to));
            match page.next_after_seq {
                Some(n) if n > after => after = n,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Marks the conversation read up to `seq`: the server's cursor (and so
    /// `unread`) moves there. Clamped to what was delivered.
    pub fn mark_read(&self, seq: i64) {
        self.handle.ack(self.id, seq)
    }
}
