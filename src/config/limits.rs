//! Timeouts, connection caps and the per-address limits.

use super::*;

settings_group! {
    // Connections, memory and time.
    #[command(next_help_heading = "Connections and memory")]
    pub struct LimitSettings {
        /// Open connections across all reactors.
        #[arg(long, value_name = "N", default_value = "10000")]
        pub max_connections: u64,
        /// Message bodies held in memory across the gateway (being received or with the
        /// sink); over it bodies stop being read and MAIL gets 451 4.3.1
        /// [default: 25% of the machine's memory].
        #[arg(long, value_name = "BYTES")]
        pub max_body_memory: Option<ByteSize>,
        /// Slowest average rate a message body may arrive at, as BYTES[/WINDOW] (bytes per
        /// second, averaged over windows of WINDOW, the first being the grace), before
        /// 421 4.4.2; 0 turns it off.
        #[arg(long, value_name = "RATE", default_value = "1K/30s")]
        pub min_data_rate: DataRate,
        /// Close a connection silent this long, e.g. 300 or 5m.
        #[arg(long, value_name = "DUR", default_value = "300")]
        pub idle_timeout: Dur,
        /// Close any connection open this long, however active.
        #[arg(long, value_name = "DUR", default_value = "1h")]
        pub max_session_time: Dur,
        /// On SIGTERM/SIGINT, wait this long for sessions to finish (SIGHUP reloads it).
        #[arg(long, value_name = "DUR", default_value = "30s")]
        pub drain_timeout: Dur,
    }
}
