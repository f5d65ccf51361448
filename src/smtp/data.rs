//! DATA body reception (stub).

/// What to do with a bare CR or LF in a DATA body (SMTP smuggling defence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BareLfPolicy {
    /// Refuse the whole message with `550 5.6.0` once its real end has been read.
    #[default]
    Reject,
    /// Store every bare CR or LF as CRLF; only `<CRLF>.<CRLF>` ever ends the message.
    Normalize,
}
