//! What a RCPT costs as the accept-domain list grows: a session takes EHLO, MAIL and
//! 100 pipelined RCPTs whose domain is the last of 10 or 10,000 accept-domains, in
//! ASCII (upper case) and as a U-label (fullwidth letters, which UTS #46 maps to the
//! same A-label). The domains are a set normalised at load, so the four figures should
//! be alike (issue 20 item 2: before, a U-label RCPT converted the client's domain once
//! per accepted domain, 2.6 ms with 10,000).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smtpgw::smtp::{BareLfPolicy, Session, SessionConfig};
use std::hint::black_box;

const RCPTS: usize = 100;

fn config(domains: usize) -> Arc<SessionConfig> {
    let mut accept: Vec<String> = (0..domains - 1).map(|i| format!("d{i}.example")).collect();
    accept.push("example.com".into());
    Arc::new(SessionConfig {
        hostname: "mx.bench.example".into(),
        accept_domains: accept.into_iter().collect(),
        max_message_size: 10 * 1024 * 1024,
        max_recipients: RCPTS,
        bare_lf: BareLfPolicy::Reject,
        headroom: smtpgw::sink::record::RECEIVED_HEADROOM + "mx.bench.example".len(),
    })
}

fn input(domain: &str) -> Vec<u8> {
    let mut input =
        b"EHLO client.example.org\r\nMAIL FROM:<a@client.example.org> SMTPUTF8\r\n".to_vec();
    for i in 0..RCPTS {
        input.extend_from_slice(format!("RCPT TO:<u{i}@{domain}>\r\n").as_bytes());
    }
    input
}

/// Feeds the conversation; returns the accepted RCPTs.
fn run(config: &Arc<SessionConfig>, input: &[u8]) -> usize {
    let mut session = Session::new(config.clone(), "192.0.2.7:4321".parse().unwrap());
    let mut pos = 0;
    while pos < input.len() {
        let n = session.feed(&input[pos..]);
        assert!(n > 0, "the session stopped taking input");
        pos += n;
    }
    session
        .output()
        .windows(9)
        .filter(|w| w == b"250 2.1.5")
        .count()
}

fn bench_rcpt(c: &mut Criterion) {
    let mut group = c.benchmark_group("rcpt_accept_domains");
    group.throughput(Throughput::Elements(RCPTS as u64));
    for domains in [10, 10_000] {
        let config = config(domains);
        for (label, domain) in [("ascii", "EXAMPLE.com"), ("u-label", "ｅｘａｍｐｌｅ.com")]
        {
            let input = input(domain);
            assert_eq!(run(&config, &input), RCPTS, "every RCPT accepted");
            group.bench_with_input(BenchmarkId::new(label, domains), &input, |b, input| {
                b.iter(|| black_box(run(&config, black_box(input))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_rcpt);
criterion_main!(benches);
