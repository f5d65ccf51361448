//! The gateway's configuration: one struct per settings group, each deriving clap's
//! `Args` and serde's `Deserialize`, so that a setting (its flag, `SMTPGW_*` variable,
//! file key, help text and default) is declared once, on one field. The layers are
//! merged flag > environment > `--config` file > default with clap's value sources, then
//! validated into one [`Config`] before anything starts, so a bad value fails with one
//! line naming where it came from: the flag, the variable or the file and its key.
//!
//! Layout: `values` (the value types and the enums settings choose between), `group`
//! (what a settings group is, and `settings_group!`), one file per group (`server`,
//! `session`, `limits`, `edge`, `spool`, `kafka`, `logging`), `cli` (subcommands and
//! environment variables), `file` (the `--config` file and layering) and `validate` (the
//! checks that make a [`Config`], and `print-config`). Everything public is re-exported
//! here: callers name `config::X`, never a file.

use std::ffi::OsString;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::certs::TlsMinVersion;
use crate::conn::{Cidr, ProxyMode};
use crate::smtp::BareLfPolicy;

pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 1024 * 1024 * 1024;
pub const MAX_REACTORS: u64 = 1024;
/// Greeting delays beyond this would only make legitimate clients time out.
const MAX_GREETING_DELAY: Duration = Duration::from_secs(60);
/// Without a total memory figure (or below it), the body budget is this.
const FALLBACK_BODY_MEMORY: usize = 256 * 1024 * 1024;
/// Far beyond any sensible setting, and keeps deadline arithmetic far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// librdkafka takes message.timeout.ms as a 32-bit count of milliseconds.
const MAX_PUBLISH_TIMEOUT: Duration = Duration::from_secs(24 * 24 * 3600);
/// The minimum data rate's window when none is given (the first window is the grace).
const MIN_DATA_RATE_WINDOW: Duration = Duration::from_secs(30);

#[macro_use]
mod values;
#[macro_use]
mod group;
mod cli;
mod edge;
mod file;
mod kafka;
mod limits;
mod logging;
mod server;
mod session;
mod spool;
#[cfg(test)]
mod tests;
mod validate;

pub use cli::*;
pub use edge::*;
pub use file::*;
pub use group::*;
pub use kafka::*;
pub use limits::*;
pub use logging::*;
pub use server::*;
pub use session::*;
pub use spool::*;
pub use validate::*;
pub use values::*;
