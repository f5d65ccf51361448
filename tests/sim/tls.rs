//! TLS and AUTH for the simulation: the gateway's listeners as `server::listeners`
//! builds them from a parsed configuration (the STARTTLS listener, the same with
//! `--require-tls`, and the implicit-TLS one, with the certificate loaded by
//! `certs::load` and AUTH offered through a verifier), and the clients' rustls side.
//!
//! The certificate is a fixed Ed25519 one (`tests/sim/cert.pem`, valid to 2126): an
//! Ed25519 signature always has the same length, so every handshake's records do too,
//! whatever the randomness rustls draws from the OS for its key shares and randoms.
//! That randomness reaches no decision of the gateway or of a client; byte counts, and
//! so every split and step of a run, follow from the seed. Clients verify the
//! certificate at a fixed time and never resume a session (a ticket from one seed
//! would change the next seed's handshake).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use smtpgw::auth::{AuthSettings, Verifier};
use smtpgw::conn::Edge;
use smtpgw::metrics::Metrics;
use smtpgw::net::ListenerKind;

/// The AUTH user the users file holds, and its password.
pub const USER: &str = "simuser";
pub const PASSWORD: &str = "sim-secret";
/// How long a handshake may take (`--tls-handshake-timeout`, its default).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sim")
}

/// The users file (`tests/sim/users`): `USER` with a cheap argon2id hash of
/// `PASSWORD` (8 KiB, one pass: a verification costs microseconds, and the simulation
/// verifies on its one thread).
fn users_file() -> PathBuf {
    dir().join("users")
}

/// The gateway's configuration for the run, parsed as the binary parses its flags.
fn config(require_tls: bool) -> smtpgw::config::Config {
    let d = dir();
    let cert = d.join("cert.pem");
    let key = d.join("key.pem");
    let users = users_file();
    let mut args: Vec<String> = [
        "smtpgw",
        "--hostname",
        crate::run::HOSTNAME,
        "--accept-domain",
        "example.com",
        "--listen",
        "127.0.0.1:0",
        "--listen-tls",
        "127.0.0.1:0",
        "--max-auth-failures-per-ip",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--auth-users".into(),
        users.display().to_string(),
    ]);
    if require_tls {
        args.push("--require-tls".into());
    }
    let cli = smtpgw::config::parse_cli_from(args).expect("the simulation's flags parse");
    cli.server
        .resolve()
        .expect("the simulation's configuration is valid")
}

/// The listeners' edges a run's clients connect to.
pub struct Edges {
    /// STARTTLS offered, AUTH after it.
    pub starttls: Arc<Edge>,
    /// The same with `--require-tls`.
    pub required: Arc<Edge>,
    /// `--listen-tls`: TLS from the first byte.
    pub implicit: Arc<Edge>,
}

/// Built afresh for each run, as a start builds them: a session cache of one run
/// is never seen by the next.
pub fn edges(metrics: &Arc<Metrics>) -> Edges {
    let verifier = Verifier::start_inline(AuthSettings {
        users_file: users_file(),
        max_failures_per_user: None,
        message_rate: None,
        threads: 0,
    })
    .expect("the simulation's users file loads");
    // Parsed once: a configuration is only settings; what a run must not share (the
    // certificate's server configuration and its session cache, the verifier) is built
    // from it below, for each run.
    static CONFIGS: OnceLock<[smtpgw::config::Config; 2]> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| [config(false), config(true)]);
    let pick = |require_tls: bool, kind: ListenerKind| {
        let config = &configs[usize::from(require_tls)];
        let (specs, _) = smtpgw::server::listeners(config, metrics, Some(&verifier))
            .expect("the simulation's listeners");
        specs
            .into_iter()
            .find(|s| s.kind == kind)
            .expect("a listener of that kind")
            .edge
    };
    Edges {
        starttls: pick(false, ListenerKind::Smtp),
        required: pick(true, ListenerKind::Smtp),
        implicit: pick(false, ListenerKind::ImplicitTls),
    }
}

/// 2027-01-01: within the certificate's validity, whatever the wall clock says.
#[derive(Debug)]
struct FixedTime;

impl TimeProvider for FixedTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            1_798_761_600,
        )))
    }
}

/// A client configuration trusting the simulation's certificate, TLS 1.3 or 1.2 only.
fn client_config(tls12: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir().join("cert.pem")).expect("cert.pem") {
        roots.add(c.expect("a certificate")).expect("a root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ClientConfig::builder_with_details(provider, Arc::new(FixedTime))
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// A client's side of a handshake with the gateway.
pub fn client(tls12: bool) -> ClientConnection {
    static CONFIGS: OnceLock<[Arc<ClientConfig>; 2]> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| [client_config(false), client_config(true)]);
    let name = ServerName::try_from(crate::run::HOSTNAME).expect("server name");
    ClientConnection::new(configs[usize::from(tls12)].clone(), name).expect("client connection")
}
