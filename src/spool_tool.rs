//! TEMP stand-in for the spool subcommands (the real one lands from branch `spool`; drop this).

use std::io::Write;
use std::path::Path;

use crate::sink::spool::SpoolError;

pub fn ls(_dir: &Path, _out: &mut dyn Write) -> Result<(), SpoolError> {
    Err(SpoolError::Unavailable)
}

pub fn cat(
    _dir: &Path,
    _id: &str,
    _body_only: bool,
    _out: &mut dyn Write,
) -> Result<(), SpoolError> {
    Err(SpoolError::Unavailable)
}

pub fn export_mbox(_dir: &Path, _mbox: &Path) -> Result<usize, SpoolError> {
    Err(SpoolError::Unavailable)
}
