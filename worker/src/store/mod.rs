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
//! membership writes and their rules (roles); `append`, message writes
//! (group commit); `read`, cursors and reads. Connections, the pool, the
//! schema and errors are here.

mod append;
pub mod membership;
pub mod migrate;
pub mod notice;
pub mod oneshot;
pub mod presence;
mod read;
pub mod retain;
mod tickets;

/// The whole current schema, to read (databases are built by [`migrate`]).
pub const SCHEMA_SQL: &str = include_str!("../../../schema.sql");

pub use append::{
    append_messages, append_messages_with, AppendStatements, Appended, BatchOutcome, NewMessage,
};
pub use membership::{
    add_member, create_conversation, remove_member, set_role, History, MembershipChange, Role,
    MAX_INITIAL_MEMBERS,
};
pub use notice::{Notice, NoticeKey};
pub use read::*;
use tether_protocol::error_code::ErrorCode;
pub use tickets::redeem_ticket;

use postgres::error::SqlState;
use postgres::{Client, NoTls, Row};
use r2d2_postgres::PostgresConnectionManager;
use std::str::FromStr;
use std::time::Duration;
use tether_protocol::frames::{Event, EVENT_CONVERSATION_CREATED, EVENT_MEMBER_ROLE};

/// The LISTEN/NOTIFY channel every committing transaction notifies.
pub const NOTIFY_CHANNEL: &str = "tether_events";

/// The transaction's time as RFC 3339 UTC with microseconds, as
/// `created_at` is formatted in [`EVENT_COLUMNS`].
pub(crate) const NOW_SQL: &str =
    r#"to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#;

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
    /// The conversation has as many members as it may (422
    /// `too_many_members`).
    #[error("a conversation has at most {0} members")]
    TooManyMembers(usize),
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
            StoreError::TooManyMembers(_) => (ErrorCode::TooManyMembers, e.to_string(), None),
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
    /// What is between us and PostgreSQL at `url`.
    pub pooler: Pooler,
}

/// What stands between tether and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooler {
    /// A direct connection (or a session-mode pooler): prepared
    /// statements and session settings are ours.
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`):
    /// each transaction may run on another server connection, so no named
    /// prepared statements and no session settings (the statement timeout
    /// is then the role's: `ALTER ROLE ... SET statement_timeout`), and
    /// LISTEN goes over a direct connection (`--listen-database-url`).
    Transaction,
}

impl DbSettings {
    pub fn new(url: &str) -> DbSettings {
        DbSettings {
            url: url.to_string(),
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            application_name: "tether".to_string(),
            pooler: Pooler::None,
        }
    }

    /// The same settings for connections through `pooler`.
    pub fn through(self, pooler: Pooler) -> DbSettings {
        DbSettings { pooler, ..self }
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
        // A transaction-mode pooler refuses startup options (PgBouncer:
        // "unsupported startup parameter: options") and could not keep a
        // session setting anyway.
        if self.pooler == Pooler::None {
            cfg.options(&format!(
                "-c statement_timeout={}",
                self.statement_timeout.as_millis()
            ));
        }
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

/// `NOTIFY channel, payload` (sent when the implicit transaction commits).
pub fn notify(client: &mut Client, channel: &str, payload: &str) -> Result<(), StoreError> {
    use oneshot::OneShot;
    client.oneshot_execute("SELECT pg_notify($1, $2)", &[&channel, &payload])?;
    Ok(())
}

/// Brings the database's schema up to date (see [`migrate`]).
pub fn apply_schema(client: &mut Client) -> Result<(), StoreError> {
    migrate::migrate(client).map(|_| ())
}

pub(crate) fn event_from_row(row: &Row) -> Event {
    event_from_row_at(row, 0)
}

/// An event from [`EVENT_COLUMNS`] starting at column `at`.
pub(crate) fn event_from_row_at(row: &Row, at: usize) -> Event {
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
pub(crate) const EVENT_COLUMNS_E: &str = r#"e.conversation_id, e.seq, e.type, e.sender,
    to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    e.body, e.client_msg_id, e.subject, e.payload::text"#;

pub(crate) const EVENT_COLUMNS: &str = r#"conversation_id, seq, type, sender,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    body, client_msg_id, subject, payload::text"#;
