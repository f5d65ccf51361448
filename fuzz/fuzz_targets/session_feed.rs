//! Fuzzes `Session::feed` with arbitrary bytes split at arbitrary points.
//!
//! The first byte picks the policy and the read size, the rest is the client's stream.
//! Beyond "never panics", it checks what a reactor relies on: consumed never exceeds
//! the input, the unconsumed remainder stays bounded, and a completed message is
//! answered before more input is taken.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use smtpgw::smtp::{BareLfPolicy, MessageId, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let config = Arc::new(SessionConfig {
        hostname: "fuzz.test".into(),
        accept_domains: vec!["example.com".into()],
        max_message_size: 4096,
        max_recipients: 4,
        bare_lf: if control & 1 == 0 {
            BareLfPolicy::Reject
        } else {
            BareLfPolicy::Normalize
        },
    });
    let step = usize::from(control >> 1).max(1);
    let mut session = Session::new(config, "192.0.2.1:25".parse().unwrap());
    let mut buffer = Vec::new();
    let mut next_id = 0u128;
    for piece in stream.chunks(step) {
        buffer.extend_from_slice(piece);
        loop {
            let consumed = session.feed(&buffer);
            assert!(consumed <= buffer.len());
            buffer.drain(..consumed);
            match session.take_message() {
                Some(message) => {
                    assert!(message.body().len() <= 4096);
                    assert_eq!(session.feed(b"NOOP\r\n"), 0, "no input while publishing");
                    next_id += 1;
                    session.publish_result(Ok(MessageId::from(next_id)));
                }
                None => break,
            }
        }
        // A reactor's buffer only ever holds a partial command line.
        assert!(buffer.len() < 512 || session.is_closed() || session.is_awaiting_publish());
        if session.is_closed() {
            return;
        }
        let out = session.output().len();
        session.advance_output(out);
    }
});
