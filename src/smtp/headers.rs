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
        if let Some(value) = field_value(header, pos, end) {
            return value;
        }
        pos = end + 1;
    }
    None
}

/// [`message_id`], given where the header's lines that start with `M` or `m` begin
/// (every one of them before the blank line, in order; the body reader notes them on
/// its way: [`super::data::HeaderLines`]). The same answer for a fraction of the work:
/// a few lines compared instead of a search for every line's end.
pub fn message_id_among(message: &[u8], starts: impl Iterator<Item = usize>) -> Option<&[u8]> {
    let header = &message[..message.len().min(MAX_SCAN)];
    for pos in starts {
        if pos >= header.len() {
            break;
        }
        let end = memchr(b'\n', &header[pos..]).map_or(header.len(), |n| pos + n);
        if let Some(value) = field_value(header, pos, end) {
            return value;
        }
    }
    None
}

/// `Some(value)` when the line `header[pos..end]` is a `Message-ID:` field (the value
/// trimmed, folded lines joined; `None` when it is empty), `None` for any other line.
fn field_value(header: &[u8], pos: usize, end: usize) -> Option<Option<&[u8]>> {
    let line = &header[pos..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // `message-id:` in any case. Eight bytes at once: with the `-` checked on its own,
    // setting 0x20 in each byte folds exactly the letters of `message` (a byte ORed to
    // one of them was that letter in either case).
    let (&[m0, m1, m2, m3, m4, m5, m6, m7, i, d, colon], _) = line.split_first_chunk::<11>()?;
    if m7 != b'-'
        || u64::from_le_bytes([m0, m1, m2, m3, m4, m5, m6, m7]) | 0x2020_2020_2020_2020
            != u64::from_le_bytes(*b"message-")
        || i | 0x20 != b'i'
        || d | 0x20 != b'd'
        || colon != b':'
    {
        return None;
    }
    // Folded onto the next lines: the value runs to the first line that does not
    // start with a space or tab.
    let mut value_end = end;
    while value_end + 1 < header.len() && matches!(header[value_end + 1], b' ' | b'\t') {
        value_end =
            memchr(b'\n', &header[value_end + 1..]).map_or(header.len(), |n| value_end + 1 + n);
    }
    let value = header[pos + 11..value_end].trim_ascii();
    let value = &value[..value.len().min(MAX_VALUE)];
    Some((!value.is_empty()).then_some(value))
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
        // The quick tests must not turn away the field in any case, nor take a look-alike.
        assert_eq!(
            message_id(b"X: 1\nmessage-id: <l@b>\n\n"),
            Some(&b"<l@b>"[..])
        );
        assert_eq!(
            message_id(b"Message_ID: <no>\r\nmessage-iD:<m@b>\r\n\r\n"),
            Some(&b"<m@b>"[..])
        );
        assert_eq!(message_id(b"Message-IDs <no>\r\n\r\n"), None);
    }
}
