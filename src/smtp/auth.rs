//! SMTP AUTH (RFC 4954) as the session speaks it: the SASL mechanisms PLAIN (RFC 4616)
//! and LOGIN, their base64 responses, and what the session hands its caller to verify.
//!
//! Decoding only: whether a name and password are right is decided off the reactor
//! (`crate::auth`), and the answer comes back as an [`AuthVerdict`].

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

/// The mechanisms offered, in the order EHLO lists them.
pub const MECHANISMS: &str = "PLAIN LOGIN";

/// A user name longer than this is refused as malformed (a user name is an address or
/// a short account name; the users file keeps names no longer).
pub const MAX_USER: usize = 255;
/// A password longer than this is refused as malformed.
pub const MAX_PASSWORD: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn parse(name: &[u8]) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// Credentials to verify. The password is wiped from memory when dropped, and never
/// shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthRequest {
    pub user: Box<str>,
    pub password: Zeroizing<Vec<u8>>,
    pub mechanism: Mechanism,
}

impl std::fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRequest")
            .field("user", &self.user)
            .field("password", &format_args!("<{} bytes>", self.password.len()))
            .field("mechanism", &self.mechanism)
            .finish()
    }
}

/// The verifier's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthVerdict {
    /// `235 2.7.0`
    Accepted,
    /// `535 5.7.8`: unknown user and wrong password alike.
    Rejected,
    /// `454 4.7.0`: the verifier is overloaded or unavailable.
    Temporary,
    /// The user name is over its failure limit: `421 4.7.0`, then close.
    Locked,
}

/// Why a client response was refused before any verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// `*`: the client gave up (`501`).
    Cancelled,
    /// Not base64, or not the mechanism's shape (`501 5.5.2`).
    Malformed,
}

/// A client response line: `*` cancels, `=` is the empty initial response (RFC 4954
/// section 4), anything else must be strict base64.
pub fn decode_response(line: &[u8]) -> Result<Zeroizing<Vec<u8>>, ResponseError> {
    match line {
        b"*" => Err(ResponseError::Cancelled),
        b"=" => Ok(Zeroizing::new(Vec::new())),
        _ => STANDARD
            .decode(line)
            .map(Zeroizing::new)
            .map_err(|_| ResponseError::Malformed),
    }
}

/// A user name as the session takes it: UTF-8 without control characters, bounded.
pub fn valid_user(raw: &[u8]) -> Option<&str> {
    let name = std::str::from_utf8(raw).ok()?;
    (!name.is_empty() && name.len() <= MAX_USER && !name.chars().any(char::is_control))
        .then_some(name)
}

/// PLAIN's message: `[authzid] NUL authcid NUL passwd`. An authorization identity other
/// than the user itself is not something this gateway grants, so it is refused like bad
/// credentials (by the verifier, so it costs the same).
pub fn parse_plain(message: &[u8]) -> Result<AuthRequest, ResponseError> {
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(ResponseError::Malformed);
    };
    let user = valid_user(user).ok_or(ResponseError::Malformed)?;
    if password.is_empty() || password.len() > MAX_PASSWORD || password.contains(&0) {
        return Err(ResponseError::Malformed);
    }
    // An authzid naming someone else: verified with no password that can match, so
    // the answer is `535` after the same work as a wrong password.
    let password = if authzid.is_empty() || authzid == user.as_bytes() {
        password.to_vec()
    } else {
        Vec::new()
    };
    Ok(AuthRequest {
        user: user.into(),
        password: Zeroizing::new(password),
        mechanism: Mechanism::Plain,
    })
}

/// `334` challenges, base64 of `Username:` and `Password:` for LOGIN, empty for PLAIN.
pub const CHALLENGE_EMPTY: &[u8] = b"334 \r\n";
pub const CHALLENGE_USERNAME: &[u8] = b"334 VXNlcm5hbWU6\r\n";
pub const CHALLENGE_PASSWORD: &[u8] = b"334 UGFzc3dvcmQ6\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_decode_strictly() {
        assert_eq!(decode_response(b"*"), Err(ResponseError::Cancelled));
        assert_eq!(decode_response(b"=").map(|v| v.to_vec()), Ok(vec![]));
        assert_eq!(
            decode_response(b"AGFsaWNlAHNlY3JldA==").map(|v| v.to_vec()),
            Ok(b"\0alice\0secret".to_vec())
        );
        for bad in [&b"AGFsaWNlAHNlY3JldA"[..], b"!!!!", b"AGFs aWNl", b"a"] {
            assert_eq!(
                decode_response(bad),
                Err(ResponseError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_messages() {
        let r = parse_plain(b"\0alice\0secret").unwrap();
        assert_eq!((&*r.user, &r.password[..]), ("alice", &b"secret"[..]));
        let r = parse_plain(b"alice\0alice\0secret").unwrap();
        assert_eq!(&r.password[..], b"secret");
        // Asking to act as someone else can never succeed.
        let r = parse_plain(b"bob\0alice\0secret").unwrap();
        assert!(r.password.is_empty());
        for bad in [
            &b"alice\0secret"[..],
            b"\0\0secret",
            b"\0alice\0",
            b"\0al\x01ice\0pw",
            b"\0\xff\0pw",
            b"",
        ] {
            assert_eq!(parse_plain(bad), Err(ResponseError::Malformed), "{bad:?}");
        }
        // A NUL inside the password is no password.
        assert_eq!(
            parse_plain(b"\0alice\0se\0cret"),
            Err(ResponseError::Malformed)
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let r = parse_plain(b"\0alice\0hunter2").unwrap();
        let shown = format!("{r:?}");
        assert!(
            shown.contains("alice") && shown.contains("<7 bytes>"),
            "{shown}"
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("104"),
            "{shown}"
        );
    }

    #[test]
    fn mechanisms_are_case_insensitive() {
        assert_eq!(Mechanism::parse(b"plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse(b"LoGiN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::parse(b"CRAM-MD5"), None);
    }
}
