//! Client behaviours: what each simulated client sends and what it expects back. A
//! script is a list of groups of commands; a client sends a group (pipelined when it
//! has several commands) and, unless it is a blaster, waits for every reply of the
//! group before the next. Each command carries what may answer it, so replies are
//! checked in command order as they arrive; a message's body is kept as the sink must
//! store it (dot-unstuffed, BDAT chunks joined) for the record check.
//!
//! TLS clients put a real rustls `ClientConnection` between their script and the wire
//! (after STARTTLS's `220`, or from the first byte on the implicit-TLS listener); the
//! script's commands go into it as plaintext and its records onto the socket. Clients
//! that misbehave at the handshake send raw bytes instead: garbage, or part of a
//! ClientHello and then nothing.

use std::collections::VecDeque;
use std::io::{Read, Write};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustls::ClientConnection;

use smtpgw::smtp::BareLfPolicy;

use crate::sim_support::Rng;
use crate::tls;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Lock-step: one command, one reply.
    Mta,
    /// MAIL, RCPT and DATA in one write (RFC 2920), the body after the 354.
    Pipelining,
    /// MAIL, RCPT and every BDAT chunk in one write (RFC 3030); some pipeline the
    /// next transaction behind `BDAT 0 LAST`.
    Bdat,
    /// Lock-step, one byte per write.
    Trickle,
    /// Pipelines thousands of commands and never reads a reply.
    NeverReads,
    /// Resets the connection in the middle of a body.
    ResetMidData,
    /// Talks before the (delayed) greeting.
    EarlyTalker,
    /// On the PROXY listener: a header first (sometimes a broken one).
    Proxied,
    /// Bare LF and `<LF>.<LF>` in a body, with commands behind them.
    Smuggler,
    /// Command lines and messages over the limits.
    Oversized,
    /// STARTTLS, then transactions over TLS; some authenticate (PLAIN or LOGIN), some
    /// give a wrong password or malformed base64, some try AUTH before TLS first.
    StartTls,
    /// STARTTLS answered, then garbage instead of a ClientHello.
    TlsGarbage,
    /// STARTTLS answered, then part of a ClientHello and silence.
    TlsStall,
    /// Commands pipelined behind STARTTLS in the same write (RFC 3207 section 4.2:
    /// the gateway must discard them), then TLS and a transaction.
    TlsInjector,
    /// On a `--require-tls` listener: MAIL (`530`) and sometimes AUTH (`538`) before
    /// STARTTLS, then TLS and a transaction.
    TlsRequired,
    /// On the `--listen-tls` listener: TLS from the first byte (sometimes garbage or a
    /// stalled handshake there too).
    ImplicitTls,
}

pub const KINDS: [Kind; 16] = [
    Kind::Mta,
    Kind::Pipelining,
    Kind::Bdat,
    Kind::Trickle,
    Kind::NeverReads,
    Kind::ResetMidData,
    Kind::EarlyTalker,
    Kind::Proxied,
    Kind::Smuggler,
    Kind::Oversized,
    Kind::StartTls,
    Kind::TlsGarbage,
    Kind::TlsStall,
    Kind::TlsInjector,
    Kind::TlsRequired,
    Kind::ImplicitTls,
];

impl Kind {
    /// Whether the client starts TLS (and so connects to a listener with a
    /// certificate).
    pub fn tls(self) -> bool {
        matches!(
            self,
            Kind::StartTls
                | Kind::TlsGarbage
                | Kind::TlsStall
                | Kind::TlsInjector
                | Kind::TlsRequired
                | Kind::ImplicitTls
        )
    }
}

/// What may answer one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Greeting,
    Ehlo,
    Noop,
    Mail,
    /// `user`: the address is `user{user}@example.com`, or `user@elsewhere.test` when
    /// not `good`.
    Rcpt {
        good: bool,
        user: u8,
    },
    Data,
    /// The end of a DATA body, or the last BDAT chunk: message `msg` of the client.
    MessageEnd {
        msg: u32,
    },
    BdatChunk,
    Quit,
    /// An over-long or unknown command.
    Junk,
    /// STARTTLS: `220`, then the handshake.
    StartTls,
    /// A step of AUTH LOGIN: `334`.
    AuthChallenge,
    /// The end of an AUTH exchange, with the right password or a wrong one.
    Auth {
        good: bool,
    },
    /// An AUTH response that is not base64.
    AuthMalformed,
    /// AUTH before TLS where the listener offers it only after: `538`.
    AuthNeedsTls,
    /// MAIL before TLS on a `--require-tls` listener: `530`.
    MailNeedsTls,
}

/// What a TLS client does once TLS is to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsPlan {
    None,
    /// A whole handshake, TLS 1.2 or 1.3.
    Good {
        tls12: bool,
    },
    /// These bytes instead of a ClientHello.
    Garbage(Vec<u8>),
    /// The first `keep` bytes of a ClientHello (shorter than it), then nothing.
    Stall {
        keep: usize,
    },
}

pub struct Cmd {
    pub bytes: Vec<u8>,
    pub expect: Option<Expect>,
    /// A DATA body: sent only if the DATA before it got 354.
    pub needs_354: bool,
    /// Reset the connection after sending this many bytes of the command.
    pub reset_after: Option<usize>,
}

pub struct Group {
    pub cmds: Vec<Cmd>,
    /// Wait for every reply of this group before sending the next.
    pub wait: bool,
}

/// A message as the sink must store it, and whether it may be stored at all.
pub struct Msg {
    pub stored_body: Vec<u8>,
    /// Must never get 250 (too large, or bare LF under the reject policy).
    pub refused: bool,
}

/// The session settings in force when the client connected.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub bare_lf: BareLfPolicy,
    pub max_message_size: usize,
}

pub struct Script {
    pub groups: Vec<Group>,
    pub msgs: Vec<Msg>,
    pub reads: bool,
    pub trickle: bool,
    /// Sends its first group before the greeting.
    pub early: bool,
    pub tls: TlsPlan,
    /// TLS from the first byte (the implicit-TLS listener).
    pub implicit: bool,
    /// Pipelines commands behind STARTTLS (they must never be answered).
    pub injects: bool,
    /// Its handshake records go both ways at once (see `World::eager_handshakes`).
    pub eager: bool,
}

fn line(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.u8(..10) {
        0 => 0,
        1 => rng.usize(100..990),
        _ => rng.usize(1..80),
    };
    let mut l: Vec<u8> = (0..len).map(|_| rng.u8(b' '..=b'~')).collect();
    if rng.u8(..6) == 0 {
        // Dot-stuffing at work: a line that starts with a dot, or is one.
        l.insert(0, b'.');
    }
    l
}

/// A message body (CRLF lines, the tag first) of about `size` bytes.
fn body(rng: &mut Rng, client: u32, msg: u32, size: usize) -> Vec<u8> {
    let mut m = format!("X-Sim-Tag: c{client}m{msg}\r\nSubject: sim\r\n\r\n").into_bytes();
    while m.len() < size {
        m.extend_from_slice(&line(rng));
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// The body as DATA sends it: a dot that starts a line (after CRLF only: a bare LF
/// ends no line, which is what smuggling plays on) doubled, and the terminator.
fn stuff(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + 16);
    for (i, &b) in m.iter().enumerate() {
        let line_start = i == 0 || (i >= 2 && &m[i - 2..i] == b"\r\n");
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// What the normalizing policy stores: every bare CR or LF becomes CRLF.
fn normalize(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + 16);
    let mut i = 0;
    while i < m.len() {
        match m[i] {
            b'\r' if m.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn cmd(text: &str, expect: Expect) -> Cmd {
    Cmd {
        bytes: text.as_bytes().to_vec(),
        expect: Some(expect),
        needs_354: false,
        reset_after: None,
    }
}

fn group(cmds: Vec<Cmd>) -> Group {
    Group { cmds, wait: true }
}

struct Builder<'a> {
    rng: &'a mut Rng,
    client: u32,
    settings: Settings,
    groups: Vec<Group>,
    msgs: Vec<Msg>,
}

impl Builder<'_> {
    fn envelope(&mut self) -> Vec<Cmd> {
        let mut cmds = vec![cmd(&format!("MAIL FROM:<{MAIL_FROM}>\r\n"), Expect::Mail)];
        for r in 0..self.rng.usize(1..4) {
            cmds.push(cmd(
                &format!("RCPT TO:<user{r}@example.com>\r\n"),
                Expect::Rcpt {
                    good: true,
                    user: r as u8,
                },
            ));
        }
        if self.rng.u8(..5) == 0 {
            cmds.push(cmd(
                "RCPT TO:<user@elsewhere.test>\r\n",
                Expect::Rcpt {
                    good: false,
                    user: 0,
                },
            ));
        }
        cmds
    }

    fn size(&mut self) -> usize {
        match self.rng.u8(..8) {
            0 | 1 => self.rng.usize(8_000..60_000),
            2 => 60,
            _ => self.rng.usize(100..3_000),
        }
    }

    /// A DATA transaction; `content` is the body as sent (before stuffing).
    fn data(&mut self, lock_step: bool, content: Vec<u8>, stored: Vec<u8>, refused: bool) {
        let msg = self.msgs.len() as u32;
        let mut head = self.envelope();
        head.push(cmd("DATA\r\n", Expect::Data));
        if lock_step {
            for c in head {
                self.groups.push(group(vec![c]));
            }
        } else {
            self.groups.push(group(head));
        }
        self.groups.push(group(vec![Cmd {
            bytes: stuff(&content),
            expect: Some(Expect::MessageEnd { msg }),
            needs_354: true,
            reset_after: None,
        }]));
        self.msgs.push(Msg {
            stored_body: stored,
            refused,
        });
    }

    fn plain_message(&mut self, lock_step: bool) {
        let msg = self.msgs.len() as u32;
        let size = self.size();
        let m = body(self.rng, self.client, msg, size);
        let refused = m.len() > self.settings.max_message_size;
        self.data(lock_step, m.clone(), m, refused);
    }

    fn bdat_message(&mut self, size: usize) {
        let msg = self.msgs.len() as u32;
        let m = body(self.rng, self.client, msg, size);
        let mut cmds = self.envelope();
        let mut at = 0;
        // Sometimes many small chunks: a session takes a bounded number of steps per
        // feed, so a long pipelined group is consumed over several.
        let most = if self.rng.u8(..3) == 0 { 64 } else { 20_000 };
        while at < m.len() {
            let n = self.rng.usize(1..=(m.len() - at).min(most));
            let mut bytes = format!("BDAT {n}\r\n").into_bytes();
            bytes.extend_from_slice(&m[at..at + n]);
            cmds.push(Cmd {
                bytes,
                expect: Some(Expect::BdatChunk),
                needs_354: false,
                reset_after: None,
            });
            at += n;
        }
        cmds.push(cmd("BDAT 0 LAST\r\n", Expect::MessageEnd { msg }));
        self.groups.push(group(cmds));
        self.msgs.push(Msg {
            refused: m.len() > self.settings.max_message_size,
            stored_body: m,
        });
    }

    /// An AUTH exchange, lock-step: PLAIN with an initial response or LOGIN's three
    /// steps; `good`: the right password.
    fn auth(&mut self, good: bool) {
        let password = if good {
            tls::PASSWORD
        } else {
            "not-the-secret"
        };
        if self.rng.bool() {
            let plain = B64.encode(format!("\0{}\0{password}", tls::USER));
            self.groups.push(group(vec![cmd(
                &format!("AUTH PLAIN {plain}\r\n"),
                Expect::Auth { good },
            )]));
        } else {
            self.groups
                .push(group(vec![cmd("AUTH LOGIN\r\n", Expect::AuthChallenge)]));
            self.groups.push(group(vec![cmd(
                &format!("{}\r\n", B64.encode(tls::USER)),
                Expect::AuthChallenge,
            )]));
            self.groups.push(group(vec![cmd(
                &format!("{}\r\n", B64.encode(password)),
                Expect::Auth { good },
            )]));
        }
    }

    /// Under TLS: nothing, a good AUTH, a wrong password or malformed base64.
    fn auth_variant(&mut self) {
        match self.rng.u8(..6) {
            0 | 1 => {}
            2 | 3 => self.auth(true),
            4 => self.auth(false),
            _ => self.groups.push(group(vec![cmd(
                "AUTH PLAIN !!not*base64!!\r\n",
                Expect::AuthMalformed,
            )])),
        }
    }

    /// STARTTLS, alone in its group, and the EHLO the session starts over with.
    fn starttls(&mut self) {
        self.groups
            .push(group(vec![cmd("STARTTLS\r\n", Expect::StartTls)]));
        self.groups
            .push(group(vec![cmd("EHLO client.sim.test\r\n", Expect::Ehlo)]));
    }

    /// Garbage instead of a ClientHello: bytes that are no TLS record, plaintext SMTP,
    /// or a record header that promises more than ever comes.
    fn garbage(&mut self) -> Vec<u8> {
        match self.rng.u8(..3) {
            0 => (0..self.rng.usize(1..600))
                .map(|_| self.rng.u8(..))
                .collect(),
            1 => b"EHLO client.sim.test\r\nMAIL FROM:<g@sim.test>\r\n".to_vec(),
            _ => {
                let mut g = vec![0x16, 0x03, 0x01, 0x3f, 0xff];
                g.extend((0..self.rng.usize(0..200)).map(|_| self.rng.u8(..)));
                g
            }
        }
    }

    fn handshake_plan(&mut self) -> TlsPlan {
        TlsPlan::Good {
            tls12: self.rng.u8(..4) == 0,
        }
    }

    fn smuggled_message(&mut self) {
        let msg = self.msgs.len() as u32;
        let mut m = body(self.rng, self.client, msg, 200);
        let trick: &[u8] = match self.rng.u8(..4) {
            0 => b"\n.\n",
            1 => b"\r\n.\n",
            2 => b"\n.\r\n",
            _ => b"bare\nfeed\r\n",
        };
        m.extend_from_slice(trick);
        m.extend_from_slice(b"MAIL FROM:<evil@sim.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n");
        m.extend_from_slice(b"smuggled\r\n");
        let (stored, refused) = match self.settings.bare_lf {
            BareLfPolicy::Reject => (Vec::new(), true),
            BareLfPolicy::Normalize => (normalize(&m), false),
        };
        self.data(false, m, stored, refused);
    }
}

/// The script of client `client` of kind `kind`, from its own seed.
pub fn script(kind: Kind, client: u32, seed: u64, settings: Settings) -> Script {
    let mut rng = Rng::with_seed(seed);
    let mut b = Builder {
        rng: &mut rng,
        client,
        settings,
        groups: Vec::new(),
        msgs: Vec::new(),
    };
    let mut reads = true;
    let mut trickle = false;
    let mut early = false;
    let mut tls_plan = TlsPlan::None;
    let implicit = kind == Kind::ImplicitTls;
    let injects = kind == Kind::TlsInjector;
    if kind == Kind::Proxied {
        let header = if b.rng.u8(..6) == 0 {
            "PROXY TCP4 nonsense\r\n".to_string()
        } else {
            format!(
                "PROXY TCP4 192.0.2.{} 198.51.100.1 {} 25\r\n",
                b.rng.u8(1..255),
                b.rng.u16(1024..)
            )
        };
        b.groups.push(Group {
            cmds: vec![Cmd {
                bytes: header.into_bytes(),
                expect: None,
                needs_354: false,
                reset_after: None,
            }],
            wait: false,
        });
        early = true;
    }
    if kind == Kind::EarlyTalker {
        early = true;
    }
    b.groups
        .push(group(vec![cmd("EHLO client.sim.test\r\n", Expect::Ehlo)]));
    match kind {
        Kind::Mta | Kind::Trickle | Kind::Proxied | Kind::EarlyTalker => {
            trickle = kind == Kind::Trickle;
            let n = if trickle { 1 } else { b.rng.usize(1..4) };
            for _ in 0..n {
                b.plain_message(true);
                if b.rng.bool() {
                    b.groups.push(group(vec![cmd("RSET\r\n", Expect::Noop)]));
                }
            }
        }
        Kind::Pipelining => {
            for _ in 0..b.rng.usize(1..6) {
                b.plain_message(false);
            }
        }
        Kind::Bdat => {
            // A third pipeline the next transaction right behind `BDAT 0 LAST` (RFC
            // 3030 allows it): its bytes arrive while the message is with the sink.
            let pipelined = b.rng.u8(..3) == 0;
            for _ in 0..b.rng.usize(1..5) {
                let size = b.size();
                b.bdat_message(size);
                if pipelined {
                    if let Some(g) = b.groups.last_mut() {
                        g.wait = false;
                    }
                }
            }
        }
        Kind::ResetMidData => {
            b.plain_message(true);
            let size = b.rng.usize(2_000..30_000);
            b.plain_message(true);
            let last = b.groups.last_mut().expect("a body");
            let body = &mut last.cmds[0];
            body.reset_after = Some(size.min(body.bytes.len() / 2).max(1));
        }
        Kind::NeverReads => {
            reads = false;
            early = true;
            let mut cmds = Vec::new();
            for _ in 0..b.rng.usize(500..3_000) {
                cmds.push(match b.rng.u8(..3) {
                    0 => cmd("NOOP\r\n", Expect::Noop),
                    1 => cmd("RSET\r\n", Expect::Noop),
                    _ => cmd("EHLO again.sim.test\r\n", Expect::Ehlo),
                });
            }
            b.groups.push(Group { cmds, wait: false });
        }
        Kind::Smuggler => {
            for _ in 0..b.rng.usize(1..3) {
                b.smuggled_message();
                b.plain_message(false);
            }
        }
        Kind::StartTls | Kind::TlsInjector | Kind::TlsRequired => {
            if kind == Kind::TlsRequired {
                b.groups.push(group(vec![cmd(
                    &format!("MAIL FROM:<{MAIL_FROM}>\r\n"),
                    Expect::MailNeedsTls,
                )]));
            }
            if kind != Kind::TlsInjector && b.rng.u8(..4) == 0 {
                let plain = B64.encode(format!("\0{}\0{}", tls::USER, tls::PASSWORD));
                b.groups.push(group(vec![cmd(
                    &format!("AUTH PLAIN {plain}\r\n"),
                    Expect::AuthNeedsTls,
                )]));
            }
            tls_plan = b.handshake_plan();
            if kind == Kind::TlsInjector {
                let mut cmds = vec![cmd("STARTTLS\r\n", Expect::StartTls)];
                for text in [
                    "MAIL FROM:<injected@sim.test>\r\n",
                    "RCPT TO:<user0@example.com>\r\n",
                ] {
                    cmds.push(Cmd {
                        bytes: text.as_bytes().to_vec(),
                        expect: None,
                        needs_354: false,
                        reset_after: None,
                    });
                }
                b.groups.push(group(cmds));
                b.groups
                    .push(group(vec![cmd("EHLO client.sim.test\r\n", Expect::Ehlo)]));
            } else {
                b.starttls();
                b.auth_variant();
            }
            for _ in 0..b.rng.usize(1..3) {
                let lock_step = b.rng.bool();
                b.plain_message(lock_step);
            }
        }
        Kind::TlsGarbage => {
            tls_plan = TlsPlan::Garbage(b.garbage());
            b.groups
                .push(group(vec![cmd("STARTTLS\r\n", Expect::StartTls)]));
        }
        Kind::TlsStall => {
            tls_plan = TlsPlan::Stall {
                keep: b.rng.usize(1..100),
            };
            b.groups
                .push(group(vec![cmd("STARTTLS\r\n", Expect::StartTls)]));
        }
        Kind::ImplicitTls => {
            tls_plan = match b.rng.u8(..8) {
                0 => TlsPlan::Garbage(b.garbage()),
                1 => TlsPlan::Stall {
                    keep: b.rng.usize(1..100),
                },
                _ => b.handshake_plan(),
            };
            b.auth_variant();
            for _ in 0..b.rng.usize(1..3) {
                let lock_step = b.rng.bool();
                b.plain_message(lock_step);
            }
        }
        Kind::Oversized => {
            let long = format!("NOOP {}\r\n", "x".repeat(b.rng.usize(1_000..3_000)));
            b.groups.push(group(vec![cmd(&long, Expect::Junk)]));
            let size = settings.max_message_size + b.rng.usize(1..5_000);
            if b.rng.bool() {
                let msg = b.msgs.len() as u32;
                let m = body(b.rng, client, msg, size);
                b.data(false, m.clone(), m, true);
            } else {
                b.bdat_message(size);
            }
            b.plain_message(false);
        }
    }
    if !matches!(kind, Kind::NeverReads | Kind::TlsGarbage | Kind::TlsStall) {
        b.groups.push(group(vec![cmd("QUIT\r\n", Expect::Quit)]));
    }
    let msgs = std::mem::take(&mut b.msgs);
    let mut groups = std::mem::take(&mut b.groups);
    if !reads {
        // It waits for nothing it would have to read.
        for g in &mut groups {
            g.wait = false;
        }
    }
    let eager = rng.u8(..4) != 0;
    Script {
        groups,
        msgs,
        reads,
        trickle,
        early,
        eager,
        tls: tls_plan,
        implicit,
        injects,
    }
}

/// A reply as the client parsed it.
pub struct Reply {
    pub code: u16,
    pub text: String,
    /// What it answered (`None`: nothing was outstanding).
    pub expect: Option<Expect>,
}

/// What is between the script and the socket.
enum Wire {
    /// Plaintext SMTP.
    Plain,
    /// TLS: the script's commands go in as plaintext, records come out.
    Tls(Box<ClientConnection>),
    /// Raw bytes (garbage, a cut ClientHello) and nothing more; input is ignored.
    Raw,
}

/// One client's side of a connection: the script, what it sent, what it waits for.
pub struct Client {
    pub id: u32,
    pub kind: Kind,
    pub script: Script,
    next_group: usize,
    /// Bytes of loaded commands not sent yet, and for each loaded command where its
    /// last byte is in `out` and what it expects.
    out: Vec<u8>,
    out_sent: usize,
    loading: VecDeque<(usize, Option<Expect>, Option<usize>)>,
    waiting_group: bool,
    pub outstanding: VecDeque<Expect>,
    inbuf: Vec<u8>,
    last_data_354: bool,
    pub got_421: bool,
    pub reset_pending: bool,
    pub replies: u64,
    /// The recipients the open transaction's RCPTs got `250` for, in order.
    accepted: Vec<String>,
    /// Per message that got to its end: the recipients accepted for it.
    pub envelopes: Vec<Option<Vec<String>>>,
    wire: Wire,
    /// Bytes for the socket not written yet (TLS records or raw bytes).
    wire_out: Vec<u8>,
    /// TLS began (STARTTLS's `220` arrived, or the connection is implicit TLS) and
    /// the run has not taken note yet.
    pub tls_began: bool,
    /// What went wrong with the gateway's TLS records, if anything.
    pub tls_error: Option<String>,
    /// The user a `235` authenticated.
    pub authenticated: Option<String>,
}

/// The reverse path every simulated transaction gives.
pub const MAIL_FROM: &str = "sender@sim.test";

impl Client {
    pub fn new(id: u32, kind: Kind, seed: u64, settings: Settings) -> Client {
        let script = script(kind, id, seed, settings);
        let mut c = Client {
            id,
            kind,
            next_group: 0,
            out: Vec::new(),
            out_sent: 0,
            loading: VecDeque::new(),
            waiting_group: false,
            outstanding: VecDeque::from([Expect::Greeting]),
            inbuf: Vec::new(),
            last_data_354: false,
            got_421: false,
            reset_pending: false,
            replies: 0,
            accepted: Vec::new(),
            envelopes: Vec::new(),
            script,
            wire: Wire::Plain,
            wire_out: Vec::new(),
            tls_began: false,
            tls_error: None,
            authenticated: None,
        };
        if c.script.implicit {
            c.start_tls();
        }
        c
    }

    /// TLS starts now, as the script plans it.
    fn start_tls(&mut self) {
        self.tls_began = true;
        // Nothing of the plaintext conversation goes on: what was not sent is dropped.
        self.out.clear();
        self.out_sent = 0;
        self.loading.clear();
        match self.script.tls.clone() {
            TlsPlan::None => {}
            TlsPlan::Good { tls12 } => self.wire = Wire::Tls(Box::new(tls::client(tls12))),
            TlsPlan::Garbage(g) => {
                self.wire = Wire::Raw;
                self.wire_out = g;
            }
            TlsPlan::Stall { keep } => {
                let mut hello = Vec::new();
                let mut c = tls::client(false);
                while c.wants_write() {
                    if c.write_tls(&mut hello).is_err() {
                        break;
                    }
                }
                hello.truncate(keep.min(hello.len().saturating_sub(1)));
                self.wire = Wire::Raw;
                self.wire_out = hello;
            }
        }
    }

    /// Mid-handshake, with its handshake records moving at once.
    pub fn eager_handshake(&self) -> bool {
        self.script.eager && matches!(&self.wire, Wire::Tls(t) if t.is_handshaking())
    }

    /// Whether the conversation runs over TLS (and so its records must say so).
    pub fn tls_on(&self) -> bool {
        matches!(self.wire, Wire::Tls(_))
    }

    /// The script's plaintext goes into rustls, and its records out to `wire_out`.
    fn pump_tls(&mut self) {
        for _ in 0..1_000 {
            let chunk = self.plain_outgoing().to_vec();
            if chunk.is_empty() {
                break;
            }
            let Wire::Tls(t) = &mut self.wire else {
                return;
            };
            if t.writer().write_all(&chunk).is_err() {
                self.tls_error = Some("rustls refused plaintext".into());
                return;
            }
            self.plain_sent(chunk.len());
        }
        let Wire::Tls(t) = &mut self.wire else {
            return;
        };
        while t.wants_write() {
            match t.write_tls(&mut self.wire_out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Loads the next group when the client is ready for it.
    fn load(&mut self) {
        if self.got_421 || self.out_sent < self.out.len() {
            return;
        }
        let blocked = self.waiting_group && !self.outstanding.is_empty();
        let greeted = self.script.early || self.next_group > 0 || self.outstanding.is_empty();
        if blocked || !greeted {
            return;
        }
        let Some(g) = self.script.groups.get(self.next_group) else {
            return;
        };
        self.next_group += 1;
        self.out.clear();
        self.out_sent = 0;
        for c in &g.cmds {
            if c.needs_354 && !self.last_data_354 {
                continue;
            }
            let start = self.out.len();
            self.out.extend_from_slice(&c.bytes);
            let reset = c.reset_after.map(|n| start + n);
            self.loading.push_back((self.out.len(), c.expect, reset));
        }
        self.waiting_group = g.wait;
    }

    /// What the client would write now.
    pub fn outgoing(&mut self) -> &[u8] {
        match self.wire {
            Wire::Plain => self.plain_outgoing(),
            Wire::Tls(_) => {
                self.pump_tls();
                &self.wire_out
            }
            Wire::Raw => &self.wire_out,
        }
    }

    /// `n` bytes of [`Self::outgoing`] were written.
    pub fn sent(&mut self, n: usize) {
        match self.wire {
            Wire::Plain => self.plain_sent(n),
            Wire::Tls(_) | Wire::Raw => {
                self.wire_out.drain(..n.min(self.wire_out.len()));
            }
        }
    }

    /// The script's plaintext the client would send now.
    fn plain_outgoing(&mut self) -> &[u8] {
        self.load();
        let end = self
            .loading
            .iter()
            .find_map(|l| l.2)
            .unwrap_or(self.out.len());
        &self.out[self.out_sent..end.max(self.out_sent)]
    }

    /// `n` bytes of [`Self::plain_outgoing`] went out (or into rustls).
    fn plain_sent(&mut self, n: usize) {
        self.out_sent += n;
        while let Some(&(end, expect, reset)) = self.loading.front() {
            if reset.is_some_and(|r| self.out_sent >= r) {
                self.reset_pending = true;
            }
            if end > self.out_sent {
                break;
            }
            self.loading.pop_front();
            if let Some(e) = expect {
                self.outstanding.push_back(e);
            }
        }
    }

    /// Every command of the script is sent (or, sending raw bytes, every one of them).
    pub fn script_done(&self) -> bool {
        match self.wire {
            Wire::Raw => self.wire_out.is_empty(),
            Wire::Plain | Wire::Tls(_) => {
                self.next_group >= self.script.groups.len()
                    && self.out_sent >= self.out.len()
                    && self.wire_out.is_empty()
            }
        }
    }

    /// Whether it waits for a reply with everything it has to say sent.
    pub fn waiting_on_server(&mut self) -> bool {
        !self.outstanding.is_empty() && self.outgoing().is_empty()
    }

    /// Bytes from the server; returns the complete replies in them.
    pub fn received(&mut self, data: &[u8]) -> Vec<Reply> {
        let mut replies = Vec::new();
        match self.wire {
            Wire::Plain => {
                self.inbuf.extend_from_slice(data);
                if self.parse(&mut replies) {
                    // STARTTLS's `220`: what came after it is the gateway's TLS.
                    let rest = std::mem::take(&mut self.inbuf);
                    self.tls_received(&rest, &mut replies);
                }
            }
            Wire::Tls(_) => self.tls_received(data, &mut replies),
            Wire::Raw => {}
        }
        replies
    }

    /// Records from the gateway: their plaintext goes to the replies.
    fn tls_received(&mut self, mut data: &[u8], replies: &mut Vec<Reply>) {
        let Wire::Tls(t) = &mut self.wire else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        while !data.is_empty() && self.tls_error.is_none() {
            match t.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => self.tls_error = Some(format!("read_tls: {e}")),
            }
            if let Err(e) = t.process_new_packets() {
                self.tls_error = Some(e.to_string());
            }
            loop {
                match t.reader().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                }
            }
        }
        self.parse(replies);
    }

    /// The complete replies in `inbuf`; true if one of them started TLS (the rest of
    /// `inbuf` is then left for it).
    fn parse(&mut self, replies: &mut Vec<Reply>) -> bool {
        let mut start = 0;
        let mut pos = 0;
        let mut began = false;
        while let Some(lf) = self.inbuf[pos..].iter().position(|&b| b == b'\n') {
            let line = &self.inbuf[pos..pos + lf + 1];
            pos += lf + 1;
            if line.len() >= 4 && line[3] == b'-' {
                continue;
            }
            let text = String::from_utf8_lossy(&self.inbuf[start..pos]).into_owned();
            start = pos;
            let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            let r = self.reply(code, text);
            let starts = r.expect == Some(Expect::StartTls) && code == 220;
            replies.push(r);
            if starts && matches!(self.wire, Wire::Plain) {
                self.start_tls();
                began = true;
                break;
            }
        }
        self.inbuf.drain(..start);
        began
    }

    fn reply(&mut self, code: u16, text: String) -> Reply {
        self.replies += 1;
        let expect = if code == 421 {
            self.got_421 = true;
            self.outstanding.front().copied()
        } else {
            self.outstanding.pop_front()
        };
        match expect {
            Some(Expect::Data) => self.last_data_354 = code == 354,
            // Every transaction starts with MAIL, whatever RSET or a failed one left.
            Some(Expect::Mail) => self.accepted.clear(),
            Some(Expect::Rcpt { good, user }) if code == 250 => self.accepted.push(if good {
                format!("user{user}@example.com")
            } else {
                "user@elsewhere.test".into()
            }),
            Some(Expect::Auth { good: true }) if code == 235 => {
                self.authenticated = Some(tls::USER.into());
            }
            Some(Expect::MessageEnd { msg }) => {
                let msg = msg as usize;
                if self.envelopes.len() <= msg {
                    self.envelopes.resize(msg + 1, None);
                }
                self.envelopes[msg] = Some(self.accepted.clone());
            }
            _ => {}
        }
        Reply { code, text, expect }
    }
}
