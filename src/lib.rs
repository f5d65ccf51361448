//! smtpgw: an SMTP ingestion gateway that says `250` only once a message is durable.
//!
//! `smtp` is the sans-IO protocol core, `conn` the sans-IO connection driver around it
//! (deadlines, drain, memory limits), `net` moves bytes between sockets and drivers,
//! `sink` stores accepted messages, `metrics` exports what they do, `notify` tells
//! systemd, `server` wires them together. `limits` (the per-address limiter) and
//! `certs` (certificate loading) are the edge's shared state, which the driver reaches
//! through its own traits and handles, so neither it nor the backends depend on them.
//!
//! The public surface is what the `smtpgw` binary needs: the configuration, the
//! server, reloading, logging and the offline tools. Everything else is the crate's
//! own; the `testing` feature opens those modules to the integration tests, benches
//! and fuzz targets (which enable it through the crate's dev-dependency on itself).

/// Declares the private variant of the modules below. A macro on purpose: cargo-mutants
/// finds a crate's files by following `mod` items and does not look inside macro
/// invocations, so each file is reached once, through its `testing` declaration (with
/// both spelled out it lists every mutant twice; with both in a macro, none).
macro_rules! private_unless_testing {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(not(feature = "testing"))]
        mod $name;
    )*};
}

pub mod auth;
pub mod config;
pub mod logging;
pub mod reload;
pub mod server;
pub mod spool_tool;

// Private unless the `testing` feature is on.
#[cfg(feature = "testing")]
pub mod certs;
#[cfg(feature = "testing")]
pub mod completion;
#[cfg(feature = "testing")]
pub mod conn;
#[cfg(feature = "testing")]
pub mod files;
#[cfg(feature = "testing")]
pub mod limits;
#[cfg(feature = "testing")]
pub mod liveness;
#[cfg(feature = "testing")]
pub mod metrics;
#[cfg(feature = "testing")]
pub mod net;
#[cfg(feature = "testing")]
pub mod notify;
#[cfg(feature = "testing")]
pub mod sink;
#[cfg(feature = "testing")]
pub mod smtp;
private_unless_testing!(
    certs, completion, conn, files, limits, liveness, metrics, net, notify, sink, smtp
);
