//! Replays the session_feed seed corpus as an ordinary test (stable, in CI): each seed
//! through the fuzz target's own check (whole vs. its recorded cuts), then whole vs. a
//! cut at every single position and vs. one byte per read. Also checks that the corpus
//! still means something: it has DATA and BDAT messages, a smuggling refusal, a refused
//! oversize body and a temporary sink failure among its replies.

use smtpgw_fuzz::{check, run, Case};

fn corpus() -> Vec<(String, Vec<u8>)> {
    smtpgw_fuzz::seeds("session_feed")
}

#[test]
fn every_seed_gives_the_same_transcript_however_it_is_cut() {
    let seeds = corpus();
    assert!(seeds.len() >= 12, "only {} seeds", seeds.len());
    for (name, data) in &seeds {
        check(data);
        let case = Case::decode(data).unwrap_or_else(|| panic!("{name}: too short"));
        let whole = run(case.flags, &[case.stream]);
        for cut in 0..=case.stream.len() {
            let split = run(case.flags, &case.pieces(&[cut]));
            assert_eq!(whole, split, "{name}: cut at {cut}");
        }
        let bytes: Vec<&[u8]> = case.stream.chunks(1).collect();
        assert_eq!(whole, run(case.flags, &bytes), "{name}: byte by byte");
    }
}

#[test]
fn the_corpus_reaches_the_interesting_places() {
    let mut replies = String::new();
    let mut messages = 0;
    let mut dsn = false;
    let mut auth = false;
    for (_, data) in corpus() {
        let case = Case::decode(&data).expect("seed decodes");
        let t = run(case.flags, &[case.stream]);
        replies.push_str(&String::from_utf8_lossy(&t.replies));
        messages += t.messages.len();
        auth |= t
            .messages
            .iter()
            .any(|m| m.2.iter().any(|d| d == "auth=alice"));
        dsn |= t.messages.iter().any(|m| {
            m.2.iter()
                .any(|d| d == "SUCCESS,FAILURE rfc822;bob+40x.example")
        });
    }
    for code in [
        "250 2.0.0 Ok: queued as ",
        "354 ",
        "550 5.6.0",
        "552 5.3.4",
        "451 4.3.0",
        "452 4.5.3",
        "500 5.5.6",
        "501 5.5.4 Malformed RET",
        "501 5.5.4 Malformed ENVID",
        "501 5.5.4 Malformed NOTIFY",
        "501 5.5.4 Malformed ORCPT",
        "501 5.5.4 Duplicate RCPT",
        "503 5.5.1",
        "221 ",
        "235 2.7.0",
        "334 VXNlcm5hbWU6",
        "501 5.7.0",
        "501 5.5.2",
        "504 5.5.4",
        "535 5.7.8",
        "454 4.7.0",
        "530 5.7.0 Authentication required",
        "421 4.7.0 fuzz.test Too many authentication failures",
    ] {
        assert!(replies.contains(code), "no seed gets {code:?}");
    }
    assert!(messages >= 10, "{messages} messages");
    assert!(dsn, "no seed carries DSN parameters into a message");
    assert!(auth, "no seed carries an AUTH user into a message");
}
