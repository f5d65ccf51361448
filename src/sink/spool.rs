//! TEMP stand-in for the spool sink (the real one lands from branch `spool`; drop this).

use std::path::Path;

use super::{Completion, PublishError, Sink};
use crate::smtp::envelope::SealedMessage;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("spool not available in this build (stand-in)")]
    Unavailable,
}

pub struct SpoolSink;

impl SpoolSink {
    pub fn open(dir: &Path) -> Result<SpoolSink, SpoolError> {
        std::fs::create_dir_all(dir)?;
        Ok(SpoolSink)
    }
}

impl Sink for SpoolSink {
    fn submit(&self, _msg: SealedMessage, done: Completion) {
        done.complete(Err(PublishError::Temporary("spool stand-in".into())));
    }

    fn shutdown(&self) {}

    fn name(&self) -> &'static str {
        "spool"
    }
}
