//! What a session counts for the metrics: plain integers, no clocks, no atomics.
//!
//! The session bumps these as it works; the caller takes them after each `feed` and adds
//! them to its own per-thread totals, which it publishes now and then. They are output
//! only: what the caller acts on it learns from the session's events
//! ([`super::session::SessionEvent`]), never by comparing counts. Keeping the core
//! free of shared counters is what lets a command cost no cache-line traffic between
//! reactors. Every label value is one of the fixed tables here, never client text.

/// `smtpgw_commands_total{verb}` label values; the index is [`SessionStats::commands`]'.
pub const VERBS: [&str; 19] = [
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
    "SEND", "SOML", "SAML", "TURN", "STARTTLS", "AUTH", "OTHER",
];

/// Index of `OTHER` in [`VERBS`]: unknown, not implemented or unparsable lines.
pub const VERB_OTHER: usize = 18;

/// Every reply code the gateway can send, for `smtpgw_replies_total{code}`.
pub const REPLY_CODES: [u16; 26] = [
    214, 220, 221, 235, 250, 252, 334, 354, 421, 451, 452, 454, 500, 501, 502, 503, 504, 530, 535,
    538, 550, 552, 553, 554, 555, 0,
];

/// Index of the catch-all slot in [`REPLY_CODES`]; only a reply added to `reply.rs`
/// without being added above lands here (a unit test keeps it empty).
pub const REPLY_UNLISTED: usize = 25;

/// `smtpgw_messages_rejected_total{reason}` label values.
pub const REJECT_REASONS: [&str; 4] = [
    "too_large",
    "bare_line_ending",
    "sink_temporary",
    "sink_too_large",
];

pub const REJECT_TOO_LARGE: usize = 0;
pub const REJECT_BARE_LINE_ENDING: usize = 1;
pub const REJECT_SINK_TEMPORARY: usize = 2;
pub const REJECT_SINK_TOO_LARGE: usize = 3;

/// Counts since the caller last took them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Indexed like [`VERBS`].
    pub commands: [u64; VERBS.len()],
    /// Final reply lines sent, indexed like [`REPLY_CODES`]; the greeting counts.
    pub replies: [u64; REPLY_CODES.len()],
    pub messages_accepted: u64,
    /// Indexed like [`REJECT_REASONS`].
    pub messages_rejected: [u64; REJECT_REASONS.len()],
    /// DATA bodies with a bare CR or LF, whatever the policy did with them.
    pub smuggling_attempts: u64,
    /// Sessions closed with `421 4.7.0` by a limit, indexed like [`LIMIT_CLOSES`].
    pub limit_closes: [u64; LIMIT_CLOSES.len()],
    /// Every refusal the session made, whether or not its event was taken.
    pub refusals: super::refusal::RefusalCounts,
}

/// `smtpgw_session_limit_closes_total{reason}` label values.
pub const LIMIT_CLOSES: [&str; 3] = ["error_budget", "message_rate", "auth_failures"];
pub const CLOSE_ERROR_BUDGET: usize = 0;
pub const CLOSE_MESSAGE_RATE: usize = 1;
pub const CLOSE_AUTH_FAILURES: usize = 2;

impl SessionStats {
    /// Adds `other` to `self` and zeroes `other`, so the same counts are never added twice.
    pub fn absorb(&mut self, other: &mut SessionStats) {
        fn add<const N: usize>(to: &mut [u64; N], from: &mut [u64; N]) {
            for (t, f) in to.iter_mut().zip(from.iter_mut()) {
                *t += std::mem::take(f);
            }
        }
        add(&mut self.commands, &mut other.commands);
        add(&mut self.replies, &mut other.replies);
        add(&mut self.messages_rejected, &mut other.messages_rejected);
        add(&mut self.limit_closes, &mut other.limit_closes);
        self.messages_accepted += std::mem::take(&mut other.messages_accepted);
        self.smuggling_attempts += std::mem::take(&mut other.smuggling_attempts);
        self.refusals.absorb(&mut other.refusals);
    }

    /// Commands counted for `verb` (a [`VERBS`] entry); 0 for anything else.
    pub fn command(&self, verb: &str) -> u64 {
        VERBS
            .iter()
            .position(|v| *v == verb)
            .map_or(0, |i| self.commands[i])
    }

    /// Final replies counted with `code`.
    pub fn reply(&self, code: u16) -> u64 {
        self.replies[reply_index(code)]
    }

    /// Counts every final reply line (`NNN ` rather than `NNN-`) in `out`, which holds
    /// whole replies the session just wrote.
    pub(crate) fn count_replies(&mut self, out: &[u8]) {
        for line in out.split(|&b| b == b'\n') {
            if let [a, b, c, b' ', ..] = *line {
                let code = [a, b, c].iter().try_fold(0u16, |n, d| {
                    d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0'))
                });
                if let Some(code) = code {
                    self.replies[reply_index(code)] += 1;
                }
            }
        }
    }
}

fn reply_index(code: u16) -> usize {
    REPLY_CODES[..REPLY_UNLISTED]
        .iter()
        .position(|&c| c == code)
        .unwrap_or(REPLY_UNLISTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_final_lines_only() {
        let mut s = SessionStats::default();
        s.count_replies(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n550 5.7.1 no\r\n");
        assert_eq!(s.reply(250), 1);
        assert_eq!(s.reply(550), 1);
        assert_eq!(s.replies[REPLY_UNLISTED], 0);
    }

    #[test]
    fn absorb_moves_counts() {
        let mut a = SessionStats::default();
        let mut b = SessionStats::default();
        b.commands[VERB_OTHER] = 2;
        b.replies[0] = 3;
        b.messages_accepted = 1;
        a.absorb(&mut b);
        a.absorb(&mut b);
        assert_eq!(a.command("OTHER"), 2);
        assert_eq!(a.replies[0], 3);
        assert_eq!(a.messages_accepted, 1);
        assert_eq!(b, SessionStats::default());
    }
}
