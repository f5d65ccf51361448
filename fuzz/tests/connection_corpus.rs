//! Replays the connection_feed seed corpus as an ordinary test (stable, in CI): each
//! seed through the fuzz target's own check, then whole vs. a cut at every position and
//! vs. one byte per read. Also checks that the corpus reaches the driver's edge: a
//! client address from PROXY v1 and v2 headers in the trace line, a header refused with
//! nothing written, the error budget's 421, MAIL refused without TLS, a sink failure,
//! and on an implicit-TLS listener a split header followed by a large ClientHello.

use smtpgw::conn::State;
use smtpgw_fuzz::connection::{case_pieces, check_connection, run_connection};
use smtpgw_fuzz::Case;

fn corpus() -> Vec<(String, Vec<u8>)> {
    smtpgw_fuzz::seeds("connection_feed")
}

fn seed(name: &str) -> Vec<u8> {
    corpus()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no seed {name}"))
        .1
}

fn transcript(name: &str) -> (String, Vec<String>, State) {
    let data = seed(name);
    let case = Case::decode(&data).expect("seed decodes");
    let t = run_connection(case.flags, &case_pieces(&case, &[], false));
    (
        String::from_utf8_lossy(&t.written).into_owned(),
        t.published
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect(),
        t.state,
    )
}

/// AUTH through the driver: the verdict comes back through `handle_auth`, an
/// authenticated session relays (trace line `ESMTPA`), and the address is locked after
/// three failures.
#[test]
fn auth_seeds_reach_the_verdicts() {
    let (written, published, _) = transcript("auth-relay");
    assert!(written.contains("250-AUTH PLAIN LOGIN\r\n"), "{written}");
    assert!(written.contains("235 2.7.0 "), "{written}");
    assert_eq!(published.len(), 1, "{written}");
    assert!(
        published[0].contains(" with ESMTPA id "),
        "{}",
        published[0]
    );
    let (written, published, state) = transcript("auth-brute-force");
    assert!(published.is_empty());
    assert_eq!(written.matches("535 5.7.8 ").count(), 3, "{written}");
    assert!(
        written
            .ends_with("421 4.7.0 fuzz.test Too many authentication failures, try again later\r\n"),
        "{written}"
    );
    assert_ne!(state, State::Open);
}

#[test]
fn every_seed_gives_the_same_transcript_however_it_is_cut() {
    let seeds = corpus();
    assert!(seeds.len() >= 12, "only {} seeds", seeds.len());
    for (name, data) in &seeds {
        check_connection(data);
        let case = Case::decode(data).unwrap_or_else(|| panic!("{name}: too short"));
        let whole = run_connection(case.flags, &case_pieces(&case, &[], false));
        for cut in 0..=case.stream.len() {
            let split = run_connection(case.flags, &case_pieces(&case, &[cut], false));
            assert_eq!(whole, split, "{name}: cut at {cut}");
        }
        // One byte per read, the header's too.
        let every: Vec<usize> = (0..case.stream.len()).collect();
        let bytes = case_pieces(&case, &every, false);
        assert_eq!(
            whole,
            run_connection(case.flags, &bytes),
            "{name}: byte by byte"
        );
    }
}

#[test]
fn the_corpus_reaches_the_edge() {
    let (out, published, _) = transcript("proxy-v1");
    assert!(out.starts_with("220 fuzz.test"), "{out}");
    assert!(published[0].contains("([203.0.113.7])"), "{published:?}");
    let (_, published, _) = transcript("proxy-v2");
    assert!(published[0].contains("([203.0.113.7])"), "{published:?}");
    let (_, published, _) = transcript("proxy-v2-tlv-any");
    assert_eq!(published.len(), 3);
    assert!(published.iter().all(|p| p.contains("([203.0.113.8])")));
    // A LOCAL header (the balancer's own check) keeps the socket's address.
    let (_, published, _) = transcript("proxy-v2-local");
    assert!(published[0].contains("([127.0.0.1])"), "{published:?}");
    for refused in ["proxy-untrusted", "proxy-v1-garbage"] {
        let (out, published, state) = transcript(refused);
        assert_eq!(out, "", "{refused}: a refused header gets nothing");
        assert!(published.is_empty());
        assert_ne!(state, State::Open);
    }
    let (out, _, _) = transcript("error-budget");
    assert!(out.contains("421 4.7.0"), "{out}");
    let (out, published, _) = transcript("require-tls");
    assert!(out.contains("530 5.7.0") && published.is_empty(), "{out}");
    let (out, published, _) = transcript("sink-down");
    assert!(
        out.contains("451 4.3.0") && published.len() == 2,
        "{out} {published:?}"
    );
    // Implicit TLS: a header in pieces, its last piece with a 6 KB ClientHello.
    for (seed, client) in [
        ("tls-proxy-v1-split-header-big-hello", "([203.0.113.7])"),
        ("tls-proxy-v2-split-header-big-hello", "([203.0.113.7])"),
        ("tls-no-proxy-big-hello-cut", "([127.0.0.1])"),
    ] {
        let (out, published, _) = transcript(seed);
        assert!(out.starts_with("220 fuzz.test"), "{seed}: {out}");
        assert!(
            out.ends_with("221 2.0.0 fuzz.test closing connection\r\n"),
            "{seed}: {out}"
        );
        assert_eq!(published.len(), 1, "{seed}: {out}");
        assert!(published[0].contains(client), "{seed}: {published:?}");
        assert!(
            published[0].contains("with ESMTPS"),
            "{seed}: {published:?}"
        );
    }
    let (out, _, _) = transcript("output-cap-pipelined-help");
    // 60 HELP replies of ~400 bytes each: far more than the 512-byte output cap, so
    // input waited behind unwritten output and every command was still answered.
    assert_eq!(out.matches("\r\n214 ").count(), 60, "{out}");
    assert!(out.len() > 60 * 100, "{}", out.len());
    assert!(
        out.ends_with("221 2.0.0 fuzz.test closing connection\r\n"),
        "{out}"
    );
}
