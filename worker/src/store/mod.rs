//! The PostgreSQL event log: the write path (DB-first, group commit) and
//! every read the worker makes.
//!
//! All functions here are blocking (the `postgres` crate runs its own
//! runtime): the worker calls them from dedicated threads or from
//! `spawn_blocking`, never from an async task.
//!
//! Ordering rule: every writer of a conversation first locks its
//! `conversations` row (`FOR UPDATE`), then assigns `seq = last_seq + 1 ...`,
//! inserts, bumps `last_seq` and commits. So seqs are gap-free and commit in
//! seq order, across any number of processes and hosts. Writers lock rows
//! in ascending id order, so two batches never deadlock.
//!
//! Every committing transaction announces itself with one `pg_notify` on
//! [`NOTIFY_CHANNEL`] (sent at COMMIT, so nothing is announced before it is
//! durable); the payload is authenticated (see [`notice`]), and the table
//! stays the source of truth.
//!
//! Submodules: [`notice`], the notification codec; [`membership`], the
//! membership writes and their rules (roles). Message appends, cursors and
//! reads are here.

pub mod membership;
pub mod notice;

/// The whole schema, applied at every start (idempotent).
pub const SCHEMA_SQL: &str = include_str!("../../../schema.sql");

pub use membership::{
    add_member, create_conversation, remove_member, set_role, History, MembershipChange, Role,
    MAX_INITIAL_MEMBERS,
};
pub use notice::{Notice, NoticeKey};
use tether_protocol::error_code::ErrorCode;

use postgres::error::SqlState;
use postgres::{Client, NoTls, Row};
use r2d2_postgres::PostgresConnectionManager;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;
use tether_protocol::frames::{
    Event, EVENT_CONVERSATION_CREATED, EVENT_MEMBER_ROLE, EVENT_MESSAGE_CREATED,
};

/// The LISTEN/NOTIFY channel every committing transaction notifies.
pub const NOTIFY_CHANNEL: &str = "tether_events";

/// The transaction's time as RFC 3339 UTC with microseconds, as
/// `created_at` is formatted in [`EVENT_COLUMNS`].
const NOW_SQL: &str = r#"to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

/// Why a store operation failed. Callers branch on it: `Unavailable` is a
/// 503 with `Retry-After`, `NotFound` a 404, `Invalid` a 422.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached, refused us, or timed out. Nothing
    /// was committed by the failing call.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The conversation does not exist or the caller is not a member (the
    /// two are not told apart, so existence does not leak).
    #[error("conversation {0} not found")]
    NotFound(i64),
    /// The named user is not a member of the conversation.
    #[error("user {user} is not a member of conversation {conversation_id}")]
    NotMember { conversation_id: i64, user: String },
    /// The caller is a member but lacks the right (roles).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A field is out of range.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Anything else the database said; a bug or a broken schema.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether this is the database being unreachable (retry later).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        classify(&e)
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(e: r2d2::Error) -> StoreError {
        StoreError::Unavailable(format!("no database connection: {e}"))
    }
}

/// What a client is told about a failed store operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    pub code: ErrorCode,
    /// Safe to show: internal details stay in the log.
    pub message: String,
    /// Seconds after which a retry may succeed.
    pub retry_after: Option<u64>,
}

impl From<&StoreError> for StoreFailure {
    fn from(e: &StoreError) -> StoreFailure {
        let (code, message, retry_after) = match e {
            StoreError::Unavailable(_) => (
                ErrorCode::DatabaseUnavailable,
                "the database is unavailable; nothing was written, retry later (with the same client_msg_id)".to_string(),
                Some(1),
            ),
            StoreError::NotFound(_) | StoreError::NotMember { .. } => {
                (ErrorCode::NotFound, e.to_string(), None)
            }
            StoreError::Forbidden(m) => (ErrorCode::Forbidden, m.clone(), None),
            StoreError::Invalid(m) => (ErrorCode::InvalidField, m.clone(), None),
            StoreError::Internal(_) => (ErrorCode::Internal, "internal error".to_string(), None),
        };
        StoreFailure {
            code,
            message,
            retry_after,
        }
    }
}

/// Sorts a database error into unavailable (connection-level, shutdown,
/// timeouts) or internal.
fn classify(e: &postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable(format!("connection closed: {e}"));
    }
    match e.code() {
        None => StoreError::Unavailable(e.to_string()),
        Some(code) => {
            let c = code.code();
            if c.starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
            {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Internal(e.to_string())
            }
        }
    }
}

/// Connection settings shared by pools and dedicated connections: fail
/// fast rather than hang when the database goes away.
#[derive(Debug, Clone)]
pub struct DbSettings {
    pub url: String,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    /// `application_name`, so operators (and tests) can tell the
    /// connections apart in `pg_stat_activity`.
    pub application_name: String,
}

impl DbSettings {
    pub fn new(url: &str) -> DbSettings {
        DbSettings {
            url: url.to_string(),
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            application_name: "tether".to_string(),
        }
    }

    /// The same settings under another `application_name`.
    pub fn named(&self, name: &str) -> DbSettings {
        DbSettings {
            application_name: name.to_string(),
            ..self.clone()
        }
    }

    /// The `postgres` configuration with timeouts and keepalives set.
    pub fn config(&self) -> Result<postgres::Config, StoreError> {
        let mut cfg = postgres::Config::from_str(&self.url)
            .map_err(|e| StoreError::Invalid(format!("bad database url: {e}")))?;
        cfg.connect_timeout(self.connect_timeout);
        cfg.keepalives(true);
        cfg.keepalives_idle(Duration::from_secs(10));
        cfg.options(&format!(
            "-c statement_timeout={}",
            self.statement_timeout.as_millis()
        ));
        cfg.application_name(&self.application_name);
        Ok(cfg)
    }

    /// One dedicated connection (committer lanes, the listener).
    pub fn connect(&self) -> Result<Client, StoreError> {
        Ok(self.config()?.connect(NoTls)?)
    }
}

pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;
/// A connection checked out of a [`Pool`].
pub type PooledClient = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// A connection pool that does not block start-up when the database is
/// down (it connects lazily) and gives up on a checkout after
/// `checkout_timeout`.
pub fn pool(
    settings: &DbSettings,
    size: u32,
    checkout_timeout: Duration,
) -> Result<Pool, StoreError> {
    let manager = PostgresConnectionManager::new(settings.config()?, NoTls);
    Ok(r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(checkout_timeout)
        // No round trip on every checkout: the worker retries a read that
        // failed on a connection that died with the database, and checks
        // the connection before a write (tether_worker::App::db, db_write).
        .test_on_check_out(false)
        .error_handler(Box::new(QuietErrors))
        .build_unchecked(manager))
}

/// r2d2 logs every failed background connect at error level; while the
/// database is down that is a line per attempt. We log our own, once.
#[derive(Debug)]
struct QuietErrors;
impl r2d2::HandleError<postgres::Error> for QuietErrors {
    fn handle_error(&self, error: postgres::Error) {
        log::debug!("pool: connect failed: {error}");
    }
}

/// Applies `schema.sql` (idempotent).
pub fn apply_schema(client: &mut Client) -> Result<(), StoreError> {
    // Two starting processes may race on CREATE ... IF NOT EXISTS (a known
    // PostgreSQL behaviour: both pass the check, one fails on the catalog's
    // unique index). An advisory lock serializes them.
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7412093)", &[])?;
    // "already exists, skipping" notices are expected on every start.
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    tx.batch_execute(SCHEMA_SQL)?;
    tx.commit()?;
    Ok(())
}

pub(crate) fn event_from_row(row: &Row) -> Event {
    event_from_row_at(row, 0)
}

/// An event from [`EVENT_COLUMNS`] starting at column `at`.
fn event_from_row_at(row: &Row, at: usize) -> Event {
    let kind: String = row.get(at + 2);
    let payload: Option<String> = row.get(at + 8);
    let (title, members, role) = match (kind.as_str(), payload) {
        (EVENT_CONVERSATION_CREATED, Some(p)) => {
            let v: serde_json::Value = serde_json::from_str(&p).unwrap_or_default();
            let title = v.get("title").and_then(|t| t.as_str()).map(str::to_owned);
            let members = v.get("members").and_then(|m| m.as_array()).map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_owned))
                    .collect()
            });
            (title, members, None)
        }
        (EVENT_MEMBER_ROLE, Some(p)) => {
            let v: serde_json::Value = serde_json::from_str(&p).unwrap_or_default();
            let role = v.get("role").and_then(|r| r.as_str()).map(str::to_owned);
            (None, None, role)
        }
        _ => (None, None, None),
    };
    Event {
        conversation_id: row.get(at),
        seq: row.get(at + 1),
        kind,
        sender: row.get(at + 3),
        created_at: row.get(at + 4),
        body: row.get(at + 5),
        client_msg_id: row.get(at + 6),
        user: row.get(at + 7),
        role,
        title,
        members,
    }
}

/// [`EVENT_COLUMNS`] of an `events e` alias (all NULL when it did not join).
const EVENT_COLUMNS_E: &str = r#"e.conversation_id, e.seq, e.type, e.sender,
    to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    e.body, e.client_msg_id, e.subject, e.payload::text"#;

pub(crate) const EVENT_COLUMNS: &str = r#"conversation_id, seq, type, sender,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    body, client_msg_id, subject, payload::text"#;

// ---------------------------------------------------------------------------
// Message writes: group commit
// ---------------------------------------------------------------------------

/// One message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conversation_id: i64,
    pub sender: String,
    pub body: String,
    pub client_msg_id: String,
}

/// The result of one message of a batch.
#[derive(Debug, Clone)]
pub struct Appended {
    pub event: Event,
    /// True when the same (conversation, sender, client_msg_id) was already
    /// committed (now or earlier in the batch): nothing new was written.
    pub duplicate: bool,
}

/// What a committed batch produced: one result per input, in order, and
/// the notice sent with the batch.
#[derive(Debug)]
pub struct BatchOutcome {
    pub results: Vec<Result<Appended, StoreError>>,
    pub notice: Notice,
    /// The events this batch appended (not duplicates), in (conversation, seq) order.
    pub new_events: Vec<Event>,
}

/// The statements of the write path, prepared once per connection (the
/// commit lanes keep one connection each), so a batch pays no parsing or
/// planning: three statements and BEGIN/COMMIT per committed batch.
pub struct AppendStatements {
    key: NoticeKey,
    lock: postgres::Statement,
    resolve: postgres::Statement,
    write: postgres::Statement,
}

impl AppendStatements {
    pub fn prepare(client: &mut Client, key: &NoticeKey) -> Result<AppendStatements, StoreError> {
        Ok(AppendStatements {
            key: key.clone(),
            // 1. Lock the touched conversations (ascending id: no deadlock
            //    between batches), read their last seq and the commit time.
            lock: client.prepare(&format!(
                "SELECT id, last_seq, {NOW_SQL} FROM conversations
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            ))?,
            // 2. After the lock (a fresh snapshot: READ COMMITTED takes one
            //    per statement), per (conversation, sender, client_msg_id):
            //    is the sender a member, and was this key committed before?
            //    Written as per-key lookups (LATERAL ... LIMIT 1) so that
            //    the plan is an index probe per key whatever the table
            //    statistics said when the statement was prepared: a hash
            //    join over a then-empty events table would scan the whole
            //    log on every batch once it has grown.
            resolve: client.prepare(&format!(
                "SELECT k.c, k.s,
                        EXISTS (SELECT 1 FROM members mm
                                WHERE mm.conversation_id = k.c AND mm.user_id = k.s),
                        e.seq IS NOT NULL, {EVENT_COLUMNS_E}
                 FROM (SELECT DISTINCT * FROM unnest($1::bigint[], $2::text[], $3::text[])) AS k(c, s, m)
                 LEFT JOIN LATERAL (
                     SELECT * FROM events ev
                     WHERE ev.conversation_id = k.c AND ev.sender = k.s
                       AND ev.client_msg_id = k.m AND ev.client_msg_id IS NOT NULL
                     LIMIT 1
                 ) AS e ON true"
            ))?,
            // 3. Insert the events, bump last_seq, announce: one statement.
            write: client.prepare(
                "WITH ins AS (
                     INSERT INTO events (conversation_id, seq, type, sender, created_at, body, client_msg_id)
                     SELECT c, s, 'message.created', snd, now(), b, m
                     FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])
                          AS t(c, s, snd, b, m)
                 ), upd AS (
                     UPDATE conversations c SET last_seq = v.s
                     FROM unnest($6::bigint[], $7::bigint[]) AS v(id, s) WHERE c.id = v.id
                 )
                 SELECT pg_notify($8, $9)",
            )?,
        })
    }
}

/// Appends a batch of messages in ONE transaction (see
/// [`append_messages_with`]), preparing the statements first. Lanes keep
/// an [`AppendStatements`] and call [`append_messages_with`] directly.
pub fn append_messages(
    client: &mut Client,
    key: &NoticeKey,
    batch: &[NewMessage],
) -> Result<BatchOutcome, StoreError> {
    let stmts = AppendStatements::prepare(client, key)?;
    append_messages_with(client, &stmts, batch)
}

/// Appends a batch of messages in ONE transaction: locks the touched
/// conversations (ascending id), resolves idempotency and membership,
/// assigns seqs, inserts, bumps `last_seq`, sends one NOTIFY, commits.
///
/// Per-message problems (not a member, unknown conversation) fail only
/// that message; a database failure fails the whole batch and commits
/// nothing. Callers acknowledge only after this returns `Ok`.
pub fn append_messages_with(
    client: &mut Client,
    stmts: &AppendStatements,
    batch: &[NewMessage],
) -> Result<BatchOutcome, StoreError> {
    let mut tx = client.transaction()?;

    let mut conv_ids: Vec<i64> = batch.iter().map(|m| m.conversation_id).collect();
    conv_ids.sort_unstable();
    conv_ids.dedup();

    let rows = tx.query(&stmts.lock, &[&conv_ids])?;
    let mut last_seq: HashMap<i64, i64> = HashMap::with_capacity(rows.len());
    let mut now = String::new();
    for r in &rows {
        last_seq.insert(r.get(0), r.get(1));
        now = r.get(2);
    }

    let mut cs = Vec::with_capacity(batch.len());
    let mut ss = Vec::with_capacity(batch.len());
    let mut ms = Vec::with_capacity(batch.len());
    for m in batch
        .iter()
        .filter(|m| last_seq.contains_key(&m.conversation_id))
    {
        cs.push(m.conversation_id);
        ss.push(m.sender.as_str());
        ms.push(m.client_msg_id.as_str());
    }
    let mut members: std::collections::HashSet<(i64, String)> = Default::default();
    let mut existing: HashMap<(i64, String, String), Event> = HashMap::new();
    if !cs.is_empty() {
        for r in tx.query(&stmts.resolve, &[&cs, &ss, &ms])? {
            let (c, sender): (i64, String) = (r.get(0), r.get(1));
            if r.get::<_, bool>(2) {
                members.insert((c, sender));
            }
            if r.get::<_, bool>(3) {
                let e = event_from_row_at(&r, 4);
                let key = (
                    e.conversation_id,
                    e.sender.clone(),
                    e.client_msg_id.clone().unwrap_or_default(),
                );
                existing.insert(key, e);
            }
        }
    }

    // Decide every message and assign seqs.
    let mut results: Vec<Result<Appended, StoreError>> = Vec::with_capacity(batch.len());
    let mut new_events: Vec<Event> = Vec::new();
    for m in batch {
        let Some(last) = last_seq.get_mut(&m.conversation_id) else {
            results.push(Err(StoreError::NotFound(m.conversation_id)));
            continue;
        };
        if !members.contains(&(m.conversation_id, m.sender.clone())) {
            results.push(Err(StoreError::NotFound(m.conversation_id)));
            continue;
        }
        let key = (m.conversation_id, m.sender.clone(), m.client_msg_id.clone());
        if let Some(e) = existing.get(&key) {
            results.push(Ok(Appended {
                event: e.clone(),
                duplicate: true,
            }));
            continue;
        }
        *last += 1;
        let event = Event {
            conversation_id: m.conversation_id,
            seq: *last,
            kind: EVENT_MESSAGE_CREATED.to_string(),
            sender: m.sender.clone(),
            created_at: now.clone(),
            body: Some(m.body.clone()),
            client_msg_id: Some(m.client_msg_id.clone()),
            user: None,
            role: None,
            title: None,
            members: None,
        };
        existing.insert(key, event.clone());
        new_events.push(event.clone());
        results.push(Ok(Appended {
            event,
            duplicate: false,
        }));
    }

    if new_events.is_empty() {
        tx.rollback()?;
        return Ok(BatchOutcome {
            results,
            notice: Notice::default(),
            new_events,
        });
    }

    new_events.sort_by_key(|e| (e.conversation_id, e.seq));
    let mut c = Vec::with_capacity(new_events.len());
    let mut s = Vec::with_capacity(new_events.len());
    let mut snd = Vec::with_capacity(new_events.len());
    let mut body = Vec::with_capacity(new_events.len());
    let mut cmid = Vec::with_capacity(new_events.len());
    for e in &new_events {
        c.push(e.conversation_id);
        s.push(e.seq);
        snd.push(e.sender.as_str());
        body.push(e.body.as_deref().unwrap_or(""));
        cmid.push(e.client_msg_id.as_deref().unwrap_or(""));
    }
    let mut touched: Vec<(i64, i64)> = Vec::new();
    for e in &new_events {
        match touched.last_mut() {
            Some((cid, seq)) if *cid == e.conversation_id => *seq = e.seq,
            _ => touched.push((e.conversation_id, e.seq)),
        }
    }
    let (tc, ts): (Vec<i64>, Vec<i64>) = touched.iter().copied().unzip();
    let mut notice = Notice {
        events: touched,
        membership: vec![],
        everything: false,
        content: new_events.clone(),
        authenticated: true,
    };
    let mut payloads = notice.encode(&stmts.key);
    notice.content.clear();
    // One payload in all but pathological batches; if it would not fit,
    // say "catch up everything" instead of several notifications.
    let payload = if payloads.len() == 1 {
        payloads.remove(0)
    } else {
        let everything = Notice {
            everything: true,
            ..Notice::default()
        };
        everything.encode(&stmts.key).remove(0)
    };
    tx.query(
        &stmts.write,
        &[
            &c,
            &s,
            &snd,
            &body,
            &cmid,
            &tc,
            &ts,
            &NOTIFY_CHANNEL,
            &payload,
        ],
    )?;
    tx.commit()?;
    Ok(BatchOutcome {
        results,
        notice,
        new_events,
    })
}

// ---------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------

/// Moves cursors forward (never back, never past the last committed seq),
/// many at once. Rows of users no longer members are ignored.
pub fn advance_cursors(
    client: &mut Client,
    acks: &[(i64, String, i64)],
) -> Result<u64, StoreError> {
    if acks.is_empty() {
        return Ok(0);
    }
    let c: Vec<i64> = acks.iter().map(|a| a.0).collect();
    let u: Vec<&str> = acks.iter().map(|a| a.1.as_str()).collect();
    let s: Vec<i64> = acks.iter().map(|a| a.2).collect();
    Ok(client.execute(
        "UPDATE members m SET cursor_seq = GREATEST(m.cursor_seq, LEAST(v.s, c.last_seq))
         FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS v(c, u, s), conversations c
         WHERE m.conversation_id = v.c AND m.user_id = v.u AND c.id = v.c
           AND m.cursor_seq < LEAST(v.s, c.last_seq)",
        &[&c, &u, &s],
    )?)
}

// ---------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------

/// A user's place in one conversation, read at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub conversation_id: i64,
    pub cursor: i64,
    /// The conversation's last committed seq when read: the backlog is
    /// exactly (cursor, last_seq].
    pub last_seq: i64,
}

/// Every conversation `user` belongs to, with cursor and last seq. The
/// cursor is never below the seq before the user's own `member.joined`:
/// delivery starts where their membership does.
pub fn memberships(client: &mut Client, user: &str) -> Result<Vec<Membership>, StoreError> {
    let rows = client.query(
        "SELECT m.conversation_id, GREATEST(m.cursor_seq, m.joined_seq - 1), c.last_seq
         FROM members m JOIN conversations c ON c.id = m.conversation_id
         WHERE m.user_id = $1 ORDER BY m.conversation_id",
        &[&user],
    )?;
    Ok(rows
        .iter()
        .map(|r| Membership {
            conversation_id: r.get(0),
            cursor: r.get(1),
            last_seq: r.get(2),
        })
        .collect())
}

/// Events of one conversation with `after < seq <= upto`, ascending, at
/// most `limit`.
pub fn events_range(
    client: &mut Client,
    conversation_id: i64,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let rows = client.query(
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE conversation_id = $1 AND seq > $2 AND seq <= $3
             ORDER BY seq LIMIT $4"
        ),
        &[&conversation_id, &after, &upto, &limit],
    )?;
    Ok(rows.iter().map(event_from_row).collect())
}

/// Events after a position in each of several conversations (catch-up
/// reads of the fan-out), ascending per conversation, at most `limit_each`
/// per conversation.
pub fn events_after_many(
    client: &mut Client,
    positions: &[(i64, i64)],
    limit_each: i64,
) -> Result<Vec<Event>, StoreError> {
    if positions.is_empty() {
        return Ok(vec![]);
    }
    let (c, s): (Vec<i64>, Vec<i64>) = positions.iter().copied().unzip();
    let rows = client.query(
        &format!(
            "SELECT e.* FROM unnest($1::bigint[], $2::bigint[]) AS p(c, s),
             LATERAL (SELECT {EVENT_COLUMNS} FROM events
                      WHERE conversation_id = p.c AND seq > p.s
                      ORDER BY seq LIMIT $3) AS e"
        ),
        &[&c, &s, &limit_each],
    )?;
    let mut events: Vec<Event> = rows.iter().map(event_from_row).collect();
    events.sort_by_key(|e| (e.conversation_id, e.seq));
    Ok(events)
}

/// Whether `user` is a member of the conversation.
pub fn is_member(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
) -> Result<bool, StoreError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2",
            &[&conversation_id, &user],
        )?
        .is_some())
}

/// The highest seq `user` may not read in a conversation (they see
/// `seq > floor`): the seq before their own `member.joined`, or 0 where
/// the history is shared. `NotFound` for a non-member.
pub fn history_floor(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
) -> Result<i64, StoreError> {
    let row = client
        .query_opt(
            "SELECT CASE WHEN c.history = 'shared' THEN 0 ELSE m.joined_seq - 1 END
             FROM members m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.conversation_id = $1 AND m.user_id = $2",
            &[&conversation_id, &user],
        )?
        .ok_or(StoreError::NotFound(conversation_id))?;
    Ok(row.get::<_, i64>(0).max(0))
}

/// One page of a conversation's events for a member: newest first below
/// `before_seq`, or oldest first above `after_seq`, never at or below the
/// member's [`history_floor`]. Keyset pagination on the primary key
/// (conversation_id, seq).
pub fn events_page(
    client: &mut Client,
    user: &str,
    conversation_id: i64,
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let floor = history_floor(client, conversation_id, user)?;
    let rows = match after_seq {
        Some(after) => client.query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3"
            ),
            &[&conversation_id, &after.max(floor), &limit],
        )?,
        None => client.query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events
                 WHERE conversation_id = $1 AND seq < $2 AND seq > $3
                 ORDER BY seq DESC LIMIT $4"
            ),
            &[
                &conversation_id,
                &before_seq.unwrap_or(i64::MAX),
                &floor,
                &limit,
            ],
        )?,
    };
    Ok(rows.iter().map(event_from_row).collect())
}

/// A row of the conversation list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConversationSummary {
    pub id: i64,
    pub title: String,
    pub last_seq: i64,
    pub cursor: i64,
    pub unread: i64,
    /// The caller's role: `owner`, `admin` or `member`.
    pub role: String,
    /// `since_join` or `shared`.
    pub history: String,
}

/// One page of the conversations `user` belongs to, by ascending id after
/// `after` (keyset pagination on members (user_id, conversation_id)).
pub fn conversations_page(
    client: &mut Client,
    user: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<ConversationSummary>, StoreError> {
    let rows = client.query(
        "SELECT c.id, c.title, c.last_seq, GREATEST(m.cursor_seq, m.joined_seq - 1), m.role, c.history
         FROM members m JOIN conversations c ON c.id = m.conversation_id
         WHERE m.user_id = $1 AND m.conversation_id > $2
         ORDER BY m.conversation_id LIMIT $3",
        &[&user, &after, &limit],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let last: i64 = r.get(2);
            let cursor: i64 = r.get(3);
            ConversationSummary {
                id: r.get(0),
                title: r.get(1),
                last_seq: last,
                cursor,
                unread: (last - cursor).max(0),
                role: r.get(4),
                history: r.get(5),
            }
        })
        .collect())
}

/// A cheap round trip for health checks.
pub fn ping(client: &mut Client) -> Result<(), StoreError> {
    client.simple_query("SELECT 1")?;
    Ok(())
}
