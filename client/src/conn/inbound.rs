//! What the server sends, handled: events (deduplicated, never blocking on
//! the application's channel), `synced`, answers to sends, errors, and the
//! ephemeral frames (presence, typing, read receipts, truncation).

use super::*;

impl Task {
    /// Delivers an event unless it is a duplicate, or the channel is full
    /// (then it, and the rest of this connection's events, stay on the
    /// server until the application has read the channel down).
    pub(super) fn on_event(&mut self, e: Event) {
        if self.overflowed || !self.room_for(2) {
            if !self.overflowed {
                self.overflowed = true;
                self.emit(ClientEvent::Error(ClientError::Overflow {
                    capacity: self.opts.event_capacity,
                }));
            }
            self.tracker.sent_by_server(e.conversation_id, e.seq);
            return;
        }
        let now = std::time::Instant::now();
        match self.tracker.observe(e.conversation_id, e.seq, now) {
            Seen::Duplicate => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Seen::Gap { expected } => {
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                self.emit(ClientEvent::Error(ClientError::Gap {
                    conversation_id: e.conversation_id,
                    expected,
                    got: e.seq,
                }));
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.emit(ClientEvent::Event(e));
            }
            Seen::New => {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.emit(ClientEvent::Event(e));
            }
        }
    }

    /// Handles one read; `Some` ends the session.
    pub(super) async fn on_message(
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
            if let Ok(e) = serde_json::from_str::<Event>(text.as_str()) {
                self.on_event(e);
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
                self.emit(ClientEvent::Hello { user, worker });
                self.emit(ClientEvent::State(ConnState::Open));
            }
            ServerFrame::Event(e) => self.on_event(e),
            ServerFrame::Synced => {
                *synced_at = Some(Instant::now());
                self.emit(ClientEvent::Synced);
                self.emit(ClientEvent::State(ConnState::Synced));
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
                        self.emit(ClientEvent::Error(ClientError::Server { code, message }));
                    }
                }
            }
            ServerFrame::Truncated {
                conversation_id,
                from_seq,
            } => {
                self.tracker.truncated(conversation_id, from_seq);
                self.emit(ClientEvent::Truncated {
                    conversation_id,
                    from_seq,
                });
            }
            ServerFrame::Presence {
                conversation_id,
                user,
                status,
                last_seen,
            } => self.emit(ClientEvent::Presence {
                conversation_id,
                user,
                online: status == "online",
                last_seen,
            }),
            ServerFrame::Typing {
                conversation_id,
                user,
            } => self.emit(ClientEvent::Typing {
                conversation_id,
                user,
            }),
            ServerFrame::Read {
                conversation_id,
                user,
                seq,
            } => self.emit(ClientEvent::Read {
                conversation_id,
                user,
                seq,
            }),
            ServerFrame::Pong | ServerFrame::Unknown => {}
        }
        None
    }
}
