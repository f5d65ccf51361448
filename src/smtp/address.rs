//! RFC 5321 paths and mailboxes (section 4.1.2), with the RFC 6531 UTF-8 extensions.
//!
//! Parsing borrows from the command line and allocates nothing; the session copies an
//! address into its envelope only once it has accepted it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 section 4.5.3.1.1.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 section 4.5.3.1.2.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 section 4.5.3.1.3: the whole path, angle brackets included.
pub const MAX_PATH: usize = 256;

/// A mailbox, `local-part@domain`, exactly as the client wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox<'a> {
    /// `local@domain` as written (quoted local parts keep their quotes).
    pub text: &'a str,
    pub local_part: &'a str,
    pub domain: Domain<'a>,
}

impl Mailbox<'_> {
    pub fn is_ascii(&self) -> bool {
        self.text.is_ascii()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain<'a> {
    /// A domain name (A-labels or, with SMTPUTF8, U-labels).
    Name(&'a str),
    /// An address literal with its brackets: `[192.0.2.1]`, `[IPv6:2001:db8::1]`.
    Literal(&'a str),
}

impl<'a> Domain<'a> {
    pub fn as_str(&self) -> &'a str {
        match *self {
            Domain::Name(s) | Domain::Literal(s) => s,
        }
    }
}

/// The argument of MAIL FROM: the sender, or `<>` for bounces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReversePath<'a> {
    Null,
    Mailbox(Mailbox<'a>),
}

/// The argument of RCPT TO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardPath<'a> {
    /// `<Postmaster>` without a domain, which every server must accept (section 4.5.1).
    Postmaster,
    /// `<>`: syntactically a path, but no one to deliver to.
    Null,
    Mailbox(Mailbox<'a>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address syntax")]
    Syntax,
    #[error("address is not valid UTF-8")]
    NotUtf8,
    #[error("local part longer than 64 octets")]
    LocalPartTooLong,
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    #[error("path longer than 256 octets")]
    PathTooLong,
    #[error("control, line-separator or bidi-override character in the address")]
    HostileCharacter,
}

/// Characters no address may carry even with SMTPUTF8: C0/C1 controls and DEL, the
/// Unicode line and paragraph separators (a line break to some readers), and the bidi
/// embedding/override/isolate controls that make a terminal or a mail client show
/// text in another order than it is stored (Trojan Source, CVE-2021-42574).
pub fn is_hostile_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
                | '\u{200E}' | '\u{200F}' | '\u{061C}'
        )
}

/// Where escaped client text goes, which decides the two things that differ between
/// places: whether line breaks and tabs stay (a message body shown whole) and whether a
/// backslash is doubled (so every escape is unambiguous where nothing else reads `\`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscapeFor {
    /// A `Received:` trace line: backslashes stay, since quoted local parts use them
    /// legitimately (RFC 5321 quoted-pair).
    TraceLine,
    /// One field of a tool's output line (`spool ls`).
    TerminalField,
    /// A message shown whole on a terminal (`spool cat`): line breaks and tabs stay.
    TerminalText,
}

/// Writes client text with every character that is not plainly printable (see
/// [`is_hostile_char`]) as a visible `\u{..}` escape and every byte that is not UTF-8 as
/// `\x..`, so what a client sent can never change the structure of a trace line or what
/// a terminal shows. The one escaper for client text.
pub fn write_escaped(
    out: &mut impl std::io::Write,
    bytes: &[u8],
    place: EscapeFor,
) -> std::io::Result<()> {
    let keep = |c: char| match c {
        '\\' => place != EscapeFor::TerminalField,
        '\r' | '\n' | '\t' => place == EscapeFor::TerminalText,
        c => !is_hostile_char(c),
    };
    for chunk in bytes.utf8_chunks() {
        let mut rest = chunk.valid();
        while let Some(at) = rest.find(|c| !keep(c)) {
            out.write_all(&rest.as_bytes()[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            if c == '\\' {
                out.write_all(b"\\\\")?;
            } else {
                write!(out, "\\u{{{:x}}}", c as u32)?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        out.write_all(rest.as_bytes())?;
        for b in chunk.invalid() {
            write!(out, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// [`write_escaped`] into a string.
pub fn escaped(bytes: &[u8], place: EscapeFor) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let _ = write_escaped(&mut out, bytes, place);
    // Only whole UTF-8 characters and ASCII escapes were written.
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `name` is acceptable as a HELO/EHLO argument: an address literal, or a
/// domain of ASCII letters, digits, `-` and `_` (underscores are common in Windows host
/// names and harmless). Anything else could distort the `Received:` line it goes into.
pub fn is_valid_helo(name: &str) -> bool {
    if name.starts_with('[') {
        return parse_address_literal(name).is_ok();
    }
    !name.is_empty()
        && name.len() <= MAX_DOMAIN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

/// Why an accept-domain cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcceptDomainError {
    #[error("not a valid domain (got {0:?})")]
    Domain(String),
    #[error("not a valid address literal (got {0:?}); e.g. [192.0.2.1] or [IPv6:2001:db8::1]")]
    Literal(String),
}

/// The one form in which an accept-domain is stored and compared: a domain name after
/// UTS #46 processing (A-labels, lower case), so `bücher.example`, `BÜCHER.example` and
/// `xn--bcher-kva.example` are one domain; an address literal as `[a.b.c.d]` or
/// `[IPv6:<canonical>]`.
pub fn normalize_accept_domain(text: &str) -> Result<String, AcceptDomainError> {
    if text.starts_with('[') {
        let bad = || AcceptDomainError::Literal(text.to_owned());
        return match parse_address_literal(text).map_err(|_| bad())? {
            Domain::Literal(l) => literal_ip(l).map(canonical_literal).ok_or_else(bad),
            Domain::Name(_) => Err(bad()),
        };
    }
    let bad = || AcceptDomainError::Domain(text.to_owned());
    let ascii = idna::domain_to_ascii_cow(text.as_bytes(), idna::AsciiDenyList::EMPTY)
        .map_err(|_| bad())?;
    // UTS #46 without STD3 rules lets through ASCII that is no host name (space, `/`).
    let ldh = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    if ascii.is_empty() || ascii.len() > MAX_DOMAIN || !ascii.split('.').all(ldh) {
        return Err(bad());
    }
    Ok(ascii.into_owned())
}

fn canonical_literal(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// The IP address of an IPv4 or `IPv6:` address literal (brackets included).
fn literal_ip(literal: &str) -> Option<std::net::IpAddr> {
    let inner = literal.strip_prefix('[')?.strip_suffix(']')?;
    match strip_prefix_ignore_case(inner, "IPv6:") {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(Into::into),
        None => inner.parse::<Ipv4Addr>().ok().map(Into::into),
    }
}

/// The accept-domains, each in the form [`normalize_accept_domain`] returns, in a hash
/// set: a recipient's domain is normalised once and looked up, so a RCPT costs the same
/// whether the list has ten domains or ten thousand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcceptDomains(HashSet<String>);

impl AcceptDomains {
    /// From domains already normalised (the configuration normalises them at load).
    pub fn new<S: Into<String>>(normalised: impl IntoIterator<Item = S>) -> AcceptDomains {
        AcceptDomains(normalised.into_iter().map(Into::into).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a recipient's domain is accepted. An ASCII name is lower-cased on the
    /// stack, without allocating; only a U-label name (SMTPUTF8) is IDNA-converted, and
    /// an address literal put in its canonical form, once per call.
    pub fn accepts(&self, domain: Domain<'_>) -> bool {
        match domain {
            Domain::Name(name) if name.is_ascii() => {
                let mut lower = [0u8; MAX_DOMAIN];
                let Some(buf) = lower.get_mut(..name.len()) else {
                    return false;
                };
                buf.copy_from_slice(name.as_bytes());
                buf.make_ascii_lowercase();
                // Lower-casing ASCII keeps it ASCII, so this never fails.
                std::str::from_utf8(buf).is_ok_and(|n| self.0.contains(n))
            }
            Domain::Name(name) => {
                idna::domain_to_ascii_cow(name.as_bytes(), idna::AsciiDenyList::EMPTY)
                    .is_ok_and(|ascii| self.0.contains(ascii.as_ref()))
            }
            Domain::Literal(literal) => {
                literal_ip(literal).is_some_and(|ip| self.0.contains(&canonical_literal(ip)))
            }
        }
    }
}

impl<S: Into<String>> FromIterator<S> for AcceptDomains {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> AcceptDomains {
        AcceptDomains::new(iter)
    }
}

/// Parses `<...>` at the start of `input` and returns it with the unparsed rest (the
/// parameters). The null path `<>` is returned as `Ok(None)`.
fn parse_path(input: &[u8]) -> Result<(Option<Mailbox<'_>>, &[u8]), AddressError> {
    if input.first() != Some(&b'<') {
        return Err(AddressError::Syntax);
    }
    let end = closing_bracket(input).ok_or(AddressError::Syntax)?;
    if end + 1 > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    let rest = &input[end + 1..];
    if !(rest.is_empty() || rest[0] == b' ') {
        return Err(AddressError::Syntax);
    }
    let inner = &input[1..end];
    if inner.is_empty() {
        return Ok((None, rest));
    }
    let inner = std::str::from_utf8(inner).map_err(|_| AddressError::NotUtf8)?;
    if !inner.is_ascii() && inner.chars().any(is_hostile_char) {
        return Err(AddressError::HostileCharacter);
    }
    let mailbox = skip_source_route(inner)?;
    Ok((Some(parse_mailbox(mailbox)?), rest))
}

/// Finds the `>` that closes the path, skipping any inside a quoted local part.
fn closing_bracket(input: &[u8]) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in input.iter().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == b'>' && !quoted {
            return Some(i);
        }
    }
    None
}

/// Source routes (`@a,@b:user@c`) are obsolete; section 4.1.1.3 says to accept and
/// ignore them.
fn skip_source_route(inner: &str) -> Result<&str, AddressError> {
    if !inner.starts_with('@') {
        return Ok(inner);
    }
    let colon = inner.find(':').ok_or(AddressError::Syntax)?;
    for hop in inner[..colon].split(',') {
        let domain = hop.strip_prefix('@').ok_or(AddressError::Syntax)?;
        parse_domain(domain)?;
    }
    Ok(&inner[colon + 1..])
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`.
pub fn parse_mailbox(text: &str) -> Result<Mailbox<'_>, AddressError> {
    let at = local_part_end(text)?;
    let (local_part, domain) = (&text[..at], &text[at + 1..]);
    if local_part.len() > MAX_LOCAL_PART {
        return Err(AddressError::LocalPartTooLong);
    }
    let domain = if domain.starts_with('[') {
        parse_address_literal(domain)?
    } else {
        parse_domain(domain)?
    };
    Ok(Mailbox {
        text,
        local_part,
        domain,
    })
}

/// Validates the local part and returns the index of the `@` that follows it.
fn local_part_end(text: &str) -> Result<usize, AddressError> {
    let bytes = text.as_bytes();
    if bytes.first() == Some(&b'"') {
        // Quoted-string: qtextSMTP or quoted-pairSMTP, UTF-8 allowed (RFC 6531).
        let mut i = 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => match bytes.get(i + 1) {
                    Some(&c) if (32..=126).contains(&c) => i += 2,
                    _ => return Err(AddressError::Syntax),
                },
                b'"' => {
                    return if bytes.get(i + 1) == Some(&b'@') {
                        Ok(i + 1)
                    } else {
                        Err(AddressError::Syntax)
                    }
                }
                c if c == 32 || c == 33 || (35..=126).contains(&c) || c >= 0x80 => i += 1,
                _ => return Err(AddressError::Syntax),
            }
        }
        return Err(AddressError::Syntax);
    }
    // Dot-string: atoms separated by single dots.
    let at = text.rfind('@').ok_or(AddressError::Syntax)?;
    let local = &bytes[..at];
    if local.is_empty() || local[0] == b'.' || local[local.len() - 1] == b'.' {
        return Err(AddressError::Syntax);
    }
    let mut previous_dot = false;
    for &c in local {
        if c == b'.' {
            if previous_dot {
                return Err(AddressError::Syntax);
            }
            previous_dot = true;
        } else if is_atext(c) {
            previous_dot = false;
        } else {
            return Err(AddressError::Syntax);
        }
    }
    Ok(at)
}

/// RFC 5322 atext, plus any octet of a UTF-8 sequence (RFC 6531 section 3.3; the whole
/// path was already checked to be valid UTF-8).
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c) || c >= 0x80
}

/// `Domain = sub-domain *("." sub-domain)`, each `Let-dig [Ldh-str]` or a U-label.
pub fn parse_domain(domain: &str) -> Result<Domain<'_>, AddressError> {
    if domain.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    if domain.is_empty() {
        return Err(AddressError::Syntax);
    }
    for label in domain.split('.') {
        let b = label.as_bytes();
        let let_dig = |c: u8| c.is_ascii_alphanumeric() || c >= 0x80;
        let valid = !b.is_empty()
            && b.len() <= 63
            && let_dig(b[0])
            && let_dig(b[b.len() - 1])
            && b.iter().all(|&c| let_dig(c) || c == b'-');
        if !valid {
            return Err(AddressError::Syntax);
        }
    }
    Ok(Domain::Name(domain))
}

/// `address-literal = "[" ( IPv4 / "IPv6:" IPv6 / General-address-literal ) "]"`.
fn parse_address_literal(literal: &str) -> Result<Domain<'_>, AddressError> {
    let inner = literal
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or(AddressError::Syntax)?;
    let valid = if let Some(v6) = strip_prefix_ignore_case(inner, "IPv6:") {
        v6.parse::<Ipv6Addr>().is_ok()
    } else if let Some(colon) = inner.find(':') {
        // General-address-literal: Standardized-tag ":" 1*dcontent.
        let (tag, content) = (&inner[..colon], &inner[colon + 1..]);
        !tag.is_empty()
            && tag.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !content.is_empty()
            && content
                .bytes()
                .all(|c| (33..=90).contains(&c) || (94..=126).contains(&c))
    } else {
        inner.parse::<Ipv4Addr>().is_ok()
    };
    if valid {
        Ok(Domain::Literal(literal))
    } else {
        Err(AddressError::Syntax)
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Parses the argument of MAIL FROM (after the colon); returns the path and the
/// parameter text that follows it.
pub fn parse_reverse_path(input: &[u8]) -> Result<(ReversePath<'_>, &[u8]), AddressError> {
    let (mailbox, rest) = parse_path(input)?;
    let path = match mailbox {
        None => ReversePath::Null,
        Some(m) => ReversePath::Mailbox(m),
    };
    Ok((path, rest))
}

/// Parses the argument of RCPT TO (after the colon); returns the path and the parameter
/// text that follows it.
pub fn parse_forward_path(input: &[u8]) -> Result<(ForwardPath<'_>, &[u8]), AddressError> {
    if input.len() >= 12 && input[..12].eq_ignore_ascii_case(b"<postmaster>") {
        let rest = &input[12..];
        if rest.is_empty() || rest[0] == b' ' {
            return Ok((ForwardPath::Postmaster, rest));
        }
    }
    let (mailbox, rest) = parse_path(input)?;
    let path = match mailbox {
        None => ForwardPath::Null,
        Some(m) => ForwardPath::Mailbox(m),
    };
    Ok((path, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(input: &str) -> Result<Mailbox<'_>, AddressError> {
        match parse_reverse_path(input.as_bytes())? {
            (ReversePath::Mailbox(m), []) => Ok(m),
            _ => Err(AddressError::Syntax),
        }
    }

    #[test]
    fn accepts_rfc5321_forms() {
        for ok in [
            "<user@example.com>",
            "<first.last+tag@sub.example.co.uk>",
            "<\"quoted local\"@example.com>",
            "<\"with \\\" escaped > bracket\"@example.com>",
            "<user@[192.0.2.1]>",
            "<user@[IPv6:2001:db8::1]>",
            "<user@[x-tag:content]>",
            "<@relay.example,@other.example:user@example.com>",
            "<!#$%&'*+-/=?^_`{|}~@example.com>",
            "<用户@例子.广告>",
            "<a@b>",
        ] {
            assert!(mailbox(ok).is_ok(), "{ok} should parse");
        }
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "user@example.com",
            "<user@example.com",
            "<user>",
            "<@example.com>",
            "<.user@example.com>",
            "<user.@example.com>",
            "<us..er@example.com>",
            "<user@-example.com>",
            "<user@example-.com>",
            "<user@exa mple.com>",
            "<user@example..com>",
            "<user@[300.1.1.1]>",
            "<user@[IPv6:zz::1]>",
            "<\"unterminated@example.com>",
            "<user@example.com>x",
            "<us er@example.com>",
            "<@relay.example:>",
        ] {
            assert!(mailbox(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn source_route_is_ignored() {
        let m = mailbox("<@a.example,@b.example:user@c.example>").unwrap();
        assert_eq!(m.text, "user@c.example");
        assert_eq!(m.domain, Domain::Name("c.example"));
    }

    #[test]
    fn enforces_length_limits() {
        let local = "a".repeat(64);
        assert!(mailbox(&format!("<{local}@example.com>")).is_ok());
        assert_eq!(
            mailbox(&format!("<{local}a@example.com>")),
            Err(AddressError::LocalPartTooLong)
        );
        // 256 octets including brackets is the most a path may be.
        let label = "d".repeat(63);
        let domain = format!("{label}.{label}.{label}.{}", "d".repeat(58));
        let path = format!("<{}@{domain}>", "u".repeat(256 - 3 - domain.len()));
        assert_eq!(path.len(), 256);
        assert!(mailbox(&path).is_ok());
        let path = format!("<{}@{domain}>", "u".repeat(257 - 3 - domain.len()));
        assert_eq!(mailbox(&path), Err(AddressError::PathTooLong));
    }

    #[test]
    fn null_and_postmaster_paths() {
        assert_eq!(
            parse_reverse_path(b"<> SIZE=10").unwrap(),
            (ReversePath::Null, &b" SIZE=10"[..])
        );
        assert_eq!(
            parse_forward_path(b"<POSTMASTER>").unwrap().0,
            ForwardPath::Postmaster
        );
        assert_eq!(parse_forward_path(b"<>").unwrap().0, ForwardPath::Null);
        assert!(matches!(
            parse_forward_path(b"<postmaster@example.com>").unwrap().0,
            ForwardPath::Mailbox(_)
        ));
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            parse_reverse_path(b"<\xff@example.com>"),
            Err(AddressError::NotUtf8)
        );
    }
}
