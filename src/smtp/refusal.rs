//! Why the gateway said no: one typed value per reason, each with one reply on the wire
//! and one word that is both the log line's `reason` and the label of
//! `smtpgw_refusals_total{reason}`.
//!
//! The session and the driver report a refusal as a [`Refusal`] (see
//! [`super::session::SessionEvent`]); nothing downstream looks at reply bytes to learn
//! what happened.

use super::reply;
use super::stats::Label;

macro_rules! refusals {
    ($($variant:ident => $word:literal, $code:literal, $enhanced:literal;)*) => {
        /// A reason of the gateway's own for a `4xx`/`5xx` reply or a close.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Refusal {
            $($variant,)*
        }

        impl Refusal {
            /// Every reason, in the order of its [`Label::index`].
            pub const ALL: &'static [Refusal] = &[$(Refusal::$variant,)*];

            /// The log line's `reason` and the metric's label.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Refusal::$variant => $word,)*
                }
            }

            /// The reply code (0 for a connection closed unanswered).
            pub fn code(self) -> u16 {
                match self {
                    $(Refusal::$variant => $code,)*
                }
            }

            /// The RFC 3463 enhanced status code ("" when there is no reply).
            pub fn enhanced(self) -> &'static str {
                match self {
                    $(Refusal::$variant => $enhanced,)*
                }
            }
        }
    };
}

refusals! {
    UnknownCommand => "unknown_command", 500, "5.5.2";
    LineTooLong => "line_too_long", 500, "5.5.6";
    Syntax => "syntax", 501, "5.5.4";
    BadSender => "bad_sender", 501, "5.1.7";
    BadRecipient => "bad_recipient", 501, "5.1.3";
    SenderTooLong => "sender_too_long", 553, "5.1.7";
    RecipientTooLong => "recipient_too_long", 553, "5.1.3";
    NeedsSmtpUtf8 => "smtputf8_required", 553, "5.6.7";
    BadParameter => "bad_parameter", 501, "5.5.4";
    UnsupportedParameter => "unsupported_parameter", 555, "5.5.4";
    UnknownHelpTopic => "unknown_help_topic", 504, "5.5.4";
    BadSequence => "bad_sequence", 503, "5.5.1";
    NoValidRecipients => "no_valid_recipients", 554, "5.5.1";
    NotImplemented => "not_implemented", 502, "5.5.1";
    RelayDenied => "relay_denied", 550, "5.7.1";
    TooManyRecipients => "too_many_recipients", 452, "4.5.3";
    TooLarge => "too_large", 552, "5.3.4";
    BareLineEnding => "bare_line_ending", 550, "5.6.0";
    TlsRequired => "tls_required", 530, "5.7.0";
    BodyMemory => "body_memory", 451, "4.3.1";
    ErrorBudget => "error_budget", 421, "4.7.0";
    MessageRate => "message_rate", 421, "4.7.0";
    PerIp => "per_ip", 421, "4.7.0";
    PerPrefix => "per_prefix", 421, "4.7.0";
    ConnectionRate => "connection_rate", 421, "4.7.0";
    EarlyTalker => "early_talker", 554, "5.5.0";
    IdleTimeout => "idle_timeout", 421, "4.4.2";
    SessionTimeout => "session_timeout", 421, "4.4.2";
    DataRate => "data_rate", 421, "4.4.2";
    ShuttingDown => "shutting_down", 421, "4.3.2";
    MaxConnections => "max_connections", 421, "4.3.2";
    ProxyInvalid => "proxy_invalid", 0, "";
    ProxyUntrusted => "proxy_untrusted", 0, "";
    TlsHandshake => "tls_handshake", 0, "";
    SinkTemporary => "sink_temporary", 451, "4.3.0";
    StorageFull => "storage_full", 452, "4.3.1";
    SinkTooLarge => "sink_too_large", 552, "5.3.4";
    AuthFailed => "auth_failed", 535, "5.7.8";
    AuthRequired => "auth_required", 530, "5.7.0";
    AuthNeedsTls => "auth_needs_tls", 538, "5.7.11";
    AuthMechanism => "auth_mechanism", 504, "5.5.4";
    AuthCancelled => "auth_cancelled", 501, "5.7.0";
    AuthMalformed => "auth_malformed", 501, "5.5.2";
    AuthTemporary => "auth_temporary", 454, "4.7.0";
    AuthFailures => "auth_failures", 421, "4.7.0";
}

/// `smtpgw_refusals_total{reason}`: one counter per reason, its word the label.
impl Label for Refusal {
    type Array = [u64; Refusal::ALL.len()];
    const ALL: &'static [Refusal] = Refusal::ALL;
    const ZERO: Self::Array = [0; Refusal::ALL.len()];
    fn index(self) -> usize {
        self as usize
    }
    fn as_str(self) -> &'static str {
        Refusal::as_str(self)
    }
}

impl Refusal {
    /// Whether a command refused for this reason spends the session's error budget
    /// (`--error-budget`): every `5xx`, and `452 4.5.3` for too many recipients, since a
    /// client that keeps adding recipients past the limit is refused over and over and
    /// must not go on forever. Decided from the typed value, never from reply bytes.
    pub fn spends_error_budget(self) -> bool {
        self.code() >= 500 || self == Refusal::TooManyRecipients
    }

    /// The fixed reply of a refusal that has one (the others name the host or a reason
    /// and are written by [`reply`]'s functions).
    pub fn fixed_reply(self) -> Option<&'static [u8]> {
        Some(match self {
            Refusal::UnknownCommand => reply::UNKNOWN_COMMAND,
            Refusal::LineTooLong => reply::LINE_TOO_LONG,
            Refusal::RelayDenied => reply::RELAY_DENIED,
            Refusal::TooManyRecipients => reply::TOO_MANY_RECIPIENTS,
            Refusal::TooLarge => reply::MESSAGE_TOO_BIG,
            Refusal::BareLineEnding => reply::BARE_LINE_ENDING,
            Refusal::TlsRequired => reply::TLS_REQUIRED,
            Refusal::BodyMemory => reply::LOW_MEMORY,
            Refusal::NoValidRecipients => reply::NO_VALID_RECIPIENTS,
            Refusal::StorageFull => reply::STORAGE_FULL,
            Refusal::SinkTooLarge => reply::SINK_TOO_BIG,
            Refusal::AuthFailed => reply::AUTH_FAILED,
            Refusal::AuthRequired => reply::AUTH_REQUIRED,
            Refusal::AuthNeedsTls => reply::AUTH_NEEDS_TLS,
            Refusal::AuthMechanism => reply::AUTH_MECHANISM,
            Refusal::AuthCancelled => reply::AUTH_CANCELLED,
            Refusal::AuthMalformed => reply::AUTH_MALFORMED,
            Refusal::AuthTemporary => reply::AUTH_TEMPORARY,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed value and the bytes on the wire agree: each fixed reply starts with the
    /// refusal's code and enhanced code.
    #[test]
    fn fixed_replies_carry_the_refusals_codes() {
        for &r in Refusal::ALL {
            assert_eq!(Refusal::ALL[r.index()], r);
            if let Some(text) = r.fixed_reply() {
                let want = format!("{} {} ", r.code(), r.enhanced());
                assert!(text.starts_with(want.as_bytes()), "{r:?}");
            }
        }
    }

    #[test]
    fn words_are_unique_labels() {
        let words: Vec<_> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
        let mut sorted = words.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(words.len(), sorted.len());
        assert!(words.iter().all(|w| w
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')));
    }
}
