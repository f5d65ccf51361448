//! Allocation budget of the protocol core, counted by a global allocator.
//!
//! The design promises no allocation per command and one per message (its buffer).
//! This test pins the exact numbers measured on the steady state, so a change that adds
//! an allocation to the hot path fails here rather than in a profile months later. The
//! counter is per thread, so the test harness's other threads do not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use smtpgw::smtp::{BareLfPolicy, MessageId, Session, SessionConfig};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// Every thread's allocations, for the reactor test (whose reactor runs on its own
/// thread).
static ALL_ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counter is a const-initialized
// thread-local `Cell`, which never allocates (try_with tolerates thread teardown).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        ALL_ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        ALL_ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc is an allocation for this budget: it is what a growing buffer costs.
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        ALL_ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

fn config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test.example".into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: 10 * 1024 * 1024,
        max_recipients: 100,
        bare_lf: BareLfPolicy::Reject,
        headroom: smtpgw::sink::record::RECEIVED_HEADROOM + "mx.test.example".len(),
    })
}

/// A 1 KiB-ish body with 76-character lines, one of them dot-stuffed, and its terminator.
fn body(size: usize) -> Vec<u8> {
    let mut b = b"Subject: alloc test\r\n\r\n".to_vec();
    let line = [b'x'; 74];
    while b.len() < size {
        b.extend_from_slice(&line);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"..stuffed\r\n.\r\n");
    b
}

/// Feeds `input` whole, answers any completed message as a sink would, and discards the
/// replies as a reactor's write would. Returns the number of replies' final lines.
fn drive(session: &mut Session, input: &[u8], id: &mut u128) {
    let at = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
    let mut pos = 0;
    loop {
        let n = session.feed(&input[pos..]);
        pos += n;
        match session.take_message() {
            Some(message) => {
                *id += 1;
                let sealed = smtpgw::sink::record::SealedMessage::seal(
                    message,
                    MessageId::from(*id),
                    at,
                    "mx.test.example",
                );
                drop(sealed);
                session.publish_result(Ok(MessageId::from(*id)));
            }
            // The session holds commands back while its body events wait: polled here
            // only then, so the refusals' events (and their text) stay unpolled as
            // before and what is counted is the session's own work.
            None if pos < input.len() => {
                let polled = std::iter::from_fn(|| session.poll_event()).count();
                assert!(n > 0 || polled > 0, "the session stopped taking input");
            }
            None => break,
        }
    }
    assert_eq!(pos, input.len(), "all input consumed");
    let n = session.output().len();
    session.advance_output(n);
}

/// Allocations made while `input` is driven through `session`, repeated `times`, after
/// one uncounted round (which lets the reply buffer grow to what this input needs: a
/// long pipelined batch grows it once, then never again).
fn count(session: &mut Session, input: &[u8], times: u64, id: &mut u128) -> u64 {
    drive(session, input, id);
    let before = allocs();
    for _ in 0..times {
        drive(session, input, id);
    }
    allocs() - before
}

#[test]
fn allocation_budget() {
    let mut session = Session::new(config(), "192.0.2.7:4321".parse().unwrap());
    let mut id = 0;
    let small = body(1024);
    let mut message = b"MAIL FROM:<alice@client.example.org> SIZE=1200\r\n\
RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n"
        .to_vec();
    message.extend_from_slice(&small);
    let mut bdat =
        b"MAIL FROM:<alice@client.example.org>\r\nRCPT TO:<bob@example.com>\r\n".to_vec();
    bdat.extend_from_slice(format!("BDAT {} LAST\r\n", small.len()).as_bytes());
    bdat.extend_from_slice(&small);

    // Warm-up: EHLO interns the HELO name, the output buffer reaches its working size.
    drive(&mut session, b"EHLO client.example.org\r\n", &mut id);
    for _ in 0..3 {
        drive(&mut session, &message, &mut id);
        drive(&mut session, &bdat, &mut id);
        drive(
            &mut session,
            b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nBOGUS\r\n",
            &mut id,
        );
    }

    // Commands outside a transaction: nothing at all.
    let per_command = [
        ("NOOP", &b"NOOP\r\n"[..]),
        ("RSET", b"RSET\r\n"),
        ("VRFY", b"VRFY bob\r\n"),
        ("HELP", b"HELP\r\n"),
        ("unknown verb", b"BOGUS\r\n"),
        ("RCPT without MAIL (503)", b"RCPT TO:<bob@example.com>\r\n"),
        ("repeated EHLO, same name", b"EHLO client.example.org\r\n"),
        ("pipelined NOOP x100", &b"NOOP\r\n".repeat(100)),
    ];
    for (what, input) in per_command {
        assert_eq!(
            count(&mut session, input, 100, &mut id),
            0,
            "{what} allocates"
        );
    }

    // A transaction opened and dropped: MAIL creates the envelope's arena (its text
    // String and its recipient Vec), RCPTs append to it without allocating.
    let txn = b"MAIL FROM:<a@client.example.org>\r\nRCPT TO:<bob@example.com>\r\n\
RCPT TO:<carol@example.com>\r\nRSET\r\n";
    assert_eq!(
        count(&mut session, txn, 100, &mut id),
        2 * 100,
        "MAIL+RCPT+RSET"
    );
    // DSN parameters (RFC 3461) are checked in place and kept in the same arena: the
    // same two allocations, and a refused one costs nothing.
    let dsn = b"MAIL FROM:<a@client.example.org> RET=HDRS ENVID=abc+2Bdef\r\n\
RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40x.example\r\n\
RCPT TO:<carol@example.com> NOTIFY=NEVER\r\nRCPT TO:<bob@example.com> NOTIFY=NEVER,DELAY\r\n\
RCPT TO:<bob@example.com> ORCPT=rfc822;a+2\r\nRSET\r\n";
    assert_eq!(
        count(&mut session, dsn, 100, &mut id),
        2 * 100,
        "MAIL+RCPT with DSN parameters, refused ones, RSET"
    );

    // The same message step by step, to attribute each allocation.
    let cmds_end = message.windows(6).position(|w| w == b"DATA\r\n").unwrap() + 6;
    let mail_end = message.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let at = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
    let mut steps = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut()| {
        let before = allocs();
        f();
        steps.push((name, allocs() - before));
    };
    step("MAIL", &mut || {
        assert_eq!(session.feed(&message[..mail_end]), mail_end)
    });
    step("RCPT, RCPT, DATA", &mut || {
        assert_eq!(
            session.feed(&message[mail_end..cmds_end]),
            cmds_end - mail_end
        )
    });
    step("body", &mut || {
        assert_eq!(session.feed(&message[cmds_end..]), message.len() - cmds_end)
    });
    let mut taken = None;
    step("take_message", &mut || taken = session.take_message());
    let mut sealed = None;
    step("seal", &mut || {
        sealed = taken.take().map(|m| {
            smtpgw::sink::record::SealedMessage::seal(m, MessageId::from(1), at, "mx.test.example")
        })
    });
    step("drop sealed", &mut || drop(sealed.take()));
    step("publish_result", &mut || {
        session.publish_result(Ok(MessageId::from(1)))
    });
    let n = session.output().len();
    session.advance_output(n);
    eprintln!("DATA message step by step: {steps:?}");
    // MAIL: the envelope arena (its text String and its recipient Vec). DATA: the body
    // buffer, sized from SIZE=, so the body itself never reallocates. seal(): the
    // `Received:` line is formatted on the stack into the headroom; the one allocation
    // is the `Shared` header bytes needs to freeze a buffer that is not full.
    assert_eq!(
        steps,
        [
            ("MAIL", 2),
            ("RCPT, RCPT, DATA", 1),
            ("body", 0),
            ("take_message", 0),
            ("seal", 1),
            ("drop sealed", 0),
            ("publish_result", 0),
        ]
    );

    // A whole message, sealed and answered, in the steady state: 4 allocations, whatever
    // the transfer (DATA or BDAT): envelope 2, body 1, seal 1.
    let per_message = count(&mut session, &message, 100, &mut id) as f64 / 100.0;
    eprintln!("DATA message: {per_message} allocations");
    assert_eq!(per_message, 4.0, "allocations per DATA message");
    let per_message = count(&mut session, &bdat, 100, &mut id) as f64 / 100.0;
    eprintln!("BDAT message: {per_message} allocations");
    assert_eq!(per_message, 4.0, "allocations per BDAT message");

    // Size does not matter when the client announces it: 100 KiB costs the same four.
    let big = body(100 * 1024);
    let mut large = format!(
        "MAIL FROM:<alice@client.example.org> SIZE={}\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n",
        big.len()
    )
    .into_bytes();
    large.extend_from_slice(&big);
    assert_eq!(
        count(&mut session, &large, 20, &mut id),
        4 * 20,
        "100 KiB with SIZE="
    );
    // Without SIZE= the body buffer starts at 16 KiB and doubles: 3 more for 100 KiB.
    let mut unsized_msg =
        b"MAIL FROM:<alice@client.example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n".to_vec();
    unsized_msg.extend_from_slice(&big);
    let n = count(&mut session, &unsized_msg, 20, &mut id);
    eprintln!("100 KiB without SIZE: {} allocations", n as f64 / 20.0);
    assert_eq!(n, 7 * 20, "100 KiB without SIZE=");
}

/// The io_uring reactor around the core, in-process with the null sink and one
/// reactor: once warm, a pipelined command allocates nothing and a message nothing
/// beyond the core's four (envelope text and recipients, body buffer, sealed bytes),
/// with receives, sends, timers and sink answers all on the reactor's thread. The
/// client side (this thread) writes prebuilt bytes and reads into a fixed buffer, so
/// it allocates nothing either; a little slack covers the reactor's periodic metrics
/// flush.
#[test]
fn uring_reactor_allocation_budget() {
    use std::io::{Read, Write};
    use std::time::Duration;

    use smtpgw::conn::{ConnectionSettings, Edge};
    use smtpgw::metrics::Metrics;
    use smtpgw::net::{IoBackend, ListenerKind, ListenerSpec, ReactorParams, Reactors};
    use smtpgw::sink::null::NullSink;

    let r = Reactors::start(
        IoBackend::Uring,
        ReactorParams {
            listeners: vec![ListenerSpec {
                addr: "127.0.0.1:0".parse().unwrap(),
                kind: ListenerKind::Smtp,
                edge: Arc::new(Edge::default()),
            }],
            reactors: 1,
            pin_cpus: true,
            session: Arc::new(Arc::unwrap_or_clone(config()).into()),
            sink: Arc::new(NullSink::new()),
            metrics: Arc::new(Metrics::new().expect("metrics")),
            max_connections: 10,
            limits: ConnectionSettings {
                idle_timeout: Duration::from_secs(60),
                max_session_time: Duration::from_secs(600),
                min_data_rate: None,
                output_cap: ConnectionSettings::DEFAULT_OUTPUT_CAP,
                sink: "null",
            },
            max_body_memory: 1 << 30,
        },
    )
    .expect("io_uring reactor starts");
    assert_eq!(r.backend(), "uring");
    let mut s = std::net::TcpStream::connect(r.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 16];

    // Reads until `want` occurrences of `needle` have arrived (replies may split).
    let mut wait_for = |s: &mut std::net::TcpStream, needle: &[u8], want: usize| {
        let (mut seen, mut carry) = (0usize, 0usize);
        while seen < want {
            let n = match s.read(&mut buf[carry..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("replies: {e}"),
            };
            assert!(n > 0, "connection closed");
            let end = carry + n;
            let mut i = 0;
            while i + needle.len() <= end {
                if &buf[i..i + needle.len()] == needle {
                    seen += 1;
                    i += needle.len();
                } else {
                    i += 1;
                }
            }
            // Keep a possible partial needle at the end.
            let keep = (needle.len() - 1).min(end);
            buf.copy_within(end - keep..end, 0);
            carry = keep;
        }
    };

    let batch = 50;
    let mut message =
        b"MAIL FROM:<alice@client.example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n".to_vec();
    message.extend_from_slice(&body(1024));
    let messages = message.repeat(batch);
    let noops = b"NOOP\r\n".repeat(batch);

    s.write_all(b"EHLO client.example.org\r\n").unwrap();
    wait_for(&mut s, b"250 ", 1);
    for _ in 0..20 {
        s.write_all(&messages).unwrap();
        wait_for(&mut s, b"Ok: queued as", batch);
        s.write_all(&noops).unwrap();
        wait_for(&mut s, b"250 2.0.0 Ok", batch);
    }

    let rounds = 40;
    let before = ALL_ALLOCS.load(Ordering::Relaxed);
    for _ in 0..rounds {
        s.write_all(&noops).unwrap();
        wait_for(&mut s, b"250 2.0.0 Ok", batch);
    }
    let per_noops = ALL_ALLOCS.load(Ordering::Relaxed) - before;

    let before = ALL_ALLOCS.load(Ordering::Relaxed);
    for _ in 0..rounds {
        s.write_all(&messages).unwrap();
        wait_for(&mut s, b"Ok: queued as", batch);
    }
    let per_messages = ALL_ALLOCS.load(Ordering::Relaxed) - before;
    let n = (rounds * batch) as u64;
    eprintln!(
        "uring reactor: {per_noops} allocations for {n} NOOPs, {per_messages} for {n} messages"
    );
    assert!(
        per_noops <= 16,
        "{per_noops} allocations for {n} pipelined NOOPs"
    );
    // Besides the core's four per message, the driver keeps the tail of a read that
    // ends inside a line or body in a buffer it frees once drained (so idle
    // connections hold none): at most one allocation per read, and reads here take at
    // least 16 KiB (the driver's read size between commands) when the client has
    // written that much.
    let reads = (rounds * messages.len()).div_ceil(16 * 1024) as u64;
    assert!(
        per_messages <= 4 * n + reads + 16,
        "{per_messages} allocations for {n} messages in about {reads} reads (budget: 4 per \
         message, 1 per read)"
    );
    drop(s);
    r.stop();
}
