//! Membership writes: creating a conversation, adding and removing
//! members, changing roles. Rare, so one transaction each; every one
//! appends its events to the log under the conversation's row lock, bumps
//! `last_seq`, announces and commits, like a message batch.
//!
//! The rules (docs/PROTOCOL.md, "Roles"):
//! - the creator is `owner`; any member may add members; only the owner
//!   may add an `admin` or change a role;
//! - only the owner or an admin may remove someone else, and nobody may
//!   remove the owner; anyone may leave;
//! - when the owner leaves, the earliest-joined admin (else the
//!   earliest-joined member) becomes owner, written as a `member.role`
//!   event right after the `member.left`.
//!
//! A caller who is not a member gets [`StoreError::NotFound`] for
//! everything (existence does not leak); a member without the right gets
//! [`StoreError::Forbidden`].

use super::notice::{Notice, NoticeKey};
use super::oneshot::OneShot;
use super::{event_from_row, StoreError, EVENT_COLUMNS, NOTIFY_CHANNEL};
use postgres::{Client, Transaction};
use tether_protocol::frames::{
    Event, EVENT_CONVERSATION_CREATED, EVENT_MEMBER_JOINED, EVENT_MEMBER_LEFT, EVENT_MEMBER_ROLE,
};

/// Most members a conversation may be created with in one request.
pub const MAX_INITIAL_MEMBERS: usize = 1000;

/// A member's role in one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }

    /// May remove other members.
    fn moderates(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// Who may read a conversation's history from before they joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum History {
    /// Members see the conversation from their own `member.joined` on.
    #[default]
    SinceJoin,
    /// Members read everything, whenever they joined.
    Shared,
}

impl History {
    pub fn as_str(self) -> &'static str {
        match self {
            History::SinceJoin => "since_join",
            History::Shared => "shared",
        }
    }

    pub fn parse(s: &str) -> Option<History> {
        match s {
            "since_join" => Some(History::SinceJoin),
            "shared" => Some(History::Shared),
            _ => None,
        }
    }
}

/// What a membership write committed: its events (none when nothing
/// changed) and the notice that went out with them.
#[derive(Debug, Clone)]
pub struct MembershipChange {
    pub events: Vec<Event>,
    pub notice: Notice,
}

impl MembershipChange {
    fn none() -> MembershipChange {
        MembershipChange {
            events: Vec::new(),
            notice: Notice::default(),
        }
    }
}

/// Locks the conversation row; returns its `last_seq` and the actor's
/// role, or `NotFound` if the actor is not a member.
fn lock_as_member(
    tx: &mut Transaction<'_>,
    conversation_id: i64,
    actor: &str,
) -> Result<(i64, Role), StoreError> {
    let row = tx
        .oneshot_query_opt(
            "SELECT c.last_seq, (SELECT m.role FROM members m
                 WHERE m.conversation_id = c.id AND m.user_id = $2)
             FROM conversations c WHERE c.id = $1 FOR UPDATE",
            &[&conversation_id, &actor],
        )?
        .ok_or(StoreError::NotFound(conversation_id))?;
    let role: Option<String> = row.get(1);
    let role = role
        .as_deref()
        .and_then(Role::parse)
        .ok_or(StoreError::NotFound(conversation_id))?;
    Ok((row.get(0), role))
}

fn role_of(
    tx: &mut Transaction<'_>,
    conversation_id: i64,
    user: &str,
) -> Result<Option<Role>, StoreError> {
    let row = tx.oneshot_query_opt(
        "SELECT role FROM members WHERE conversation_id = $1 AND user_id = $2",
        &[&conversation_id, &user],
    )?;
    Ok(row.and_then(|r| Role::parse(r.get::<_, &str>(0))))
}

/// Creates a conversation whose members are `creator` (its owner) plus
/// `members`. Appends `conversation.created` as seq 1; every initial
/// member's cursor starts at 0, so each of them receives it.
pub fn create_conversation(
    client: &mut Client,
    key: &NoticeKey,
    creator: &str,
    title: &str,
    members: &[String],
    history: History,
) -> Result<MembershipChange, StoreError> {
    let mut all: Vec<String> = vec![creator.to_string()];
    for m in members {
        if !all.contains(m) {
            all.push(m.clone());
        }
    }
    if all.len() > MAX_INITIAL_MEMBERS {
        return Err(StoreError::Invalid(format!(
            "at most {MAX_INITIAL_MEMBERS} initial members"
        )));
    }
    let mut tx = client.transaction()?;
    let row = tx.oneshot_query_one(
        "INSERT INTO conversations (title, created_by, last_seq, history)
         VALUES ($1, $2, 1, $3) RETURNING id",
        &[&title, &creator, &history.as_str()],
    )?;
    let id: i64 = row.get(0);
    tx.oneshot_execute(
        "INSERT INTO members (conversation_id, user_id, cursor_seq, joined_seq, role)
         SELECT $1, u, 0, 1, CASE WHEN u = $3 THEN 'owner' ELSE 'member' END
         FROM unnest($2::text[]) AS u",
        &[&id, &all, &creator],
    )?;
    let payload = serde_json::json!({"title": title, "members": all}).to_string();
    let row = tx.oneshot_query_one(
        &format!(
            "INSERT INTO events (conversation_id, seq, type, sender, payload)
             VALUES ($1, 1, $2, $3, $4::text::jsonb) RETURNING {EVENT_COLUMNS}"
        ),
        &[&id, &EVENT_CONVERSATION_CREATED, &creator, &payload],
    )?;
    let event = event_from_row(&row);
    let notice = Notice {
        events: vec![(id, 1)],
        membership: all.iter().map(|u| (id, 1, u.clone())).collect(),
        ..Notice::default()
    };
    announce(&mut tx, key, &notice)?;
    tx.commit()?;
    Ok(MembershipChange {
        events: vec![event],
        notice,
    })
}

/// Adds `user` with `role` (`Member`, or `Admin` when the actor is the
/// owner) to a conversation the actor belongs to. Appends
/// `member.joined`; the new member's cursor starts just before it.
/// Adding an existing member changes nothing; a conversation that has
/// `max_members` (0 = unlimited) refuses a new one.
pub fn add_member(
    client: &mut Client,
    key: &NoticeKey,
    actor: &str,
    conversation_id: i64,
    user: &str,
    role: Role,
    max_members: usize,
) -> Result<MembershipChange, StoreError> {
    let mut tx = client.transaction()?;
    let (last, actor_role) = lock_as_member(&mut tx, conversation_id, actor)?;
    match role {
        Role::Owner => return Err(StoreError::Invalid("role must be admin or member".into())),
        Role::Admin if actor_role != Role::Owner => {
            return Err(StoreError::Forbidden(
                "only the owner may make someone an admin".into(),
            ))
        }
        _ => {}
    }
    if role_of(&mut tx, conversation_id, user)?.is_some() {
        tx.rollback()?;
        return Ok(MembershipChange::none());
    }
    if max_members > 0 {
        // Under the conversation's row lock: concurrent adds cannot overshoot.
        let n: i64 = tx
            .oneshot_query_one(
                "SELECT count(*) FROM members WHERE conversation_id = $1",
                &[&conversation_id],
            )?
            .get(0);
        if n as usize >= max_members {
            tx.rollback()?;
            return Err(StoreError::TooManyMembers(max_members));
        }
    }
    let seq = last + 1;
    tx.oneshot_execute(
        "INSERT INTO members (conversation_id, user_id, cursor_seq, joined_seq, role)
         VALUES ($1, $2, $3, $4, $5)",
        &[&conversation_id, &user, &(seq - 1), &seq, &role.as_str()],
    )?;
    let mut events = vec![append_event(
        &mut tx,
        conversation_id,
        seq,
        EVENT_MEMBER_JOINED,
        actor,
        user,
        None,
    )?];
    if role == Role::Admin {
        events.push(role_event(
            &mut tx,
            conversation_id,
            seq + 1,
            actor,
            user,
            role,
        )?);
    }
    finish(tx, key, conversation_id, events, user)
}

/// Sets the role of member `user` (`Admin` or `Member`). Only the owner
/// may; the owner's own role does not change this way. Setting the role a
/// member already has changes nothing.
pub fn set_role(
    client: &mut Client,
    key: &NoticeKey,
    actor: &str,
    conversation_id: i64,
    user: &str,
    role: Role,
) -> Result<MembershipChange, StoreError> {
    let mut tx = client.transaction()?;
    let (last, actor_role) = lock_as_member(&mut tx, conversation_id, actor)?;
    if role == Role::Owner {
        return Err(StoreError::Invalid("role must be admin or member".into()));
    }
    if actor_role != Role::Owner {
        return Err(StoreError::Forbidden(
            "only the owner may change roles".into(),
        ));
    }
    let current =
        role_of(&mut tx, conversation_id, user)?.ok_or_else(|| StoreError::NotMember {
            conversation_id,
            user: user.to_string(),
        })?;
    if current == Role::Owner {
        return Err(StoreError::Forbidden(
            "the owner's role cannot be changed".into(),
        ));
    }
    if current == role {
        tx.rollback()?;
        return Ok(MembershipChange::none());
    }
    tx.oneshot_execute(
        "UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2",
        &[&conversation_id, &user, &role.as_str()],
    )?;
    let event = role_event(&mut tx, conversation_id, last + 1, actor, user, role)?;
    finish(tx, key, conversation_id, vec![event], user)
}

/// Removes `user`: the actor themself (leaving), or, by the owner or an
/// admin, someone else who is not the owner. Appends `member.left` (and,
/// when the owner left, the successor's `member.role`); the removed
/// user's cursor is dropped with them.
pub fn remove_member(
    client: &mut Client,
    key: &NoticeKey,
    actor: &str,
    conversation_id: i64,
    user: &str,
) -> Result<MembershipChange, StoreError> {
    let mut tx = client.transaction()?;
    let (last, actor_role) = lock_as_member(&mut tx, conversation_id, actor)?;
    let target = role_of(&mut tx, conversation_id, user)?.ok_or_else(|| StoreError::NotMember {
        conversation_id,
        user: user.to_string(),
    })?;
    if actor != user {
        if !actor_role.moderates() {
            return Err(StoreError::Forbidden(
                "only the owner or an admin may remove other members".into(),
            ));
        }
        if target == Role::Owner {
            return Err(StoreError::Forbidden("the owner cannot be removed".into()));
        }
    }
    tx.oneshot_execute(
        "DELETE FROM members WHERE conversation_id = $1 AND user_id = $2",
        &[&conversation_id, &user],
    )?;
    let mut seq = last + 1;
    let mut events = vec![append_event(
        &mut tx,
        conversation_id,
        seq,
        EVENT_MEMBER_LEFT,
        actor,
        user,
        None,
    )?];
    if target == Role::Owner {
        let successor = tx.oneshot_query_opt(
            "SELECT user_id FROM members WHERE conversation_id = $1
             ORDER BY (role = 'admin') DESC, joined_seq, joined_at, user_id LIMIT 1",
            &[&conversation_id],
        )?;
        if let Some(row) = successor {
            let next: String = row.get(0);
            tx.oneshot_execute(
                "UPDATE members SET role = 'owner' WHERE conversation_id = $1 AND user_id = $2",
                &[&conversation_id, &next],
            )?;
            seq += 1;
            events.push(role_event(
                &mut tx,
                conversation_id,
                seq,
                actor,
                &next,
                Role::Owner,
            )?);
        }
    }
    finish(tx, key, conversation_id, events, user)
}

/// Inserts one event at `seq` (the caller holds the row lock).
fn append_event(
    tx: &mut Transaction<'_>,
    conversation_id: i64,
    seq: i64,
    kind: &str,
    actor: &str,
    subject: &str,
    payload: Option<String>,
) -> Result<Event, StoreError> {
    let row = tx.oneshot_query_one(
        &format!(
            "INSERT INTO events (conversation_id, seq, type, sender, subject, payload)
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb) RETURNING {EVENT_COLUMNS}"
        ),
        &[&conversation_id, &seq, &kind, &actor, &subject, &payload],
    )?;
    Ok(event_from_row(&row))
}

fn role_event(
    tx: &mut Transaction<'_>,
    conversation_id: i64,
    seq: i64,
    actor: &str,
    user: &str,
    role: Role,
) -> Result<Event, StoreError> {
    let payload = serde_json::json!({ "role": role.as_str() }).to_string();
    append_event(
        tx,
        conversation_id,
        seq,
        EVENT_MEMBER_ROLE,
        actor,
        user,
        Some(payload),
    )
}

/// Bumps `last_seq` to the last of `events`, announces them (naming
/// `user`, so workers not following the conversation learn of a member
/// of theirs) and commits.
fn finish(
    mut tx: Transaction<'_>,
    key: &NoticeKey,
    conversation_id: i64,
    events: Vec<Event>,
    user: &str,
) -> Result<MembershipChange, StoreError> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        tx.rollback()?;
        return Ok(MembershipChange::none());
    };
    let (first, last) = (first.seq, last.seq);
    tx.oneshot_execute(
        "UPDATE conversations SET last_seq = $2 WHERE id = $1",
        &[&conversation_id, &last],
    )?;
    let notice = Notice {
        events: vec![(conversation_id, last)],
        membership: vec![(conversation_id, first, user.to_string())],
        ..Notice::default()
    };
    announce(&mut tx, key, &notice)?;
    tx.commit()?;
    Ok(MembershipChange { events, notice })
}

/// Sends `notice` with the transaction (delivered at COMMIT).
fn announce(tx: &mut Transaction<'_>, key: &NoticeKey, notice: &Notice) -> Result<(), StoreError> {
    for payload in notice.encode(key) {
        tx.oneshot_execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &payload])?;
    }
    Ok(())
}
