//! Builders shared by the spool tests: real sealed messages, real channels.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use smtpgw::sink::record::{received_line, SealedMessage};
use smtpgw::sink::{Completion, PublishResult, Sink};
use smtpgw::smtp::envelope::{Envelope, Verb};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use ulid::Ulid;

/// Microsecond precision, as the spool stores it.
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("now is in range")
}

pub fn message(mail_from: &str, rcpts: &[&str], body: &[u8]) -> SealedMessage {
    message_at(now(), mail_from, rcpts, body)
}

pub fn message_at(
    received_at: DateTime<Utc>,
    mail_from: &str,
    rcpts: &[&str],
    body: &[u8],
) -> SealedMessage {
    let mut envelope = envelope(
        "client.example",
        true,
        "192.0.2.7:40123",
        mail_from,
        "SIZE=1234 BODY=8BITMIME",
    );
    for rcpt in rcpts {
        envelope.push_rcpt(rcpt);
    }
    seal(Ulid::new(), envelope, received_at, body)
}

/// A `MAIL` envelope from `client` (a literal address), no recipients yet.
pub fn envelope(
    helo: &str,
    esmtp: bool,
    client: &str,
    mail_from: &str,
    mail_params: &str,
) -> Envelope {
    let client: SocketAddr = client.parse().expect("literal address");
    Envelope::new(
        Verb::Mail,
        Arc::from(helo),
        esmtp,
        client,
        mail_from,
        mail_params,
    )
}

/// `body` as the record of `envelope`: the trace line a session's message gets
/// (hostname `gw.example`), then the body.
pub fn seal(
    id: Ulid,
    envelope: Envelope,
    received_at: DateTime<Utc>,
    body: &[u8],
) -> SealedMessage {
    let line = received_line(&envelope, id, received_at, "gw.example");
    let mut value = line.clone().into_bytes();
    value.extend_from_slice(body);
    SealedMessage {
        id,
        received_at,
        envelope,
        value: Bytes::from(value),
        body_offset: line.len(),
    }
}

pub fn headers_of(msg: &SealedMessage) -> Vec<(String, Vec<u8>)> {
    let mut headers = Vec::new();
    msg.for_each_header(|name, value| headers.push((name.to_owned(), value.to_vec())));
    headers
}

/// Submits and returns the receiver that will get the sink's one answer.
pub fn submit(sink: &dyn Sink, msg: SealedMessage) -> UnboundedReceiver<PublishResult> {
    let (tx, rx) = unbounded_channel();
    sink.submit(msg, Completion::new(tx));
    rx
}

pub fn publish(sink: &dyn Sink, msg: SealedMessage) -> PublishResult {
    submit(sink, msg)
        .blocking_recv()
        .expect("the sink answers every message")
}

/// Three messages that stress a replay: a repeated recipient and a stuffed-looking
/// body, the null sender to postmaster with an empty body, and 100 kB of 0xff.
pub fn replay_sample() -> Vec<SealedMessage> {
    vec![
        message(
            "a@example.com",
            &["b@example.com", "c@example.com", "b@example.com"],
            b"one\r\n.\r\n",
        ),
        message("", &["postmaster"], b""),
        message("x@example.com", &["y@example.com"], &[0xffu8; 100_000]),
    ]
}

/// Rewrites a format 2 segment's commit marks (in `bytes`, a whole segment) to name
/// `end`: what a crash leaves when the batch after `end` was written but never
/// acknowledged (the marks are rewritten only after a batch's `fdatasync`).
pub fn mark_acknowledged_up_to(bytes: &mut [u8], end: u64) {
    use smtpgw::sink::spool::format::{encode_commit_marks, COMMIT_MARK_AT};
    let at = COMMIT_MARK_AT[0] as usize;
    let marks = encode_commit_marks(end);
    bytes[at..at + marks.len()].copy_from_slice(&marks);
}
