//! The use records of one-time SSE tickets (`crate::tickets`): the
//! database is what every worker of every host shares, so it is what makes
//! "once" hold across them.

use super::oneshot::OneShot;
use super::StoreError;
use postgres::Client;

/// Records the use of ticket `id` (valid until `expires_ms`); `false` when
/// it was used before, here or on any other worker. Now and then also
/// deletes the records of tickets that have expired (they can no longer
/// be presented).
pub fn redeem_ticket(client: &mut Client, id: &str, expires_ms: u64) -> Result<bool, StoreError> {
    let expires_ms = i64::try_from(expires_ms).unwrap_or(i64::MAX);
    let fresh = client.oneshot_execute(
        "INSERT INTO sse_tickets_used (id, expires_at)
         VALUES ($1, to_timestamp($2::bigint / 1000.0))
         ON CONFLICT (id) DO NOTHING",
        &[&id, &expires_ms],
    )? == 1;
    // About one in 32 redemptions sweeps (the id is random): the table
    // holds about a TTL's worth of tickets, without a sweep on every call.
    let sweep = id
        .get(..2)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .is_some_and(|b| b < 8);
    if sweep {
        client.oneshot_execute(
            "DELETE FROM sse_tickets_used WHERE expires_at < now() - interval '1 minute'",
            &[],
        )?;
    }
    Ok(fresh)
}
