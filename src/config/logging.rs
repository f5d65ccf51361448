//! Log level, format and what the transaction line shows.

use super::*;

settings_group! {
    // Log lines on stderr.
    #[command(next_help_heading = "Logging")]
    pub struct LogSettings {
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value = "text")]
        pub log_format: LogFormat,
        /// Log filter, e.g. info or warn,smtpgw=debug; SIGHUP re-reads it from the file;
        /// its variable is SMTPGW_LOG [default: RUST_LOG, else info]. The transaction
        /// line is target smtpgw::message, refusals smtpgw::refusal, connection ends
        /// smtpgw::session.
        #[arg(long, value_name = "FILTER")]
        pub log_level: Option<String>,
        /// Recipients on the transaction line: each address, their number only, or a
        /// keyed hash of each (key random per process) to follow an address unread.
        #[arg(long, value_enum, default_value = "full")]
        pub log_recipients: crate::logging::LogRecipients,
    }
}
