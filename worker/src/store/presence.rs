//! Presence in the database: leases and transitions.
//!
//! A worker holds a lease per user with at least one connection on it
//! ([`lease`]), renews them every few seconds, and gives one up when the
//! user's last connection there closes ([`release`]). A user's state in
//! `presence` changes only in transitions, each made by one UPDATE whose
//! WHERE says "not yet" (`NOT online`, `online`), so concurrent workers
//! and hosts make each transition exactly once:
//!
//! - online: the first lease of a user who was offline ([`lease`]);
//! - offline: no live lease and `last_seen` older than the grace period
//!   ([`sweep`]). `last_seen` moves with every renewal and release, so a
//!   user whose connection moves to another worker (or host) within the
//!   grace period never goes offline; a user whose worker was killed goes
//!   offline at most max(grace, lease) after its last renewal.
//!
//! The caller announces what the transitions return.

use super::oneshot::OneShot;
use super::StoreError;
use postgres::Client;
use std::time::Duration;

/// A user's state, as a transition or a read returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user: String,
    pub online: bool,
    /// RFC 3339 UTC.
    pub last_seen: String,
}

const LAST_SEEN_SQL: &str =
    r#"to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

fn presence_rows(rows: &[postgres::Row]) -> Vec<Presence> {
    rows.iter()
        .map(|r| Presence {
            user: r.get(0),
            online: r.get(1),
            last_seen: r.get(2),
        })
        .collect()
}

/// Takes or renews `holder`'s leases of `users` for `lease`, moves their
/// `last_seen` to now, and returns the users this made online.
pub fn lease(
    client: &mut Client,
    holder: &str,
    users: &[String],
    lease: Duration,
) -> Result<Vec<Presence>, StoreError> {
    if users.is_empty() {
        return Ok(vec![]);
    }
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let secs = lease.as_secs_f64();
    let mut tx = client.transaction()?;
    tx.oneshot_execute(
        "INSERT INTO presence_leases (user_id, holder, expires_at)
         SELECT u, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) u
         ON CONFLICT (user_id, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        &[&users, &holder, &secs],
    )?;
    // Transitions first (the WHERE is re-checked on a row another worker
    // changed meanwhile: one of them wins), then the renewal.
    let mut online = presence_rows(&tx.oneshot_query(
        &format!(
            "UPDATE presence SET online = true, last_seen = now()
             WHERE user_id = ANY($1::text[]) AND NOT online
             RETURNING user_id, online, {LAST_SEEN_SQL}"
        ),
        &[&users],
    )?);
    online.extend(presence_rows(&tx.oneshot_query(
        &format!(
            "INSERT INTO presence (user_id, online, last_seen)
             SELECT u, true, now() FROM unnest($1::text[]) u
             ON CONFLICT (user_id) DO NOTHING
             RETURNING user_id, online, {LAST_SEEN_SQL}"
        ),
        &[&users],
    )?));
    tx.oneshot_execute(
        "UPDATE presence SET last_seen = now() WHERE user_id = ANY($1::text[]) AND online",
        &[&users],
    )?;
    tx.commit()?;
    Ok(online)
}

/// `holder` no longer holds `users` (their last connection on it closed):
/// drops the leases and moves `last_seen` to now, from which the grace
/// period runs.
pub fn release(client: &mut Client, holder: &str, users: &[String]) -> Result<(), StoreError> {
    if users.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut tx = client.transaction()?;
    tx.oneshot_execute(
        "DELETE FROM presence_leases WHERE holder = $1 AND user_id = ANY($2::text[])",
        &[&holder, &users],
    )?;
    tx.oneshot_execute(
        "UPDATE presence SET last_seen = now() WHERE user_id = ANY($1::text[]) AND online",
        &[&users],
    )?;
    tx.commit()?;
    Ok(())
}

/// The offline transitions due: online users with no live lease, last
/// seen more than `grace` ago.
pub fn sweep(client: &mut Client, grace: Duration) -> Result<Vec<Presence>, StoreError> {
    let secs = grace.as_secs_f64();
    let gone = presence_rows(&client.oneshot_query(
        &format!(
            "UPDATE presence p SET online = false
             WHERE online AND last_seen < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM presence_leases l
                               WHERE l.user_id = p.user_id AND l.expires_at > now())
             RETURNING user_id, online, {LAST_SEEN_SQL}"
        ),
        &[&secs],
    )?);
    Ok(gone)
}

/// Forgets leases expired long ago (their workers died): a scan of the
/// lease table, so run now and then, not at every sweep.
pub fn forget_expired(client: &mut Client) -> Result<u64, StoreError> {
    Ok(client.oneshot_execute(
        "DELETE FROM presence_leases WHERE expires_at < now() - interval '10 minutes'",
        &[],
    )?)
}

/// The conversations of `user` with at most `max_members` members: where
/// their presence is pushed.
pub fn pushed_conversations(
    client: &mut Client,
    user: &str,
    max_members: i64,
) -> Result<Vec<i64>, StoreError> {
    Ok(client
        .oneshot_query(
            "SELECT m.conversation_id FROM members m
             WHERE m.user_id = $1
               AND (SELECT count(*) FROM (SELECT 1 FROM members x
                                           WHERE x.conversation_id = m.conversation_id
                                           LIMIT $2 + 1) n) <= $2",
            &[&user, &max_members],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The state of the other members of `user`'s conversations with at most
/// `max_members` members, at most `limit` rows: the burst after `synced`.
/// (conversation, that member's presence).
pub fn burst(
    client: &mut Client,
    user: &str,
    max_members: i64,
    limit: i64,
) -> Result<Vec<(i64, Presence)>, StoreError> {
    Ok(client
        .oneshot_query(
            &format!(
                "SELECT m.conversation_id, m.user_id, coalesce(p.online, false),
                        coalesce({LAST_SEEN_SQL}, '')
                 FROM members me
                 JOIN members m ON m.conversation_id = me.conversation_id
                                AND m.user_id <> me.user_id
                 LEFT JOIN presence p ON p.user_id = m.user_id
                 WHERE me.user_id = $1
                   AND (SELECT count(*) FROM (SELECT 1 FROM members x
                                               WHERE x.conversation_id = me.conversation_id
                                               LIMIT $2 + 1) n) <= $2
                 ORDER BY m.conversation_id, m.user_id LIMIT $3"
            ),
            &[&user, &max_members, &limit],
        )?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Presence {
                    user: r.get(1),
                    online: r.get(2),
                    last_seen: r.get(3),
                },
            )
        })
        .collect())
}

/// One member as `GET /v1/conversations/{id}/presence` shows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemberPresence {
    pub user: String,
    /// `online` or `offline`.
    pub status: &'static str,
    /// RFC 3339, or null for a user never seen.
    pub last_seen: Option<String>,
    pub read_seq: i64,
}

/// Every member of a conversation `user` belongs to, with presence and
/// read position (`NotFound` for a non-member), by user id.
pub fn of_conversation(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
) -> Result<Vec<MemberPresence>, StoreError> {
    let rows = client.oneshot_query(
        &format!(
            "SELECT m.user_id, coalesce(p.online, false), {LAST_SEEN_SQL},
                    GREATEST(m.cursor_seq, m.joined_seq - 1)
             FROM members m LEFT JOIN presence p ON p.user_id = m.user_id
             WHERE m.conversation_id = $1
               AND EXISTS (SELECT 1 FROM members me
                           WHERE me.conversation_id = $1 AND me.user_id = $2)
             ORDER BY m.user_id"
        ),
        &[&conversation_id, &user],
    )?;
    if rows.is_empty() {
        return Err(StoreError::NotFound(conversation_id));
    }
    Ok(rows
        .iter()
        .map(|r| MemberPresence {
            user: r.get(0),
            status: if r.get::<_, bool>(1) {
                "online"
            } else {
                "offline"
            },
            last_seen: r.get(2),
            read_seq: r.get(3),
        })
        .collect())
}

/// Member counts of `conversations`, each counted only up to `max + 1`
/// (enough to tell "more than max").
pub fn member_counts(
    client: &mut Client,
    conversations: &[i64],
    max: i64,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let cs = conversations.to_vec();
    Ok(client
        .oneshot_query(
            "SELECT c, (SELECT count(*) FROM (SELECT 1 FROM members x
                                              WHERE x.conversation_id = c LIMIT $2 + 1) n)
             FROM unnest($1::bigint[]) c",
            &[&cs, &max],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
