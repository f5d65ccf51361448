//! Test helper: runs a command under a seccomp filter that makes `io_uring_setup` fail
//! with EPERM, the way a container runtime's default profile does, so the gateway's
//! `--io-backend auto` fallback is tested against a real refusal.
//!
//! Usage: `seccomp_exec PROGRAM [ARGS...]`

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: seccomp_exec PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    let filter = SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH
            .try_into()
            .expect("supported architecture"),
    )
    .and_then(BpfProgram::try_from);
    let program_bpf = match filter {
        Ok(p) => p,
        Err(e) => {
            eprintln!("seccomp_exec: cannot build the filter: {e}");
            return ExitCode::from(1);
        }
    };
    // Sets no_new_privs and installs the filter for this process; exec keeps both.
    if let Err(e) = seccompiler::apply_filter(&program_bpf) {
        eprintln!("seccomp_exec: cannot install the filter: {e}");
        return ExitCode::from(1);
    }
    let err = Command::new(&program).args(args).exec();
    eprintln!(
        "seccomp_exec: cannot run {}: {err}",
        program.to_string_lossy()
    );
    ExitCode::from(1)
}
