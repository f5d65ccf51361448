//! The edge of the driver: PROXY headers (byte vectors from the specification), TLS with
//! a real rustls client in memory, the greeting delay and early talkers, and the
//! per-address limits through the real limiter.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::tests::{fixed_stamp, hand, session_config, Handed};
use super::*;
use crate::limits::{PeerLimiter, PeerLimitsConfig, PerMinute};
use crate::metrics::Metrics;

const SOCKET_PEER: &str = "10.0.0.5:40000";

fn limits() -> ConnectionSettings {
    ConnectionSettings {
        idle_timeout: Duration::from_secs(60),
        max_session_time: Duration::from_secs(3600),
        min_data_rate: None,
        output_cap: ConnectionSettings::DEFAULT_OUTPUT_CAP,
        sink: "test",
    }
}

fn open_edge(t0: Instant, edge: Edge, peer: &str) -> Connection {
    Connection::new(
        t0,
        session_config(),
        Arc::new(limits()),
        BodyBudget::new(1 << 30),
        peer.parse().unwrap(),
        Arc::new(edge),
    )
}

fn proxied(mode: ProxyMode) -> Edge {
    Edge {
        proxy: mode,
        proxy_trusted: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        ..Edge::default()
    }
}

/// Writes out everything and answers every message with `Ok`; returns the replies and
/// the messages.
fn exchange(conn: &mut Connection, now: Instant) -> (String, Vec<Handed>) {
    let mut out = Vec::new();
    let mut messages = Vec::new();
    loop {
        if conn.wants_write() {
            let n = conn.pending_output().len();
            out.extend_from_slice(conn.pending_output());
            conn.output_written(now, n);
            continue;
        }
        if let Some(m) = conn.poll_message(now, &mut fixed_stamp, hand) {
            let id = m.id;
            messages.push(m);
            conn.handle_publish(now, Ok(id));
            continue;
        }
        return (String::from_utf8(out).unwrap(), messages);
    }
}

const TXN: &[u8] =
    b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhi\r\n.\r\n";

/// The v2 signature, from section 2.2 of the specification.
const SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut h = SIG.to_vec();
    h.push(0x20 | command);
    h.push(family);
    let len = (addresses.len() + tlvs.len()) as u16;
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(addresses);
    h.extend_from_slice(tlvs);
    h
}

fn v2_tcp4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut a = src.to_vec();
    a.extend_from_slice(&[192, 0, 2, 1]);
    a.extend_from_slice(&sport.to_be_bytes());
    a.extend_from_slice(&25u16.to_be_bytes());
    v2(0x1, 0x11, &a, tlvs)
}

#[test]
fn v1_header_names_the_client_and_the_greeting_follows_it() {
    let t0 = Instant::now();
    let mut conn = open_edge(t0, proxied(ProxyMode::V1), SOCKET_PEER);
    // Nothing before the header.
    assert!(!conn.wants_write());
    assert_eq!(conn.state(), State::Open);
    conn.handle_input(t0, b"PROXY TCP4 198.51.100.7 192.0.2.1 51000 25\r\n");
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.starts_with("220 mx.test"), "{out}");
    assert_eq!(conn.peer(), "198.51.100.7:51000".parse().unwrap());
    conn.handle_input(t0, TXN);
    let (out, messages) = exchange(&mut conn, t0);
    assert!(out.contains("250 2.0.0 Ok: queued"), "{out}");
    // The record's `Received:` line and `smtp.client_addr` are written from these
    // (`sink::record`).
    let env = &messages[0].message.envelope;
    assert_eq!(env.client_addr, "198.51.100.7:51000".parse().unwrap());
    assert_eq!(&*env.helo, "c.test");
}

#[test]
fn v1_tcp6_and_unknown() {
    let t0 = Instant::now();
    let mut conn = open_edge(t0, proxied(ProxyMode::Any), SOCKET_PEER);
    conn.handle_input(t0, b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 25\r\n");
    assert_eq!(conn.peer(), "[2001:db8::7]:51000".parse().unwrap());
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.starts_with("220 "));

    let mut conn = open_edge(t0, proxied(ProxyMode::V1), SOCKET_PEER);
    conn.handle_input(t0, b"PROXY UNKNOWN\r\n");
    assert_eq!(conn.peer(), SOCKET_PEER.parse().unwrap());
    assert!(exchange(&mut conn, t0).0.starts_with("220 "));
}

#[test]
fn v2_ipv4_ipv6_local_and_tlvs() {
    let t0 = Instant::now();
    // IPv4, with TLVs (an AWS NLB sends PP2_TYPE_AWS 0xEA with the endpoint id), which
    // are skipped.
    let tlvs = [
        0xEA, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e', 0x04, 0x00, 0x01, 0x00,
    ];
    let header = v2_tcp4([203, 0, 113, 9], 40001, &tlvs);
    for cut in [1, 12, 15, 16, header.len() - 1] {
        let mut conn = open_edge(t0, proxied(ProxyMode::V2), SOCKET_PEER);
        // In two pieces: the first is not enough.
        conn.handle_input(t0, &header[..cut]);
        assert!(
            !conn.wants_write(),
            "greeting before the whole header (cut {cut})"
        );
        conn.handle_input(t0, &header[cut..]);
        assert_eq!(conn.peer(), "203.0.113.9:40001".parse().unwrap());
        assert!(exchange(&mut conn, t0).0.starts_with("220 "));
    }
    // IPv6.
    let mut a = Vec::new();
    a.extend_from_slice(
        &"2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    a.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    a.extend_from_slice(&40002u16.to_be_bytes());
    a.extend_from_slice(&25u16.to_be_bytes());
    let mut conn = open_edge(t0, proxied(ProxyMode::Any), SOCKET_PEER);
    conn.handle_input(t0, &v2(0x1, 0x21, &a, &[]));
    assert_eq!(conn.peer(), "[2001:db8::9]:40002".parse().unwrap());
    // LOCAL (the balancer's health check): the socket's address stays.
    let mut conn = open_edge(t0, proxied(ProxyMode::V2), SOCKET_PEER);
    conn.handle_input(t0, &v2(0x0, 0x00, &[], &[]));
    assert_eq!(conn.peer(), SOCKET_PEER.parse().unwrap());
    assert!(exchange(&mut conn, t0).0.starts_with("220 "));
}

#[test]
fn bad_headers_close_unanswered() {
    let t0 = Instant::now();
    let v2h = v2_tcp4([203, 0, 113, 9], 40001, &[]);
    let cases: Vec<(ProxyMode, Vec<u8>)> = vec![
        // No header at all: a client speaking SMTP.
        (ProxyMode::V1, b"EHLO c.test\r\n".to_vec()),
        (ProxyMode::Any, b"EHLO c.test\r\n".to_vec()),
        (ProxyMode::V2, b"EHLO c.test\r\n".to_vec()),
        // Garbage.
        (ProxyMode::Any, vec![0xff; 64]),
        (
            ProxyMode::V1,
            b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n".to_vec(),
        ),
        (
            ProxyMode::V1,
            b"PROXY TCP4 198.51.100.7 192.0.2.1 99999 25\r\n".to_vec(),
        ),
        // The other version than the listener takes.
        (ProxyMode::V1, v2h.clone()),
        (
            ProxyMode::V2,
            b"PROXY TCP4 198.51.100.7 192.0.2.1 51000 25\r\n".to_vec(),
        ),
        // A v2 header with a bad version nibble.
        (ProxyMode::V2, {
            let mut h = v2h.clone();
            h[12] = 0x11;
            h
        }),
        // A v1 line that never ends within 107 bytes.
        (
            ProxyMode::V1,
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(),
        ),
    ];
    for (mode, input) in cases {
        let mut conn = open_edge(t0, proxied(mode), SOCKET_PEER);
        conn.handle_input(t0, &input);
        assert_eq!(conn.state(), State::Done, "{mode:?} {input:?}");
        assert_eq!(conn.ending(), Some(Ending::Refused));
        assert!(conn.pending_output().is_empty());
        let stats = taken(&mut conn);
        assert_eq!(stats.refused[edge::Rejected::ProxyInvalid], 1);
    }
}

#[test]
fn truncated_header_times_out_unanswered() {
    let t0 = Instant::now();
    let mut conn = open_edge(t0, proxied(ProxyMode::V2), SOCKET_PEER);
    let header = v2_tcp4([203, 0, 113, 9], 40001, &[]);
    conn.handle_input(t0, &header[..20]);
    let deadline = conn.poll_timeout().unwrap();
    assert!(deadline <= t0 + PROXY_HEADER_TIMEOUT);
    conn.handle_timeout(deadline);
    assert_eq!(conn.state(), State::Done);
    assert!(conn.pending_output().is_empty());
}

#[test]
fn untrusted_source_is_refused_at_once() {
    let t0 = Instant::now();
    let conn = open_edge(t0, proxied(ProxyMode::Any), "198.51.100.200:5000");
    assert_eq!(conn.state(), State::Done);
    assert_eq!(conn.ending(), Some(Ending::Refused));
    assert!(conn.pending_output().is_empty());
}

#[test]
fn bytes_after_the_header_before_the_greeting_are_an_early_talker() {
    let t0 = Instant::now();
    let mut conn = open_edge(t0, proxied(ProxyMode::V1), SOCKET_PEER);
    conn.handle_input(
        t0,
        b"PROXY TCP4 198.51.100.7 192.0.2.1 51000 25\r\nEHLO c.test\r\n",
    );
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.starts_with("554 5.5.0"), "{out}");
    assert_eq!(conn.state(), State::ShutdownWrite);
}

#[test]
fn greeting_delay_and_early_talker() {
    let t0 = Instant::now();
    let edge = Edge {
        greeting_delay: Duration::from_secs(3),
        ..Edge::default()
    };
    let mut conn = open_edge(t0, edge.clone(), SOCKET_PEER);
    assert!(!conn.wants_write());
    assert_eq!(conn.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    conn.handle_timeout(t0 + Duration::from_secs(1));
    assert!(!conn.wants_write());
    conn.handle_timeout(t0 + Duration::from_secs(3));
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.starts_with("220 mx.test"), "{out}");
    conn.handle_input(t0 + Duration::from_secs(3), TXN);
    assert!(exchange(&mut conn, t0).0.contains("queued"));

    // A delay longer than the idle timeout does not time the client out before it
    // was even greeted.
    let slow = Edge {
        greeting_delay: limits().idle_timeout + Duration::from_secs(5),
        ..Edge::default()
    };
    let mut conn = open_edge(t0, slow.clone(), SOCKET_PEER);
    let at = conn.poll_timeout().unwrap();
    assert_eq!(at, t0 + slow.greeting_delay);
    conn.handle_timeout(at);
    assert!(exchange(&mut conn, at).0.starts_with("220 "));
    assert_eq!(conn.poll_timeout(), Some(at + limits().idle_timeout));

    // Talking during the delay.
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    conn.handle_input(
        t0 + Duration::from_secs(1),
        b"EHLO spam.test\r\nMAIL FROM:<a@b>\r\n",
    );
    let (out, _) = exchange(&mut conn, t0);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("554 5.5.0 mx.test"), "{out}");
    assert_eq!(conn.state(), State::ShutdownWrite);
}

fn limiter(config: PeerLimitsConfig) -> Arc<dyn PeerLimits> {
    PeerLimiter::new(config, Instant::now(), Arc::new(Metrics::new().unwrap()))
}

fn no_limits() -> PeerLimitsConfig {
    PeerLimitsConfig {
        per_ip: None,
        per_prefix: None,
        connection_rate: None,
        message_rate: None,
        auth_failures: None,
        trusted: Vec::new(),
        max_entries: 1024,
    }
}

#[test]
fn per_ip_limit_uses_the_proxied_address() {
    let t0 = Instant::now();
    let peers = limiter(PeerLimitsConfig {
        per_ip: Some(1),
        ..no_limits()
    });
    let edge = Edge {
        peers: Some(peers),
        ..proxied(ProxyMode::V1)
    };
    let header = |ip: &str| format!("PROXY TCP4 {ip} 192.0.2.1 51000 25\r\n");
    // All from the same balancer: only the header's address counts.
    let mut a = open_edge(t0, edge.clone(), SOCKET_PEER);
    a.handle_input(t0, header("198.51.100.7").as_bytes());
    assert!(exchange(&mut a, t0).0.starts_with("220 "));
    let mut b = open_edge(t0, edge.clone(), SOCKET_PEER);
    b.handle_input(t0, header("198.51.100.8").as_bytes());
    assert!(exchange(&mut b, t0).0.starts_with("220 "));
    let mut c = open_edge(t0, edge.clone(), SOCKET_PEER);
    c.handle_input(t0, header("198.51.100.7").as_bytes());
    let (out, _) = exchange(&mut c, t0);
    assert!(
        out.starts_with("421 4.7.0 mx.test Too many connections from your address"),
        "{out}"
    );
    assert_eq!(c.state(), State::ShutdownWrite);
    let stats = taken(&mut c);
    assert_eq!(stats.refused[edge::Rejected::PerIp], 1);
    // Closing the first frees its slot.
    drop(a);
    let mut d = open_edge(t0, edge, SOCKET_PEER);
    d.handle_input(t0, header("198.51.100.7").as_bytes());
    assert!(exchange(&mut d, t0).0.starts_with("220 "));
}

#[test]
fn message_rate_refuses_mail_with_421() {
    let t0 = Instant::now();
    let edge = Edge {
        peers: Some(limiter(PeerLimitsConfig {
            message_rate: Some(PerMinute(2)),
            ..no_limits()
        })),
        ..Edge::default()
    };
    let mut conn = open_edge(t0, edge, "198.51.100.9:1000");
    let txn = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhi\r\n.\r\n";
    conn.handle_input(t0, b"EHLO c.test\r\n");
    for _ in 0..2 {
        conn.handle_input(t0, txn);
        assert!(exchange(&mut conn, t0).0.contains("queued"));
    }
    conn.handle_input(t0, txn);
    let (out, messages) = exchange(&mut conn, t0);
    assert!(messages.is_empty());
    assert!(
        out.starts_with("421 4.7.0 mx.test Too many messages from your address"),
        "{out}"
    );
    assert_eq!(conn.state(), State::ShutdownWrite);
}

/// An edge offering AUTH in plaintext (as on loopback), with a real verifier over a
/// users file holding alice/secret.
fn auth_edge(peers: Option<Arc<dyn PeerLimits>>) -> (Edge, tempfile::NamedTempFile) {
    let mut users = tempfile::NamedTempFile::new().unwrap();
    let hash = crate::auth::hash_password(b"secret").unwrap();
    users
        .write_all(format!("alice:{hash}\n").as_bytes())
        .unwrap();
    let verifier = crate::auth::Verifier::start(crate::auth::AuthSettings {
        users_file: users.path().to_owned(),
        max_failures_per_user: None,
        message_rate: None,
        threads: 1,
    })
    .unwrap();
    let edge = Edge {
        peers,
        auth: Some(EdgeAuth {
            policy: crate::smtp::session::AuthPolicy {
                plaintext: true,
                required: false,
                relay: false,
            },
            verifier,
        }),
        ..Edge::default()
    };
    (edge, users)
}

/// The driver hands credentials out, consumes nothing while they are verified, and
/// goes on with the pipelined input once the verdict is back.
#[test]
fn auth_waits_for_the_verifier_without_consuming_input() {
    let t0 = Instant::now();
    let (edge, _users) = auth_edge(None);
    let mut conn = open_edge(t0, edge, "198.51.100.9:1000");
    exchange(&mut conn, t0);
    // base64 of "\0alice\0secret", then a pipelined transaction.
    conn.handle_input(
        t0,
        b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.test>\r\n",
    );
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.contains("250-AUTH PLAIN LOGIN\r\n"), "{out}");
    assert!(!out.contains("235"), "{out}");
    assert!(conn.awaiting_auth() && !conn.wants_read());
    // Waiting for the verifier is not idleness.
    assert_eq!(conn.poll_timeout(), Some(conn.hard_deadline));
    let (request, verifier) = conn.poll_auth().unwrap();
    assert!(conn.poll_auth().is_none());
    let verdict = verifier.verify(&request);
    conn.handle_auth(t0, verdict);
    let (out, _) = exchange(&mut conn, t0);
    assert_eq!(
        out,
        "235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n"
    );
    let stats = taken(&mut conn);
    assert_eq!(stats.auth[crate::auth::AuthResult::Success], 1);
    assert_eq!(stats.auth.total(), 1);
}

#[test]
fn auth_failures_per_address_close_with_421() {
    let t0 = Instant::now();
    let peers = limiter(PeerLimitsConfig {
        auth_failures: Some(2),
        ..no_limits()
    });
    let (edge, _users) = auth_edge(Some(peers));
    let wrong = b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n";
    let mut conn = open_edge(t0, edge.clone(), "198.51.100.9:1000");
    exchange(&mut conn, t0);
    conn.handle_input(t0, b"EHLO c.test\r\n");
    exchange(&mut conn, t0);
    conn.handle_input(t0, wrong);
    let (request, verifier) = conn.poll_auth().unwrap();
    conn.handle_auth(t0, verifier.verify(&request));
    assert!(exchange(&mut conn, t0).0.starts_with("535 5.7.8 "));
    conn.handle_input(t0, wrong);
    let (request, verifier) = conn.poll_auth().unwrap();
    conn.handle_auth(t0, verifier.verify(&request));
    let (out, _) = exchange(&mut conn, t0);
    assert_eq!(
        out,
        "535 5.7.8 Authentication credentials invalid\r\n\
         421 4.7.0 mx.test Too many authentication failures, try again later\r\n"
    );
    assert_eq!(conn.state(), State::ShutdownWrite);
    let auth = taken(&mut conn).auth;
    assert_eq!(auth[crate::auth::AuthResult::Failure], 2);
    assert_eq!(auth[crate::auth::AuthResult::Locked], 1);
    assert_eq!(auth.total(), 3);
    // A new connection from the address gets 421 at its first AUTH, unverified.
    let mut again = open_edge(t0, edge, "198.51.100.9:1001");
    exchange(&mut again, t0);
    again.handle_input(t0, b"EHLO c.test\r\n");
    exchange(&mut again, t0);
    again.handle_input(t0, wrong);
    assert!(again.poll_auth().is_none());
    let (out, _) = exchange(&mut again, t0);
    assert!(
        out.starts_with("421 4.7.0 mx.test Too many authentication failures"),
        "{out}"
    );
}

#[test]
fn error_budget_closes_with_421() {
    let t0 = Instant::now();
    let edge = Edge {
        error_budget: Some(3),
        ..Edge::default()
    };
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    exchange(&mut conn, t0);
    conn.handle_input(
        t0,
        b"XYZZY\r\nRCPT TO:<x@example.com>\r\nNOOP\r\nBAD\r\nNOOP\r\n",
    );
    let (out, _) = exchange(&mut conn, t0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("500 ") && lines[1].starts_with("503 "));
    assert!(lines[2].starts_with("250 ") && lines[3].starts_with("500 "));
    assert!(
        lines[4].starts_with("421 4.7.0 mx.test Too many errors"),
        "{out}"
    );
    assert_eq!(conn.state(), State::ShutdownWrite);
}

// --- TLS ------------------------------------------------------------------------------

/// A self-signed certificate for `mx.test`, made by the openssl CLI.
fn certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=mx.test"])
        .args(["-addext", "subjectAltName=DNS:mx.test"])
        // An end-entity certificate (webpki refuses a CA certificate as a server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl CLI (needed to make a test certificate)");
    assert!(status.success());
    (cert, key)
}

struct Tls {
    _dir: tempfile::TempDir,
    handle: TlsHandle,
    client: Arc<ClientConfig>,
    client12: Arc<ClientConfig>,
}

fn tls() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let handle = TlsHandle::new(
        crate::certs::load(&cert, &key, crate::certs::TlsMinVersion::Tls12)
            .unwrap()
            .config,
    );
    let mut roots = RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let build = |versions: &[&'static rustls::SupportedProtocolVersion]| {
        Arc::new(
            ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        )
    };
    Tls {
        client: build(&[&rustls::version::TLS13, &rustls::version::TLS12]),
        client12: build(&[&rustls::version::TLS12]),
        handle,
        _dir: dir,
    }
}

/// Moves bytes both ways until neither side has anything to say; returns the
/// plaintext the client received and the messages the server completed.
fn pump(
    client: &mut ClientConnection,
    conn: &mut Connection,
    now: Instant,
) -> (String, Vec<Handed>) {
    let mut messages = Vec::new();
    let mut plain = Vec::new();
    loop {
        let mut progress = false;
        if conn.wants_write() {
            let out = conn.pending_output().to_vec();
            conn.output_written(now, out.len());
            let mut rd = &out[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
            }
            progress = true;
        }
        if let Some(m) = conn.poll_message(now, &mut fixed_stamp, hand) {
            let id = m.id;
            messages.push(m);
            conn.handle_publish(now, Ok(id));
            progress = true;
        }
        // As a backend does: only while the driver wants input.
        if client.wants_write() && conn.wants_read() {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            conn.handle_input(now, &buf);
            progress = true;
        }
        let mut chunk = [0u8; 4096];
        while let Ok(n) = client.reader().read(&mut chunk) {
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&chunk[..n]);
        }
        if !progress {
            return (String::from_utf8(plain).unwrap(), messages);
        }
    }
}

fn starttls_edge(t: &Tls) -> Edge {
    Edge {
        tls: Some(t.handle.clone()),
        ..Edge::default()
    }
}

fn implicit_edge(t: &Tls) -> Edge {
    Edge {
        implicit_tls: true,
        ..starttls_edge(t)
    }
}

/// The edge counts the connection kept since the last take.
fn taken(conn: &mut Connection) -> EdgeStats {
    let mut stats = EdgeStats::default();
    stats.absorb(&mut conn.edge_stats);
    stats
}

fn client(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config.clone(), ServerName::try_from("mx.test").unwrap()).unwrap()
}

#[test]
fn starttls_then_a_transaction_over_tls() {
    let t = tls();
    let t0 = Instant::now();
    let mut conn = open_edge(t0, starttls_edge(&t), SOCKET_PEER);
    conn.handle_input(t0, b"EHLO c.test\r\n");
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.contains("250-STARTTLS\r\n"), "{out}");
    conn.handle_input(t0, b"STARTTLS\r\n");
    let (out, _) = exchange(&mut conn, t0);
    assert_eq!(out, "220 2.0.0 Ready to start TLS\r\n");
    let mut c = client(&t.client);
    pump(&mut c, &mut conn, t0);
    assert!(!c.is_handshaking());
    // The session started over: EHLO again, without STARTTLS.
    c.writer().write_all(b"EHLO c.test\r\n").unwrap();
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(
        out.starts_with("250-mx.test") && !out.contains("STARTTLS"),
        "{out}"
    );
    c.writer().write_all(b"STARTTLS\r\n").unwrap();
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("503 5.5.1"), "{out}");
    c.writer().write_all(&TXN[13..]).unwrap();
    let (out, messages) = pump(&mut c, &mut conn, t0);
    assert!(out.contains("queued"), "{out}");
    // What the record's `smtp.tls` and the `with ESMTPS` of its `Received:` line are
    // written from (`sink::record`).
    let tls = messages[0].message.envelope.tls.as_deref().unwrap();
    assert!(tls.starts_with("TLSv1.3 TLS13_"), "{tls}");
    c.writer().write_all(b"QUIT\r\n").unwrap();
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("221 "), "{out}");
    assert_eq!(conn.state(), State::ShutdownWrite);
    let stats = taken(&mut conn);
    assert_eq!(stats.tls_handshakes[edge::TlsVersion::Tls13], 1);
    assert_eq!(stats.tls_handshakes.total(), 1);
}

#[test]
fn tls12_handshake_is_counted_by_version() {
    let t = tls();
    let t0 = Instant::now();
    let mut conn = open_edge(t0, starttls_edge(&t), SOCKET_PEER);
    conn.handle_input(t0, b"STARTTLS\r\n");
    exchange(&mut conn, t0);
    let mut c = client(&t.client12);
    pump(&mut c, &mut conn, t0);
    c.writer().write_all(TXN).unwrap();
    let (out, messages) = pump(&mut c, &mut conn, t0);
    assert!(out.contains("queued"), "{out}");
    assert!(messages[0]
        .message
        .envelope
        .tls
        .as_deref()
        .unwrap()
        .starts_with("TLSv1.2 TLS_ECDHE_"));
    let stats = taken(&mut conn);
    assert_eq!(stats.tls_handshakes[edge::TlsVersion::Tls12], 1);
    assert_eq!(stats.tls_handshakes.total(), 1);
}

/// CVE-2011-0411: commands pipelined after STARTTLS, in the same packet, must never be
/// executed, neither before nor after the handshake.
#[test]
fn commands_pipelined_after_starttls_are_discarded() {
    let t = tls();
    let t0 = Instant::now();
    let mut conn = open_edge(t0, starttls_edge(&t), SOCKET_PEER);
    conn.handle_input(
        t0,
        b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<x@example.com>\r\n",
    );
    let (out, _) = exchange(&mut conn, t0);
    assert!(out.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{out}");
    assert!(!out.contains("250 2.1.0"), "{out}");
    // More plaintext before the handshake is discarded too.
    let mut c = client(&t.client);
    pump(&mut c, &mut conn, t0);
    c.writer()
        .write_all(b"EHLO c.test\r\nRCPT TO:<x@example.com>\r\n")
        .unwrap();
    let (out, _) = pump(&mut c, &mut conn, t0);
    // No transaction survived the switch.
    assert!(out.contains("503 5.5.1 Need MAIL"), "{out}");
    let stats = taken(&mut conn);
    assert_eq!(
        stats.starttls_discarded_bytes,
        b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<x@example.com>\r\n".len() as u64
    );
}

#[test]
fn starttls_with_an_argument_and_without_a_certificate() {
    let t = tls();
    let t0 = Instant::now();
    let mut conn = open_edge(t0, starttls_edge(&t), SOCKET_PEER);
    conn.handle_input(t0, b"STARTTLS now\r\n");
    assert!(exchange(&mut conn, t0)
        .0
        .ends_with("501 5.5.4 This command takes no arguments\r\n"));
    let mut conn = open_edge(t0, Edge::default(), SOCKET_PEER);
    conn.handle_input(t0, b"EHLO c.test\r\nSTARTTLS\r\n");
    let (out, _) = exchange(&mut conn, t0);
    assert!(!out.contains("STARTTLS") && out.ends_with("502 5.5.1 Command not implemented\r\n"));
}

#[test]
fn require_tls_refuses_mail_before_starttls() {
    let t = tls();
    let t0 = Instant::now();
    let edge = Edge {
        require_tls: true,
        ..starttls_edge(&t)
    };
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    conn.handle_input(t0, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n");
    let (out, _) = exchange(&mut conn, t0);
    assert!(
        out.ends_with("530 5.7.0 Must issue a STARTTLS command first\r\n"),
        "{out}"
    );
    conn.handle_input(t0, b"STARTTLS\r\n");
    exchange(&mut conn, t0);
    let mut c = client(&t.client);
    pump(&mut c, &mut conn, t0);
    c.writer().write_all(TXN).unwrap();
    assert!(pump(&mut c, &mut conn, t0).0.contains("queued"));
}

#[test]
fn implicit_tls_greets_inside_tls() {
    let t = tls();
    let t0 = Instant::now();
    let edge = implicit_edge(&t);
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    assert!(!conn.wants_write(), "nothing in plaintext");
    let mut c = client(&t.client);
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("220 mx.test"), "{out}");
    c.writer().write_all(TXN).unwrap();
    let (out, messages) = pump(&mut c, &mut conn, t0);
    assert!(
        out.contains("250-mx.test") && !out.contains("STARTTLS"),
        "{out}"
    );
    assert!(out.contains("queued"), "{out}");
    assert!(messages[0].message.envelope.tls.is_some());
}

#[test]
fn implicit_tls_behind_proxy() {
    let t = tls();
    let t0 = Instant::now();
    let edge = Edge {
        implicit_tls: true,
        ..Edge {
            tls: Some(t.handle.clone()),
            ..proxied(ProxyMode::V2)
        }
    };
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    let mut c = client(&t.client);
    // Header and ClientHello in one read.
    let mut first = v2_tcp4([203, 0, 113, 9], 40001, &[]);
    c.write_tls(&mut first).unwrap();
    conn.handle_input(t0, &first);
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("220 mx.test"), "{out}");
    assert_eq!(conn.peer(), "203.0.113.9:40001".parse().unwrap());
}

/// A client whose ClientHello is large (24 ALPN names of 250 bytes: over 6,000 bytes,
/// several TCP segments), as a client with many extensions or a long SNI sends.
fn big_hello_client(t: &Tls) -> ClientConnection {
    let mut config = (*t.client).clone();
    config.alpn_protocols = (0..24u8).map(|i| vec![b'a' + i; 250]).collect();
    client(&Arc::new(config))
}

/// A client sends `header` and its ClientHello cut at `cuts` (positions in the two
/// together); returns what it reads once the handshake has run: the greeting inside
/// TLS proves every byte of the ClientHello arrived.
fn through_split_proxy(t: &Tls, mode: ProxyMode, header: &[u8], cuts: &[usize]) -> String {
    let t0 = Instant::now();
    let edge = Edge {
        implicit_tls: true,
        tls: Some(t.handle.clone()),
        ..proxied(mode)
    };
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    let mut c = big_hello_client(t);
    let mut wire = header.to_vec();
    c.write_tls(&mut wire).unwrap();
    let mut from = 0;
    for &cut in cuts.iter().chain([wire.len()].iter()) {
        let cut = cut.clamp(from, wire.len());
        conn.handle_input(t0, &wire[from..cut]);
        from = cut;
    }
    pump(&mut c, &mut conn, t0).0
}

/// Issue 20 item 6: a PROXY header that arrives in pieces, its last piece followed by a
/// large ClientHello in the same read: every byte after the header reaches TLS, for
/// every cut of header + ClientHello into two reads, the header in three pieces, and
/// one byte per read.
#[test]
fn every_byte_after_a_split_proxy_header_reaches_tls() {
    let t = tls();
    let mut hello = Vec::new();
    big_hello_client(&t).write_tls(&mut hello).unwrap();
    assert!(hello.len() > 6_000, "{}", hello.len());
    let v1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 465\r\n".to_vec();
    let v2 = v2_tcp4([203, 0, 113, 9], 40001, &[]);
    for (mode, header) in [(ProxyMode::V1, v1), (ProxyMode::V2, v2)] {
        let total = header.len() + hello.len();
        let greeted = |cuts: &[usize]| through_split_proxy(&t, mode, &header, cuts);
        for cut in 1..total {
            let out = greeted(&[cut]);
            assert!(
                out.starts_with("220 mx.test"),
                "{mode:?} cut at {cut}: {out:?}"
            );
        }
        // The header in three pieces, the last with the whole ClientHello.
        for first in 1..header.len() - 1 {
            let out = greeted(&[first, header.len() - 1]);
            assert!(
                out.starts_with("220 mx.test"),
                "{mode:?} header cut at {first}"
            );
        }
        let every: Vec<usize> = (1..total).collect();
        let out = greeted(&every);
        assert!(
            out.starts_with("220 mx.test"),
            "{mode:?} byte by byte: {out:?}"
        );
    }
}

/// The same with a real client all the way: the header in two pieces, the second with
/// the whole ClientHello; the handshake completes and the session runs inside TLS.
#[test]
fn a_split_proxy_header_then_a_big_client_hello_gets_a_session() {
    let t = tls();
    let t0 = Instant::now();
    let edge = Edge {
        implicit_tls: true,
        tls: Some(t.handle.clone()),
        ..proxied(ProxyMode::V1)
    };
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    let mut c = big_hello_client(&t);
    let header = b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 465\r\n";
    conn.handle_input(t0, &header[..10]);
    let mut second = header[10..].to_vec();
    c.write_tls(&mut second).unwrap();
    conn.handle_input(t0, &second);
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("220 mx.test"), "{out}");
    assert_eq!(conn.peer(), "203.0.113.9:40001".parse().unwrap());
    c.writer().write_all(TXN).unwrap();
    let (out, messages) = pump(&mut c, &mut conn, t0);
    assert!(out.contains("queued"), "{out}");
    assert_eq!(
        messages[0].message.envelope.client_addr,
        "203.0.113.9:40001".parse().unwrap()
    );
}

/// Issue 20 item 7: a message's final dot and, in the same read, a record that fails
/// to decrypt. The message whose end arrived intact is stored and its `250` is written,
/// encrypted before the alert, then the connection closes.
#[test]
fn a_final_dot_before_a_bad_record_in_the_same_read_is_answered() {
    let t = tls();
    let t0 = Instant::now();
    let mut conn = open_edge(t0, implicit_edge(&t), SOCKET_PEER);
    let mut c = client(&t.client);
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("220 mx.test"), "{out}");
    let mut wire = Vec::new();
    c.writer().write_all(TXN).unwrap();
    c.write_tls(&mut wire).unwrap();
    let mut bad = Vec::new();
    c.writer().write_all(b"QUIT\r\n").unwrap();
    c.write_tls(&mut bad).unwrap();
    // A flipped bit in the tag: the record fails authentication (bad_record_mac).
    *bad.last_mut().unwrap() ^= 1;
    wire.extend_from_slice(&bad);
    conn.handle_input(t0, &wire);
    let handed = conn
        .poll_message(t0, &mut fixed_stamp, hand)
        .expect("the message whose end arrived intact goes to the sink");
    assert_eq!(handed.message.body(), b"hi\r\n");
    conn.handle_publish(t0, Ok(handed.id));
    let mut out = Vec::new();
    while conn.wants_write() {
        let n = conn.pending_output().len();
        out.extend_from_slice(conn.pending_output());
        conn.output_written(t0, n);
    }
    assert_eq!(conn.state(), State::ShutdownWrite, "the bad record ends it");
    // The client reads the replies, then the alert.
    let mut rd = &out[..];
    let mut failed = None;
    while !rd.is_empty() && failed.is_none() {
        c.read_tls(&mut rd).unwrap();
        failed = c.process_new_packets().err();
    }
    assert!(
        matches!(failed, Some(rustls::Error::AlertReceived(_))),
        "{failed:?}"
    );
    let mut plain = String::new();
    let _ = c.reader().read_to_string(&mut plain);
    // The last reply before the alert is the message's; QUIT never arrived intact.
    let last = plain.lines().last().unwrap_or_default();
    assert!(last.starts_with("250 2.0.0 Ok: queued as "), "{plain}");
}

/// Records are decrypted only as the session takes their plaintext: a command cut
/// across records, and far more pipelined replies than the output cap, all answered.
#[test]
fn records_wait_while_the_session_cannot_take_input() {
    let t = tls();
    let t0 = Instant::now();
    let mut conn = open_edge(t0, implicit_edge(&t), SOCKET_PEER);
    let mut c = client(&t.client);
    pump(&mut c, &mut conn, t0);
    let mut wire = Vec::new();
    for piece in [
        &b"EHLO c.test\r\nNO"[..],
        b"OP\r\n",
        &b"HELP\r\n".repeat(500),
        b"QUIT\r\n",
    ] {
        c.writer().write_all(piece).unwrap();
        c.write_tls(&mut wire).unwrap();
    }
    conn.handle_input(t0, &wire);
    assert!(!conn.wants_read(), "replies past the cap stop the reading");
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert_eq!(out.matches("\r\n214 ").count(), 500, "{out}");
    assert!(out.contains("\r\n250 2.0.0 Ok\r\n214"), "{out}");
    assert!(
        out.ends_with("221 2.0.0 mx.test closing connection\r\n"),
        "{out}"
    );
}

fn timed_edge(t: &Tls, implicit: bool) -> Edge {
    Edge {
        implicit_tls: implicit,
        tls_handshake_timeout: Some(Duration::from_secs(10)),
        ..starttls_edge(t)
    }
}

/// Issue 20 item 5: a handshake that never starts, or trickles, is closed at the
/// handshake deadline (10 s here, the idle timeout being 60 s), unanswered.
#[test]
fn silent_and_trickling_handshakes_close_at_the_deadline() {
    let t = tls();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    // Silent.
    let mut conn = open_edge(t0, timed_edge(&t, true), SOCKET_PEER);
    assert_eq!(conn.poll_timeout(), Some(deadline));
    conn.handle_timeout(deadline - Duration::from_millis(1));
    assert_eq!(conn.state(), State::Open);
    conn.handle_timeout(deadline);
    assert_eq!(conn.state(), State::Done);
    assert!(!conn.wants_write());
    assert_eq!(taken(&mut conn).tls_failures[edge::TlsFailure::Timeout], 1);
    // Trickling: a byte of the ClientHello a second keeps it no longer.
    let mut conn = open_edge(t0, timed_edge(&t, true), SOCKET_PEER);
    let mut hello = Vec::new();
    client(&t.client).write_tls(&mut hello).unwrap();
    let mut now = t0;
    for byte in hello.chunks(1) {
        now += Duration::from_secs(1);
        if conn.poll_timeout().is_some_and(|d| d <= now) {
            conn.handle_timeout(now);
        }
        if conn.state() != State::Open {
            break;
        }
        conn.handle_input(now, byte);
    }
    assert_eq!(conn.state(), State::Done, "closed at {:?}", now - t0);
    assert_eq!(now, deadline);
    // After STARTTLS the clock starts once the 220 is written.
    let mut conn = open_edge(t0, timed_edge(&t, false), SOCKET_PEER);
    assert_eq!(conn.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    let later = t0 + Duration::from_secs(30);
    conn.handle_input(later, b"STARTTLS\r\n");
    exchange(&mut conn, later);
    assert_eq!(conn.poll_timeout(), Some(later + Duration::from_secs(10)));
    conn.handle_timeout(later + Duration::from_secs(10));
    assert_eq!(conn.state(), State::Done);
    // A handshake done in time leaves only the idle timeout.
    let mut conn = open_edge(t0, timed_edge(&t, true), SOCKET_PEER);
    let mut c = client(&t.client);
    let (out, _) = pump(&mut c, &mut conn, t0);
    assert!(out.starts_with("220 "), "{out}");
    assert_eq!(conn.poll_timeout(), Some(t0 + Duration::from_secs(60)));
}

/// A drain that begins during a handshake closes the session, but the handshake's
/// deadline still holds: a client that stops mid-handshake is not kept until the drain
/// deadline (or its 421, which it cannot read, is written).
#[test]
fn a_handshake_cut_by_a_drain_still_ends_at_its_deadline() {
    let t = tls();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(10);
    let mut conn = open_edge(t0, timed_edge(&t, true), SOCKET_PEER);
    let mut hello = Vec::new();
    client(&t.client).write_tls(&mut hello).unwrap();
    // The whole ClientHello: the server's flight goes out, the client's never comes.
    conn.handle_input(t0 + Duration::from_secs(1), &hello);
    conn.begin_drain(t0 + Duration::from_secs(2));
    assert_eq!(conn.poll_timeout(), Some(deadline));
    conn.handle_timeout(deadline);
    assert_eq!(conn.state(), State::Done);
    assert_eq!(taken(&mut conn).tls_failures[edge::TlsFailure::Timeout], 1);
}

/// Issue 20 item 5: a client may send at most `MAX_HANDSHAKE_INPUT` before its
/// handshake is done; a ClientHello larger than that (here 18 KB, cut short or not)
/// fails the handshake instead of being buffered.
#[test]
fn a_handshake_larger_than_its_bound_is_failed() {
    let t = tls();
    let t0 = Instant::now();
    let mut config = (*t.client).clone();
    config.alpn_protocols = (0..72u8).map(|i| vec![b'!' + i; 250]).collect();
    let mut hello = Vec::new();
    client(&Arc::new(config)).write_tls(&mut hello).unwrap();
    assert!(hello.len() > MAX_HANDSHAKE_INPUT + 1000, "{}", hello.len());
    for cut in [
        MAX_HANDSHAKE_INPUT - 100,
        MAX_HANDSHAKE_INPUT + 1,
        hello.len(),
    ] {
        let mut conn = open_edge(t0, implicit_edge(&t), SOCKET_PEER);
        // In reads of 1,000 bytes, as segments arrive.
        for piece in hello[..cut].chunks(1000) {
            conn.handle_input(t0, piece);
        }
        if cut <= MAX_HANDSHAKE_INPUT {
            assert_eq!(
                conn.state(),
                State::Open,
                "{cut} bytes are within the bound"
            );
            continue;
        }
        assert_eq!(conn.state(), State::Done, "{cut}");
        assert_eq!(conn.ending(), Some(Ending::Overrun));
        assert_eq!(
            taken(&mut conn).tls_failures[edge::TlsFailure::BadMessage],
            1
        );
    }
}

#[test]
fn garbage_instead_of_a_handshake_closes() {
    let t = tls();
    let t0 = Instant::now();
    let edge = implicit_edge(&t);
    let mut conn = open_edge(t0, edge, SOCKET_PEER);
    conn.handle_input(t0, b"EHLO c.test\r\n");
    // An alert may be written, then the connection closes.
    exchange(&mut conn, t0);
    assert_ne!(conn.state(), State::Open);
    let stats = taken(&mut conn);
    assert_eq!(stats.tls_failures.total(), 1);
    assert_eq!(stats.tls_handshakes.total(), 0);
}

#[test]
fn a_reloaded_certificate_serves_new_handshakes_only() {
    let t = tls();
    let t0 = Instant::now();
    let mut old = open_edge(t0, implicit_edge(&t), SOCKET_PEER);
    let mut c_old = client(&t.client);
    pump(&mut c_old, &mut old, t0);
    // A new certificate the client does not trust.
    let other = tls();
    t.handle.replace(other.handle.current());
    let mut new = open_edge(t0, implicit_edge(&t), SOCKET_PEER);
    let mut c_new = client(&other.client);
    let (out, _) = pump(&mut c_new, &mut new, t0);
    assert!(out.starts_with("220 "), "{out}");
    // The open session goes on with its own keys.
    c_old.writer().write_all(TXN).unwrap();
    assert!(pump(&mut c_old, &mut old, t0).0.contains("queued"));
}

#[test]
fn cidr_parsing_and_matching() {
    let c = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(c.contains("10.1.200.3".parse::<IpAddr>().unwrap()));
    assert!(c.contains("::ffff:10.1.2.3".parse::<IpAddr>().unwrap()));
    assert!(!c.contains("10.2.0.1".parse::<IpAddr>().unwrap()));
    assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    assert!(Cidr::parse("2001:db8::/32")
        .unwrap()
        .contains("2001:db8:ffff::1".parse().unwrap()));
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains("192.0.2.1".parse().unwrap()));
    for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129", ""] {
        assert!(Cidr::parse(bad).is_err(), "{bad}");
    }
}

/// `--auth-allow-plaintext` is for clients on the gateway's own host. Behind a PROXY
/// header the real client decides: a remote one (whose credentials crossed the network
/// to the balancer in the clear) gets no AUTH before TLS; a loopback one keeps it.
#[test]
fn plaintext_auth_only_for_a_loopback_client_behind_proxy() {
    let t0 = Instant::now();
    for (header, offered) in [
        (
            &b"PROXY TCP4 198.51.100.7 127.0.0.1 51000 25\r\n"[..],
            false,
        ),
        (b"PROXY UNKNOWN\r\n", false),
        (b"PROXY TCP4 127.0.0.1 127.0.0.1 51000 25\r\n", true),
        (b"PROXY TCP6 ::1 ::1 51000 25\r\n", true),
    ] {
        let (mut edge, _users) = auth_edge(None);
        edge.proxy = ProxyMode::V1;
        edge.proxy_trusted = vec![Cidr::parse("127.0.0.0/8").unwrap()];
        let mut conn = open_edge(t0, edge, "127.0.0.1:4000");
        conn.handle_input(t0, header);
        conn.handle_input(t0, b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let (out, _) = exchange(&mut conn, t0);
        let name = String::from_utf8_lossy(header);
        assert_eq!(
            out.contains("250-AUTH PLAIN LOGIN\r\n"),
            offered,
            "{name}: {out}"
        );
        if offered {
            let (request, verifier) = conn.poll_auth().expect("credentials taken");
            conn.handle_auth(t0, verifier.verify(&request));
            assert!(exchange(&mut conn, t0).0.starts_with("235 "), "{name}");
        } else {
            assert!(conn.poll_auth().is_none(), "{name}");
            assert!(
                out.ends_with(std::str::from_utf8(crate::smtp::reply::AUTH_NEEDS_TLS).unwrap()),
                "{name}: {out}"
            );
        }
    }
}

/// A client that leaves while its credentials are verified never hears the verdict,
/// so the driver never counts it: without counting the abandoned attempt, one address
/// could keep the verifier pool busy (AUTH, close, again) and never reach
/// `--max-auth-failures-per-ip`.
#[test]
fn auth_abandoned_during_verification_counts_as_a_failure() {
    let t0 = Instant::now();
    let peers = limiter(PeerLimitsConfig {
        auth_failures: Some(2),
        ..no_limits()
    });
    let (edge, _users) = auth_edge(Some(peers));
    for port in [1000, 1001] {
        let mut conn = open_edge(t0, edge.clone(), &format!("198.51.100.9:{port}"));
        exchange(&mut conn, t0);
        conn.handle_input(t0, b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHdyb25n\r\n");
        exchange(&mut conn, t0);
        assert!(conn.poll_auth().is_some());
        conn.handle_eof(t0);
        drop(conn);
    }
    let mut again = open_edge(t0, edge, "198.51.100.9:1002");
    exchange(&mut again, t0);
    again.handle_input(t0, b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    assert!(again.poll_auth().is_none());
    let (out, _) = exchange(&mut again, t0);
    assert!(
        out.contains("421 4.7.0 mx.test Too many authentication failures"),
        "{out}"
    );
}

/// A v2 header may be `MAX_HEADER` bytes long and no longer, also when it arrives
/// whole in one read (the incomplete case has its own bound).
#[test]
fn a_whole_v2_header_longer_than_its_bound_is_invalid() {
    let header_of = |total: usize| {
        // One NOOP TLV pads the header: 16 fixed bytes, 12 of addresses, 3 of TLV head.
        let mut tlv = vec![0x04];
        let value = vec![0u8; total - 16 - 12 - 3];
        tlv.extend_from_slice(&(value.len() as u16).to_be_bytes());
        tlv.extend_from_slice(&value);
        let h = v2_tcp4([203, 0, 113, 9], 40001, &tlv);
        assert_eq!(h.len(), total);
        h
    };
    let at = header_of(proxy::MAX_HEADER);
    assert!(matches!(
        proxy::parse(ProxyMode::V2, &at),
        proxy::Parsed::Header { len, .. } if len == proxy::MAX_HEADER
    ));
    let over = header_of(proxy::MAX_HEADER + 1);
    assert!(matches!(
        proxy::parse(ProxyMode::V2, &over),
        proxy::Parsed::Invalid
    ));
}

/// Taking a connection's counts adds every one of them and leaves the source at zero.
#[test]
fn absorbing_edge_stats_adds_every_count_and_zeroes_the_source() {
    let mut total = EdgeStats {
        proxy_headers: 2,
        starttls_discarded_bytes: 5,
        ..EdgeStats::default()
    };
    let mut more = EdgeStats {
        proxy_headers: 3,
        starttls_discarded_bytes: 7,
        ..EdgeStats::default()
    };
    total.absorb(&mut more);
    assert_eq!(
        (total.proxy_headers, total.starttls_discarded_bytes),
        (5, 12)
    );
    assert_eq!(more, EdgeStats::default());
}

/// A record header that is no TLS record's (content type outside 20-24, a version
/// other than 3.x) or that claims the most a record may carry (2^14 + 2,048 bytes of
/// payload) or more is given back alone, for rustls to refuse at once; any other is
/// awaited whole.
#[test]
fn a_tls_record_header_that_cannot_be_one_is_not_awaited() {
    let max: u16 = (1 << 14) + 2048;
    let header = |kind: u8, major: u8, payload: u16| {
        let [hi, lo] = payload.to_be_bytes();
        [kind, major, 3, hi, lo]
    };
    assert_eq!(tls::declared_record_len(&header(22, 3, max)), Some(5));
    assert_eq!(tls::declared_record_len(&header(22, 3, u16::MAX)), Some(5));
    assert_eq!(tls::declared_record_len(&header(25, 3, 10)), Some(5));
    assert_eq!(tls::declared_record_len(&header(19, 3, 10)), Some(5));
    assert_eq!(tls::declared_record_len(&header(22, 2, 10)), Some(5));
    assert_eq!(tls::declared_record_len(&header(23, 3, 10)), Some(15));
    assert_eq!(
        tls::declared_record_len(&header(22, 3, max - 1)),
        Some(5 + usize::from(max - 1))
    );
}

/// Each failed handshake is counted under its cause (`smtpgw_tls_handshake_failures_total`).
#[test]
fn handshake_failures_are_counted_by_their_cause() {
    use rustls::{AlertDescription, Error, PeerIncompatible};
    let label = |e: Error| tls::failure(&e).as_str();
    assert_eq!(
        label(Error::AlertReceived(AlertDescription::HandshakeFailure)),
        "alert_received"
    );
    assert_eq!(
        label(Error::PeerIncompatible(
            PeerIncompatible::NoCipherSuitesInCommon
        )),
        "incompatible"
    );
    assert_eq!(label(Error::NoCertificatesPresented), "incompatible");
    assert_eq!(label(Error::DecryptError), "bad_message");
    assert_eq!(label(Error::General("other".into())), "other");
}
