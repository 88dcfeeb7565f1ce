//! The wire types of the contract: events, WebSocket frames (client frames
//! parsed by the worker, server frames built by it and parsed by clients),
//! error bodies.
//!
//! Server frames are built as JSON text once and shared (an event fanned
//! out to a thousand sockets is serialized once). Client frames are parsed
//! strictly: unknown fields are ignored, but wrong types, unknown `type`s
//! and out-of-range numbers are errors that name what was wrong.

use serde::{Deserialize, Serialize};

/// Event types of the log.
pub const EVENT_CONVERSATION_CREATED: &str = "conversation.created";
pub const EVENT_MEMBER_JOINED: &str = "member.joined";
pub const EVENT_MEMBER_LEFT: &str = "member.left";
pub const EVENT_MESSAGE_CREATED: &str = "message.created";
pub const EVENT_MEMBER_ROLE: &str = "member.role";

/// Longest `client_msg_id` accepted (bytes).
pub const MAX_CLIENT_MSG_ID: usize = 128;

/// One committed event of a conversation's log.
///
/// In JSON the event type is under `"event"` (the WebSocket frame's own
/// `"type"` is `"event"`, so the two cannot share a key); see
/// docs/PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub conversation_id: i64,
    pub seq: i64,
    #[serde(rename = "event")]
    pub kind: String,
    pub sender: String,
    /// RFC 3339, UTC, microseconds.
    pub created_at: String,
    /// message.created: the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// message.created: the sender's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    /// member.joined / member.left / member.role: the user who joined,
    /// left, or whose role changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// member.role: the user's new role (`owner`, `admin`, `member`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// conversation.created: the title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// conversation.created: the initial members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
}

impl Event {
    /// The event as a WebSocket frame: `{"type":"event",...fields...}`.
    pub fn to_frame(&self) -> String {
        // The event's own JSON with `"type":"event",` spliced in after the
        // opening brace: one serialization, no intermediate Value.
        let json = self.to_json();
        let mut frame = String::with_capacity(json.len() + 16);
        frame.push_str("{\"type\":\"event\",");
        frame.push_str(&json[1..]);
        frame
    }

    /// The event as HTTP JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }
}

/// A frame from a client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        conversation_id: i64,
        body: String,
        client_msg_id: String,
    },
    Ack {
        conversation_id: i64,
        seq: i64,
    },
    /// The user is typing in a conversation (forwarded to the other
    /// members; ephemeral).
    Typing {
        conversation_id: i64,
    },
    Ping,
}

/// Every field a client frame may have, flat, borrowed where the JSON
/// string has no escapes: a non-buffering parse for the fast path (serde's
/// internally tagged enums buffer the whole object first).
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    conversation_id: Option<i64>,
    seq: Option<i64>,
    #[serde(borrow)]
    body: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    client_msg_id: Option<std::borrow::Cow<'a, str>>,
}

impl RawFrame<'_> {
    /// The frame, if the type is known and its fields are present (extra
    /// fields are ignored, as in the slow path).
    fn into_frame(self) -> Option<ClientFrame> {
        match &*self.kind {
            "send" => Some(ClientFrame::Send {
                conversation_id: self.conversation_id?,
                body: self.body?.into_owned(),
                client_msg_id: self.client_msg_id?.into_owned(),
            }),
            "ack" => Some(ClientFrame::Ack {
                conversation_id: self.conversation_id?,
                seq: self.seq?,
            }),
            "typing" => Some(ClientFrame::Typing {
                conversation_id: self.conversation_id?,
            }),
            "ping" => Some(ClientFrame::Ping),
            _ => None,
        }
    }
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// Contract error code (`bad_frame`, `invalid_field`, ...).
    pub code: &'static str,
    pub message: String,
    /// The frame's `client_msg_id` when one could be read, so a client can
    /// match the error to its send.
    pub client_msg_id: Option<String>,
}

impl ClientFrame {
    /// Parses and validates one text frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        // Fast path: a well-formed frame deserializes straight into its
        // type. Only a refused frame pays for a second, generic parse that
        // finds out what to say about it.
        if let Ok(raw) = serde_json::from_str::<RawFrame<'_>>(text) {
            if let Some(frame) = raw.into_frame() {
                if frame.validate().is_ok() {
                    return Ok(frame);
                }
            }
        }
        Self::parse_slow(text)
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            ClientFrame::Send {
                conversation_id,
                client_msg_id,
                ..
            } => {
                if *conversation_id <= 0 {
                    return Err("conversation_id must be positive".into());
                }
                validate_client_msg_id(client_msg_id).map_err(str::to_owned)
            }
            ClientFrame::Ack {
                conversation_id,
                seq,
            } => {
                if *conversation_id <= 0 {
                    return Err("conversation_id must be positive".into());
                }
                if *seq < 0 {
                    return Err("seq must not be negative".into());
                }
                Ok(())
            }
            ClientFrame::Typing { conversation_id } => {
                if *conversation_id <= 0 {
                    return Err("conversation_id must be positive".into());
                }
                Ok(())
            }
            ClientFrame::Ping => Ok(()),
        }
    }

    fn parse_slow(text: &str) -> Result<ClientFrame, FrameError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
            code: "bad_frame",
            message: format!("malformed JSON: {e}"),
            client_msg_id: None,
        })?;
        let client_msg_id = value
            .get("client_msg_id")
            .and_then(|v| v.as_str())
            .filter(|s| s.len() <= MAX_CLIENT_MSG_ID)
            .map(str::to_owned);
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .map(str::to_owned);
        let frame: ClientFrame = serde_json::from_value(value).map_err(|e| FrameError {
            code: if matches!(kind.as_deref(), Some("send" | "ack" | "typing" | "ping")) {
                "invalid_field"
            } else {
                "unknown_type"
            },
            message: e.to_string(),
            client_msg_id: client_msg_id.clone(),
        })?;
        frame.validate().map_err(|message| FrameError {
            code: "invalid_field",
            message,
            client_msg_id: client_msg_id.clone(),
        })?;
        Ok(frame)
    }
}

/// Checks a `client_msg_id`: 1 to 128 bytes, no control characters.
pub fn validate_client_msg_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID {
        return Err("client_msg_id must be 1 to 128 bytes");
    }
    if id.chars().any(char::is_control) {
        return Err("client_msg_id must not contain control characters");
    }
    Ok(())
}

/// A frame from the server, as a client reads it (the builders in
/// [`server`] write them). Unknown `type`s parse as
/// [`ServerFrame::Unknown`]: newer servers may add frames.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Hello {
        #[serde(default)]
        user: String,
        #[serde(default)]
        worker: String,
    },
    Event(Event),
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
        /// Seconds.
        #[serde(default)]
        retry_after: Option<f64>,
    },
    Pong,
    /// A member's presence (ephemeral, no seq).
    Presence {
        conversation_id: i64,
        user: String,
        /// `online` or `offline`.
        status: String,
        /// RFC 3339.
        #[serde(default)]
        last_seen: Option<String>,
    },
    /// A member is typing (show it for 5 s unless renewed).
    Typing {
        conversation_id: i64,
        user: String,
    },
    /// A member's cursor moved: they have read up to `seq`.
    Read {
        conversation_id: i64,
        user: String,
        seq: i64,
    },
    /// The conversation's history below `from_seq` was pruned (retention)
    /// while the connection's position was below it: events continue,
    /// gap-free, from `from_seq`.
    Truncated {
        conversation_id: i64,
        from_seq: i64,
    },
    #[serde(other)]
    Unknown,
}

/// Builders for the server's frames.
pub mod server {
    use serde_json::json;

    pub fn hello(user: &str, worker: &str) -> String {
        json!({"type": "hello", "user": user, "worker": worker}).to_string()
    }

    pub fn synced() -> String {
        r#"{"type":"synced"}"#.to_string()
    }

    pub fn pong() -> String {
        r#"{"type":"pong"}"#.to_string()
    }

    /// `user` is online or offline (`last_seen`, RFC 3339) in a
    /// conversation the reader shares with them.
    pub fn presence(conversation_id: i64, user: &str, online: bool, last_seen: &str) -> String {
        json!({
            "type": "presence",
            "conversation_id": conversation_id,
            "user": user,
            "status": if online { "online" } else { "offline" },
            "last_seen": if last_seen.is_empty() { serde_json::Value::Null } else { last_seen.into() },
        })
        .to_string()
    }

    /// `user` is typing in the conversation.
    pub fn typing(conversation_id: i64, user: &str) -> String {
        json!({"type": "typing", "conversation_id": conversation_id, "user": user}).to_string()
    }

    /// `user` has read the conversation up to `seq`.
    pub fn read(conversation_id: i64, user: &str, seq: i64) -> String {
        json!({"type": "read", "conversation_id": conversation_id, "user": user, "seq": seq})
            .to_string()
    }

    /// History below `from_seq` is gone (retention): what follows in this
    /// conversation starts there.
    pub fn truncated(conversation_id: i64, from_seq: i64) -> String {
        json!({"type": "truncated", "conversation_id": conversation_id, "from_seq": from_seq})
            .to_string()
    }

    pub fn sent(client_msg_id: &str, conversation_id: i64, seq: i64, duplicate: bool) -> String {
        // The hot reply of the write path: formatted directly, with the one
        // free-form field escaped by serde_json.
        let id = serde_json::to_string(client_msg_id).expect("strings serialize");
        format!(
            r#"{{"type":"sent","client_msg_id":{id},"conversation_id":{conversation_id},"seq":{seq},"duplicate":{duplicate}}}"#
        )
    }

    /// An `error` frame; `retry_after` (seconds) only where retrying helps.
    pub fn error(
        code: &str,
        message: &str,
        client_msg_id: Option<&str>,
        retry_after: Option<u64>,
    ) -> String {
        let mut v = json!({"type": "error", "code": code, "message": message});
        if let Some(id) = client_msg_id {
            v["client_msg_id"] = id.into();
        }
        if let Some(s) = retry_after {
            v["retry_after"] = s.into();
        }
        v.to_string()
    }
}

/// The JSON body of an HTTP error: `{"error":code,"message":...}`.
pub fn http_error_body(code: &str, message: &str, retry_after: Option<u64>) -> String {
    let mut v = serde_json::json!({"error": code, "message": message});
    if let Some(s) = retry_after {
        v["retry_after"] = s.into();
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_frames_and_names_bad_ones() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ack","conversation_id":3,"seq":9}"#).unwrap(),
            ClientFrame::Ack {
                conversation_id: 3,
                seq: 9
            }
        );
        let send = r#"{"type":"send","conversation_id":1,"body":"hi","client_msg_id":"m1"}"#;
        assert!(matches!(
            ClientFrame::parse(send).unwrap(),
            ClientFrame::Send { .. }
        ));
        assert_eq!(ClientFrame::parse("{").unwrap_err().code, "bad_frame");
        assert_eq!(
            ClientFrame::parse(r#"{"type":"nope"}"#).unwrap_err().code,
            "unknown_type"
        );
        assert_eq!(
            ClientFrame::parse(r#"[1,2]"#).unwrap_err().code,
            "unknown_type"
        );
        let wrong = r#"{"type":"send","conversation_id":"1","body":"hi","client_msg_id":"m1"}"#;
        let e = ClientFrame::parse(wrong).unwrap_err();
        assert_eq!(
            (e.code, e.client_msg_id.as_deref()),
            ("invalid_field", Some("m1"))
        );
        let big = r#"{"type":"ack","conversation_id":1,"seq":99999999999999999999}"#;
        assert_eq!(ClientFrame::parse(big).unwrap_err().code, "invalid_field");
        let neg = r#"{"type":"ack","conversation_id":1,"seq":-1}"#;
        assert_eq!(ClientFrame::parse(neg).unwrap_err().code, "invalid_field");
        let empty_id = r#"{"type":"send","conversation_id":1,"body":"hi","client_msg_id":""}"#;
        assert_eq!(
            ClientFrame::parse(empty_id).unwrap_err().code,
            "invalid_field"
        );
    }

    #[test]
    fn server_frames_parse_as_the_builders_write_them() {
        let e = Event {
            conversation_id: 3,
            seq: 7,
            kind: EVENT_MESSAGE_CREATED.into(),
            sender: "a".into(),
            created_at: "t".into(),
            body: Some("hi".into()),
            client_msg_id: Some("m".into()),
            user: None,
            role: None,
            title: None,
            members: None,
        };
        let f: ServerFrame = serde_json::from_str(&e.to_frame()).unwrap();
        assert_eq!(f, ServerFrame::Event(e));
        let f: ServerFrame = serde_json::from_str(&server::sent("m", 3, 7, true)).unwrap();
        assert!(matches!(
            f,
            ServerFrame::Sent {
                seq: 7,
                duplicate: true,
                ..
            }
        ));
        let f: ServerFrame =
            serde_json::from_str(&server::error("rate_limited", "m", Some("x"), Some(2))).unwrap();
        assert!(
            matches!(f, ServerFrame::Error { retry_after: Some(r), client_msg_id: Some(_), .. } if (r - 2.0).abs() < 1e-9)
        );
        let f: ServerFrame = serde_json::from_str(&server::hello("u", "w1")).unwrap();
        assert_eq!(
            f,
            ServerFrame::Hello {
                user: "u".into(),
                worker: "w1".into()
            }
        );
        for (text, want) in [
            (server::synced(), ServerFrame::Synced),
            (server::pong(), ServerFrame::Pong),
        ] {
            assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), want);
        }
        let f: ServerFrame = serde_json::from_str(r#"{"type":"whatever","x":1}"#).unwrap();
        assert_eq!(f, ServerFrame::Unknown);
    }

    #[test]
    fn event_frame_has_both_type_and_event() {
        let e = Event {
            conversation_id: 1,
            seq: 2,
            kind: EVENT_MESSAGE_CREATED.into(),
            sender: "a".into(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            body: Some("hi".into()),
            client_msg_id: Some("m".into()),
            user: None,
            role: None,
            title: None,
            members: None,
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_frame()).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["event"], "message.created");
        assert_eq!(v["seq"], 2);
        let back: Event = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(back, e);
    }
}
