//! Test helper: runs a command under a seccomp filter, the way a container runtime does.
//!
//! Without options the filter makes `io_uring_setup` fail with EPERM, as a container
//! runtime's default profile does, so the gateway's `--io-backend auto` fallback is
//! tested against a real refusal.
//!
//! With `--rules FILE` the filter is an allow-list: a container profile (Docker's JSON
//! format, translated by tests/e2e/test_deploy.py into syscall numbers) so the gateway
//! can be run under `deploy/container/seccomp.json` itself. FILE has one rule a line:
//!
//! ```text
//! default-errno E             anything not allowed fails with errno E
//! allow NR [ARG OP VALUE [VALUE2]]...   syscall NR, if every condition holds
//! errno NR E                  syscall NR fails with errno E
//! ```
//!
//! OP is `eq`, `ne`, `lt`, `le`, `gt`, `ge` or `masked_eq` (`(arg & VALUE) == VALUE2`).
//! Lines for one syscall are alternatives; `errno` lines win over `allow` lines.
//!
//! Usage: `seccomp_exec [--rules FILE] PROGRAM [ARGS...]`

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    let rules = if args.peek().is_some_and(|a| a == "--rules") {
        args.next();
        match args.next() {
            Some(path) => Some(path),
            None => return usage(),
        }
    } else {
        None
    };
    let Some(program) = args.next() else {
        return usage();
    };
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .expect("supported architecture");
    let programs = match &rules {
        None => io_uring_refused(arch).map(|p| vec![p]),
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.to_string_lossy()))
            .and_then(|text| from_rules(&text, arch)),
    };
    let programs = match programs {
        Ok(p) => p,
        Err(e) => {
            eprintln!("seccomp_exec: cannot build the filter: {e}");
            return ExitCode::from(1);
        }
    };
    // Sets no_new_privs and installs the filters for this process; exec keeps them.
    // The kernel runs every filter and takes the strictest answer; between two errno
    // answers the filter installed last wins, which is why the errno rules go last.
    for p in &programs {
        if let Err(e) = seccompiler::apply_filter(p) {
            eprintln!("seccomp_exec: cannot install the filter: {e}");
            return ExitCode::from(1);
        }
    }
    let err = Command::new(&program).args(args).exec();
    eprintln!(
        "seccomp_exec: cannot run {}: {err}",
        program.to_string_lossy()
    );
    ExitCode::from(1)
}

fn usage() -> ExitCode {
    eprintln!("usage: seccomp_exec [--rules FILE] PROGRAM [ARGS...]");
    ExitCode::from(2)
}

fn io_uring_refused(arch: TargetArch) -> Result<BpfProgram, String> {
    SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| e.to_string())
}

fn number<T: std::str::FromStr>(s: &str, line: usize) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("line {line}: {s:?} is not a number"))
}

fn condition(words: &[&str], line: usize) -> Result<(SeccompCondition, usize), String> {
    let [arg, op, value, rest @ ..] = words else {
        return Err(format!("line {line}: a condition is ARG OP VALUE"));
    };
    let arg: u8 = number(arg, line)?;
    let value: u64 = number(value, line)?;
    let (op, value, used) = match *op {
        "eq" => (SeccompCmpOp::Eq, value, 3),
        "ne" => (SeccompCmpOp::Ne, value, 3),
        "lt" => (SeccompCmpOp::Lt, value, 3),
        "le" => (SeccompCmpOp::Le, value, 3),
        "gt" => (SeccompCmpOp::Gt, value, 3),
        "ge" => (SeccompCmpOp::Ge, value, 3),
        "masked_eq" => {
            let Some(two) = rest.first() else {
                return Err(format!("line {line}: masked_eq needs VALUE2"));
            };
            (SeccompCmpOp::MaskedEq(value), number(two, line)?, 4)
        }
        other => return Err(format!("line {line}: unknown operator {other:?}")),
    };
    let c = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("line {line}: {e}"))?;
    Ok((c, used))
}

fn from_rules(text: &str, arch: TargetArch) -> Result<Vec<BpfProgram>, String> {
    let mut default_errno = libc::EPERM as u32;
    // `None`: allowed whatever the arguments.
    let mut allow: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    // One filter per errno value: a filter has a single action for what it matches.
    let mut errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let words: Vec<&str> = raw.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["default-errno", e] => default_errno = number(e, line)?,
            ["errno", nr, e] => {
                errno
                    .entry(number(e, line)?)
                    .or_default()
                    .insert(number(nr, line)?, vec![]);
            }
            ["allow", nr, rest @ ..] => {
                let nr: i64 = number(nr, line)?;
                let mut conditions = Vec::new();
                let mut rest = rest;
                while !rest.is_empty() {
                    let (c, used) = condition(rest, line)?;
                    conditions.push(c);
                    rest = &rest[used..];
                }
                let entry = allow.entry(nr).or_insert_with(|| Some(Vec::new()));
                match (entry, conditions.is_empty()) {
                    (None, _) => {}
                    (entry, true) => *entry = None,
                    (Some(rules), false) => rules.push(
                        SeccompRule::new(conditions).map_err(|e| format!("line {line}: {e}"))?,
                    ),
                }
            }
            _ => return Err(format!("line {line}: cannot read {raw:?}")),
        }
    }
    // To seccompiler an empty rule list means "whatever the arguments".
    let allow = allow
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let mut programs = vec![SeccompFilter::new(
        allow,
        SeccompAction::Errno(default_errno),
        SeccompAction::Allow,
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| e.to_string())?];
    for (e, rules) in errno {
        programs.push(
            SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(e), arch)
                .and_then(BpfProgram::try_from)
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(programs)
}
