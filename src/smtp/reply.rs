//! Every reply the gateway sends, with its RFC 3463 enhanced status code.
//!
//! Fixed replies are static bytes; the few that name the host, a size or a message id
//! are written straight into the session's output buffer, so replying never allocates.

use std::io::Write;

use super::envelope::MessageId;

pub const MAIL_OK: &[u8] = b"250 2.1.0 Ok\r\n";
pub const RCPT_OK: &[u8] = b"250 2.1.5 Ok\r\n";
pub const OK: &[u8] = b"250 2.0.0 Ok\r\n";
pub const START_DATA: &[u8] = b"354 End data with <CR><LF>.<CR><LF>\r\n";
pub const VRFY: &[u8] =
    b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n";
pub const HELP: &[u8] = b"214-2.0.0 smtpgw accepts mail for its configured domains\r\n\
214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT\r\n\
214-2.0.0           VRFY HELP SEND SOML SAML\r\n\
214 2.0.0 End of HELP info\r\n";
/// HELP where EHLO offers AUTH.
pub const HELP_AUTH: &[u8] = b"214-2.0.0 smtpgw accepts mail for its configured domains\r\n\
214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT\r\n\
214-2.0.0           VRFY HELP SEND SOML SAML AUTH\r\n\
214 2.0.0 End of HELP info\r\n";
pub const HELP_TOPIC_AUTH: &[u8] = b"214 2.0.0 AUTH PLAIN|LOGIN [initial-response] (RFC 4954)\r\n";
pub const HELP_UNKNOWN_TOPIC: &[u8] = b"504 5.5.4 HELP topic unknown\r\n";

pub const UNKNOWN_COMMAND: &[u8] = b"500 5.5.2 Command unrecognized\r\n";
pub const LINE_TOO_LONG: &[u8] =
    b"500 5.5.6 Line too long (512 octets at most; MAIL 612, RCPT 1012)\r\n";
pub const SYNTAX_HELO: &[u8] = b"501 5.5.4 Syntax: HELO hostname\r\n";
pub const SYNTAX_EHLO: &[u8] = b"501 5.5.4 Syntax: EHLO hostname\r\n";
pub const SYNTAX_MAIL: &[u8] = b"501 5.5.4 Syntax: MAIL FROM:<address> [parameters]\r\n";
pub const SYNTAX_RCPT: &[u8] = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n";
pub const SYNTAX_BDAT: &[u8] = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n";
pub const SYNTAX_VRFY: &[u8] = b"501 5.5.4 Syntax: VRFY address\r\n";
pub const NO_ARGUMENTS: &[u8] = b"501 5.5.4 This command takes no arguments\r\n";
pub const BAD_HELO: &[u8] = b"501 5.5.4 Invalid HELO/EHLO hostname\r\n";
pub const BAD_SENDER: &[u8] = b"501 5.1.7 Bad sender address syntax\r\n";
pub const BAD_RECIPIENT: &[u8] = b"501 5.1.3 Bad recipient address syntax\r\n";
pub const NULL_RECIPIENT: &[u8] = b"501 5.1.3 A recipient address is required\r\n";
pub const SENDER_TOO_LONG: &[u8] = b"553 5.1.7 Sender address too long\r\n";
pub const RECIPIENT_TOO_LONG: &[u8] = b"553 5.1.3 Recipient address too long\r\n";
pub const NEEDS_SMTPUTF8: &[u8] =
    b"553 5.6.7 Non-ASCII addresses require the SMTPUTF8 parameter\r\n";
pub const DUPLICATE_PARAM: &[u8] = b"501 5.5.4 Duplicate MAIL parameter\r\n";
pub const BAD_PARAM: &[u8] = b"501 5.5.4 Malformed parameter\r\n";
pub const DUPLICATE_RCPT_PARAM: &[u8] = b"501 5.5.4 Duplicate RCPT parameter\r\n";
pub const BAD_RET: &[u8] = b"501 5.5.4 Malformed RET parameter: RET=FULL or RET=HDRS\r\n";
pub const BAD_ENVID: &[u8] =
    b"501 5.5.4 Malformed ENVID parameter: xtext of printable ASCII, at most 100 characters\r\n";
pub const BAD_NOTIFY: &[u8] = b"501 5.5.4 Malformed NOTIFY parameter: NEVER, or SUCCESS, FAILURE and DELAY each at most once\r\n";
pub const BAD_ORCPT: &[u8] =
    b"501 5.5.4 Malformed ORCPT parameter: addr-type;xtext, at most 500 characters\r\n";
pub const UNKNOWN_MAIL_PARAM: &[u8] = b"555 5.5.4 Unsupported MAIL parameter\r\n";
pub const UNKNOWN_RCPT_PARAM: &[u8] = b"555 5.5.4 Unsupported RCPT parameter\r\n";
pub const PARAMS_NEED_EHLO: &[u8] = b"555 5.5.4 Parameters require EHLO\r\n";

pub const NEED_HELO: &[u8] = b"503 5.5.1 Send HELO/EHLO first\r\n";
pub const NESTED_MAIL: &[u8] = b"503 5.5.1 Nested MAIL command\r\n";
pub const NEED_MAIL: &[u8] = b"503 5.5.1 Need MAIL command\r\n";
pub const RCPT_AFTER_BDAT: &[u8] = b"503 5.5.1 RCPT not allowed after BDAT\r\n";
pub const DATA_AFTER_BDAT: &[u8] = b"503 5.5.1 DATA not allowed after BDAT\r\n";
pub const BDAT_NEEDS_EHLO: &[u8] = b"503 5.5.1 BDAT requires EHLO\r\n";
pub const NO_VALID_RECIPIENTS: &[u8] = b"554 5.5.1 No valid recipients\r\n";

pub const RELAY_DENIED: &[u8] = b"550 5.7.1 Relay access denied\r\n";
pub const TOO_MANY_RECIPIENTS: &[u8] = b"452 4.5.3 Too many recipients\r\n";
pub const MESSAGE_TOO_BIG: &[u8] = b"552 5.3.4 Message size exceeds fixed limit\r\n";
pub const SINK_TOO_BIG: &[u8] = b"552 5.3.4 Message too large for the message store\r\n";
/// The message store is at its size limit or free-space floor: temporary, retry later.
pub const STORAGE_FULL: &[u8] = b"452 4.3.1 Insufficient system storage, try again later\r\n";
pub const BARE_LINE_ENDING: &[u8] =
    b"550 5.6.0 Message refused: bare CR or LF (RFC 5321 section 2.3.8)\r\n";

/// A new transaction while the gateway holds as much message data as it may: temporary.
pub const LOW_MEMORY: &[u8] = b"451 4.3.1 Insufficient system resources, try again later\r\n";
pub const EXPN: &[u8] = b"502 5.5.1 EXPN not supported\r\n";
pub const TURN: &[u8] = b"502 5.5.1 TURN not supported\r\n";
pub const NOT_IMPLEMENTED: &[u8] = b"502 5.5.1 Command not implemented\r\n";

/// RFC 3207: after this line the client starts its TLS handshake.
pub const READY_FOR_TLS: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";
pub const TLS_ALREADY_ACTIVE: &[u8] = b"503 5.5.1 TLS already active\r\n";
/// `--require-tls`: no transaction over a plaintext connection (RFC 3207 section 4).
pub const TLS_REQUIRED: &[u8] = b"530 5.7.0 Must issue a STARTTLS command first\r\n";

/// RFC 4954 section 6.
pub const AUTH_OK: &[u8] = b"235 2.7.0 Authentication successful\r\n";
pub const AUTH_FAILED: &[u8] = b"535 5.7.8 Authentication credentials invalid\r\n";
/// `--require-auth`: no transaction before AUTH.
pub const AUTH_REQUIRED: &[u8] = b"530 5.7.0 Authentication required\r\n";
pub const AUTH_NEEDS_TLS: &[u8] =
    b"538 5.7.11 Encryption required for requested authentication mechanism\r\n";
pub const AUTH_MECHANISM: &[u8] = b"504 5.5.4 Unrecognized authentication type\r\n";
pub const AUTH_CANCELLED: &[u8] = b"501 5.7.0 Authentication cancelled\r\n";
pub const AUTH_MALFORMED: &[u8] = b"501 5.5.2 Cannot decode response\r\n";
pub const AUTH_TEMPORARY: &[u8] = b"454 4.7.0 Temporary authentication failure\r\n";
pub const AUTH_TWICE: &[u8] = b"503 5.5.1 Already authenticated\r\n";
pub const AUTH_IN_TRANSACTION: &[u8] =
    b"503 5.5.1 AUTH not permitted during a mail transaction\r\n";
pub const SYNTAX_AUTH: &[u8] = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n";

pub fn greeting(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(out, "220 {hostname} ESMTP smtpgw\r\n");
}

pub fn helo(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(out, "250 {hostname}\r\n");
}

/// Advertises only what the core implements: STARTTLS only while it can be used (a
/// certificate is configured and the connection is not encrypted yet), and, as RFC 5321
/// section 4.1.1.1 requires, a keyword for every command it implements beyond the
/// required set of section 4.5.1: HELP, SEND, SOML and SAML.
/// `AUTH PLAIN LOGIN` only where AUTH may be used (`auth`): over TLS, or on a loopback
/// listener that allows it in plaintext.
pub fn ehlo(
    out: &mut Vec<u8>,
    hostname: &str,
    max_message_size: usize,
    starttls: bool,
    auth: bool,
) {
    let _ = write!(
        out,
        "250-{hostname}\r\n250-PIPELINING\r\n250-SIZE {max_message_size}\r\n\
         250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n"
    );
    if starttls {
        out.extend_from_slice(b"250-STARTTLS\r\n");
    }
    if auth {
        let _ = write!(out, "250-AUTH {}\r\n", super::auth::MECHANISMS);
    }
    out.extend_from_slice(b"250-HELP\r\n250-SEND\r\n250-SOML\r\n250 SAML\r\n");
}

pub fn bye(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(out, "221 2.0.0 {hostname} closing connection\r\n");
}

pub fn queued(out: &mut Vec<u8>, id: MessageId) {
    let _ = write!(out, "250 2.0.0 Ok: queued as {id}\r\n");
}

pub fn chunk_received(out: &mut Vec<u8>, size: u64) {
    let _ = write!(out, "250 2.0.0 {size} octets received\r\n");
}

/// `451 4.3.0`: our own trouble, so temporary; the client keeps the message and retries.
pub fn temporary_failure(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(b"451 4.3.0 ");
    // The reason comes from a sink (possibly a broker's error text): keep it to one line.
    out.extend(
        reason
            .bytes()
            .take(200)
            .map(|b| if b.is_ascii_graphic() { b } else { b' ' }),
    );
    out.extend_from_slice(b", try again later\r\n");
}

pub fn timeout(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(out, "421 4.4.2 {hostname} Timeout, closing connection\r\n");
}

/// The client sent its message slower than `--min-data-rate`.
pub fn too_slow(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(
        out,
        "421 4.4.2 {hostname} Data rate too low, closing connection\r\n"
    );
}

pub fn shutting_down(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(
        out,
        "421 4.3.2 {hostname} Service shutting down, closing connection\r\n"
    );
}

/// A per-address limit (connections, connection rate, message rate, error budget):
/// `421 4.7.0`, then close. `what` is a fixed phrase, never client text.
pub fn policy_limit(out: &mut Vec<u8>, hostname: &str, what: &str) {
    let _ = write!(out, "421 4.7.0 {hostname} {what}, try again later\r\n");
}

/// The client spoke before the greeting (a bulk sender that does not wait): close.
pub fn early_talker(out: &mut Vec<u8>, hostname: &str) {
    let _ = write!(
        out,
        "554 5.5.0 {hostname} Protocol error: client sent data before the greeting\r\n"
    );
}

/// Sent instead of the greeting when `--max-connections` is reached; then close.
pub fn too_many_connections(hostname: &str) -> String {
    format!("421 4.3.2 {hostname} Too many connections, try again later\r\n")
}
