//! Inputs shared by the benches: realistic bodies and command mixes, built once and
//! deterministically (a fixed xorshift seed), so every run measures the same bytes.

#![allow(dead_code)] // each bench uses a different subset

/// A tiny deterministic PRNG: benches need repeatable inputs, not good randomness.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A message of about `size` octets as a client puts it on the wire after DATA: a few
/// headers, then text in lines of at most 76 characters (like quoted-printable or base64
/// bodies), about one line in 40 starting with a dot and therefore dot-stuffed, and
/// the `.\r\n` terminator (the DATA command's CRLF precedes the body).
pub fn wire_body(size: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "gateway",
        "accepts",
        "mail",
        "and",
        "stores",
        "it",
        "durably",
        "before",
        "saying",
        "two-fifty",
        "message",
        "kafka",
        "spool",
        "reactor",
        "session",
        "=C3=A9t=C3=A9",
        "Lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet,",
        "consectetur",
        "adipiscing",
        "elit.",
    ];
    let mut rng = XorShift::new(seed);
    let mut out = Vec::with_capacity(size + 128);
    out.extend_from_slice(
        b"From: Alice Example <alice@client.example>\r\n\
To: Bob <bob@example.com>\r\n\
Subject: benchmark message\r\n\
Message-ID: <bench@client.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\n",
    );
    while out.len() < size {
        let mut line_len = 0;
        if rng.next().is_multiple_of(40) {
            // A line that starts with a dot: the client stuffs it to "..".
            out.extend_from_slice(b"..");
            line_len += 1;
        }
        let target = 40 + (rng.next() % 37) as usize; // 40..=76 characters
        while line_len < target {
            let word = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
            if line_len + word.len() + 1 > 76 {
                break;
            }
            if line_len > 0 {
                out.push(b' ');
                line_len += 1;
            }
            out.extend_from_slice(word);
            line_len += word.len();
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The body's unstuffed length, as the server must store it (without the terminator).
pub fn unstuffed_len(wire: &[u8]) -> usize {
    let body = &wire[..wire.len() - 3];
    let stuffed = body
        .split(|&b| b == b'\n')
        .filter(|l| l.first() == Some(&b'.'))
        .count();
    body.len() - stuffed
}

/// A realistic mix of command lines (without CRLF) as a busy MX sees them: mostly
/// transaction commands, some with parameters, verbs in both cases.
pub const COMMAND_MIX: &[&[u8]] = &[
    b"EHLO client.example.org",
    b"MAIL FROM:<alice@client.example.org> SIZE=1536 BODY=8BITMIME",
    b"RCPT TO:<bob@example.com>",
    b"RCPT TO:<carol.smith+tag@example.com>",
    b"DATA",
    b"mail from:<bounces-1234@lists.example.net>",
    b"rcpt to:<dave@example.com>",
    b"BDAT 1024 LAST",
    b"RSET",
    b"NOOP",
    b"MAIL FROM:<>",
    b"RCPT TO:<Postmaster>",
    b"HELO legacy.example.org",
    b"QUIT",
];
