//! Finding a header field in a received message without parsing the whole header.

use memchr::memchr;

/// The header section is searched this far at most: a `Message-ID` behind megabytes of
/// headers is not worth the reactor's time.
const MAX_SCAN: usize = 64 * 1024;
/// A field value is kept to this length (a Message-ID is far shorter).
const MAX_VALUE: usize = 998;

/// The value of the first `Message-ID:` field of `message`'s header section, trimmed,
/// with folded lines joined; `None` if there is none. Reads line by line up to the blank
/// line that ends the header, so it costs about the header's length.
pub fn message_id(message: &[u8]) -> Option<&[u8]> {
    let header = &message[..message.len().min(MAX_SCAN)];
    let mut pos = 0;
    while pos < header.len() {
        let end = memchr(b'\n', &header[pos..]).map_or(header.len(), |n| pos + n);
        let line = &header[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        if line.len() >= 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            // Folded onto the next lines: the value runs to the first line that does not
            // start with a space or tab.
            let mut value_end = end;
            while value_end + 1 < header.len() && matches!(header[value_end + 1], b' ' | b'\t') {
                value_end = memchr(b'\n', &header[value_end + 1..])
                    .map_or(header.len(), |n| value_end + 1 + n);
            }
            let value = header[pos + 11..value_end].trim_ascii();
            let value = &value[..value.len().min(MAX_VALUE)];
            return (!value.is_empty()).then_some(value);
        }
        pos = end + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_field_in_the_header_only() {
        assert_eq!(
            message_id(b"Subject: x\r\nMESSAGE-ID:  <a@b> \r\n\r\nbody"),
            Some(&b"<a@b>"[..])
        );
        assert_eq!(message_id(b"Subject: x\r\n\r\nMessage-ID: <a@b>\r\n"), None);
        assert_eq!(
            message_id(b"Message-ID:\r\n <f@b>\r\nX: y\r\n\r\n"),
            Some(&b"<f@b>"[..])
        );
        assert_eq!(message_id(b"Message-ID: <cut"), Some(&b"<cut"[..]));
        assert_eq!(message_id(b""), None);
        assert_eq!(message_id(b"Message-IDx: <no>\r\n\r\n"), None);
    }
}
