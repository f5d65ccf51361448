//! The differential harness behind the `connection_feed` fuzz target: the connection
//! driver (PROXY header, error budget, output cap, sink answers) fed a client stream
//! whole and cut at chosen points must write the same bytes, publish the same messages
//! (their `Received:` line included, which carries the PROXY header's address) and end
//! in the same state.
//!
//! Input format: the same as `session_feed`'s ([`crate::Case`]), with the end of a
//! PROXY header at the stream's start always a read boundary in both runs: a client
//! speaks only once it has the greeting, which comes after the header; bytes in the
//! header's own read are an early talker's (`554`), rightly, so a cut there would
//! change the outcome. Cuts inside the header are made like any other. Flag bits:
//! bits 0-1 pick the PROXY mode (off, v1, v2, either), bit 2 turns on an error budget of
//! 3, bit 3 makes the sink refuse every second message temporarily, bit 4 requires TLS
//! for MAIL (there is no certificate, so MAIL gets `530`), bit 5 trusts no PROXY source
//! (a header is then refused with nothing sent), bit 7 offers AUTH (in plaintext, as on
//! loopback; credentials answered at once by `crate::verify`'s stand-in, the address
//! locked after 3 failures).

use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
use smtpgw::conn::{
    BodyBudget, Cidr, Connection, ConnectionSettings, Edge, EdgeAuth, PeerLimits, ProxyMode, State,
    TlsHandle,
};
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::PublishError;
use smtpgw::smtp::{BareLfPolicy, MessageId, SessionConfig};

use crate::MAX_MESSAGE_SIZE;

/// Everything a client and the sink would see of one connection.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectionTranscript {
    pub written: Vec<u8>,
    /// The whole stored value (`Received:` line and message) of every accepted message.
    pub published: Vec<Vec<u8>>,
    pub state: State,
}

fn edge(flags: u8) -> Edge {
    Edge {
        proxy: match flags & 3 {
            0 => ProxyMode::Off,
            1 => ProxyMode::V1,
            2 => ProxyMode::V2,
            _ => ProxyMode::Any,
        },
        proxy_trusted: if flags & 32 == 0 {
            vec![Cidr::parse("127.0.0.0/8").expect("literal")]
        } else {
            Vec::new()
        },
        error_budget: (flags & 4 != 0).then_some(3),
        require_tls: flags & 16 != 0,
        implicit_tls: flags & TLS != 0,
        tls: (flags & TLS != 0).then(|| TlsHandle::new(tls_configs().0.clone())),
        auth: (flags & AUTH != 0).then(|| EdgeAuth {
            policy: smtpgw::smtp::session::AuthPolicy {
                plaintext: true,
                required: false,
                relay: true,
            },
            verifier: verifier().clone(),
        }),
        peers: (flags & AUTH != 0).then(|| {
            smtpgw::limits::PeerLimiter::new(
                smtpgw::limits::PeerLimitsConfig {
                    per_ip: None,
                    per_prefix: None,
                    connection_rate: None,
                    message_rate: None,
                    auth_failures: Some(3),
                    trusted: Vec::new(),
                    max_entries: 1024,
                },
                Instant::now(),
                Arc::new(smtpgw::metrics::Metrics::new().expect("metrics")),
            ) as Arc<dyn PeerLimits>
        }),
        ..Edge::default()
    }
}

/// Flag bit 7: AUTH offered.
pub const AUTH: u8 = 128;

/// The verifier an AUTH edge needs; the harness never calls it (its stand-in answers
/// at once), so its users file is empty.
fn verifier() -> &'static Arc<smtpgw::auth::Verifier> {
    static VERIFIER: OnceLock<Arc<smtpgw::auth::Verifier>> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let file = std::env::temp_dir().join(format!("smtpgw-fuzz-users-{}", std::process::id()));
        std::fs::write(&file, "").expect("users file");
        let verifier = smtpgw::auth::Verifier::start(smtpgw::auth::AuthSettings {
            users_file: file.clone(),
            max_failures_per_user: None,
            message_rate: None,
            threads: 1,
        })
        .expect("verifier");
        // Read once; never reloaded.
        let _ = std::fs::remove_file(&file);
        verifier
    })
}

/// Flag bit 6: an implicit-TLS listener.
pub const TLS: u8 = 64;

const CERT: &[u8] = include_bytes!("../tls/mx.test.crt");
const KEY: &[u8] = include_bytes!("../tls/mx.test.key");

/// The server's configuration and a client's that trusts it and sends a ClientHello of
/// over 6 KB (24 ALPN names of 250 bytes, which a server without ALPN ignores).
fn tls_configs() -> &'static (Arc<ServerConfig>, Arc<ClientConfig>) {
    static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(CERT)
            .collect::<Result<_, _>>()
            .expect("fuzz/tls certificate");
        let key = PrivateKeyDer::from_pem_slice(KEY).expect("fuzz/tls key");
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key)
            .expect("certificate and key");
        let mut roots = RootCertStore::empty();
        roots.add(certs[0].clone()).expect("root");
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = (0..24u8).map(|i| vec![b'a' + i; 250]).collect();
        (Arc::new(server), Arc::new(client))
    })
}

/// Feeds `pieces` as a backend would: after every read, writes out everything pending
/// and answers every message at once; then the end of the stream. With [`TLS`] the
/// pieces' boundaries cut the client's first flight instead (see the module doc).
pub fn run_connection(flags: u8, pieces: &[&[u8]]) -> ConnectionTranscript {
    let now = Instant::now();
    let session = Arc::new(SessionConfig {
        hostname: "fuzz.test".into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: MAX_MESSAGE_SIZE,
        max_recipients: 4,
        bare_lf: BareLfPolicy::Reject,
        headroom: smtpgw::sink::record::RECEIVED_HEADROOM + "fuzz.test".len(),
    });
    let limits = Arc::new(ConnectionSettings {
        idle_timeout: Duration::from_secs(60),
        max_session_time: Duration::from_secs(3600),
        min_data_rate: None,
        // Small, so the fuzzer reaches the cap that stops input behind unread output.
        output_cap: 512,
        sink: "fuzz",
    });
    let mut conn = Connection::new(
        now,
        session,
        limits,
        BodyBudget::new(1 << 20),
        "127.0.0.1:40000".parse().expect("literal"),
        Arc::new(edge(flags)),
    );
    let mut run = Run {
        now,
        flags,
        out: Vec::new(),
        published: Vec::new(),
        taken: 0,
    };
    if flags & TLS != 0 {
        return run.tls(conn, pieces);
    }
    for piece in pieces {
        run.settle(&mut conn);
        if conn.state() != State::Open {
            break;
        }
        conn.handle_input(now, piece);
    }
    run.settle(&mut conn);
    if conn.state() == State::Open {
        conn.handle_eof(now);
        run.settle(&mut conn);
    }
    ConnectionTranscript {
        written: run.out,
        published: run.published,
        state: conn.state(),
    }
}

/// One run's sink and what the connection wrote.
struct Run {
    now: Instant,
    flags: u8,
    /// The driver's output (with TLS: records, which the client takes).
    out: Vec<u8>,
    published: Vec<Vec<u8>>,
    taken: u64,
}

impl Run {
    /// Writes out everything pending and answers every message, until neither moves.
    fn settle(&mut self, conn: &mut Connection) {
        loop {
            let mut progressed = false;
            if conn.wants_write() {
                let n = conn.pending_output().len();
                self.out.extend_from_slice(conn.pending_output());
                conn.output_written(self.now, n);
                progressed = true;
            }
            let taken = &mut self.taken;
            let mut stamp = || {
                *taken += 1;
                (
                    MessageId::from(u128::from(*taken)),
                    chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("literal"),
                )
            };
            if let Some((request, _)) = conn.poll_auth() {
                conn.handle_auth(self.now, crate::verify(&request));
                progressed = true;
            }
            if let Some(message) = conn.poll_message(self.now, &mut stamp, SealedMessage::seal) {
                let result = if self.flags & 8 != 0 && self.taken.is_multiple_of(2) {
                    Err(PublishError::Temporary("fuzz: sink down".into()))
                } else {
                    self.published.push(message.value.to_vec());
                    Ok(message.id)
                };
                conn.handle_publish(self.now, result);
                progressed = true;
            }
            if !progressed {
                return;
            }
        }
    }

    /// The TLS run: header and ClientHello cut where `pieces` are, then the handshake
    /// and the plaintext through a real client; the transcript is what it decrypts.
    fn tls(mut self, mut conn: Connection, pieces: &[&[u8]]) -> ConnectionTranscript {
        let stream = pieces.concat();
        let header = proxy_header_len(&stream);
        let mut client = ClientConnection::new(
            tls_configs().1.clone(),
            ServerName::try_from("mx.test").expect("literal"),
        )
        .expect("client");
        let mut flight = stream[..header].to_vec();
        client.write_tls(&mut flight).expect("ClientHello");
        // Sent once the handshake is done (rustls holds it until then).
        client
            .writer()
            .write_all(&stream[header..])
            .expect("client buffer");
        // The pieces' boundaries (not the stream's end) cut the first flight.
        let mut from = 0;
        let mut at = 0;
        for piece in pieces.split_last().map_or(&[][..], |(_, init)| init) {
            at += piece.len();
            if at > from && at < flight.len() {
                conn.handle_input(self.now, &flight[from..at]);
                from = at;
            }
        }
        conn.handle_input(self.now, &flight[from..]);
        let mut plain = Vec::new();
        let mut client_ok = true;
        loop {
            self.settle(&mut conn);
            let mut progressed = false;
            if !self.out.is_empty() && client_ok {
                let mut rd = &self.out[..];
                while !rd.is_empty() && client_ok {
                    client_ok =
                        client.read_tls(&mut rd).is_ok() && client.process_new_packets().is_ok();
                }
                self.out.clear();
                let _ = client.reader().read_to_end(&mut plain);
                progressed = true;
            }
            if client_ok && client.wants_write() && conn.state() == State::Open && conn.wants_read()
            {
                let mut records = Vec::new();
                client.write_tls(&mut records).expect("client records");
                conn.handle_input(self.now, &records);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        if conn.state() == State::Open {
            conn.handle_eof(self.now);
            self.settle(&mut conn);
        }
        ConnectionTranscript {
            written: plain,
            published: self.published,
            state: conn.state(),
        }
    }
}

/// How long the PROXY header at the start of `stream` is, by the specification (v1: up
/// to the first CRLF of a line starting `PROXY `, at most 107 bytes; v2: the 16-byte
/// preamble and the length it gives), or 0 if the stream does not start with one.
/// Written from the spec, not the driver's parser, so the two cannot agree by mistake.
pub fn proxy_header_len(stream: &[u8]) -> usize {
    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    if stream.starts_with(b"PROXY ") {
        let line = &stream[..stream.len().min(107)];
        return line
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(0, |at| at + 2);
    }
    if stream.starts_with(V2_SIGNATURE) && stream.len() >= 16 {
        let len = 16 + usize::from(u16::from_be_bytes([stream[14], stream[15]]));
        return if len <= stream.len() { len } else { 0 };
    }
    0
}

/// The case's stream cut at the end of its PROXY header (if any, and not with [`TLS`])
/// and, with `split`, at the case's points; plus `extra` points.
pub fn case_pieces<'a>(case: &crate::Case<'a>, extra: &[usize], split: bool) -> Vec<&'a [u8]> {
    let stream = case.stream;
    // With TLS the header's end is no boundary: the ClientHello follows it at once.
    let mut cuts = if case.flags & TLS == 0 {
        vec![proxy_header_len(stream)]
    } else {
        Vec::new()
    };
    if split {
        cuts.extend(&case.cuts);
    }
    cuts.extend(extra.iter().map(|&c| c.min(stream.len())));
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for cut in cuts {
        pieces.push(&stream[from..cut]);
        from = cut;
    }
    pieces.push(&stream[from..]);
    pieces
}

/// The differential check: the stream whole (but for the end of its PROXY header) and
/// cut at the case's points agree.
pub fn check_connection(data: &[u8]) {
    let Some(case) = crate::Case::decode(data) else {
        return;
    };
    let whole = run_connection(case.flags, &case_pieces(&case, &[], false));
    let split = run_connection(case.flags, &case_pieces(&case, &[], true));
    case.assert_agree(&whole, &split);
}
