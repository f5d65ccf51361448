//! The internet edge: TLS, PROXY, AUTH, trusted networks.

use super::*;

settings_group! {
    // TLS, the PROXY protocol and the per-address limits.
    #[command(next_help_heading = "The internet edge")]
    pub struct EdgeSettings {
        /// Second address, speaking TLS from the first byte (RFC 8314 submissions/465
        /// style); needs --tls-cert and --tls-key.
        #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
        pub listen_tls: Option<SocketAddr>,
        /// Certificate chain (PEM, leaf first); with --tls-key, STARTTLS is offered.
        #[arg(long, value_name = "FILE")]
        pub tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE")]
        pub tls_key: Option<PathBuf>,
        /// Close a TLS handshake (implicit or after STARTTLS) not done this long after it
        /// began, silent or trickling, e.g. 10 or 10s.
        #[arg(long, value_name = "DUR", default_value = "10s")]
        pub tls_handshake_timeout: Dur,
        /// MAIL before STARTTLS gets 530 5.7.0.
        #[arg(long)]
        pub require_tls: bool,
        /// Oldest TLS version a handshake may use.
        #[arg(long, value_enum, value_name = "VERSION", default_value = "1.2")]
        pub tls_min_version: TlsMinVersion,
        /// PROXY protocol header expected on every listener, or with --proxy-listen only
        /// on that one.
        #[arg(long, value_enum, default_value = "off")]
        pub proxy_protocol: ProxyProtocol,
        /// Another SMTP address, for the load balancers: only it expects the
        /// --proxy-protocol header, while --listen and --listen-tls take clients
        /// directly.
        #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
        pub proxy_listen: Option<SocketAddr>,
        /// Address prefix allowed to send a PROXY header (the load balancers);
        /// repeatable, or comma-separated. Required with --proxy-protocol.
        #[arg(long, value_name = "CIDR", value_delimiter = ',')]
        #[serde(deserialize_with = "one_or_many")]
        pub proxy_trusted_cidr: Vec<Cidr>,
        /// Address prefix exempt from the per-address limits; repeatable, or
        /// comma-separated; giving it replaces the default.
        #[arg(long, value_name = "CIDR", value_delimiter = ',',
              default_values = ["127.0.0.0/8", "::1/128"])]
        #[serde(deserialize_with = "one_or_many")]
        pub trusted_cidr: Vec<Cidr>,
        /// Open connections per client address; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "50")]
        pub max_connections_per_ip: u32,
        /// Open connections per /24 (IPv4) or /64 (IPv6); 0 turns it off.
        #[arg(long, value_name = "N", default_value = "200")]
        pub max_connections_per_prefix: u32,
        /// New connections per client address per minute (bursts of as many); 0 turns
        /// it off.
        #[arg(long, value_name = "N", default_value = "600")]
        pub max_connection_rate_per_ip: u32,
        /// Messages per client address per minute (bursts of as many); 0 turns it off.
        #[arg(long, value_name = "N", default_value = "0")]
        pub max_message_rate_per_ip: u32,
        /// Commands refused with 5xx after which a session gets 421 4.7.0 and is
        /// closed; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "20")]
        pub error_budget: u32,
        /// Wait this long before the greeting; a client that talks first gets 554 5.5.0;
        /// 0 turns it off.
        #[arg(long, value_name = "DUR", default_value = "0")]
        pub greeting_delay: Dur,
        /// Users for SMTP AUTH (PLAIN, LOGIN), one `name:hash[:rate=N]` a line, hashes
        /// made by `smtpgw auth hash`; re-read on SIGHUP and when it changes. AUTH is
        /// offered only over TLS (STARTTLS or --listen-tls).
        #[arg(long, value_name = "FILE")]
        pub auth_users: Option<PathBuf>,
        /// Offer AUTH before TLS as well; only for loopback listeners, and behind a
        /// PROXY header only to a client whose real address is loopback.
        #[arg(long)]
        pub auth_allow_plaintext: bool,
        /// MAIL before a successful AUTH gets 530 5.7.0.
        #[arg(long)]
        pub require_auth: bool,
        /// Authenticated sessions may send to any recipient domain (unauthenticated ones
        /// stay limited to --accept-domain).
        #[arg(long)]
        pub auth_relay: bool,
        /// Failed AUTH attempts per client address, and per user name, per hour before
        /// 421 4.7.0; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "10")]
        pub max_auth_failures_per_ip: u32,
        /// Messages per authenticated user per minute (bursts of as many), unless its
        /// line in the users file says rate=N; 0 turns it off.
        #[arg(long, value_name = "N", default_value = "0")]
        pub max_message_rate_per_user: u32,
    }
}

impl EdgeSettings {
    /// Certificate and key, when TLS is on (validation makes them both or neither).
    pub fn tls(&self) -> Option<(&Path, &Path)> {
        self.tls_cert.as_deref().zip(self.tls_key.as_deref())
    }
}
