//! Command parsing throughput: `smtp::command::parse` over a realistic mix of lines.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use smtpgw::smtp::command;
use std::hint::black_box;

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("command_parse");
    group.throughput(Throughput::Elements(common::COMMAND_MIX.len() as u64));
    group.bench_function("mix", |b| {
        b.iter(|| {
            for line in common::COMMAND_MIX {
                // Every line in the mix is valid: a parser regression shows up as a panic
                // here rather than as a suspiciously fast benchmark.
                let cmd = command::parse(black_box(line)).expect("valid command");
                black_box(cmd);
            }
        })
    });
    // The two commands every message has, alone: the per-message parsing cost.
    for (name, line) in [
        (
            "mail_with_params",
            &b"MAIL FROM:<alice@client.example.org> SIZE=1536 BODY=8BITMIME"[..],
        ),
        ("rcpt", &b"RCPT TO:<bob@example.com>"[..]),
    ] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |b| {
            b.iter(|| black_box(command::parse(black_box(line)).expect("valid command")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
