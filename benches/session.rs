//! A whole pipelined SMTP session through `Session::feed`, the way a reactor drives it:
//! reads of up to 64 KiB, every completed message sealed (trace line, id) and answered
//! with `250`, replies drained after each read. Measures messages per second for 1 KiB
//! and 100 KiB bodies; the sink is the only thing left out.

mod common;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smtpgw::smtp::{BareLfPolicy, MessageId, Session, SessionConfig};
use std::hint::black_box;

const MESSAGES: usize = 64;
const READ_SIZE: usize = 64 * 1024;

/// EHLO, then `MESSAGES` transactions of MAIL (with SIZE), two RCPTs, DATA and the body,
/// back to back as a pipelining client sends them, then QUIT.
fn conversation(body_size: usize) -> Vec<u8> {
    let body = common::wire_body(body_size, 7);
    let mut input = b"EHLO client.example.org\r\n".to_vec();
    for _ in 0..MESSAGES {
        input.extend_from_slice(
            format!(
                "MAIL FROM:<alice@client.example.org> SIZE={}\r\n\
                 RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n",
                body.len()
            )
            .as_bytes(),
        );
        input.extend_from_slice(&body);
    }
    input.extend_from_slice(b"QUIT\r\n");
    input
}

/// Runs one conversation; returns how many messages were completed.
fn run(config: &Arc<SessionConfig>, input: &[u8]) -> usize {
    let received_at = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
    let mut session = Session::new(config.clone(), "192.0.2.7:4321".parse().unwrap());
    // A reactor's receive buffer: unconsumed bytes stay at `buf[start..]`, and are moved
    // to the front only when the next read is appended (not once per message).
    let mut buf = Vec::with_capacity(2 * READ_SIZE);
    let mut start = 0;
    let mut offset = 0;
    let mut done = 0;
    loop {
        let n = session.feed(&buf[start..]);
        start += n;
        // As a reactor does after every read (the session holds commands back while
        // its body events wait).
        while black_box(session.poll_event()).is_some() {}
        if let Some(message) = session.take_message() {
            done += 1;
            let id = MessageId::from(done as u128);
            black_box(smtpgw::sink::record::SealedMessage::seal(
                message,
                id,
                received_at,
                &config.hostname,
            ));
            session.publish_result(Ok(id));
            continue;
        }
        // One "write" of all replies produced by this read.
        let len = session.output().len();
        session.advance_output(len);
        if session.is_closed() || offset == input.len() {
            break;
        }
        buf.drain(..start);
        start = 0;
        let end = (offset + READ_SIZE).min(input.len());
        buf.extend_from_slice(&input[offset..end]);
        offset = end;
    }
    done
}

fn bench_session(c: &mut Criterion) {
    let config = Arc::new(SessionConfig {
        hostname: "mx.bench.example".into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: 10 * 1024 * 1024,
        max_recipients: 100,
        bare_lf: BareLfPolicy::Reject,
        headroom: smtpgw::sink::record::RECEIVED_HEADROOM + "mx.bench.example".len(),
    });
    let mut group = c.benchmark_group("session_pipelined");
    for (label, size) in [("1KiB", 1024), ("100KiB", 100 * 1024)] {
        let input = conversation(size);
        assert_eq!(run(&config, &input), MESSAGES, "every message completes");
        group.throughput(Throughput::Elements(MESSAGES as u64));
        group.bench_with_input(BenchmarkId::new("msgs", label), &input, |b, input| {
            b.iter(|| black_box(run(&config, black_box(input))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_session);
criterion_main!(benches);
