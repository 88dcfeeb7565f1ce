//! tether-shared: what the supervisor (`tether`) and the worker
//! (`tether-worker`) have in common.
//!
//! - [`auth`]: HS256 tokens (issue and verify);
//! - [`frames`]: the WebSocket and HTTP wire types of the contract;
//! - [`error_code`]: the contract's error codes, and a store error's code;
//! - [`control`]: the supervisor ↔ worker interface (inherited fds, control lines);
//! - [`store`]: the PostgreSQL event log (schema, write path, reads);
//! - [`pgcluster`]: a private PostgreSQL cluster, for tests and dev mode.

pub mod auth;
pub mod control;
pub mod error_code;
pub mod frames;
pub mod pgcluster;
pub mod store;

/// The whole schema, applied at every start (idempotent).
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");
