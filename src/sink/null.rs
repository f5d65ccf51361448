//! The null sink: drops every message and answers at once. It measures the gateway
//! without storage and must never be used where mail matters.

use super::{Completion, Sink};
use crate::sink::record::SealedMessage;

#[derive(Debug, Default)]
pub struct NullSink;

impl NullSink {
    pub fn new() -> Self {
        NullSink
    }
}

impl Sink for NullSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        done.complete(Ok(msg.id));
    }

    fn shutdown(&self) {}

    fn name(&self) -> &'static str {
        "null"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_immediately_with_the_id() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = NullSink::new();
        let env = crate::smtp::Envelope::new(
            crate::smtp::envelope::Verb::Mail,
            "client".into(),
            true,
            "127.0.0.1:1".parse().unwrap(),
            "a@b",
            "",
        );
        let msg = crate::smtp::Message::new(env, bytes::BytesMut::from(&b"hi\r\n"[..]), 0);
        let id = ulid::Ulid::new();
        sink.submit(
            SealedMessage::seal(msg, id, chrono::Utc::now(), "mx"),
            Completion::new(tx),
        );
        assert_eq!(rx.try_recv().unwrap(), Ok(id));
        assert_eq!(sink.name(), "null");
    }
}
