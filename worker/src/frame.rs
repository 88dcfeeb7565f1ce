//! One committed event as the worker delivers it: serialized once, shared
//! by every recipient (`Arc<Frame>`), with what it changes about who
//! receives the conversation.

use std::time::Instant;
use tether_protocol::frames::{
    Event, EVENT_CONVERSATION_CREATED, EVENT_MEMBER_JOINED, EVENT_MEMBER_LEFT,
};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// What an event changes for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    None,
    /// This user is a member from this event on.
    Joined(String),
    /// This user receives this event and nothing after it (until a later
    /// `Joined`).
    Left(String),
    /// These users are the first members, from this event on.
    Created(Vec<String>),
}

impl MembershipChange {
    /// Whether this event makes `user` a member.
    pub fn joins(&self, user: &str) -> bool {
        match self {
            MembershipChange::Joined(u) => u == user,
            MembershipChange::Created(members) => members.iter().any(|u| u == user),
            _ => false,
        }
    }

    /// Whether this event ends `user`'s membership.
    pub fn leaves(&self, user: &str) -> bool {
        matches!(self, MembershipChange::Left(u) if u == user)
    }
}

/// One event, serialized once, shared by every recipient.
#[derive(Debug)]
pub struct Frame {
    pub conversation_id: i64,
    pub seq: i64,
    /// The `{"type":"event",...}` text frame.
    pub text: Utf8Bytes,
    pub membership: MembershipChange,
    /// When it was committed (or read), for the delivery latency metric.
    pub committed_at: Instant,
}

impl Frame {
    pub fn from_event(e: &Event, committed_at: Instant) -> Frame {
        let membership = match e.kind.as_str() {
            EVENT_MEMBER_JOINED => MembershipChange::Joined(e.user.clone().unwrap_or_default()),
            EVENT_MEMBER_LEFT => MembershipChange::Left(e.user.clone().unwrap_or_default()),
            EVENT_CONVERSATION_CREATED => {
                MembershipChange::Created(e.members.clone().unwrap_or_default())
            }
            _ => MembershipChange::None,
        };
        Frame {
            conversation_id: e.conversation_id,
            seq: e.seq,
            text: Utf8Bytes::from(e.to_frame()),
            membership,
            committed_at,
        }
    }

    /// A frame for tests of the pure cores.
    #[cfg(test)]
    pub fn test(conversation_id: i64, seq: i64, membership: MembershipChange) -> Frame {
        Frame {
            conversation_id,
            seq,
            text: Utf8Bytes::from(format!("{conversation_id}:{seq}")),
            membership,
            committed_at: Instant::now(),
        }
    }
}
