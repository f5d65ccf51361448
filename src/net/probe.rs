//! Start-up probe: can this process use the io_uring backend, and if not, why not, in
//! one line an operator can act on. The functional checks (building a ring the way a
//! reactor does and trying each operation) live in `uring::ring`, next to the unsafe
//! code they exercise; this module turns their outcome into a decision.

use std::fmt;
use std::io;

use super::uring::ring::{self, ProbeFailure};

pub use super::uring::ring::Capabilities;

/// Why io_uring cannot be used here; `Display` is the one-line reason.
#[derive(Debug)]
pub struct Unavailable(String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Tries io_uring the way the reactors will use it.
pub fn io_uring() -> Result<Capabilities, Unavailable> {
    ring::probe().map_err(|f| Unavailable(explain(f, disabled_sysctl())))
}

/// `kernel.io_uring_disabled`: 0 allowed, 1 only for `kernel.io_uring_group`, 2 off.
fn disabled_sysctl() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn explain(f: ProbeFailure, disabled: Option<u8>) -> String {
    match f {
        ProbeFailure::Setup(e) => setup_reason(&e, disabled),
        ProbeFailure::Missing(what) => format!("the kernel lacks {what}"),
        ProbeFailure::Other(step, e) => format!("{step} failed: {e}"),
    }
}

fn setup_reason(e: &io::Error, disabled: Option<u8>) -> String {
    match (e.raw_os_error(), disabled) {
        (Some(libc::EPERM), Some(2)) => {
            "io_uring_setup: EPERM: kernel.io_uring_disabled=2 (io_uring is off on this host)"
                .into()
        }
        (Some(libc::EPERM), Some(1)) => "io_uring_setup: EPERM: kernel.io_uring_disabled=1 \
             (only members of kernel.io_uring_group may use it)"
            .into(),
        (Some(libc::EPERM), _) => "io_uring_setup: EPERM: refused by a seccomp filter or \
             security policy (e.g. a container runtime's default profile)"
            .into(),
        (Some(libc::ENOSYS), _) => {
            "io_uring_setup: ENOSYS: kernel without io_uring, or the call is filtered".into()
        }
        (Some(libc::ENOMEM), _) => {
            "io_uring_setup: ENOMEM: cannot allocate a ring (locked-memory limit?)".into()
        }
        _ => format!("io_uring_setup failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_cause() {
        let eperm = || ProbeFailure::Setup(io::Error::from_raw_os_error(libc::EPERM));
        assert!(explain(eperm(), Some(0)).contains("seccomp"));
        assert!(explain(eperm(), Some(2)).contains("io_uring_disabled=2"));
        assert!(explain(eperm(), Some(1)).contains("io_uring_group"));
        let enosys = ProbeFailure::Setup(io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(explain(enosys, None).contains("ENOSYS"));
        assert!(
            explain(ProbeFailure::Missing("multishot accept (5.19)"), None)
                .contains("lacks multishot accept")
        );
    }

    #[test]
    fn this_machine_has_io_uring() {
        // The development and CI machines run 6.x kernels without a filter; the
        // fallback is tested end to end under a real seccomp filter (tests/).
        if std::env::var_os("SMTPGW_EXPECT_NO_URING").is_some() {
            return;
        }
        let caps = io_uring().expect("io_uring usable here");
        assert!(!caps.setup.is_empty());
    }
}
