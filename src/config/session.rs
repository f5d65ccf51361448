//! The SMTP session's settings: sizes, recipients, domains, bare LF.

use super::*;

settings_group! {
    // What a session accepts; SIGHUP re-reads these from the file.
    #[command(next_help_heading = "Session (SIGHUP reloads these)")]
    pub struct SessionSettings {
        /// Recipient domain to accept mail for; repeatable, or comma-separated
        /// [default: localhost and --hostname].
        #[arg(long, value_name = "DOMAIN", value_delimiter = ',')]
        // Left out when empty, as a file must (an empty list would accept nothing).
        #[serde(deserialize_with = "domains", skip_serializing_if = "Vec::is_empty")]
        pub accept_domain: Vec<String>,
        /// Largest message; see "Sizes" in the README for units. `auto`: 10M, lowered
        /// to what the sink (the Kafka topic's max.message.bytes) holds, with a warning,
        /// where a size that does not fit the topic stops the start-up.
        #[arg(long, value_name = "BYTES|auto", default_value = "10M")]
        pub max_message_size: MaxMessageSize,
        /// Recipients per message.
        #[arg(long, value_name = "N", default_value = "100")]
        pub max_recipients: u64,
        /// Bare CR or LF in a message body.
        #[arg(long, value_enum, default_value = "reject")]
        pub bare_lf: BareLfPolicy,
    }
}
