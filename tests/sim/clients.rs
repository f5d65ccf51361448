//! Client behaviours: what each simulated client sends and what it expects back. A
//! script is a list of groups of commands; a client sends a group (pipelined when it
//! has several commands) and, unless it is a blaster, waits for every reply of the
//! group before the next. Each command carries what may answer it, so replies are
//! checked in command order as they arrive; a message's body is kept as the sink must
//! store it (dot-unstuffed, BDAT chunks joined) for the record check.

use std::collections::VecDeque;

use smtpgw::smtp::BareLfPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Lock-step: one command, one reply.
    Mta,
    /// MAIL, RCPT and DATA in one write (RFC 2920), the body after the 354.
    Pipelining,
    /// MAIL, RCPT and every BDAT chunk in one write (RFC 3030).
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
}

pub const KINDS: [Kind; 10] = [
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
];

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
}

fn line(rng: &mut fastrand::Rng) -> Vec<u8> {
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
fn body(rng: &mut fastrand::Rng, client: u32, msg: u32, size: usize) -> Vec<u8> {
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
    rng: &'a mut fastrand::Rng,
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
    let mut rng = fastrand::Rng::with_seed(seed);
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
            for _ in 0..b.rng.usize(1..5) {
                let size = b.size();
                b.bdat_message(size);
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
    if kind != Kind::NeverReads {
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
    Script {
        groups,
        msgs,
        reads,
        trickle,
        early,
    }
}

/// A reply as the client parsed it.
pub struct Reply {
    pub code: u16,
    pub text: String,
    /// What it answered (`None`: nothing was outstanding).
    pub expect: Option<Expect>,
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
}

/// The reverse path every simulated transaction gives.
pub const MAIL_FROM: &str = "sender@sim.test";

impl Client {
    pub fn new(id: u32, kind: Kind, seed: u64, settings: Settings) -> Client {
        let script = script(kind, id, seed, settings);
        Client {
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
        self.load();
        let end = self
            .loading
            .iter()
            .find_map(|l| l.2)
            .unwrap_or(self.out.len());
        &self.out[self.out_sent..end.max(self.out_sent)]
    }

    /// `n` bytes of [`Self::outgoing`] were written.
    pub fn sent(&mut self, n: usize) {
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

    /// Every command of the script is sent.
    pub fn script_done(&self) -> bool {
        self.next_group >= self.script.groups.len() && self.out_sent >= self.out.len()
    }

    /// Whether it waits for a reply with everything it has to say sent.
    pub fn waiting_on_server(&mut self) -> bool {
        !self.outstanding.is_empty() && self.outgoing().is_empty()
    }

    /// Bytes from the server; returns the complete replies in them.
    pub fn received(&mut self, data: &[u8]) -> Vec<Reply> {
        self.inbuf.extend_from_slice(data);
        let mut replies = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        while let Some(lf) = self.inbuf[pos..].iter().position(|&b| b == b'\n') {
            let line = &self.inbuf[pos..pos + lf + 1];
            pos += lf + 1;
            if line.len() >= 4 && line[3] == b'-' {
                continue;
            }
            let text = String::from_utf8_lossy(&self.inbuf[start..pos]).into_owned();
            start = pos;
            let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            replies.push(self.reply(code, text));
        }
        self.inbuf.drain(..start);
        replies
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
