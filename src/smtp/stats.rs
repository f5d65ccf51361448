//! What a session counts for the metrics: plain integers, no clocks, no atomics.
//!
//! The session bumps these as it works; the caller takes them after each `feed` and adds
//! them to its own per-thread totals, which it publishes now and then. They are output
//! only: what the caller acts on it learns from the session's events
//! ([`super::session::SessionEvent`]), never by comparing counts. Keeping the core
//! free of shared counters is what lets a command cost no cache-line traffic between
//! reactors. Every label value is one of the fixed tables here, never client text.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Index, IndexMut};

use super::refusal::Refusal;

/// A fixed set of label values of one metric: one enum variant per value, so a count is
/// addressed by its meaning, never by a position in a parallel array.
pub trait Label: Copy + fmt::Debug + PartialEq + 'static {
    /// One count per value: `[u64; ALL.len()]`.
    type Array: AsRef<[u64]> + AsMut<[u64]> + Clone + fmt::Debug + PartialEq + Eq;
    /// Every value, in the order of [`Label::index`].
    const ALL: &'static [Self];
    /// All counts zero.
    const ZERO: Self::Array;
    /// The value's slot in [`Label::Array`] and in a metric's resolved series.
    fn index(self) -> usize;
    /// The label value as exported.
    fn as_str(self) -> &'static str;
}

/// Declares a label set: the enum, its `ALL` and `as_str`, and its [`Label`] impl.
macro_rules! labels {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident => $label:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order (the counters' order).
            pub const ALL: [$name; [$($label),*].len()] = [$($name::$variant),*];

            /// The label value as exported.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }

        impl $crate::smtp::stats::Label for $name {
            type Array = [u64; [$($label),*].len()];
            const ALL: &'static [Self] = &$name::ALL;
            const ZERO: Self::Array = [0; [$($label),*].len()];
            fn index(self) -> usize {
                self as usize
            }
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
        }
    };
}
pub(crate) use labels;

/// One count per value of the label set `L`: the counts of one metric.
pub struct Counts<L: Label>(L::Array, PhantomData<L>);

impl<L: Label> Counts<L> {
    /// Adds `other` to `self` and zeroes `other`, so the same counts are never added twice.
    pub fn absorb(&mut self, other: &mut Counts<L>) {
        for (t, f) in self.0.as_mut().iter_mut().zip(other.0.as_mut()) {
            *t += std::mem::take(f);
        }
    }

    /// Each value with its count, in [`Label::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (L, u64)> + '_ {
        L::ALL.iter().map(|&l| (l, self[l]))
    }

    /// The sum over all values.
    pub fn total(&self) -> u64 {
        self.0.as_ref().iter().sum()
    }

    /// Each value's count, zeroing it: for a publisher that adds them to its totals.
    pub fn drain(&mut self, mut each: impl FnMut(L, u64)) {
        for (&l, n) in L::ALL.iter().zip(self.0.as_mut()) {
            if *n > 0 {
                each(l, std::mem::take(n));
            }
        }
    }
}

impl<L: Label> Default for Counts<L> {
    fn default() -> Self {
        Counts(L::ZERO, PhantomData)
    }
}

impl<L: Label> Clone for Counts<L> {
    fn clone(&self) -> Self {
        Counts(self.0.clone(), PhantomData)
    }
}

impl<L: Label> PartialEq for Counts<L> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<L: Label> Eq for Counts<L> {}

impl<L: Label> fmt::Debug for Counts<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(l, n)| (l.as_str(), n)),
            )
            .finish()
    }
}

impl<L: Label> Index<L> for Counts<L> {
    type Output = u64;
    fn index(&self, l: L) -> &u64 {
        &self.0.as_ref()[l.index()]
    }
}

impl<L: Label> IndexMut<L> for Counts<L> {
    fn index_mut(&mut self, l: L) -> &mut u64 {
        &mut self.0.as_mut()[l.index()]
    }
}

labels! {
    /// `smtpgw_commands_total{verb}`.
    pub enum Verb {
        Helo => "HELO",
        Ehlo => "EHLO",
        Mail => "MAIL",
        Rcpt => "RCPT",
        Data => "DATA",
        Bdat => "BDAT",
        Rset => "RSET",
        Noop => "NOOP",
        Quit => "QUIT",
        Vrfy => "VRFY",
        Expn => "EXPN",
        Help => "HELP",
        Send => "SEND",
        Soml => "SOML",
        Saml => "SAML",
        Turn => "TURN",
        StartTls => "STARTTLS",
        Auth => "AUTH",
        /// Unknown, not implemented or unparsable lines (their verb may be client junk).
        Other => "OTHER",
    }
}

labels! {
    /// `smtpgw_replies_total{code}`: every reply code the gateway can send.
    pub enum ReplyCode {
        C214 => "214",
        C220 => "220",
        C221 => "221",
        C235 => "235",
        C250 => "250",
        C252 => "252",
        C334 => "334",
        C354 => "354",
        C421 => "421",
        C451 => "451",
        C452 => "452",
        C454 => "454",
        C500 => "500",
        C501 => "501",
        C502 => "502",
        C503 => "503",
        C504 => "504",
        C530 => "530",
        C535 => "535",
        C538 => "538",
        C550 => "550",
        C552 => "552",
        C553 => "553",
        C554 => "554",
        C555 => "555",
    }
}

impl ReplyCode {
    /// The value for a 3-digit `code`; `None` for a code not in the set.
    pub fn from_code(code: u16) -> Option<ReplyCode> {
        ReplyCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The code as a number.
    pub fn code(self) -> u16 {
        self.as_str().parse().unwrap_or(0)
    }
}

labels! {
    /// `smtpgw_messages_rejected_total{reason}`.
    pub enum RejectReason {
        TooLarge => "too_large",
        BareLineEnding => "bare_line_ending",
        SinkTemporary => "sink_temporary",
        SinkTooLarge => "sink_too_large",
    }
}

labels! {
    /// `smtpgw_session_limit_closes_total{reason}`: sessions closed with `421 4.7.0` by
    /// a limit.
    pub enum LimitClose {
        ErrorBudget => "error_budget",
        MessageRate => "message_rate",
        AuthFailures => "auth_failures",
    }
}

impl LimitClose {
    /// The limit close a refusal is, if it is one.
    pub fn of(refusal: Refusal) -> Option<LimitClose> {
        match refusal {
            Refusal::ErrorBudget => Some(LimitClose::ErrorBudget),
            Refusal::MessageRate => Some(LimitClose::MessageRate),
            Refusal::AuthFailures => Some(LimitClose::AuthFailures),
            _ => None,
        }
    }
}

/// Counts since the caller last took them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub commands: Counts<Verb>,
    /// Final reply lines sent; the greeting counts.
    pub replies: Counts<ReplyCode>,
    /// Final reply lines with a code not in [`ReplyCode`]: only a reply added to
    /// `reply.rs` without being added there lands here (a unit test keeps it empty).
    pub replies_unlisted: u64,
    pub messages_accepted: u64,
    pub messages_rejected: Counts<RejectReason>,
    /// DATA bodies with a bare CR or LF, whatever the policy did with them.
    pub smuggling_attempts: u64,
    pub limit_closes: Counts<LimitClose>,
    /// Every refusal the session made, whether or not its event was taken.
    pub refusals: Counts<Refusal>,
}

impl SessionStats {
    /// Adds `other` to `self` and zeroes `other`, so the same counts are never added twice.
    pub fn absorb(&mut self, other: &mut SessionStats) {
        self.commands.absorb(&mut other.commands);
        self.replies.absorb(&mut other.replies);
        self.messages_rejected.absorb(&mut other.messages_rejected);
        self.limit_closes.absorb(&mut other.limit_closes);
        self.refusals.absorb(&mut other.refusals);
        self.replies_unlisted += std::mem::take(&mut other.replies_unlisted);
        self.messages_accepted += std::mem::take(&mut other.messages_accepted);
        self.smuggling_attempts += std::mem::take(&mut other.smuggling_attempts);
    }

    /// Commands counted for `verb` (a [`Verb`]'s label); 0 for anything else.
    pub fn command(&self, verb: &str) -> u64 {
        Verb::ALL
            .into_iter()
            .find(|v| v.as_str() == verb)
            .map_or(0, |v| self.commands[v])
    }

    /// Final replies counted with `code`.
    pub fn reply(&self, code: u16) -> u64 {
        ReplyCode::from_code(code).map_or(self.replies_unlisted, |c| self.replies[c])
    }

    /// Counts every final reply line (`NNN ` rather than `NNN-`) in `out`, which holds
    /// whole replies the session just wrote. (Metrics only: what the caller acts on
    /// comes from the session's typed events.)
    pub(crate) fn count_replies(&mut self, out: &[u8]) {
        // Line starts found with memchr rather than a split that visits every byte: a
        // reply is mostly text, and this runs for every reply the gateway writes.
        let starts = std::iter::once(0).chain(memchr::memchr_iter(b'\n', out).map(|i| i + 1));
        for start in starts {
            if let [a, b, c, b' ', ..] = out[start..] {
                let code = [a, b, c].iter().try_fold(0u16, |n, d| {
                    d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0'))
                });
                if let Some(code) = code {
                    match ReplyCode::from_code(code) {
                        Some(c) => self.replies[c] += 1,
                        None => self.replies_unlisted += 1,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_are_indexed_by_declaration_and_codes_round_trip() {
        fn check<L: Label>() {
            for (i, &l) in L::ALL.iter().enumerate() {
                assert_eq!(l.index(), i, "{l:?}");
            }
            assert_eq!(L::ZERO.as_ref().len(), L::ALL.len());
        }
        check::<Verb>();
        check::<ReplyCode>();
        check::<RejectReason>();
        check::<LimitClose>();
        check::<Refusal>();
        for c in ReplyCode::ALL {
            assert_eq!(ReplyCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ReplyCode::from_code(299), None);
        for r in Refusal::ALL {
            if let Some(close) = LimitClose::of(*r) {
                assert_eq!(close.as_str(), r.as_str());
            }
        }
    }

    #[test]
    fn drain_takes_each_count_once() {
        let mut c = Counts::<RejectReason>::default();
        c[RejectReason::SinkTooLarge] += 2;
        let mut seen = Vec::new();
        c.drain(|l, n| seen.push((l, n)));
        c.drain(|l, n| seen.push((l, n)));
        assert_eq!(seen, [(RejectReason::SinkTooLarge, 2)]);
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn counts_final_lines_only() {
        let mut s = SessionStats::default();
        s.count_replies(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n550 5.7.1 no\r\n");
        assert_eq!(s.reply(250), 1);
        assert_eq!(s.reply(550), 1);
        assert_eq!(s.replies_unlisted, 0);
    }

    #[test]
    fn absorb_moves_counts() {
        let mut a = SessionStats::default();
        let mut b = SessionStats::default();
        b.commands[Verb::Other] = 2;
        b.replies[ReplyCode::C214] = 3;
        b.messages_accepted = 1;
        a.absorb(&mut b);
        a.absorb(&mut b);
        assert_eq!(a.command("OTHER"), 2);
        assert_eq!(a.reply(214), 3);
        assert_eq!(a.messages_accepted, 1);
        assert_eq!(b, SessionStats::default());
    }
}
