//! [`TestDb`]: a throwaway PostgreSQL per test (a copy of a per-process
//! template, migrations applied), stoppable and restartable.

use super::*;

/// A throwaway PostgreSQL cluster (fsync off, 300 connections) with
/// the migrations applied. Cheap to clone (shared); stopped and removed when
/// the last clone drops.
#[derive(Clone)]
pub struct TestDb {
    inner: Arc<DbInner>,
}

struct DbInner {
    pg: Mutex<PgCluster>,
    url: String,
}

// Starting a PostgreSQL is no default value.
#[allow(clippy::new_without_default)]
impl TestDb {
    /// Starts the cluster and applies the schema. Blocking; callable from
    /// async tests too (see the module docs).
    pub fn new() -> TestDb {
        off_runtime(|| {
            let pg = PgCluster::start_temp(PgOptions {
                fsync: false,
                max_connections: 300,
                port: None,
            })
            .unwrap_or_else(|e| panic!("starting the test PostgreSQL: {e}"));
            let url = pg.url();
            let db = TestDb {
                inner: Arc::new(DbInner {
                    pg: Mutex::new(pg),
                    url,
                }),
            };
            tether_worker::store::apply_schema(&mut db.client())
                .unwrap_or_else(|e| panic!("applying schema.sql: {e}"));
            db
        })
    }

    /// [`TestDb::new`] via `spawn_blocking`.
    pub async fn new_async() -> TestDb {
        tokio::task::spawn_blocking(TestDb::new).await.unwrap()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    pub fn port(&self) -> u16 {
        self.pg().port()
    }

    fn pg(&self) -> std::sync::MutexGuard<'_, PgCluster> {
        self.inner.pg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fast shutdown: the database goes away (same port on [`TestDb::start`]).
    pub fn stop(&self) {
        self.try_stop()
            .unwrap_or_else(|e| panic!("stopping the test PostgreSQL: {e}"))
    }

    pub fn try_stop(&self) -> Result<(), PgError> {
        off_runtime(|| self.pg().stop())
    }

    /// Starts it again on the same port; returns once it accepts connections.
    pub fn start(&self) {
        self.try_start()
            .unwrap_or_else(|e| panic!("restarting the test PostgreSQL: {e}"))
    }

    pub fn try_start(&self) -> Result<(), PgError> {
        off_runtime(|| self.pg().start())
    }

    pub fn is_running(&self) -> bool {
        self.pg().is_running()
    }

    pub async fn stop_async(&self) {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.stop())
            .await
            .unwrap()
    }

    pub async fn start_async(&self) {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.start())
            .await
            .unwrap()
    }

    /// The server log's last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        self.pg().log_tail(lines)
    }

    /// A new blocking client. Use it only off the tokio runtime
    /// (`spawn_blocking`, [`TestDb::with_client`], or a sync test).
    pub fn client(&self) -> postgres::Client {
        self.try_client()
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.inner.url))
    }

    pub fn try_client(&self) -> Result<postgres::Client, postgres::Error> {
        let mut config: postgres::Config = self.inner.url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        config.connect(postgres::NoTls)
    }

    /// Runs `f` with a fresh client on a non-runtime thread.
    pub fn with_client<R: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> R + Send) -> R {
        off_runtime(|| f(&mut self.client()))
    }

    /// The first column of the first row of `sql` (an `int8`, `int4` or
    /// `int2`), e.g. `SELECT count(*) FROM events`.
    pub fn query_i64(&self, sql: &str) -> i64 {
        self.try_query_i64(sql)
            .unwrap_or_else(|e| panic!("query {sql:?}: {e}"))
    }

    /// Like [`TestDb::query_i64`], but connection and SQL errors are returned.
    pub fn try_query_i64(&self, sql: &str) -> Result<i64, postgres::Error> {
        off_runtime(|| {
            let row = self.try_client()?.query_one(sql, &[])?;
            row.try_get::<_, i64>(0)
                .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
                .or_else(|_| row.try_get::<_, i16>(0).map(i64::from))
        })
    }

    pub async fn query_i64_async(&self, sql: &str) -> i64 {
        let (db, sql) = (self.clone(), sql.to_string());
        tokio::task::spawn_blocking(move || db.query_i64(&sql))
            .await
            .unwrap()
    }

    /// Runs `sql` (one or more statements) with `batch_execute`.
    pub fn execute(&self, sql: &str) {
        off_runtime(|| {
            self.client()
                .batch_execute(sql)
                .unwrap_or_else(|e| panic!("executing {sql:?}: {e}"))
        })
    }

    pub async fn execute_async(&self, sql: &str) {
        let (db, sql) = (self.clone(), sql.to_string());
        tokio::task::spawn_blocking(move || db.execute(&sql))
            .await
            .unwrap()
    }
}
