//! DATA bodies: finding `<CRLF>.<CRLF>`, dot-unstuffing, the bare CR/LF policy and the
//! size limit, across any split of the body into reads.
//!
//! The reader is a five-state machine over line boundaries. Between CR and LF octets it
//! moves with one SIMD `memchr2` call and one bulk copy, so a body costs about one pass
//! over its bytes. Design note: a lone `memmem` search for `\r\n.\r\n` would find the
//! end just as fast, but dot-unstuffing and the smuggling defence have to look at every
//! line ending anyway; doing all three in one pass is cheaper than two passes, and the
//! state carried between reads makes every split of the input behave identically
//! without re-scanning old bytes.
//!
//! Only `<CRLF>.<CRLF>` ends a message (a body may also start with `.<CRLF>`: the DATA
//! command's own CRLF counts). A bare CR or LF never starts a line for this purpose, so
//! `\n.\n`, `\r\n.\n`, `\n.\r\n`, `\r.\r\n` and the like can never end a message early
//! (SMTP smuggling, CVE-2023-51764/5/6). What happens to the message is the policy's.

use bytes::BytesMut;
use memchr::memchr2;

/// What to do with a bare CR or LF in a DATA body (SMTP smuggling defence).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BareLfPolicy {
    /// Refuse the whole message with `550 5.6.0` once its real end has been read.
    #[default]
    Reject,
    /// Store every bare CR or LF as CRLF; only `<CRLF>.<CRLF>` ever ends the message.
    Normalize,
}

/// Where the reader stands relative to the last line boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Just after a CRLF (or at the start of the body): a dot here is special.
    LineStart,
    /// Inside a line.
    Text,
    /// Saw CR inside a line; not yet stored.
    Cr,
    /// Saw `.` at a line start; it is dropped unless the line is the terminator.
    Dot,
    /// Saw `.` CR at a line start; LF ends the message.
    DotCr,
}

/// The lines of a body's header section that start with `M` or `m`, noted on the
/// reader's way past every line start: the only lines a `Message-ID:` field can be on,
/// so the transaction line's look-up ([`super::headers::message_id_among`]) reads
/// those instead of walking the header line by line again. Positions are offsets in the
/// body buffer as the reader stored it (headroom included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderLines {
    starts: [u32; HEADER_LINES],
    count: u8,
    /// No blank line yet: the reader is still in the header section.
    open: bool,
    /// The list may miss a line (more candidates than it holds, a dot dropped at a
    /// header line's start, a bare CR or LF, a body past 4 GiB): look the whole way.
    incomplete: bool,
}

/// Candidate lines noted at most; `From`, `To`, `MIME-Version`, `Message-ID` and a few
/// more fit.
const HEADER_LINES: usize = 6;

impl Default for HeaderLines {
    fn default() -> Self {
        HeaderLines {
            starts: [0; HEADER_LINES],
            count: 0,
            open: true,
            incomplete: false,
        }
    }
}

impl HeaderLines {
    /// The candidates' offsets in the body without its first `headroom` bytes, in order;
    /// `None` when the list is not complete.
    pub fn starts(&self, headroom: usize) -> Option<impl Iterator<Item = usize> + '_> {
        if self.incomplete {
            return None;
        }
        let starts = &self.starts[..usize::from(self.count)];
        if starts.iter().any(|&s| (s as usize) < headroom) {
            return None;
        }
        Some(starts.iter().map(move |&s| s as usize - headroom))
    }

    /// A line of the body starts with `first` at offset `at`.
    #[inline]
    fn line_start(&mut self, first: u8, at: usize) {
        if first == b'\r' || first == b'\n' {
            // A blank line ends the header (a CR that is not one is bare: incomplete).
            self.open = false;
        } else if first | 0x20 == b'm' {
            match u32::try_from(at) {
                Ok(at) if usize::from(self.count) < HEADER_LINES => {
                    self.starts[usize::from(self.count)] = at;
                    self.count += 1;
                }
                _ => self.incomplete = true,
            }
        }
    }
}

/// How a complete body turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    Complete,
    /// Over the size limit: `552 5.3.4`. Nothing past the limit was kept.
    TooLarge,
    /// A bare CR or LF under [`BareLfPolicy::Reject`]: `550 5.6.0`.
    BareLineEnding,
}

/// Reads one DATA body, or the chunks of one BDAT message, into a buffer.
///
/// BDAT content has no terminator and no dot-stuffing, but a bare CR or LF in it is the
/// same smuggling risk once a downstream relay re-sends the message with DATA, so the
/// same scanner applies the same policy to it ([`DataReader::chunked`]).
#[derive(Clone, Debug)]
pub struct DataReader {
    state: State,
    /// BDAT: no terminator, no dot-stuffing; the state carries across chunks.
    chunked: bool,
    policy: BareLfPolicy,
    max_size: usize,
    size: usize,
    too_large: bool,
    bare_line_ending: bool,
    header: HeaderLines,
}

impl DataReader {
    pub fn new(max_size: usize, policy: BareLfPolicy) -> Self {
        DataReader {
            state: State::LineStart,
            chunked: false,
            policy,
            max_size,
            size: 0,
            too_large: false,
            bare_line_ending: false,
            header: HeaderLines::default(),
        }
    }

    /// A reader for BDAT content: give it each chunk's octets with [`Self::feed`] (it
    /// never reports an end) and call [`Self::finish`] after the `LAST` chunk.
    pub fn chunked(max_size: usize, policy: BareLfPolicy) -> Self {
        DataReader {
            chunked: true,
            ..DataReader::new(max_size, policy)
        }
    }

    /// The end of BDAT content: a CR still held at the very end was bare.
    pub fn finish(&mut self, body: &mut BytesMut) {
        if self.state == State::Cr {
            self.bare(body);
        }
        self.state = State::LineStart;
    }

    /// Consumes body bytes from `input`, appending the unstuffed body to `body`. Returns
    /// how many bytes it consumed and whether the terminator was among them; on `true`
    /// the bytes after the terminator are left to the caller (pipelined commands).
    pub fn feed(&mut self, input: &[u8], body: &mut BytesMut) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Text => match memchr2(b'\r', b'\n', &input[i..]) {
                    None => {
                        self.store(body, &input[i..]);
                        i = input.len();
                    }
                    Some(off) => {
                        let at = i + off;
                        if input[at] == b'\n' {
                            self.store(body, &input[i..at]);
                            self.bare(body);
                            i = at + 1;
                        } else if input.get(at + 1) == Some(&b'\n') {
                            // The common case: a whole line with its CRLF in one copy.
                            self.store(body, &input[i..at + 2]);
                            self.state = State::LineStart;
                            i = at + 2;
                        } else {
                            self.store(body, &input[i..at]);
                            self.state = State::Cr;
                            i = at + 1;
                        }
                    }
                },
                State::Cr => {
                    if input[i] == b'\n' {
                        self.store(body, b"\r\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // The held CR was bare; the current byte is looked at again as text.
                        self.bare(body);
                        self.state = State::Text;
                    }
                }
                State::LineStart => {
                    if self.header.open {
                        self.header.line_start(input[i], body.len());
                    }
                    if input[i] == b'.' && !self.chunked {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // Dot-stuffing: the leading dot is dropped, the line goes on.
                        self.header.incomplete |= self.header.open;
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::LineStart;
                        return (i + 1, true);
                    }
                    // `.` CR X: the dot was stuffing, the CR is bare.
                    self.header.incomplete |= self.header.open;
                    self.bare(body);
                    self.state = State::Text;
                }
            }
        }
        (i, false)
    }

    /// Valid once [`Self::feed`] has returned `true`.
    pub fn outcome(&self) -> BodyOutcome {
        if self.bare_line_ending && self.policy == BareLfPolicy::Reject {
            BodyOutcome::BareLineEnding
        } else if self.too_large {
            BodyOutcome::TooLarge
        } else {
            BodyOutcome::Complete
        }
    }

    /// The header section's candidate lines for a `Message-ID:` field.
    pub fn header_lines(&self) -> HeaderLines {
        self.header
    }

    /// A bare CR or LF was seen, whatever the policy made of it (a smuggling attempt).
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare_line_ending
    }

    #[cfg(any(test, feature = "testing"))]
    /// Message octets so far, after unstuffing (RFC 1870 counts them this way).
    pub fn size(&self) -> usize {
        self.size
    }

    fn bare(&mut self, body: &mut BytesMut) {
        self.bare_line_ending = true;
        // Lines then differ between the reader and a search by LF.
        self.header.incomplete = true;
        if self.policy == BareLfPolicy::Normalize {
            self.store(body, b"\r\n");
        }
    }

    fn store(&mut self, body: &mut BytesMut, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len());
        if self.too_large || (self.bare_line_ending && self.policy == BareLfPolicy::Reject) {
            return;
        }
        if self.size > self.max_size {
            // Read on to the end, keep nothing: the reply is 552 whatever follows.
            self.too_large = true;
            *body = BytesMut::new();
            return;
        }
        body.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns body, outcome and bytes left over.
    fn read(
        input: &[u8],
        step: usize,
        policy: BareLfPolicy,
        max: usize,
    ) -> Option<(Vec<u8>, BodyOutcome, usize)> {
        let mut reader = DataReader::new(max, policy);
        let mut body = BytesMut::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + step).min(input.len());
            let (n, done) = reader.feed(&input[pos..end], &mut body);
            pos += n;
            if done {
                return Some((body.to_vec(), reader.outcome(), input.len() - pos));
            }
            assert_eq!(pos, end, "the reader consumes everything until the end");
        }
        None
    }

    fn every_split(
        input: &[u8],
        policy: BareLfPolicy,
        max: usize,
    ) -> Option<(Vec<u8>, BodyOutcome, usize)> {
        let whole = read(input, input.len().max(1), policy, max);
        for step in 1..input.len() {
            assert_eq!(read(input, step, policy, max), whole, "step {step}");
        }
        whole
    }

    /// Every CR is followed by LF and every LF preceded by CR.
    fn only_crlf(body: &[u8]) -> bool {
        body.iter().enumerate().all(|(i, &b)| match b {
            b'\r' => body.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && body[i - 1] == b'\r',
            _ => true,
        })
    }

    const REJECT: BareLfPolicy = BareLfPolicy::Reject;
    const NORMALIZE: BareLfPolicy = BareLfPolicy::Normalize;

    #[test]
    fn header_lines_give_the_message_id_a_full_search_gives() {
        use crate::smtp::headers::{message_id, message_id_among};
        let cases: &[(&[u8], BareLfPolicy, bool)] = &[
            (
                b"From: A <a@x>\r\nTo: <b@x>\r\nSubject: s\r\nMessage-ID: <1.2@lt>\r\n\
                  MIME-Version: 1.0\r\n\r\nmessage-id: <body@x>\r\n.\r\n",
                REJECT,
                true,
            ),
            (
                b"MIME-Version: 1.0\r\nmessage-id: <a>\r\n\r\nx\r\n.\r\n",
                REJECT,
                true,
            ),
            (
                b"Mxx\r\nMessage-IDx: <no>\r\nMESSAGE-ID:  <yes> \r\n\r\n.\r\n",
                REJECT,
                true,
            ),
            (b"Message-ID:\r\n <f@b>\r\nX: y\r\n\r\n.\r\n", REJECT, true),
            (
                b"Message-ID:  \r\nMessage-ID: <second>\r\n\r\n.\r\n",
                REJECT,
                true,
            ),
            (b"Subject: x\r\n\r\nMessage-ID: <b>\r\n.\r\n", REJECT, true),
            (b"Message-ID: <no-blank-line>\r\n.\r\n", REJECT, true),
            (b"Subject: x\r\n\r\n.\r\n", REJECT, true),
            (b".\r\n", REJECT, true),
            // More candidates than noted, a dot dropped, a bare LF: the full search.
            (
                b"M1: a\r\nM2: a\r\nM3: a\r\nM4: a\r\nM5: a\r\nM6: a\r\nM7: a\r\n\
                  Message-ID: <late>\r\n\r\n.\r\n",
                REJECT,
                false,
            ),
            (b".Message-ID: <d>\r\n\r\n.\r\n", REJECT, false),
            (
                b"Subject: x\nMessage-ID: <l>\r\n\r\n.\r\n",
                NORMALIZE,
                false,
            ),
        ];
        for &(input, policy, noted) in cases {
            for step in 1..=input.len() {
                let headroom = 7;
                let mut reader = DataReader::new(1000, policy);
                let mut body = BytesMut::from(&[0u8; 7][..]);
                let mut pos = 0;
                while pos < input.len() {
                    let end = (pos + step).min(input.len());
                    let (n, done) = reader.feed(&input[pos..end], &mut body);
                    pos += n;
                    if done {
                        break;
                    }
                }
                let body = &body[headroom..];
                let lines = reader.header_lines();
                let starts = lines.starts(headroom);
                assert_eq!(starts.is_some(), noted, "{input:?} step {step}");
                if let Some(starts) = starts {
                    assert_eq!(
                        message_id_among(body, starts),
                        message_id(body),
                        "{input:?} step {step}"
                    );
                }
            }
        }
        // A reader that saw no line start notes nothing: an empty BDAT body.
        let empty = DataReader::chunked(10, REJECT).header_lines();
        assert_eq!(empty.starts(0).map(Iterator::count), Some(0));
    }

    #[test]
    fn finds_the_terminator_and_leaves_what_follows() {
        let (body, outcome, rest) =
            every_split(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n", REJECT, 1000).unwrap();
        assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(outcome, BodyOutcome::Complete);
        assert_eq!(rest, 6);
    }

    #[test]
    fn empty_body_starts_after_a_crlf() {
        let (body, outcome, rest) = every_split(b".\r\n", REJECT, 1000).unwrap();
        assert!(body.is_empty());
        assert_eq!((outcome, rest), (BodyOutcome::Complete, 0));
    }

    #[test]
    fn unstuffs_leading_dots() {
        let (body, ..) = every_split(b"..\r\n...x\r\n.y\r\na.b\r\n.\r\n", REJECT, 1000).unwrap();
        assert_eq!(body, b".\r\n..x\r\ny\r\na.b\r\n");
    }

    #[test]
    fn smuggling_sequences_never_end_the_message() {
        for seq in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n.\rX",
            b"\r.\r",
            b"\n.\r",
        ] {
            let mut input = b"one".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<evil@example.com>\r\nmore\r\n.\r\nNEXT");
            for policy in [REJECT, NORMALIZE] {
                let (body, outcome, rest) = every_split(&input, policy, 1000).unwrap();
                assert_eq!(rest, 4, "only the real terminator ends {seq:?}");
                match policy {
                    BareLfPolicy::Reject => assert_eq!(outcome, BodyOutcome::BareLineEnding),
                    BareLfPolicy::Normalize => {
                        assert_eq!(outcome, BodyOutcome::Complete);
                        assert!(only_crlf(&body), "{seq:?} normalized to {body:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn bare_line_endings_in_text() {
        let (_, outcome, _) = every_split(b"a\nb\r\n.\r\n", REJECT, 1000).unwrap();
        assert_eq!(outcome, BodyOutcome::BareLineEnding);
        let (body, outcome, _) = every_split(b"a\nb\rc\r\r\n.\r\n", NORMALIZE, 1000).unwrap();
        assert_eq!(outcome, BodyOutcome::Complete);
        assert_eq!(body, b"a\r\nb\r\nc\r\n\r\n");
    }

    #[test]
    fn size_limit_counts_unstuffed_octets() {
        // "..x\r\n" unstuffs to ".x\r\n": 4 octets.
        let (body, outcome, _) = every_split(b"..x\r\n.\r\n", REJECT, 4).unwrap();
        assert_eq!(
            (body.as_slice(), outcome),
            (&b".x\r\n"[..], BodyOutcome::Complete)
        );
        let (body, outcome, rest) = every_split(b"..xy\r\n.\r\nQUIT", REJECT, 4).unwrap();
        assert_eq!((body.len(), outcome, rest), (0, BodyOutcome::TooLarge, 4));
    }

    #[test]
    fn incomplete_body_waits_for_more() {
        assert_eq!(read(b"abc\r\n.\r", 1, REJECT, 100), None);
        assert_eq!(read(b"abc\r\n", 3, REJECT, 100), None);
    }

    #[test]
    fn size_counts_unstuffed_octets_also_past_the_limit() {
        let mut reader = DataReader::new(4, REJECT);
        let mut body = BytesMut::new();
        assert_eq!(reader.size(), 0);
        // "..x\r\n" is 4 octets once unstuffed; "yyyy\r\n" takes it past the limit,
        // and the count goes on (RFC 1870 counts the message, not what was kept).
        assert_eq!(reader.feed(b"..x\r\n", &mut body), (5, false));
        assert_eq!(reader.size(), 4);
        assert_eq!(reader.feed(b"yyyy\r\n.\r\n", &mut body), (9, true));
        assert_eq!(reader.size(), 10);
        assert_eq!(reader.outcome(), BodyOutcome::TooLarge);
        assert!(body.is_empty());
    }

    #[test]
    fn nothing_is_kept_after_a_bare_line_ending_under_reject() {
        // The message will be refused with 550 whatever follows: holding on to the
        // rest of it would only cost memory.
        for bare in [&b"a\nb"[..], b"a\rb", b"\r\n.\rb"] {
            let mut reader = DataReader::new(1 << 20, REJECT);
            let mut body = BytesMut::new();
            let (n, done) = reader.feed(bare, &mut body);
            assert_eq!((n, done), (bare.len(), false));
            let kept = body.len();
            assert!(kept <= 2, "{bare:?}: {body:?}");
            let more = vec![b'z'; 100_000];
            reader.feed(&more, &mut body);
            assert_eq!(
                body.len(),
                kept,
                "{bare:?}: the body grew after the bare ending"
            );
            assert_eq!(reader.feed(b"\r\n.\r\n", &mut body), (5, true));
            assert_eq!(reader.outcome(), BodyOutcome::BareLineEnding);
            assert!(reader.saw_bare_line_ending());
        }
        // Under normalize the same bytes are all kept, as CRLF.
        let mut reader = DataReader::new(1 << 20, NORMALIZE);
        let mut body = BytesMut::new();
        reader.feed(b"a\nbz\r\n.\r\n", &mut body);
        assert_eq!(&body[..], b"a\r\nbz\r\n");
        assert!(reader.saw_bare_line_ending());
        assert_eq!(reader.outcome(), BodyOutcome::Complete);
    }

    /// BDAT content through the same scanner: every split, chunk boundaries included,
    /// gives the same body and outcome; dots are plain content.
    #[test]
    fn chunked_content_follows_the_policy_across_any_split() {
        let chunked = |input: &[u8], step: usize, policy| {
            let mut reader = DataReader::chunked(1000, policy);
            let mut body = BytesMut::new();
            for piece in input.chunks(step) {
                assert_eq!(reader.feed(piece, &mut body), (piece.len(), false));
            }
            reader.finish(&mut body);
            (body.to_vec(), reader.outcome())
        };
        let cases: &[(&[u8], BodyOutcome, &[u8])] = &[
            (b".\r\n..x\r\n", BodyOutcome::Complete, b".\r\n..x\r\n"),
            (b"a\n.\nb", BodyOutcome::BareLineEnding, b"a\r\n.\r\nb"),
            (b"a\r.\r\n", BodyOutcome::BareLineEnding, b"a\r\n.\r\n"),
            (b"end\r", BodyOutcome::BareLineEnding, b"end\r\n"),
        ];
        for &(input, reject, normalized) in cases {
            for step in 1..=input.len() {
                assert_eq!(
                    chunked(input, step, REJECT).1,
                    reject,
                    "{input:?} by {step}"
                );
                let (body, outcome) = chunked(input, step, NORMALIZE);
                assert_eq!(
                    (body.as_slice(), outcome),
                    (normalized, BodyOutcome::Complete)
                );
            }
        }
    }
}
