//! DATA body throughput: terminator scan plus dot-unstuffing through `DataReader`,
//! against a naive byte-at-a-time state machine doing the same job (find `<CRLF>.<CRLF>`,
//! drop stuffed dots, flag bare CR/LF), on the same realistic bodies.

mod common;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smtpgw::smtp::data::DataReader;
use smtpgw::smtp::BareLfPolicy;
use std::hint::black_box;

/// The obvious implementation: look at every byte, push every kept byte. Same outcome
/// as `DataReader` for well-formed input (the bench asserts it), no SIMD, no bulk copy.
/// Returns the consumed length, or `None` when the terminator is missing.
fn naive(input: &[u8], out: &mut Vec<u8>, bare: &mut bool) -> Option<usize> {
    #[derive(Clone, Copy)]
    enum S {
        LineStart,
        Text,
        Cr,
        Dot,
        DotCr,
    }
    let mut s = S::LineStart;
    for (i, &b) in input.iter().enumerate() {
        s = match (s, b) {
            (S::LineStart, b'.') => S::Dot,
            (S::Dot, b'\r') => S::DotCr,
            (S::DotCr, b'\n') => return Some(i + 1),
            (S::Cr, b'\n') => {
                out.extend_from_slice(b"\r\n");
                S::LineStart
            }
            (S::Cr | S::DotCr, _) | (_, b'\n') => {
                *bare = true;
                if b == b'\r' {
                    S::Cr
                } else if b == b'\n' {
                    S::Text
                } else {
                    out.push(b);
                    S::Text
                }
            }
            (_, b'\r') => S::Cr,
            (_, _) => {
                out.push(b);
                S::Text
            }
        };
    }
    None
}

fn bench_data(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_body");
    for (label, size) in [
        ("1KiB", 1024),
        ("100KiB", 100 * 1024),
        ("1MiB", 1024 * 1024),
    ] {
        let wire = common::wire_body(size, 42);
        let expected = common::unstuffed_len(&wire);
        group.throughput(Throughput::Bytes(wire.len() as u64));

        // Buffers are allocated once and reused: the bench measures scanning and copying,
        // not the allocator (the session allocates one body buffer per message).
        let mut body = BytesMut::with_capacity(wire.len());
        let check = {
            let mut reader = DataReader::new(usize::MAX, BareLfPolicy::Reject);
            let r = reader.feed(&wire, &mut body);
            (r, body.len())
        };
        assert_eq!(check, ((wire.len(), true), expected), "DataReader result");
        group.bench_with_input(BenchmarkId::new("DataReader", label), &wire, |b, wire| {
            b.iter(|| {
                body.clear();
                let mut reader = DataReader::new(usize::MAX, BareLfPolicy::Reject);
                black_box(reader.feed(black_box(wire), &mut body))
            })
        });

        let mut out = Vec::with_capacity(wire.len());
        let mut bare = false;
        assert_eq!(naive(&wire, &mut out, &mut bare), Some(wire.len()));
        assert_eq!((out.len(), bare), (expected, false), "naive result");
        group.bench_with_input(
            BenchmarkId::new("naive_byte_loop", label),
            &wire,
            |b, wire| {
                b.iter(|| {
                    out.clear();
                    let mut bare = false;
                    black_box(naive(black_box(wire), &mut out, &mut bare))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_data);
criterion_main!(benches);
