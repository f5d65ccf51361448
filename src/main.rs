//! The `smtpgw` command: parses the configuration, sets up logging and runs the gateway
//! or a `spool` subcommand. A configuration error is one `error: ...` line on stderr
//! naming the flag, environment variable or file key to fix; a command-line syntax error
//! is clap's full message. Exit status 2 for usage errors, 1 for everything else.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use smtpgw::config::{AuthCommand, Command, LogFormat, SpoolCommand};
use smtpgw::logging;

const USAGE: u8 = 2;
const FAILURE: u8 = 1;

fn main() -> ExitCode {
    let code = run();
    // Lines still with the log writer go out before the process ends.
    logging::flush();
    code
}

fn run() -> ExitCode {
    let cli = match smtpgw::config::parse_cli() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Some(Command::Spool(cmd)) => {
            let marks = matches!(
                cmd,
                SpoolCommand::Hold { .. }
                    | SpoolCommand::Release { .. }
                    | SpoolCommand::Delete { .. }
            );
            match spool(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                // A hold, release or delete of an id the spool does not hold is a
                // usage error: nothing was written.
                Err(e) if marks && unknown_id(&e) => fail(USAGE, format_args!("{e:#}")),
                Err(e) => fail(FAILURE, format_args!("{e:#}")),
            }
        }
        Some(Command::Auth(AuthCommand::Hash)) => match auth_hash() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(FAILURE, format_args!("{e:#}")),
        },
        Some(Command::CheckConfig(args)) => match check_config(*args) {
            Ok(()) => ExitCode::SUCCESS,
            // `{e}`: each error names its cause already, as at start.
            Err(e) => fail(USAGE, format_args!("{e}")),
        },
        Some(Command::PrintConfig(args)) => match args.print_config() {
            Ok(text) => {
                let mut out = std::io::stdout().lock();
                match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(FAILURE, format_args!("writing to stdout: {e}")),
                }
            }
            Err(e) => fail(USAGE, format_args!("{e}")),
        },
        None => {
            let args = cli.server.clone();
            let config = match cli.server.resolve() {
                Ok(c) => c,
                Err(e) => return fail(USAGE, format_args!("{e}")),
            };
            let log = match logging::init(
                config.log.log_format,
                &config.log_level,
                config.log.log_recipients,
            ) {
                Ok(handle) => handle,
                Err(msg) => return fail(USAGE, format_args!("{msg}")),
            };
            let reloader = smtpgw::reload::Reloader::new(args, Some(log));
            match smtpgw::server::run(config, reloader) {
                Ok(()) => ExitCode::SUCCESS,
                // A certificate or key that does not load is a configuration error.
                Err(
                    e
                    @ (smtpgw::server::ServerError::Tls(_) | smtpgw::server::ServerError::Auth(_)),
                ) => fail(USAGE, format_args!("{e}")),
                Err(e) => fail(FAILURE, format_args!("{e}")),
            }
        }
    }
}

/// `smtpgw check-config`: everything a start checks before it binds or opens anything.
fn check_config(args: smtpgw::config::ServerArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    logging::parse_filter(&config.log_level).map_err(anyhow::Error::msg)?;
    smtpgw::server::check(&config)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "configuration ok").context("writing to stdout")?;
    Ok(())
}

fn unknown_id(e: &anyhow::Error) -> bool {
    use smtpgw::spool_tool::SpoolError;
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<SpoolError>(),
            Some(SpoolError::NotFound { .. } | SpoolError::BadId { .. })
        )
    })
}

/// `smtpgw auth hash`: one password in, its PHC hash out.
fn auth_hash() -> anyhow::Result<()> {
    use std::io::Read;
    use zeroize::Zeroizing;
    let stdin = std::io::stdin();
    let mut line = Zeroizing::new(String::new());
    if stdin.is_terminal() {
        // rpassword turns the terminal's echo off and back on (also on an error).
        line = Zeroizing::new(
            rpassword::prompt_password("Password: ").context("reading the password")?,
        );
    } else {
        // Only the first line: `printf '%s\n' "$pw" | smtpgw auth hash` and a file alike.
        let mut all = Zeroizing::new(Vec::new());
        stdin
            .lock()
            .take(64 * 1024)
            .read_to_end(&mut all)
            .context("reading the password from standard input")?;
        let text = std::str::from_utf8(&all).context("the password is not UTF-8")?;
        line.push_str(text.split('\n').next().unwrap_or_default());
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!("no password given (standard input was empty)");
    }
    if password.len() > smtpgw::auth::MAX_PASSWORD {
        anyhow::bail!(
            "the password is longer than {} bytes, which AUTH refuses",
            smtpgw::auth::MAX_PASSWORD
        );
    }
    let hash = smtpgw::auth::hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{hash}").context("writing to stdout")?;
    Ok(())
}

fn fail(code: u8, msg: std::fmt::Arguments) -> ExitCode {
    // Never eprintln!: it panics when stderr is gone, turning any exit into 101. Lines
    // queued before go first, so the error is the last line.
    logging::flush();
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
    let _ = logging::init(LogFormat::Text, &directives, Default::default());
}

/// Turns what a tool skipped into its exit status: an error unless `--skip-corrupt`.
fn skipped(
    damage: &smtpgw::spool_tool::Damage,
    skip_corrupt: bool,
    what: &str,
) -> anyhow::Result<()> {
    let n = damage.ranges.len();
    if n > 0 && !skip_corrupt {
        anyhow::bail!(
            "{what}: skipped {n} corrupt range(s), {} bytes (listed above); \
             give --skip-corrupt to accept that",
            damage.corrupt_bytes()
        );
    }
    Ok(())
}

/// `spool hold | release | delete ID`.
fn mark(
    dir: &smtpgw::config::SpoolDirArg,
    id: &str,
    action: smtpgw::spool_tool::Action,
) -> anyhow::Result<()> {
    use smtpgw::spool_tool::Action;
    use smtpgw::spool_tool::{self, Marked};
    let (dir, _) = dir.resolve()?;
    let marked = spool_tool::mark(&dir, id, action)
        .with_context(|| format!("--spool-dir {}", dir.display()))?;
    let what = match (action, marked) {
        (Action::Hold, Marked::Done) => "held",
        (Action::Hold, Marked::Already) => "already held",
        (Action::Release, _) => "released",
        (_, Marked::Done) => "deleted",
        (_, Marked::Already) => "already deleted",
    };
    logging::eprint_line(format_args!("{id}: {what}"));
    Ok(())
}

fn spool(cmd: SpoolCommand) -> anyhow::Result<()> {
    use smtpgw::spool_tool;
    use smtpgw::spool_tool::Action;

    let stdout = std::io::stdout();
    let escaped = stdout.is_terminal();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = std::io::stderr();
    match cmd {
        SpoolCommand::Ls {
            dir,
            corrupt,
            long,
            pending,
        } => {
            let (dir, _) = dir.resolve()?;
            let options = spool_tool::LsOptions { long, pending };
            let damage = spool_tool::ls_with(&dir, options, &mut out, &mut err)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
            out.flush().context("writing to stdout")?;
            skipped(&damage, corrupt.skip_corrupt, "spool ls")?;
        }
        SpoolCommand::Hold { dir, id } => mark(&dir, &id, Action::Hold)?,
        SpoolCommand::Release { dir, id } => mark(&dir, &id, Action::Release)?,
        SpoolCommand::Delete { dir, id } => mark(&dir, &id, Action::Delete)?,
        SpoolCommand::Stat { dir, corrupt } => {
            let (dir, _) = dir.resolve()?;
            let damage = spool_tool::stat(&dir, chrono::Utc::now(), &mut out, &mut err)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
            out.flush().context("writing to stdout")?;
            skipped(&damage, corrupt.skip_corrupt, "spool stat")?;
        }
        SpoolCommand::Cat {
            dir,
            corrupt,
            body,
            headers,
            id,
        } => {
            let (dir, _) = dir.resolve()?;
            let part = if headers {
                spool_tool::Part::Headers
            } else if body {
                spool_tool::Part::Body
            } else {
                spool_tool::Part::Value
            };
            let damage =
                spool_tool::cat_part_reporting(&dir, &id, part, escaped, &mut out, &mut err)
                    .with_context(|| format!("--spool-dir {}", dir.display()))?;
            out.flush().context("writing to stdout")?;
            skipped(&damage, corrupt.skip_corrupt, "spool cat")?;
        }
        SpoolCommand::Export {
            dir,
            corrupt,
            mbox,
            format,
            out: target,
            force,
            since,
            after_cursor,
        } => {
            let (dir, _) = dir.resolve()?;
            let (format, target) = match (mbox, target) {
                (Some(mbox), _) => (spool_tool::ExportFormat::Mbox, mbox),
                (None, Some(target)) => (format.unwrap_or(spool_tool::ExportFormat::Mbox), target),
                (None, None) => anyhow::bail!("spool export: give OUT (or --mbox FILE)"),
            };
            let options = spool_tool::ExportOptions {
                force,
                skip_corrupt: corrupt.skip_corrupt,
                since: since.as_deref(),
                after_cursor: after_cursor.as_deref(),
            };
            let (report, damage) = spool_tool::export(&dir, format, &target, &options, &mut err)
                .with_context(|| {
                    format!(
                        "--spool-dir {} export to {}",
                        dir.display(),
                        target.display()
                    )
                })?;
            let skipped_ranges = damage.ranges.len();
            drop(damage);
            logging::eprint_line(format_args!(
                "exported {} messages to {}{}{}{}",
                report.count,
                target.display(),
                if report.skipped > 0 {
                    format!("; left out {} held or deleted", report.skipped)
                } else {
                    String::new()
                },
                match report.cursor {
                    Some(at) => format!("; cursor at {at}"),
                    None => String::new(),
                },
                if skipped_ranges > 0 {
                    format!("; skipped {skipped_ranges} corrupt range(s)")
                } else {
                    String::new()
                }
            ));
        }
        SpoolCommand::Check { dir } => {
            let (dir, _) = dir.resolve()?;
            let summary = spool_tool::check(&dir, &mut out, &mut err)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
            out.flush().context("writing to stdout")?;
            if summary.corrupt_ranges > 0 {
                anyhow::bail!(
                    "spool check: {} corrupt range(s), {} bytes (listed above)",
                    summary.corrupt_ranges,
                    summary.corrupt_bytes
                );
            }
        }
        SpoolCommand::Prune {
            dir,
            before,
            before_cursor,
            dry_run,
        } => {
            let (dir, _) = dir.resolve()?;
            let cutoff = match (before, before_cursor) {
                (Some(before), _) => spool_tool::Cutoff::parse(&before)?,
                (None, Some(path)) => match spool_tool::load_cursor(&path)? {
                    Some(position) => spool_tool::Cutoff::Position(position),
                    None => anyhow::bail!(
                        "--before-cursor {}: no such cursor (nothing handed on yet)",
                        path.display()
                    ),
                },
                (None, None) => anyhow::bail!("spool prune: give --before or --before-cursor"),
            };
            let report = spool_tool::prune(&dir, cutoff, dry_run, &mut out, &mut err)
                .with_context(|| format!("--spool-dir {}", dir.display()))?;
            out.flush().context("writing to stdout")?;
            logging::eprint_line(format_args!(
                "{} {} segments ({} records, {} bytes); kept {}{}",
                if dry_run { "would delete" } else { "deleted" },
                report.deleted_segments,
                report.deleted_records,
                report.deleted_bytes,
                report.kept_segments,
                if report.kept_corrupt > 0 {
                    format!(", {} of them for corrupt data", report.kept_corrupt)
                } else {
                    String::new()
                }
            ));
            if report.kept_held > 0 {
                logging::eprint_line(format_args!(
                    "kept {} segment(s) holding held messages (or released ones not yet forwarded)",
                    report.kept_held
                ));
            }
            if report.kept_unforwarded > 0 {
                logging::eprint_line(format_args!(
                    "kept {} segment(s) the Kafka forwarder has not published yet",
                    report.kept_unforwarded
                ));
            }
            if report.kept_corrupt > 0 {
                anyhow::bail!(
                    "spool prune: kept {} segment(s) holding corrupt data (listed above); \
                     `smtpgw spool check` shows it",
                    report.kept_corrupt
                );
            }
        }
        SpoolCommand::Replay {
            dir,
            corrupt,
            kafka,
            after_cursor,
            ..
        } => {
            // librdkafka's warnings (unreachable broker, auth) are what an operator
            // needs to see here; a second subscriber cannot exist yet, so ignore that.
            init_tool_logging();
            let (spool_dir, file) = dir.resolve()?;
            let kafka = dir.kafka(kafka, file.as_ref())?;
            let dir = spool_dir;
            if kafka.kafka_brokers.is_none() {
                anyhow::bail!("--kafka-brokers: required with spool replay --to-kafka");
            }
            let in_dir = || format!("--spool-dir {}", dir.display());
            // One pass first: the largest record sizes the producer (librdkafka's
            // default message.max.bytes of 1 MB would refuse a larger one), and without
            // --skip-corrupt a damaged spool publishes nothing.
            let summary = if corrupt.skip_corrupt {
                // Damage is listed once, as the replay reads past it.
                spool_tool::check(&dir, &mut std::io::sink(), &mut std::io::sink())
            } else {
                spool_tool::check(&dir, &mut std::io::sink(), &mut err)
            }
            .with_context(in_dir)?;
            if !corrupt.skip_corrupt {
                // All or nothing: a replay that stops half way would look like success
                // to a consumer that does not read its exit status.
                if summary.corrupt_ranges > 0 {
                    anyhow::bail!(
                        "spool replay: {} corrupt range(s) (listed above); nothing published; \
                         give --skip-corrupt to publish the rest",
                        summary.corrupt_ranges
                    );
                }
            }
            use smtpgw::spool_tool::{replay_records, ReplayError};
            use smtpgw::spool_tool::{ReadEvent, SpoolReader};
            let start = match &after_cursor {
                Some(path) => spool_tool::load_cursor(path)?,
                None => None,
            };
            let open = || {
                let reader = match start {
                    Some(position) => SpoolReader::open_from(&dir, position),
                    None => SpoolReader::open(&dir),
                };
                // With a cursor, never past records a failed batch may still undo.
                match &after_cursor {
                    Some(_) => reader.map(SpoolReader::acknowledged_only),
                    None => reader,
                }
            };
            // Opened before the broker is contacted: a wrong directory fails at once.
            let mut reader = open().with_context(in_dir)?;
            let mut read_error = None;
            let mut corrupt_ranges = 0usize;
            // Every record handed to Kafka, in spool order, for the cursor.
            let mut handled = Vec::new();
            // Held and deleted messages are not published (but the cursor passes them).
            let tombstones = smtpgw::spool_tool::read_tombstones(&dir).with_context(in_dir)?;
            let mut held_back = 0usize;
            let records = std::iter::from_fn(|| loop {
                match reader.next_event()? {
                    Ok(ReadEvent::Record(record)) => {
                        handled.push((record.id, record.next_position()));
                        if tombstones.skips(&record.id) {
                            held_back += 1;
                            continue;
                        }
                        return Some(record);
                    }
                    Ok(ReadEvent::Corrupt(range)) => {
                        corrupt_ranges += 1;
                        logging::eprint_line(format_args!("corrupt: {range}"));
                    }
                    Ok(ReadEvent::TornTail(_) | ReadEvent::SegmentEnd { .. }) => {}
                    Err(e) => {
                        read_error = Some(e);
                        return None;
                    }
                }
            });
            // The record overhead counts room for every recipient's headers: at least
            // the server's default limit, more if a record has more.
            let max_recipients = smtpgw::config::SessionSettings::default()
                .max_recipients
                .max(summary.most_recipients);
            let mut options = smtpgw::spool_tool::KafkaOptions::new(
                kafka.clone(),
                usize::try_from(max_recipients).unwrap_or(usize::MAX),
            );
            options.max_value = Some(usize::try_from(summary.largest_value).unwrap_or(usize::MAX));
            let report = match replay_records(records, &options) {
                Ok(report) => report,
                // Only spool errors are about the directory; the others name their flag.
                Err(ReplayError::Spool(e)) => return Err(e).with_context(in_dir),
                Err(ReplayError::Unreachable { brokers, waited }) => {
                    // Name what is left unpublished, as a partial replay does.
                    let mut unpublished = 0usize;
                    let mut reader = open().with_context(in_dir)?;
                    while let Some(event) = reader.next_event() {
                        if let ReadEvent::Record(record) = event.with_context(in_dir)? {
                            eprintln!("{}: not published: no broker", record.id);
                            unpublished += 1;
                        }
                    }
                    anyhow::bail!(
                        "--kafka-brokers {brokers}: no broker answered within {waited:?}; \
                         {unpublished} messages not published"
                    )
                }
                Err(e) => return Err(e.into()),
            };
            for (id, why) in &report.failed {
                logging::eprint_line(format_args!("{id}: not published: {why}"));
            }
            if let Some(path) = &after_cursor {
                // Past the longest prefix Kafka acknowledged: a rerun starts at the
                // first message not published, and repeats nothing before it.
                let failed: std::collections::HashSet<_> =
                    report.failed.iter().map(|(id, _)| *id).collect();
                let done = handled
                    .iter()
                    .take_while(|(id, _)| !failed.contains(id))
                    .last();
                if let Some((id, position)) = done {
                    spool_tool::save_cursor(path, *position, *id)?;
                    logging::eprint_line(format_args!(
                        "cursor {} at {position} (after {id})",
                        path.display()
                    ));
                }
            }
            if held_back > 0 {
                logging::eprint_line(format_args!(
                    "left out {held_back} held or deleted message(s)"
                ));
            }
            logging::eprint_line(format_args!(
                "published {} messages to {}; {} failed{}",
                report.published,
                kafka.kafka_topic.0,
                report.failed.len(),
                if corrupt_ranges > 0 {
                    format!("; skipped {corrupt_ranges} corrupt range(s)")
                } else {
                    String::new()
                }
            ));
            if let Some(e) = read_error {
                return Err(e).with_context(|| {
                    format!("{}: reading stopped; the rest is not published", in_dir())
                });
            }
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
