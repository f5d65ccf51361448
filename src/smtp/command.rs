//! The command parser: one line in (without its line ending), a borrowed [`Command`] out.
//!
//! Verbs match case-insensitively on bytes; arguments are slices of the line. Nothing
//! here allocates, so a pipelined burst of commands costs no memory traffic.

use super::address::{self, AddressError, ForwardPath, ReversePath};
use super::envelope::Verb;

/// RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 3461 section 4: DSN's ENVID lengthens a MAIL line by up to 100 octets, NOTIFY
/// and ORCPT a RCPT line by up to 500.
pub const MAX_MAIL_LINE: usize = MAX_COMMAND_LINE + 100;
pub const MAX_RCPT_LINE: usize = MAX_COMMAND_LINE + 500;
/// RFC 4954 section 4: an AUTH command line, and each SASL response line after it, may
/// be up to 12288 octets.
pub const MAX_AUTH_LINE: usize = 12288;

/// The longest line (with its CRLF) the command starting `line` may have; `line` may be
/// a part that has not ended yet.
pub fn line_limit(line: &[u8]) -> usize {
    let Some(verb) = line.get(..4) else {
        return MAX_COMMAND_LINE;
    };
    let is = |name: &[u8]| verb.eq_ignore_ascii_case(name);
    if is(b"RCPT") {
        MAX_RCPT_LINE
    } else if is(b"AUTH") {
        MAX_AUTH_LINE
    } else if is(b"MAIL") || is(b"SEND") || is(b"SOML") || is(b"SAML") {
        MAX_MAIL_LINE
    } else {
        MAX_COMMAND_LINE
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Helo(&'a [u8]),
    Ehlo(&'a [u8]),
    /// MAIL, or RFC 821's SEND, SOML and SAML, which open a transaction the same way.
    Mail {
        verb: Verb,
        from: ReversePath<'a>,
        params: Params<'a>,
    },
    Rcpt {
        to: ForwardPath<'a>,
        params: Params<'a>,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy(&'a [u8]),
    Expn(&'a [u8]),
    Help(&'a [u8]),
    Turn,
    /// RFC 3207; it takes no argument.
    StartTls,
    /// RFC 4954: `AUTH mechanism [initial-response]`, both borrowed.
    Auth {
        mechanism: &'a [u8],
        initial: Option<&'a [u8]>,
    },
    /// Known SMTP verbs we do not offer: ETRN, ATRN.
    NotImplemented,
}

/// Why a line is not a usable command. Each maps to one reply; the session's state is
/// unchanged by all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// `500 5.5.2`
    UnknownVerb,
    /// `501 5.5.4`, with the verb's syntax in the reply.
    Syntax(SyntaxOf),
    /// `501 5.1.7` / `553 5.1.7` for MAIL, `501 5.1.3` / `553 5.1.3` for RCPT.
    Address(PathKind, AddressError),
}

/// Which command's syntax a `501` explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntaxOf {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Bdat,
    Vrfy,
    Auth,
    NoArguments,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Sender,
    Recipient,
}

/// ESMTP parameters after a path: `KEYWORD[=value]` separated by spaces, parsed lazily.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params<'a>(&'a [u8]);

impl<'a> Params<'a> {
    /// The parameter text with surrounding spaces removed, as recorded in the envelope.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(keyword, value)` pairs. A keyword that is not `ALPHA/DIGIT *(ALPHA/DIGIT/"-")`
    /// or a value that is empty after `=` yields `Err(())` for that item.
    pub fn iter(&self) -> impl Iterator<Item = Result<(&'a [u8], Option<&'a [u8]>), ()>> + 'a {
        self.0
            .split(|&b| b == b' ')
            .filter(|p| !p.is_empty())
            .map(|param| {
                let (key, value) = match param.iter().position(|&b| b == b'=') {
                    Some(eq) => (&param[..eq], Some(&param[eq + 1..])),
                    None => (param, None),
                };
                let key_ok = key.first().is_some_and(u8::is_ascii_alphanumeric)
                    && key.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-');
                let value_ok = value.is_none_or(|v| {
                    !v.is_empty() && v.iter().all(|&b| b > b' ' && b != b'=' && b != 0x7f)
                });
                if key_ok && value_ok {
                    Ok((key, value))
                } else {
                    Err(())
                }
            })
    }
}

/// Parses one command line, its CRLF (or bare LF) already removed.
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let (verb, args) = match line.iter().position(|&b| b == b' ') {
        Some(sp) => (&line[..sp], trim(&line[sp + 1..])),
        None => (line, &line[line.len()..]),
    };
    let is = |name: &[u8]| verb.eq_ignore_ascii_case(name);
    let no_args = |cmd: Command<'static>| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax(SyntaxOf::NoArguments))
        }
    };
    if is(b"MAIL") {
        mail(Verb::Mail, args)
    } else if is(b"RCPT") {
        rcpt(args)
    } else if is(b"DATA") {
        no_args(Command::Data)
    } else if is(b"BDAT") {
        bdat(args)
    } else if is(b"EHLO") {
        nonempty(args, SyntaxOf::Ehlo).map(Command::Ehlo)
    } else if is(b"HELO") {
        nonempty(args, SyntaxOf::Helo).map(Command::Helo)
    } else if is(b"RSET") {
        no_args(Command::Rset)
    } else if is(b"NOOP") {
        // RFC 5321 section 4.1.1.9: NOOP's argument, if any, is ignored.
        Ok(Command::Noop)
    } else if is(b"QUIT") {
        no_args(Command::Quit)
    } else if is(b"VRFY") {
        nonempty(args, SyntaxOf::Vrfy).map(Command::Vrfy)
    } else if is(b"EXPN") {
        Ok(Command::Expn(args))
    } else if is(b"HELP") {
        Ok(Command::Help(args))
    } else if is(b"TURN") {
        no_args(Command::Turn)
    } else if is(b"SEND") {
        mail(Verb::Send, args)
    } else if is(b"SOML") {
        mail(Verb::Soml, args)
    } else if is(b"SAML") {
        mail(Verb::Saml, args)
    } else if is(b"STARTTLS") {
        no_args(Command::StartTls)
    } else if is(b"AUTH") {
        auth(args)
    } else if is(b"ETRN") || is(b"ATRN") {
        Ok(Command::NotImplemented)
    } else {
        Err(CommandError::UnknownVerb)
    }
}

fn nonempty(args: &[u8], syntax: SyntaxOf) -> Result<&[u8], CommandError> {
    if args.is_empty() {
        Err(CommandError::Syntax(syntax))
    } else {
        Ok(args)
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `FROM:` or `TO:` then the path; a space after the colon is tolerated because common
/// clients send one, although RFC 5321 has none.
fn after_keyword<'a>(args: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let head = args.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| trim(&args[keyword.len()..]))
}

fn mail(verb: Verb, args: &[u8]) -> Result<Command<'_>, CommandError> {
    let path = after_keyword(args, b"FROM:").ok_or(CommandError::Syntax(SyntaxOf::Mail))?;
    let (from, params) = address::parse_reverse_path(path)
        .map_err(|e| CommandError::Address(PathKind::Sender, e))?;
    Ok(Command::Mail {
        verb,
        from,
        params: Params(trim(params)),
    })
}

fn rcpt(args: &[u8]) -> Result<Command<'_>, CommandError> {
    let path = after_keyword(args, b"TO:").ok_or(CommandError::Syntax(SyntaxOf::Rcpt))?;
    let (to, params) = address::parse_forward_path(path)
        .map_err(|e| CommandError::Address(PathKind::Recipient, e))?;
    Ok(Command::Rcpt {
        to,
        params: Params(trim(params)),
    })
}

/// `BDAT SP chunk-size [SP "LAST"]` (RFC 3030).
fn bdat(args: &[u8]) -> Result<Command<'_>, CommandError> {
    let syntax = CommandError::Syntax(SyntaxOf::Bdat);
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let size = words.next().and_then(parse_decimal).ok_or(syntax)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return Err(syntax),
    };
    if words.next().is_some() {
        return Err(syntax);
    }
    Ok(Command::Bdat { size, last })
}

/// `AUTH SP mechanism [SP initial-response]` (RFC 4954 section 4).
fn auth(args: &[u8]) -> Result<Command<'_>, CommandError> {
    let syntax = CommandError::Syntax(SyntaxOf::Auth);
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(syntax)?;
    let initial = words.next();
    if words.next().is_some() {
        return Err(syntax);
    }
    Ok(Command::Auth { mechanism, initial })
}

/// A non-negative decimal of at most 20 digits (RFC 1870's `size-value`); values past
/// `u64::MAX` saturate, so they compare as "too large" rather than as malformed.
pub fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::Domain;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(parse(b"quit"), Ok(Command::Quit));
        assert_eq!(parse(b"QuIt"), Ok(Command::Quit));
        assert_eq!(parse(b"data"), Ok(Command::Data));
        assert_eq!(
            parse(b"eHlO client.example"),
            Ok(Command::Ehlo(b"client.example"))
        );
    }

    #[test]
    fn mail_borrows_path_and_params() {
        let Ok(Command::Mail { verb, from, params }) =
            parse(b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME")
        else {
            panic!("MAIL should parse");
        };
        assert_eq!(verb, Verb::Mail);
        let ReversePath::Mailbox(m) = from else {
            panic!("not null")
        };
        assert_eq!(m.text, "a@example.com");
        assert_eq!(m.domain, Domain::Name("example.com"));
        assert_eq!(params.as_bytes(), b"SIZE=100 BODY=8BITMIME");
        let items: Vec<_> = params.iter().collect();
        assert_eq!(
            items,
            vec![
                Ok((&b"SIZE"[..], Some(&b"100"[..]))),
                Ok((&b"BODY"[..], Some(&b"8BITMIME"[..])))
            ]
        );
    }

    #[test]
    fn tolerates_space_after_colon() {
        assert!(matches!(
            parse(b"mail from: <a@example.com>"),
            Ok(Command::Mail { .. })
        ));
        assert!(matches!(
            parse(b"RCPT TO: <b@example.com>"),
            Ok(Command::Rcpt { .. })
        ));
    }

    #[test]
    fn rfc821_verbs_open_transactions() {
        for (line, verb) in [
            (&b"SEND FROM:<a@b.example>"[..], Verb::Send),
            (b"SOML FROM:<a@b.example>", Verb::Soml),
            (b"SAML FROM:<>", Verb::Saml),
        ] {
            assert!(matches!(parse(line), Ok(Command::Mail { verb: v, .. }) if v == verb));
        }
    }

    #[test]
    fn bdat_arguments() {
        assert_eq!(
            parse(b"BDAT 10"),
            Ok(Command::Bdat {
                size: 10,
                last: false
            })
        );
        assert_eq!(
            parse(b"BDAT 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        for bad in [
            &b"BDAT"[..],
            b"BDAT x",
            b"BDAT -1",
            b"BDAT 1 FIRST",
            b"BDAT 1 LAST x",
        ] {
            assert_eq!(parse(bad), Err(CommandError::Syntax(SyntaxOf::Bdat)));
        }
        assert_eq!(
            parse(b"BDAT 99999999999999999999"),
            Ok(Command::Bdat {
                size: u64::MAX,
                last: false
            })
        );
        assert!(parse(b"BDAT 123456789012345678901").is_err());
    }

    #[test]
    fn argument_rules() {
        assert_eq!(parse(b"HELO"), Err(CommandError::Syntax(SyntaxOf::Helo)));
        assert_eq!(parse(b"EHLO   "), Err(CommandError::Syntax(SyntaxOf::Ehlo)));
        assert_eq!(
            parse(b"DATA x"),
            Err(CommandError::Syntax(SyntaxOf::NoArguments))
        );
        assert_eq!(parse(b"NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse(b"VRFY"), Err(CommandError::Syntax(SyntaxOf::Vrfy)));
        assert_eq!(
            parse(b"MAIL TO:<a@b>"),
            Err(CommandError::Syntax(SyntaxOf::Mail))
        );
        assert_eq!(
            parse(b"RCPT TO:a@b"),
            Err(CommandError::Address(
                PathKind::Recipient,
                AddressError::Syntax
            ))
        );
        assert_eq!(parse(b"FOO"), Err(CommandError::UnknownVerb));
        assert_eq!(parse(b""), Err(CommandError::UnknownVerb));
        assert_eq!(parse(b"STARTTLS"), Ok(Command::StartTls));
        assert_eq!(
            parse(b"STARTTLS now"),
            Err(CommandError::Syntax(SyntaxOf::NoArguments))
        );
        assert_eq!(parse(b"TURN"), Ok(Command::Turn));
    }

    #[test]
    fn malformed_params_are_flagged() {
        let Ok(Command::Mail { params, .. }) = parse(b"MAIL FROM:<> SIZE= =x -A OK") else {
            panic!()
        };
        let flags: Vec<bool> = params.iter().map(|p| p.is_ok()).collect();
        assert_eq!(flags, vec![false, false, false, true]);
    }

    #[test]
    fn param_values_with_equals_del_or_controls_are_flagged() {
        for bad in [
            &b"MAIL FROM:<> X=a=b"[..],
            b"MAIL FROM:<> X=a\x7f",
            b"MAIL FROM:<> X=\x01",
            b"MAIL FROM:<> X=a\x1fb",
            b"MAIL FROM:<> X=",
            b"MAIL FROM:<> =v",
            b"MAIL FROM:<> -X=v",
            b"MAIL FROM:<> X_Y=v",
        ] {
            let Ok(Command::Mail { params, .. }) = parse(bad) else {
                panic!("{bad:?} should parse as MAIL")
            };
            assert_eq!(
                params.iter().collect::<Vec<_>>(),
                vec![Err(())],
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // The same rules for RCPT; the printable ASCII range and a key with digits and
        // hyphens (after its first character) are fine.
        let Ok(Command::Rcpt { params, .. }) =
            parse(b"RCPT TO:<b@example.com> NOTIFY=a!~ 9X-Y=1 X")
        else {
            panic!("RCPT should parse")
        };
        assert_eq!(
            params.iter().collect::<Vec<_>>(),
            vec![
                Ok((&b"NOTIFY"[..], Some(&b"a!~"[..]))),
                Ok((&b"9X-Y"[..], Some(&b"1"[..]))),
                Ok((&b"X"[..], None)),
            ]
        );
        let Ok(Command::Rcpt { params, .. }) = parse(b"RCPT TO:<b@example.com> X=a=b") else {
            panic!("RCPT should parse")
        };
        assert_eq!(params.iter().collect::<Vec<_>>(), vec![Err(())]);
        assert!(params.as_bytes() == b"X=a=b" && !params.is_empty());
    }

    #[test]
    fn auth_arguments() {
        assert_eq!(
            parse(b"AUTH PLAIN dGVzdA=="),
            Ok(Command::Auth {
                mechanism: b"PLAIN",
                initial: Some(b"dGVzdA==")
            })
        );
        assert_eq!(
            parse(b"auth login"),
            Ok(Command::Auth {
                mechanism: b"login",
                initial: None
            })
        );
        for bad in [&b"AUTH"[..], b"AUTH  ", b"AUTH PLAIN a b"] {
            assert_eq!(parse(bad), Err(CommandError::Syntax(SyntaxOf::Auth)));
        }
        assert_eq!(line_limit(b"AUTH PLAIN"), MAX_AUTH_LINE);
        assert_eq!(line_limit(b"auth"), MAX_AUTH_LINE);
    }

    #[test]
    fn verbs_we_do_not_offer_are_known_not_unknown() {
        // 502 (not implemented) rather than 500 (unknown): the session maps them apart.
        // STARTTLS is implemented (the session answers it whether or not TLS is set up).
        assert_eq!(parse(b"STARTTLS"), Ok(Command::StartTls));
        assert_eq!(parse(b"starttls"), Ok(Command::StartTls));
        for line in [&b"ETRN example.com"[..], b"ATRN"] {
            assert_eq!(parse(line), Ok(Command::NotImplemented), "{line:?}");
        }
        for line in [&b"STARTTLSX"[..], b"AUTHX", b"XETRN"] {
            assert_eq!(parse(line), Err(CommandError::UnknownVerb), "{line:?}");
        }
    }
}
