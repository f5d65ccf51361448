//! `--listen`, identity and threads: settings that change only at a restart.

use super::*;

settings_group! {
    // Listeners, identity and threads; these change only at a restart.
    #[command(next_help_heading = "Listeners")]
    pub struct ServerSettings {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", value_parser = socket_addr, default_value = "127.0.0.1:2525")]
        pub listen: SocketAddr,
        /// Address of the HTTP endpoint for /metrics, /healthz and /readyz (loopback by
        /// default: it has no authentication).
        #[arg(long, value_name = "ADDR", value_parser = socket_addr, default_value = "127.0.0.1:9025")]
        pub metrics_listen: SocketAddr,
        /// Our name in the greeting and Received: lines [default: the system hostname].
        #[arg(long, value_name = "NAME")]
        pub hostname: Option<String>,
        /// Reactor threads, 1..=1024 [default: the number of CPUs].
        #[arg(long, value_name = "N")]
        pub reactors: Option<u64>,
        /// I/O backend of the reactors.
        #[arg(long, value_enum, default_value = "auto")]
        pub io_backend: IoBackend,
        /// Leave the io_uring reactor threads unpinned (by default each is pinned to one
        /// of the CPUs the process may use). For hosts where other busy processes share
        /// those CPUs: several gateways, or Kubernetes pods without exclusive CPUs.
        #[arg(long)]
        pub no_cpu_pinning: bool,
    }
}
