//! The `smtpgw` command: parses the configuration, sets up logging and runs the gateway
//! or a `spool` subcommand. A configuration error is one `error: ...` line on stderr
//! naming the flag, environment variable or file key to fix; a command-line syntax error
//! is clap's full message. Exit status 2 for usage errors, 1 for everything else.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use smtpgw::config::{Command, LogFormat, SpoolCommand};
use smtpgw::logging;

const USAGE: u8 = 2;
const FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match smtpgw::config::parse_cli() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Some(Command::Spool(cmd)) => match spool(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(FAILURE, format_args!("{e:#}")),
        },
        None => {
            let args = cli.server.clone();
            let config = match cli.server.resolve() {
                Ok(c) => c,
                Err(e) => return fail(USAGE, format_args!("{e}")),
            };
            let log = match logging::init(config.log_format, &config.log_level) {
                Ok(handle) => handle,
                Err(msg) => return fail(USAGE, format_args!("{msg}")),
            };
            let reloader = smtpgw::reload::Reloader::new(args, Some(log));
            match smtpgw::server::run(config, reloader) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(FAILURE, format_args!("{e}")),
            }
        }
    }
}

fn fail(code: u8, msg: std::fmt::Arguments) -> ExitCode {
    // Never eprintln!: it panics when stderr is gone, turning any exit into 101.
    logging::eprint_line(format_args!("error: {msg}"));
    ExitCode::from(code)
}

/// Help and version are output, not errors. A parse error is clap's whole message: its
/// first line names the flag, the rest lists the valid values, the arguments still
/// missing and the usage, which is what the user needs to fix it.
fn clap_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(USAGE),
    }
}

/// Logging for the spool tools: text, filtered by SMTPGW_LOG or RUST_LOG (else info).
fn init_tool_logging() {
    let directives = ["SMTPGW_LOG", "RUST_LOG"]
        .iter()
        .find_map(|var| std::env::var(var).ok())
        .unwrap_or_else(|| logging::DEFAULT_FILTER.to_owned());
    // A bad filter or a second subscriber only costs the tool its warnings.
    let _ = logging::init(LogFormat::Text, &directives);
}

fn spool(cmd: SpoolCommand) -> anyhow::Result<()> {
    use smtpgw::spool_tool;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match cmd {
        SpoolCommand::Ls { dir } => {
            let (dir, _) = dir.resolve()?;
            spool_tool::ls(&dir, &mut out)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
        }
        SpoolCommand::Cat { dir, body, id } => {
            let (dir, _) = dir.resolve()?;
            if std::io::stdout().is_terminal() {
                // Read by a person: client bytes must not drive the terminal. A pipe
                // or file gets the message exactly as stored.
                let mut raw = Vec::new();
                spool_tool::cat(&dir, &id, body, &mut raw)
                    .with_context(|| format!("--spool-dir {}", dir.display()))?;
                out.write_all(&spool_tool::escape_for_terminal(&raw))
                    .context("writing to stdout")?;
            } else {
                spool_tool::cat(&dir, &id, body, &mut out)
                    .with_context(|| format!("--spool-dir {}", dir.display()))?;
            }
        }
        SpoolCommand::Export { dir, mbox } => {
            let (dir, _) = dir.resolve()?;
            let n = spool_tool::export_mbox(&dir, &mbox).with_context(|| {
                format!("--spool-dir {} --mbox {}", dir.display(), mbox.display())
            })?;
            logging::eprint_line(format_args!("exported {n} messages to {}", mbox.display()));
        }
        SpoolCommand::Replay { dir, kafka, .. } => {
            // librdkafka's warnings (unreachable broker, auth) are what an operator
            // needs to see here; a second subscriber cannot exist yet, so ignore that.
            init_tool_logging();
            let (sources, config) = (dir.sources.clone(), dir.config.clone());
            let (dir, mut file) = dir.resolve()?;
            let keys = file.keys.clone();
            let kafka = smtpgw::config::resolve_kafka(kafka, (&mut file).into())
                .map_err(|e| sources.name(e, config.as_deref(), &keys))?;
            if kafka.brokers.is_none() {
                anyhow::bail!("--kafka-brokers: required with spool replay --to-kafka");
            }
            use smtpgw::sink::kafka::{replay_spool, ReplayError};
            let report =
                match replay_spool(&dir, &kafka.options(smtpgw::config::DEFAULT_MAX_RECIPIENTS)) {
                    Ok(report) => report,
                    // Only spool errors are about the directory; the others name their flag.
                    Err(ReplayError::Spool(e)) => {
                        return Err(e).with_context(|| format!("--spool-dir {}", dir.display()))
                    }
                    Err(ReplayError::Unreachable { brokers, waited }) => anyhow::bail!(
                        "--kafka-brokers {brokers}: no broker answered within {waited:?}"
                    ),
                    Err(e) => return Err(e.into()),
                };
            for (id, why) in &report.failed {
                logging::eprint_line(format_args!("{id}: not published: {why}"));
            }
            logging::eprint_line(format_args!(
                "published {} messages to {}; {} failed",
                report.published,
                kafka.topic,
                report.failed.len()
            ));
            if !report.failed.is_empty() {
                anyhow::bail!(
                    "{} messages not published; replaying again is safe (same keys)",
                    report.failed.len()
                );
            }
        }
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}
