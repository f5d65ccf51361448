//! The spool writer thread's instructions per message, for callgrind: one 1 KiB message
//! at a time (each its own batch, so the count does not depend on timing) into a spool
//! in DIR.
//!
//! ```text
//! cargo build --release --example spool_writer_cost
//! valgrind --tool=callgrind --separate-threads=yes \
//!     target/release/examples/spool_writer_cost /dev/shm/DIR 4000
//! ```
//!
//! The writer is the second thread (`callgrind.out.PID-02`); the difference between
//! runs of 4000 and 2000 messages, over 2000, is its cost per message.

use std::sync::Arc;

use bytes::Bytes;
use chrono::DateTime;
use smtpgw::sink::record::{received_line, SealedMessage};
use smtpgw::sink::spool::SpoolSink;
use smtpgw::sink::{Completion, Sink};
use smtpgw::smtp::envelope::{Envelope, Verb};
use ulid::Ulid;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: spool_writer_cost DIR [MESSAGES]");
    let n: u64 = args.next().map_or(20_000, |s| s.parse().expect("a count"));
    let sink = SpoolSink::open(std::path::Path::new(&dir)).expect("open the spool");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let body = vec![b'x'; 1024];
    let at = DateTime::from_timestamp_micros(1_800_000_000_000_000).expect("in range");
    for i in 0..n {
        let id = Ulid::from(u128::from(i) + 1);
        let client = "192.0.2.1:25".parse().expect("literal address");
        let mut envelope = Envelope::new(
            Verb::Mail,
            Arc::from("c.example"),
            true,
            client,
            "a@example.com",
            "",
        );
        envelope.push_rcpt("b@example.com");
        let line = received_line(&envelope, id, at, "gw.example");
        let mut value = line.clone().into_bytes();
        value.extend_from_slice(&body);
        let msg = SealedMessage {
            id,
            received_at: at,
            envelope,
            value: Bytes::from(value),
            body_offset: line.len(),
        };
        sink.submit(msg, Completion::new(tx.clone()));
        rx.blocking_recv()
            .expect("the sink answers")
            .expect("the spool stores it");
    }
    sink.shutdown();
}
