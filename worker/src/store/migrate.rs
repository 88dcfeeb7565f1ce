//! Versioned migrations: the numbered files of `migrations/`, applied in
//! order, each recorded in `schema_migrations`.
//!
//! Every worker (and `tether migrate`, for deploy pipelines) runs
//! [`migrate`] at start: one transaction under an advisory lock, so hosts
//! starting together apply each migration once and the others find it
//! done. A database from before versioning (built by the first release's
//! `schema.sql`, which is exactly migration 1) is recognised by its tables
//! and recorded as at the version its columns show.

use super::oneshot::OneShot;
use super::StoreError;
use postgres::Client;

/// A numbered migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../../migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "roles_and_history",
        sql: include_str!("../../../migrations/0002_roles_and_history.sql"),
    },
    Migration {
        version: 3,
        name: "retention",
        sql: include_str!("../../../migrations/0003_retention.sql"),
    },
    Migration {
        version: 4,
        name: "presence",
        sql: include_str!("../../../migrations/0004_presence.sql"),
    },
    Migration {
        version: 5,
        name: "sse_tickets",
        sql: include_str!("../../../migrations/0005_sse_tickets.sql"),
    },
];

/// The advisory lock every schema change takes.
const LOCK: i64 = 7_412_093;

/// Applies the pending migrations; returns the versions it applied (none
/// when the database was up to date).
pub fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    let mut tx = client.transaction()?;
    tx.oneshot_execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])?;
    // "already exists, skipping" notices of migration 1 on old databases.
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let mut applied: Vec<i32> = tx
        .oneshot_query("SELECT version FROM schema_migrations", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if applied.is_empty() {
        let baseline = baseline(&mut tx)?;
        for m in MIGRATIONS.iter().filter(|m| m.version <= baseline) {
            record(&mut tx, m)?;
            applied.push(m.version);
        }
    }
    let mut done = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(m.sql)?;
        record(&mut tx, m)?;
        done.push(m.version);
    }
    tx.commit()?;
    Ok(done)
}

/// The version a database without `schema_migrations` rows is at: 0 when
/// empty, 1 with the first release's tables, 2 once roles exist.
fn baseline(tx: &mut postgres::Transaction<'_>) -> Result<i32, StoreError> {
    let has = |tx: &mut postgres::Transaction<'_>, table: &str, column: &str| {
        tx.oneshot_query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2)",
            &[&table, &column],
        )
        .map(|r| r.get::<_, bool>(0))
    };
    Ok(if !has(tx, "events", "seq")? {
        0
    } else if has(tx, "members", "role")? && has(tx, "conversations", "history")? {
        2
    } else {
        1
    })
}

fn record(tx: &mut postgres::Transaction<'_>, m: &Migration) -> Result<(), StoreError> {
    tx.oneshot_execute(
        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
        &[&m.version, &m.name],
    )?;
    Ok(())
}

/// The latest version this build knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_one_two_three_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty());
        }
        assert_eq!(latest(), MIGRATIONS.len() as i32);
    }
}
