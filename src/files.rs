//! Reading the files an operator names (the `--config` file, the TLS certificate and
//! key): one function, so every such read refuses what is not a regular file and stops
//! at a size cap, at start-up and on SIGHUP alike.
//!
//! A FIFO would block `open(2)` and `read(2)` until someone writes it, a device such as
//! `/dev/zero` never ends, and a huge file would be read into memory whole: each is a
//! one-line error here instead of a hang or an abort.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most a `--config` file may hold.
pub const CONFIG_CAP: u64 = 16 * 1024 * 1024;
/// The most a PEM file (certificate chain or key) may hold.
pub const PEM_CAP: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    #[error("is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("larger than {cap} bytes (the limit for this file)")]
    TooLarge { cap: u64 },
}

/// The whole content of the regular file at `path`, at most `cap` bytes.
///
/// Opened with `O_NONBLOCK` so a FIFO does not block the open, then checked with
/// `fstat` on the open descriptor (no window for the path to change in between).
pub fn read_regular_file(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(FileError::NotRegular(if kind.is_dir() {
            "directory"
        } else if kind.is_fifo() {
            "FIFO"
        } else if kind.is_char_device() {
            "character device"
        } else if kind.is_block_device() {
            "block device"
        } else if kind.is_socket() {
            "socket"
        } else {
            "special file"
        }));
    }
    if meta.len() > cap {
        return Err(FileError::TooLarge { cap });
    }
    // The size is a hint only: the file may grow while it is read, so the read itself
    // stops one byte past the cap.
    let mut content = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(cap.saturating_add(1)).read_to_end(&mut content)?;
    if content.len() as u64 > cap {
        return Err(FileError::TooLarge { cap });
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_whole_up_to_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").expect("write");
        assert_eq!(read_regular_file(&path, 10).expect("read"), b"0123456789");
        assert!(matches!(
            read_regular_file(&path, 9),
            Err(FileError::TooLarge { cap: 9 })
        ));
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).expect("mkfifo");
        // Without O_NONBLOCK this open would wait for a writer forever.
        let e = read_regular_file(&fifo, CONFIG_CAP).expect_err("a FIFO");
        assert_eq!(e.to_string(), "is a FIFO, not a regular file");
        let e = read_regular_file(Path::new("/dev/zero"), CONFIG_CAP).expect_err("a device");
        assert_eq!(e.to_string(), "is a character device, not a regular file");
        let e = read_regular_file(dir.path(), CONFIG_CAP).expect_err("a directory");
        assert_eq!(e.to_string(), "is a directory, not a regular file");
        let e = read_regular_file(&dir.path().join("none"), CONFIG_CAP).expect_err("missing");
        assert!(e.to_string().starts_with("cannot read: "), "{e}");
    }
}
