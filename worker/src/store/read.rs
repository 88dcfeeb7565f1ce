//! Cursor writes and every read the worker makes: memberships at
//! connect, backlog and catch-up ranges, REST pages (within the caller's
//! history), the conversation list.

use super::oneshot::OneShot;
use super::{event_from_row, event_from_row_at, StoreError, EVENT_COLUMNS};
use postgres::Client;
use tether_protocol::frames::Event;

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
    Ok(client.oneshot_execute(
        "UPDATE members m SET cursor_seq = GREATEST(m.cursor_seq, LEAST(v.s, c.last_seq))
         FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS v(c, u, s), conversations c
         WHERE m.conversation_id = v.c AND m.user_id = v.u AND c.id = v.c
           AND m.cursor_seq < LEAST(v.s, c.last_seq)",
        &[&c, &u, &s],
    )?)
}

/// What one explicit cursor move did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorMove {
    /// The cursor is now this (the greater of what it was and the seq).
    At(i64),
    /// The seq is past the conversation's last seq (which is this):
    /// nothing moved.
    BeyondLast(i64),
}

/// Moves `user`'s cursor in one conversation forward to `seq` (never
/// back), at once: `POST /v1/conversations/{id}/cursor`. `NotFound` for a
/// non-member. The cursor reported is where delivery resumes, never below
/// the seq before the user's own `member.joined`.
pub fn move_cursor(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
    seq: i64,
) -> Result<CursorMove, StoreError> {
    let mut tx = client.transaction()?;
    let row = tx
        .oneshot_query_opt(
            "SELECT c.last_seq FROM members m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.conversation_id = $1 AND m.user_id = $2
             FOR UPDATE OF m",
            &[&conversation_id, &user],
        )?
        .ok_or(StoreError::NotFound(conversation_id))?;
    let last: i64 = row.get(0);
    if seq > last {
        return Ok(CursorMove::BeyondLast(last));
    }
    let row = tx.oneshot_query_one(
        "UPDATE members SET cursor_seq = GREATEST(cursor_seq, $3)
         WHERE conversation_id = $1 AND user_id = $2
         RETURNING GREATEST(cursor_seq, joined_seq - 1)",
        &[&conversation_id, &user, &seq],
    )?;
    tx.commit()?;
    Ok(CursorMove::At(row.get(0)))
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
    /// The highest seq pruned (retention), 0 when none: a backlog from a
    /// cursor below it starts with `truncated` and resumes above it.
    pub horizon: i64,
}

/// Every conversation `user` belongs to, with cursor and last seq. The
/// cursor is never below the seq before the user's own `member.joined`:
/// delivery starts where their membership does.
pub fn memberships(client: &mut Client, user: &str) -> Result<Vec<Membership>, StoreError> {
    let rows = client.oneshot_query(
        "SELECT m.conversation_id, GREATEST(m.cursor_seq, m.joined_seq - 1), c.last_seq,
                c.horizon_seq
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
            horizon: r.get(3),
        })
        .collect())
}

/// Whether `user` has been a member of the conversation without a break
/// since at least seq `since`: a member now whose current membership
/// began (`joined_seq`, the seq of their `member.joined`, 1 for a creator)
/// at or before it. A connection that finds history pruned under it
/// skips the pruned range only when this holds: the range cannot then
/// hold their own `member.left`.
pub fn member_since(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
    since: i64,
) -> Result<bool, StoreError> {
    Ok(client
        .oneshot_query_opt(
            "SELECT 1 FROM members
             WHERE conversation_id = $1 AND user_id = $2 AND joined_seq <= $3",
            &[&conversation_id, &user, &since],
        )?
        .is_some())
}

/// Bytes one read of events may carry (backlog pages, REST pages); the
/// first event of a read always fits, whatever its size.
pub const READ_BYTES: i64 = 1024 * 1024;

/// An upper bound, in SQL, on the bytes of one event as a frame: JSON
/// escapes a control character in six bytes (`\u0001`), so a body counts
/// six times its length. `octet_length` of a stored value reads its
/// header only (no detoasting).
const EVENT_BYTES_SQL: &str = "(256 + 6 * coalesce(octet_length(body), 0)
    + coalesce(octet_length(client_msg_id), 0) + coalesce(octet_length(subject), 0)
    + 6 * coalesce(octet_length(payload::text), 0))";

/// `rows` (a query of `events` ordered by seq in `order`, at most
/// `limit`) cut to [`READ_BYTES`]: the rows whose predecessors add up to
/// less, with `n`, how many there were before the cut, as the last column.
fn bytes_bounded(rows: &str, order: &str) -> String {
    format!(
        "SELECT {EVENT_COLUMNS}, t.n FROM (
           SELECT w.*, count(*) OVER () AS n FROM (
             SELECT e.*, sum({EVENT_BYTES_SQL}) OVER (ORDER BY seq {order} ROWS UNBOUNDED PRECEDING)
                         - {EVENT_BYTES_SQL} AS before_bytes
             FROM ({rows}) e ORDER BY seq {order}) w) t
         WHERE t.before_bytes < {READ_BYTES} ORDER BY seq {order}"
    )
}

/// A read of one conversation's range, and its retention horizon as of
/// the same snapshot.
#[derive(Debug, Clone, Default)]
pub struct Range {
    pub events: Vec<Event>,
    /// The highest seq pruned (0: none). Every event of the range above
    /// it that was committed is in `events`; those at or below are gone.
    pub horizon: i64,
}

/// Events of one conversation with `after < seq <= upto`, ascending, at
/// most `limit`, and at most [`READ_BYTES`] (one event always), with the
/// conversation's horizon read in the same statement (one snapshot: the
/// prune job deletes and raises the horizon in one transaction).
pub fn events_range(
    client: &mut Client,
    conversation_id: i64,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Range, StoreError> {
    let events = bytes_bounded(
        "SELECT * FROM events
         WHERE conversation_id = $1 AND seq > $2 AND seq <= $3
         ORDER BY seq LIMIT $4",
        "ASC",
    );
    let rows = client.oneshot_query(
        &format!(
            "WITH h AS (SELECT horizon_seq FROM conversations WHERE id = $1)
             SELECT h.horizon_seq, r.* FROM h LEFT JOIN ({events}) r ON true"
        ),
        &[&conversation_id, &after, &upto, &limit],
    )?;
    let horizon = rows.first().map_or(0, |r| r.get(0));
    let events = rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>(1).is_some())
        .map(|r| event_from_row_at(r, 1))
        .collect();
    Ok(Range { events, horizon })
}

/// A catch-up read: the events, and `(conversation, last seq read)` of
/// each conversation cut short by the byte bound.
pub type CatchUp = (Vec<Event>, Vec<(i64, i64)>);

/// Events after a position in each of several conversations (catch-up
/// reads of the fan-out), ascending per conversation, at most `limit_each`
/// and [`READ_BYTES`] per conversation (one event always). Also returns
/// the conversations cut short by bytes, each with the last seq read:
/// more events follow there.
pub fn events_after_many(
    client: &mut Client,
    positions: &[(i64, i64)],
    limit_each: i64,
) -> Result<CatchUp, StoreError> {
    if positions.is_empty() {
        return Ok((vec![], vec![]));
    }
    let (c, s): (Vec<i64>, Vec<i64>) = positions.iter().copied().unzip();
    let each = bytes_bounded(
        "SELECT * FROM events WHERE conversation_id = p.c AND seq > p.s
         ORDER BY seq LIMIT $3",
        "ASC",
    );
    let rows = client.oneshot_query(
        &format!(
            "SELECT e.* FROM unnest($1::bigint[], $2::bigint[]) AS p(c, s),
             LATERAL ({each}) AS e"
        ),
        &[&c, &s, &limit_each],
    )?;
    // Rows read per conversation before the byte cut, and kept.
    let mut counts: std::collections::HashMap<i64, (i64, i64, i64)> = Default::default();
    for r in &rows {
        let entry = counts.entry(r.get(0)).or_insert((r.get(9), 0, 0));
        entry.1 += 1;
        entry.2 = entry.2.max(r.get(1));
    }
    let mut cut: Vec<(i64, i64)> = counts
        .into_iter()
        .filter(|(_, (read, kept, _))| kept < read)
        .map(|(c, (_, _, last))| (c, last))
        .collect();
    cut.sort_unstable();
    let mut events: Vec<Event> = rows.iter().map(event_from_row).collect();
    events.sort_by_key(|e| (e.conversation_id, e.seq));
    Ok((events, cut))
}

/// Whether `user` is a member of the conversation.
pub fn is_member(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
) -> Result<bool, StoreError> {
    Ok(client
        .oneshot_query_opt(
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
        .oneshot_query_opt(
            "SELECT CASE WHEN c.history = 'shared' THEN 0 ELSE m.joined_seq - 1 END
             FROM members m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.conversation_id = $1 AND m.user_id = $2",
            &[&conversation_id, &user],
        )?
        .ok_or(StoreError::NotFound(conversation_id))?;
    Ok(row.get::<_, i64>(0).max(0))
}

/// A conversation's last committed seq as this server has it (0 when it
/// does not have the conversation): how far a replica has come.
pub fn last_seq(client: &mut Client, conversation_id: i64) -> Result<i64, StoreError> {
    Ok(client
        .oneshot_query_opt(
            "SELECT last_seq FROM conversations WHERE id = $1",
            &[&conversation_id],
        )?
        .map_or(0, |r| r.get(0)))
}

/// What a member may page, read on the primary: (their history floor, the
/// conversation's last seq). `NotFound` for a non-member.
pub fn page_bounds(
    client: &mut Client,
    conversation_id: i64,
    user: &str,
) -> Result<(i64, i64), StoreError> {
    let floor = history_floor(client, conversation_id, user)?;
    Ok((floor, last_seq(client, conversation_id)?))
}

/// One page of a conversation's events for a member: newest first below
/// `before_seq`, or oldest first above `after_seq`, never at or below the
/// member's [`history_floor`]; at most `limit` events and [`READ_BYTES`]
/// (one event always). Keyset pagination on the primary key
/// (conversation_id, seq). The flag says whether more events follow.
pub fn events_page(
    client: &mut Client,
    user: &str,
    conversation_id: i64,
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: i64,
) -> Result<(Vec<Event>, bool), StoreError> {
    let floor = history_floor(client, conversation_id, user)?;
    page_events(client, conversation_id, floor, before_seq, after_seq, limit)
}

/// A page above `floor`, at most `limit` events and [`READ_BYTES`] (one
/// event always), and whether more follow. No membership check:
/// [`events_page`] and the replica path check it first, on the primary.
pub fn page_events(
    client: &mut Client,
    conversation_id: i64,
    floor: i64,
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: i64,
) -> Result<(Vec<Event>, bool), StoreError> {
    // One more than asked: whether more follow.
    let ask = limit + 1;
    let rows = match after_seq {
        Some(after) => client.oneshot_query(
            &bytes_bounded(
                "SELECT * FROM events
                 WHERE conversation_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3",
                "ASC",
            ),
            &[&conversation_id, &after.max(floor), &ask],
        )?,
        None => client.oneshot_query(
            &bytes_bounded(
                "SELECT * FROM events
                 WHERE conversation_id = $1 AND seq < $2 AND seq > $3
                 ORDER BY seq DESC LIMIT $4",
                "DESC",
            ),
            &[
                &conversation_id,
                &before_seq.unwrap_or(i64::MAX),
                &floor,
                &ask,
            ],
        )?,
    };
    let read: i64 = rows.first().map_or(0, |r| r.get(9));
    let mut events: Vec<Event> = rows.iter().map(event_from_row).collect();
    events.truncate(limit as usize);
    let more = read > events.len() as i64;
    Ok((events, more))
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
    let rows = client.oneshot_query(
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
