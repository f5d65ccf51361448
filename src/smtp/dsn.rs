//! Delivery status notification parameters (RFC 3461): `RET` and `ENVID` on MAIL,
//! `NOTIFY` and `ORCPT` on RCPT, and the xtext encoding their values use.
//!
//! The gateway delivers nothing itself; it checks these parameters as RFC 3461 writes
//! them and hands them on in the record, so whatever delivers downstream can honour the
//! sender's request. Values are validated in place and kept as sent (xtext-encoded):
//! nothing here allocates on the command path.

use super::reply;

/// RFC 3461 section 4.4: an ENVID value is at most 100 characters.
pub const MAX_ENVID: usize = 100;
/// RFC 3461 section 4.2 bounds ORCPT by the 500 characters it adds to a RCPT line.
pub const MAX_ORCPT: usize = 500;

/// `RET=`: what a failure notification returns of the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn parse(value: &[u8]) -> Result<Ret, DsnError> {
        if value.eq_ignore_ascii_case(b"FULL") {
            Ok(Ret::Full)
        } else if value.eq_ignore_ascii_case(b"HDRS") {
            Ok(Ret::Hdrs)
        } else {
            Err(DsnError::Ret)
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// `NOTIFY=`: `NEVER`, or a set of `SUCCESS`, `FAILURE` and `DELAY`; the default value
/// is "not given" (the record's empty string).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Notify(u8);

impl Notify {
    const SUCCESS: u8 = 1;
    const FAILURE: u8 = 2;
    const DELAY: u8 = 4;
    const NEVER: u8 = 8;

    /// `NEVER` alone, or each of the others at most once, in any order and case.
    pub fn parse(value: &[u8]) -> Result<Notify, DsnError> {
        let mut bits = 0u8;
        for word in value.split(|&b| b == b',') {
            let bit = if word.eq_ignore_ascii_case(b"SUCCESS") {
                Self::SUCCESS
            } else if word.eq_ignore_ascii_case(b"FAILURE") {
                Self::FAILURE
            } else if word.eq_ignore_ascii_case(b"DELAY") {
                Self::DELAY
            } else if word.eq_ignore_ascii_case(b"NEVER") {
                Self::NEVER
            } else {
                return Err(DsnError::Notify);
            };
            if bits & bit != 0 {
                return Err(DsnError::Notify);
            }
            bits |= bit;
        }
        if bits & Self::NEVER != 0 && bits != Self::NEVER {
            return Err(DsnError::Notify);
        }
        Ok(Notify(bits))
    }

    pub fn is_given(self) -> bool {
        self.0 != 0
    }

    /// The canonical spelling (upper case, `SUCCESS,FAILURE,DELAY` order); empty when
    /// the client gave none. A static string: writing the record costs no allocation.
    pub fn as_str(self) -> &'static str {
        const SETS: [&str; 8] = [
            "",
            "SUCCESS",
            "FAILURE",
            "SUCCESS,FAILURE",
            "DELAY",
            "SUCCESS,DELAY",
            "FAILURE,DELAY",
            "SUCCESS,FAILURE,DELAY",
        ];
        if self.0 == Self::NEVER {
            "NEVER"
        } else {
            SETS[usize::from(self.0 & 7)]
        }
    }
}

/// Why a DSN parameter was refused: each is `501 5.5.4` with its own text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnError {
    Ret,
    Envid,
    Notify,
    Orcpt,
}

impl DsnError {
    pub fn reply(self) -> &'static [u8] {
        match self {
            DsnError::Ret => reply::BAD_RET,
            DsnError::Envid => reply::BAD_ENVID,
            DsnError::Notify => reply::BAD_NOTIFY,
            DsnError::Orcpt => reply::BAD_ORCPT,
        }
    }
}

/// `ENVID=xtext`, at most [`MAX_ENVID`] characters; borrowed from the command line.
pub fn parse_envid(value: &[u8]) -> Result<&str, DsnError> {
    if value.is_empty() || value.len() > MAX_ENVID || !is_printable_xtext(value) {
        return Err(DsnError::Envid);
    }
    std::str::from_utf8(value).map_err(|_| DsnError::Envid)
}

/// `ORCPT=addr-type;xtext` (the address type an RFC 5322 atom), at most [`MAX_ORCPT`]
/// characters; borrowed from the command line.
pub fn parse_orcpt(value: &[u8]) -> Result<&str, DsnError> {
    if value.len() > MAX_ORCPT {
        return Err(DsnError::Orcpt);
    }
    let semi = value
        .iter()
        .position(|&b| b == b';')
        .ok_or(DsnError::Orcpt)?;
    let (addr_type, address) = (&value[..semi], &value[semi + 1..]);
    let atom_ok = !addr_type.is_empty() && addr_type.iter().all(|&b| is_atext(b));
    if !atom_ok || address.is_empty() || !is_printable_xtext(address) {
        return Err(DsnError::Orcpt);
    }
    std::str::from_utf8(value).map_err(|_| DsnError::Orcpt)
}

/// RFC 5322 `atext`.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// An `xchar`: printable ASCII (33..=126) except `+` and `=`.
pub fn is_xchar(b: u8) -> bool {
    (33..=126).contains(&b) && b != b'+' && b != b'='
}

/// Why a string is not xtext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XtextError {
    #[error("byte {0:#04x} is not allowed in xtext")]
    Char(u8),
    #[error("`+` must be followed by two upper-case hexadecimal digits")]
    Hex,
}

/// The bytes xtext `value` stands for, one at a time (RFC 3461 section 4: `+XX` with
/// upper-case hex digits, otherwise [`is_xchar`]).
pub fn decode(value: &[u8]) -> impl Iterator<Item = Result<u8, XtextError>> + '_ {
    let mut rest = value;
    std::iter::from_fn(move || {
        let (&first, tail) = rest.split_first()?;
        if first == b'+' {
            let byte = match tail {
                [h, l, ..] => upper_hex(*h).zip(upper_hex(*l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            rest = tail.get(2..).unwrap_or_default();
            if byte.is_none() {
                rest = &[];
            }
            Some(byte.ok_or(XtextError::Hex))
        } else if is_xchar(first) {
            rest = tail;
            Some(Ok(first))
        } else {
            rest = &[];
            Some(Err(XtextError::Char(first)))
        }
    })
}

/// Decodes a whole xtext value.
pub fn decode_to_vec(value: &[u8]) -> Result<Vec<u8>, XtextError> {
    decode(value).collect()
}

#[cfg(any(test, feature = "testing"))]
/// Encodes `bytes` as xtext: `+`, `=` and everything outside 33..=126 as `+XX`.
pub fn encode(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_xchar(b) {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

fn upper_hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Valid xtext whose decoded text is printable US-ASCII (graphic or space), as RFC 3461
/// requires of ENVID (section 4.4) and of the ORCPT address (section 4.2).
fn is_printable_xtext(value: &[u8]) -> bool {
    decode(value).all(|b| b.is_ok_and(|b| (32..=126).contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn xtext_decodes_hex_pairs_and_xchars() {
        assert_eq!(decode_to_vec(b"abc+2Bdef").unwrap(), b"abc+def");
        assert_eq!(decode_to_vec(b"bob+40x.example").unwrap(), b"bob@x.example");
        assert_eq!(decode_to_vec(b"").unwrap(), b"");
        assert_eq!(decode_to_vec(b"+3D+20").unwrap(), b"= ");
        assert_eq!(decode_to_vec(b"a+2b"), Err(XtextError::Hex));
        assert_eq!(decode_to_vec(b"a+2"), Err(XtextError::Hex));
        assert_eq!(decode_to_vec(b"a+"), Err(XtextError::Hex));
        assert_eq!(decode_to_vec(b"a+G0"), Err(XtextError::Hex));
        assert_eq!(decode_to_vec(b"a=b"), Err(XtextError::Char(b'=')));
        assert_eq!(decode_to_vec(b"a b"), Err(XtextError::Char(b' ')));
        assert_eq!(decode_to_vec("é".as_bytes()), Err(XtextError::Char(0xc3)));
        assert_eq!(decode_to_vec(b"\x7f"), Err(XtextError::Char(0x7f)));
    }

    #[test]
    fn envid_and_orcpt_limits() {
        assert_eq!(parse_envid(b"abc+2Bdef"), Ok("abc+2Bdef"));
        assert_eq!(parse_envid(&[b'x'; MAX_ENVID]).map(str::len), Ok(MAX_ENVID));
        assert_eq!(parse_envid(&[b'x'; MAX_ENVID + 1]), Err(DsnError::Envid));
        assert_eq!(parse_envid(b"a+0Ab"), Err(DsnError::Envid), "decodes to LF");
        assert_eq!(parse_envid(b"a+2b"), Err(DsnError::Envid));
        assert_eq!(
            parse_orcpt(b"rfc822;bob+40x.example"),
            Ok("rfc822;bob+40x.example")
        );
        let long = format!("rfc822;{}", "y".repeat(MAX_ORCPT - 7));
        assert_eq!(parse_orcpt(long.as_bytes()), Ok(long.as_str()));
        let longer = format!("rfc822;{}", "y".repeat(MAX_ORCPT - 6));
        assert_eq!(parse_orcpt(longer.as_bytes()), Err(DsnError::Orcpt));
        for bad in [
            &b"rfc822"[..],
            b";a@b",
            b"rfc822;",
            b"rfc 822;a",
            b"rfc822;a+4",
            b"rfc822;a+00b",
            b"rf\"c;a",
        ] {
            assert_eq!(parse_orcpt(bad), Err(DsnError::Orcpt), "{bad:?}");
        }
        // A `;` in the address part is an xchar.
        assert!(parse_orcpt(b"x-type;a;b").is_ok());
    }

    #[test]
    fn notify_rules() {
        assert_eq!(Notify::parse(b"NEVER").map(Notify::as_str), Ok("NEVER"));
        assert_eq!(
            Notify::parse(b"delay,Success").map(Notify::as_str),
            Ok("SUCCESS,DELAY")
        );
        assert_eq!(
            Notify::parse(b"SUCCESS,FAILURE,DELAY").map(Notify::as_str),
            Ok("SUCCESS,FAILURE,DELAY")
        );
        for bad in [
            &b"NEVER,SUCCESS"[..],
            b"FAILURE,NEVER",
            b"SUCCESS,SUCCESS",
            b"NEVER,NEVER",
            b"SUCCESS,",
            b",SUCCESS",
            b"SOMETIMES",
            b"",
        ] {
            assert_eq!(Notify::parse(bad), Err(DsnError::Notify), "{bad:?}");
        }
        assert_eq!(Notify::default().as_str(), "");
        assert!(!Notify::default().is_given());
    }

    #[test]
    fn ret_values() {
        assert_eq!(Ret::parse(b"hdrs"), Ok(Ret::Hdrs));
        assert_eq!(Ret::parse(b"FULL"), Ok(Ret::Full));
        assert_eq!(Ret::parse(b"BOTH"), Err(DsnError::Ret));
    }

    #[test]
    fn every_dsn_error_is_a_501_5_5_4() {
        for e in [
            DsnError::Ret,
            DsnError::Envid,
            DsnError::Notify,
            DsnError::Orcpt,
        ] {
            assert!(e.reply().starts_with(b"501 5.5.4 "), "{e:?}");
        }
    }

    proptest! {
        /// Any bytes survive encode then decode, and the encoding is valid xtext.
        #[test]
        fn xtext_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut text = String::new();
            encode(&bytes, &mut text);
            prop_assert!(text.bytes().all(|b| is_xchar(b) || b == b'+'
                || b.is_ascii_digit() || (b'A'..=b'F').contains(&b)));
            prop_assert_eq!(decode_to_vec(text.as_bytes()), Ok(bytes));
        }

        /// Any valid xtext decodes, and what it decodes to survives encode and decode.
        #[test]
        fn canonical_xtext_round_trips(text in "([!-*,-<>-~]|\\+[0-9A-F]{2})*") {
            let bytes = decode_to_vec(text.as_bytes());
            prop_assert!(bytes.is_ok());
            let bytes = bytes.unwrap_or_default();
            let mut again = String::new();
            encode(&bytes, &mut again);
            prop_assert_eq!(decode_to_vec(again.as_bytes()), Ok(bytes));
        }
    }
}
