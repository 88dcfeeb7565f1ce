//! Message writes: group commit. One transaction per batch locks the
//! touched conversations, resolves idempotency and membership, assigns
//! seqs, inserts, bumps `last_seq`, sends one authenticated NOTIFY and
//! commits; only then are senders answered.

use super::notice::{Notice, NoticeKey};
use super::oneshot::{OneShot, Param};
use super::{event_from_row_at, StoreError, EVENT_COLUMNS_E, NOTIFY_CHANNEL, NOW_SQL};
use postgres::{Client, Row, Transaction};
use std::collections::HashMap;
use tether_protocol::frames::{Event, EVENT_MESSAGE_CREATED};

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

/// The statements of the write path. On a direct connection they are
/// prepared once per connection (the commit lanes keep one connection
/// each), so a batch pays no parsing or planning: three statements and
/// BEGIN/COMMIT per committed batch. Behind a transaction-mode pooler
/// (`--database-pooler transaction`) named statements do not survive, so
/// each runs as a one-shot statement instead (see [`super::oneshot`]).
pub struct AppendStatements {
    key: NoticeKey,
    prepared: Option<Prepared>,
}

struct Prepared {
    lock: postgres::Statement,
    resolve: postgres::Statement,
    write: postgres::Statement,
}

/// 1. Lock the touched conversations (ascending id: no deadlock between
///    batches), read their last seq and the commit time.
fn lock_sql() -> String {
    format!(
        "SELECT id, last_seq, {NOW_SQL} FROM conversations
         WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"
    )
}

/// 2. After the lock (a fresh snapshot: READ COMMITTED takes one per
///    statement), per (conversation, sender, client_msg_id): is the sender
///    a member, and was this key committed before? Written as per-key
///    lookups (LATERAL ... LIMIT 1) so that the plan is an index probe per
///    key whatever the table statistics said when the statement was
///    prepared: a hash join over a then-empty events table would scan the
///    whole log on every batch once it has grown.
fn resolve_sql() -> String {
    format!(
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
    )
}

/// 3. Insert the events, bump last_seq, announce: one statement.
const WRITE_SQL: &str = "WITH ins AS (
         INSERT INTO events (conversation_id, seq, type, sender, created_at, body, client_msg_id)
         SELECT c, s, 'message.created', snd, now(), b, m
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])
              AS t(c, s, snd, b, m)
     ), upd AS (
         UPDATE conversations c SET last_seq = v.s
         FROM unnest($6::bigint[], $7::bigint[]) AS v(id, s) WHERE c.id = v.id
     )
     SELECT pg_notify($8::text, $9::text)";

impl AppendStatements {
    /// Prepares the statements on `client` (a direct connection).
    pub fn prepare(client: &mut Client, key: &NoticeKey) -> Result<AppendStatements, StoreError> {
        Ok(AppendStatements {
            key: key.clone(),
            prepared: Some(Prepared {
                lock: client.prepare(&lock_sql())?,
                resolve: client.prepare(&resolve_sql())?,
                write: client.prepare(WRITE_SQL)?,
            }),
        })
    }

    /// The statements as one-shot statements, for connections through a
    /// transaction-mode pooler.
    pub fn one_shot(key: &NoticeKey) -> AppendStatements {
        AppendStatements {
            key: key.clone(),
            prepared: None,
        }
    }

    fn lock(
        &self,
        tx: &mut Transaction<'_>,
        params: &[&dyn Param],
    ) -> Result<Vec<Row>, StoreError> {
        match &self.prepared {
            Some(p) => Self::run_prepared(tx, &p.lock, params),
            None => Ok(tx.oneshot_query(&lock_sql(), params)?),
        }
    }

    fn resolve(
        &self,
        tx: &mut Transaction<'_>,
        params: &[&dyn Param],
    ) -> Result<Vec<Row>, StoreError> {
        match &self.prepared {
            Some(p) => Self::run_prepared(tx, &p.resolve, params),
            None => Ok(tx.oneshot_query(&resolve_sql(), params)?),
        }
    }

    fn run_prepared(
        tx: &mut Transaction<'_>,
        statement: &postgres::Statement,
        params: &[&dyn Param],
    ) -> Result<Vec<Row>, StoreError> {
        let values: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|v| v.value()).collect();
        Ok(tx.query(statement, &values)?)
    }

    fn write(&self, tx: &mut Transaction<'_>, params: &[&dyn Param]) -> Result<(), StoreError> {
        match &self.prepared {
            Some(p) => Self::run_prepared(tx, &p.write, params)?,
            None => tx.oneshot_query(WRITE_SQL, params)?,
        };
        Ok(())
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

    let rows = stmts.lock(&mut tx, &[&conv_ids])?;
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
        for r in stmts.resolve(&mut tx, &[&cs, &ss, &ms])? {
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
    let channel = NOTIFY_CHANNEL;
    stmts.write(
        &mut tx,
        &[&c, &s, &snd, &body, &cmid, &tc, &ts, &channel, &payload],
    )?;
    tx.commit()?;
    Ok(BatchOutcome {
        results,
        notice,
        new_events,
    })
}
