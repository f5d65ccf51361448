//! Reading and verifying SMTP replies (RFC 5321 section 4.2), independently of smtpgw.
//!
//! Every reply line must be `ddd` followed by space, hyphen or the end of the line, with
//! CRLF; the first digit 2 to 5, the second 0 to 5; every line of a multi-line reply
//! carries the same code. Anything else is a protocol error: the connection's byte
//! stream can no longer be trusted, so the caller drops it and counts the error.

use std::fmt;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Longest reply line we accept. RFC 5321 allows 512 octets; servers exceed it in
/// EHLO and error texts, so be lenient but bounded.
const MAX_LINE: usize = 4096;
/// Lines in one reply (EHLO has a dozen).
const MAX_LINES: usize = 100;

#[derive(Debug)]
pub enum ProtocolError {
    Io(std::io::Error),
    /// The server closed the connection where a reply was due.
    Eof,
    /// A reply line that is not RFC 5321 syntax.
    Malformed(String),
    /// A well-formed reply that no correct server sends at this point (e.g. `250` to
    /// DATA): the two sides no longer agree on the state, so the connection is dropped.
    Unexpected {
        step: &'static str,
        code: u16,
    },
    Timeout(&'static str),
    /// The TLS handshake failed, or the server does not offer STARTTLS.
    Tls(String),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Io(e) => write!(f, "i/o error: {e}"),
            ProtocolError::Eof => write!(f, "connection closed by server"),
            ProtocolError::Malformed(line) => write!(f, "malformed reply line {line:?}"),
            ProtocolError::Unexpected { step, code } => {
                write!(f, "reply {code} is impossible after {step}")
            }
            ProtocolError::Timeout(step) => write!(f, "timed out waiting after {step}"),
            ProtocolError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

/// A buffered reader of replies that reuses one line buffer for the whole connection.
pub struct ReplyReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
}

impl<R: AsyncRead + Unpin> ReplyReader<R> {
    pub fn new(inner: R) -> Self {
        ReplyReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            line: Vec::with_capacity(512),
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
    }

    /// The stream back, for STARTTLS. Bytes already buffered after the last reply would
    /// be plaintext the server sent after `220` (the CVE-2011-0411 shape from the other
    /// side): a protocol error, not something to carry into TLS.
    pub fn into_inner(self) -> Result<R, ProtocolError> {
        if !self.inner.buffer().is_empty() {
            return Err(ProtocolError::Malformed(
                "plaintext after the STARTTLS reply".into(),
            ));
        }
        Ok(self.inner.into_inner())
    }

    /// Reads one complete reply and returns its code. `on_line` sees the text after
    /// `ddd-`/`ddd ` of every line (EHLO keywords).
    pub async fn read(&mut self, mut on_line: impl FnMut(&[u8])) -> Result<u16, ProtocolError> {
        let mut code = None;
        for _ in 0..MAX_LINES {
            self.line.clear();
            let n = (&mut self.inner)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut self.line)
                .await?;
            if n == 0 {
                return Err(ProtocolError::Eof);
            }
            let (this, last, text) = parse_line(&self.line)?;
            if code.is_some_and(|c| c != this) {
                return Err(malformed(&self.line));
            }
            code = Some(this);
            on_line(text);
            if last {
                return Ok(this);
            }
        }
        Err(ProtocolError::Malformed(format!(
            "reply of more than {MAX_LINES} lines"
        )))
    }
}

fn malformed(line: &[u8]) -> ProtocolError {
    ProtocolError::Malformed(String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned())
}

/// One reply line with its CRLF: (code, is it the last line, text).
pub fn parse_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ProtocolError> {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return Err(malformed(line));
    };
    let valid = body.len() >= 3
        && (b'2'..=b'5').contains(&body[0])
        && (b'0'..=b'5').contains(&body[1])
        && body[2].is_ascii_digit()
        && matches!(body.get(3), None | Some(b' ') | Some(b'-'));
    if !valid || body.contains(&b'\r') || body.contains(&b'\n') {
        return Err(malformed(line));
    }
    let code = u16::from(body[0] - b'0') * 100
        + u16::from(body[1] - b'0') * 10
        + u16::from(body[2] - b'0');
    let last = body.get(3) != Some(&b'-');
    Ok((code, last, body.get(4..).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(
            parse_line(b"250 2.0.0 Ok\r\n").unwrap(),
            (250, true, &b"2.0.0 Ok"[..])
        );
        assert_eq!(
            parse_line(b"250-PIPELINING\r\n").unwrap(),
            (250, false, &b"PIPELINING"[..])
        );
        assert_eq!(parse_line(b"354\r\n").unwrap(), (354, true, &b""[..]));
        for bad in [
            &b"250 Ok\n"[..],
            b"25 Ok\r\n",
            b"650 x\r\n",
            b"2x0 x\r\n",
            b"250_x\r\n",
            b"",
            b"260 a\rb\r\n",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn multiline_and_mismatch() {
        let input: &[u8] = b"250-a\r\n250-PIPELINING\r\n250 SIZE 10\r\n220-x\r\n221 y\r\n";
        let mut r = ReplyReader::new(input);
        let mut kw = Vec::new();
        assert_eq!(r.read(|t| kw.push(t.to_vec())).await.unwrap(), 250);
        assert_eq!(kw.len(), 3);
        assert!(matches!(
            r.read(|_| ()).await,
            Err(ProtocolError::Malformed(_))
        ));
        let mut empty = ReplyReader::new(&b""[..]);
        assert!(matches!(empty.read(|_| ()).await, Err(ProtocolError::Eof)));
    }
}
