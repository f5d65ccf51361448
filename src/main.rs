//! The `smtpgw` command: parses the configuration, sets up logging and runs the gateway
//! or a `spool` subcommand. Every failure ends as one `error: ...` line on stderr, with
//! exit status 2 for usage errors and 1 for everything else.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use smtpgw::config::{Cli, Command, LogFormat, SpoolCommand};

const USAGE: u8 = 2;
const FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Some(Command::Spool(cmd)) => match spool(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(FAILURE, format_args!("{e:#}")),
        },
        None => {
            let config = match cli.server.resolve() {
                Ok(c) => c,
                Err(e) => return fail(USAGE, format_args!("{e}")),
            };
            if let Err(msg) = init_logging(config.log_format) {
                return fail(USAGE, format_args!("{msg}"));
            }
            match smtpgw::server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(FAILURE, format_args!("{e}")),
            }
        }
    }
}

fn fail(code: u8, msg: std::fmt::Arguments) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

/// Help and version are output, not errors. For real parse errors clap's first line
/// already names the flag; the usage block and hints after it would break the
/// one-line promise.
fn clap_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(USAGE)
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{first}");
            ExitCode::from(USAGE)
        }
    }
}

fn init_logging(format: LogFormat) -> Result<(), String> {
    let (var, directives) = match std::env::var("SMTPGW_LOG") {
        Ok(v) => ("SMTPGW_LOG", v),
        Err(_) => match std::env::var("RUST_LOG") {
            Ok(v) => ("RUST_LOG", v),
            Err(_) => ("", "info".to_owned()),
        },
    };
    let filter =
        EnvFilter::try_new(&directives).map_err(|e| format!("{var}: invalid log filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| format!("cannot set up logging: {e}"))
}

fn spool(cmd: SpoolCommand) -> anyhow::Result<()> {
    use smtpgw::spool_tool;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match cmd {
        SpoolCommand::Ls { dir } => {
            let dir = dir.spool_dir;
            spool_tool::ls(&dir, &mut out)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
        }
        SpoolCommand::Cat {
            dir,
            body,
            headers,
            id,
        } => {
            let dir = dir.spool_dir;
            let part = if headers {
                spool_tool::Part::Headers
            } else if body {
                spool_tool::Part::Body
            } else {
                spool_tool::Part::Value
            };
            spool_tool::cat_part(&dir, &id, part, &mut out)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
        }
        SpoolCommand::Export { dir, mbox } => {
            let dir = dir.spool_dir;
            let n = spool_tool::export_mbox(&dir, &mbox).with_context(|| {
                format!("--spool-dir {} --mbox {}", dir.display(), mbox.display())
            })?;
            eprintln!("exported {n} messages to {}", mbox.display());
        }
        SpoolCommand::Replay { dir, kafka, .. } => {
            // librdkafka's warnings (unreachable broker, auth) are what an operator
            // needs to see here; a second subscriber cannot exist yet, so ignore that.
            let _ = init_logging(LogFormat::Text);
            let dir = dir.spool_dir;
            let kafka = smtpgw::config::resolve_kafka(kafka, Default::default())?;
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
                eprintln!("{id}: not published: {why}");
            }
            eprintln!(
                "published {} messages to {}; {} failed",
                report.published,
                kafka.topic,
                report.failed.len()
            );
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
