//! tether-protocol: the contract of docs/PROTOCOL.md in types, shared by
//! every program that speaks it (the worker, the supervisor, the Rust
//! client, the load tool), so no one re-declares a frame.
//!
//! - [`frames`]: events, WebSocket frames (client and server), HTTP error
//!   bodies;
//! - [`error_code`]: the error codes, with their HTTP status;
//! - [`auth`]: HS256 tokens (issue and verify);
//! - [`control`]: the supervisor ↔ worker interface (inherited descriptors,
//!   control lines).
//!
//! Pure: no I/O beyond parsing and formatting, no runtime.

pub mod auth;
pub mod control;
pub mod error_code;
pub mod frames;
