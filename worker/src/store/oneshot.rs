//! One-shot statements: every query the worker makes outside the commit
//! lanes' prepared fast path.
//!
//! The `postgres` crate's `query(&str, ..)` prepares a *named* statement
//! (`s0`, `s1`, ...) in one round trip and runs it in a second. Behind
//! PgBouncer in transaction mode (Debian's 1.18) the two round trips may
//! land on different server connections, and names from different
//! clients collide there: "prepared statement s0 does not exist" (or
//! "already exists"). A one-shot statement (`query_typed`) sends Parse
//! of the *unnamed* statement, Bind, Execute and Sync in one flight, with
//! the parameter types given, so it works through any pooler and costs
//! one round trip instead of two on a direct connection too.
//!
//! [`OneShot`] gives `Client` and `Transaction` the four calls the store
//! makes, taking parameters as before (`&[&a, &b]`); [`Param`] knows each
//! parameter's PostgreSQL type from its Rust type.

use postgres::types::{ToSql, Type};
use postgres::{Client, Row, Transaction};

/// A Rust type with one PostgreSQL type.
pub trait PgType {
    fn pg_type() -> Type;
}

macro_rules! pg_type {
    ($($t:ty => $pg:ident),* $(,)?) => {
        $(impl PgType for $t {
            fn pg_type() -> Type {
                Type::$pg
            }
        })*
    };
}

pg_type! {
    bool => BOOL,
    i32 => INT4,
    i64 => INT8,
    f64 => FLOAT8,
    &str => TEXT,
    String => TEXT,
    Vec<i64> => INT8_ARRAY,
    Vec<&str> => TEXT_ARRAY,
    Vec<String> => TEXT_ARRAY,
}

impl<T: PgType> PgType for Option<T> {
    fn pg_type() -> Type {
        T::pg_type()
    }
}

/// A statement parameter: its value and its PostgreSQL type.
pub trait Param {
    fn value(&self) -> &(dyn ToSql + Sync);
    fn pg_type(&self) -> Type;
}

impl<T: PgType + ToSql + Sync> Param for T {
    fn value(&self) -> &(dyn ToSql + Sync) {
        self
    }
    fn pg_type(&self) -> Type {
        T::pg_type()
    }
}

fn typed<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.value(), p.pg_type())).collect()
}

/// The store's queries as one-shot statements (see the module doc).
pub trait OneShot {
    fn oneshot_query(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
    ) -> Result<Vec<Row>, postgres::Error>;

    fn oneshot_execute(&mut self, sql: &str, params: &[&dyn Param])
        -> Result<u64, postgres::Error>;

    /// Exactly one row (an error otherwise).
    fn oneshot_query_one(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
    ) -> Result<Row, postgres::Error>;

    /// At most one row (an error for more).
    fn oneshot_query_opt(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
    ) -> Result<Option<Row>, postgres::Error>;
}

macro_rules! one_shot {
    ($t:ty) => {
        impl OneShot for $t {
            fn oneshot_query(
                &mut self,
                sql: &str,
                params: &[&dyn Param],
            ) -> Result<Vec<Row>, postgres::Error> {
                self.query_typed(sql, &typed(params))
            }
            fn oneshot_execute(
                &mut self,
                sql: &str,
                params: &[&dyn Param],
            ) -> Result<u64, postgres::Error> {
                self.execute_typed(sql, &typed(params))
            }
            fn oneshot_query_one(
                &mut self,
                sql: &str,
                params: &[&dyn Param],
            ) -> Result<Row, postgres::Error> {
                self.query_typed_one(sql, &typed(params))
            }
            fn oneshot_query_opt(
                &mut self,
                sql: &str,
                params: &[&dyn Param],
            ) -> Result<Option<Row>, postgres::Error> {
                self.query_typed_opt(sql, &typed(params))
            }
        }
    };
}

one_shot!(Client);
one_shot!(Transaction<'_>);
