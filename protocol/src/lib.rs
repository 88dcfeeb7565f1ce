//! tether-protocol: the contract of docs/PROTOCOL.md in types, shared by
//! every program that speaks it (the worker, the supervisor, the Rust
//! client, the load tool), so no one re-declares a frame.
//!
//! - [`frames`]: events, WebSocket frames (client and server), HTTP error
//!   bodies;
//! - [`error_code`]: the error codes, with their HTTP status;
//! - [`auth`]: HS256 tokens (issue and verify);
//! - [`control`]: the supervisor ↔ worker interface (inherited descriptors,
//!   control lines, systemd socket activation);
//! - [`exposition`]: the whole host's Prometheus metrics (merging the
//!   processes' expositions, process metrics).
//!
//! No runtime and no I/O beyond parsing and formatting (and reading
//! `/proc/self` for process metrics).

pub mod auth;
pub mod control;
pub mod error_code;
pub mod exposition;
pub mod frames;
