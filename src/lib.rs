//! smtpgw: an SMTP ingestion gateway that says `250` only once a message is durable.
//!
//! `smtp` is the sans-IO protocol core, `conn` the sans-IO connection driver around it
//! (deadlines, drain, memory limits), `net` moves bytes between sockets and drivers,
//! `sink` stores accepted messages, `metrics` exports what they do, `notify` tells
//! systemd, `server` wires them together. `limits` (the per-address limiter) and
//! `certs` (certificate loading) are the edge's shared state, which the driver reaches
//! through its own traits and handles, so neither it nor the backends depend on them.

pub mod auth;
pub mod certs;
pub mod completion;
pub mod config;
pub mod conn;
pub mod files;
pub mod limits;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod reload;
pub mod server;
pub mod sink;
pub mod smtp;
pub mod spool_tool;
