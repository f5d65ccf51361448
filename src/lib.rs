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

/// Declares modules that are private unless the `testing` feature is on.
macro_rules! internal {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {$(
        $(#[$attr])*
        #[cfg(feature = "testing")]
        pub mod $name;
        $(#[$attr])*
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

internal!(certs, completion, conn, files, limits, liveness, metrics, net, notify, sink, smtp);
