//! The command line: subcommands, the server's flags grouped, environment variables
//! named after the flags, and errors that name the variable a bad value came from.

use super::*;

/// smtpgw: an SMTP ingestion gateway that says 250 only once a message is stored durably.
#[derive(Debug, Parser)]
#[command(name = "smtpgw", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub server: ServerArgs,
}

// Parsed once per process and matched by value all over the tests: boxing the spool
// commands would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read the local spool: list, print, export, replay to Kafka.
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// Check the configuration (flags, SMTPGW_* variables, --config file) exactly as a
    /// start would, the TLS certificate and key and the librdkafka setting names
    /// included, without starting: exit 0, or 2 with the error a start would give.
    CheckConfig(Box<ServerArgs>),
    /// Print the effective configuration, one `key = value` a line in the file's
    /// syntax, each with where it came from (default, file, environment or flag).
    PrintConfig(Box<ServerArgs>),
    /// SMTP AUTH users (`--auth-users`).
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print the argon2 hash of a password for the users file: the password is read from
    /// standard input (its first line), or prompted for without echo on a terminal;
    /// never from the command line. Add the output as `name:HASH` to the file.
    Hash,
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// List the stored messages, oldest first: id, time of receipt, size, sender and
    /// recipient count, one line each.
    Ls {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// Also the state (pending, forwarded, held, deleted; stored without a
        /// forwarder), the client address and every recipient.
        #[arg(long)]
        long: bool,
        /// Only the messages the Kafka forwarder (`--spool-fallback`) has not
        /// forwarded yet.
        #[arg(long)]
        pending: bool,
    },
    /// Keep a message from forwarding, replay and export until `release` (appends a
    /// tombstone; safe while the gateway runs). Exit 2 if the id is not in the spool.
    Hold {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// The message id.
        id: String,
    },
    /// Undo `hold`: the message is forwarded (if the spool has a forwarder) and
    /// replayed and exported again.
    Release {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// The message id.
        id: String,
    },
    /// Never forward, replay or export a message again (final; its bytes stay in its
    /// segment until `prune` deletes the segment).
    Delete {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// The message id.
        id: String,
    },
    /// Counts and bytes by state and by age, the oldest pending message and the
    /// forwarder's lag.
    Stat {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
    },
    /// Print one stored message (on a terminal, control characters are escaped).
    Cat {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// Print only the message as the client sent it, without envelope or Received: line.
        #[arg(long)]
        body: bool,
        /// Print only the record headers (smtp.client_addr, smtp.tls, ...), one
        /// `name: value` line each.
        #[arg(long, conflicts_with = "body")]
        headers: bool,
        /// The message id (as in `250 ... queued as <id>`).
        id: String,
    },
    /// Write every stored message to an mbox file (mboxrd quoting, the envelope in
    /// added headers), or with `--format eml` to a directory: ID.eml and ID.json (the
    /// whole envelope) per message.
    Export {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// The mbox file to write (same as `--format mbox FILE`); it appears complete
        /// or not at all.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["format", "out"])]
        mbox: Option<PathBuf>,
        /// What to write: `mbox` (OUT is a file) or `eml` (OUT is a directory).
        #[arg(long, value_enum, requires = "out")]
        format: Option<ExportFormat>,
        /// The mbox file, or the eml directory (created if missing).
        #[arg(value_name = "OUT", required_unless_present = "mbox")]
        out: Option<PathBuf>,
        /// Only the messages stored after this one (the last id an earlier export
        /// wrote): incremental exports. An id not in the spool is an error.
        #[arg(long, value_name = "ID", conflicts_with = "after_cursor")]
        since: Option<String>,
        /// Incremental and restartable: start after the position in FILE (from the
        /// oldest message if FILE does not exist), and once the output is durable,
        /// move FILE (atomically) past what was exported.
        #[arg(long = "after-cursor", value_name = "FILE")]
        after_cursor: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Publish every stored message to Kafka, keyed by its id as the gateway would
    /// have, so consumers can drop what they already have.
    Replay {
        #[command(flatten)]
        dir: SpoolDirArg,
        #[command(flatten)]
        corrupt: SkipCorruptArg,
        /// Required: the only replay target.
        #[arg(long = "to-kafka", required = true)]
        to_kafka: bool,
        /// Incremental and restartable: start after the position in FILE (from the
        /// oldest message if FILE does not exist), and once Kafka acknowledged them,
        /// move FILE (atomically) past the messages published.
        #[arg(long = "after-cursor", value_name = "FILE")]
        after_cursor: Option<PathBuf>,
        #[command(flatten)]
        kafka: KafkaSettings,
    },
    /// Verify every record; print a summary; exit 1 if anything is corrupt.
    Check {
        #[command(flatten)]
        dir: SpoolDirArg,
    },
    /// Delete whole closed segments whose records are all older than a cut-off.
    Prune {
        #[command(flatten)]
        dir: SpoolDirArg,
        /// A message id (ULID) or an RFC 3339 time: segments whose every record was
        /// received (ULID: has an id) before it are deleted.
        #[arg(
            long,
            value_name = "ULID|RFC3339",
            required_unless_present = "before_cursor"
        )]
        before: Option<String>,
        /// Segments whose every record lies before the position in this export or
        /// replay cursor (`--after-cursor FILE`) are deleted: exactly what the
        /// incremental runs have handed on.
        #[arg(long = "before-cursor", value_name = "FILE", conflicts_with = "before")]
        before_cursor: Option<PathBuf>,
        /// Say what would be deleted, delete nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct SkipCorruptArg {
    /// Carry on past corrupt data (still reported on stderr) and exit 0.
    #[arg(long = "skip-corrupt")]
    pub skip_corrupt: bool,
}

// Where a spool subcommand finds the spool: --spool-dir, else the --config file's
// `spool-dir`, else the default, so a tool run next to a gateway reads the same spool
// as the gateway with the same file.
#[derive(Clone, Debug, Default, Args)]
pub struct SpoolDirArg {
    #[command(flatten)]
    pub file: ConfigFileArg,
    #[command(flatten)]
    pub store: SpoolDirSettings,
    #[arg(skip)]
    pub sources: Sources,
}

impl SpoolDirArg {
    /// The spool directory, and the config file if one is named.
    pub fn resolve(&self) -> Result<(PathBuf, Option<ConfigFile>), ConfigError> {
        let file = self.file.load()?;
        let store = layer(self.store.clone(), file.as_ref(), &self.sources)?;
        if store.spool_dir.as_os_str().is_empty() {
            let e = invalid("--spool-dir", "must not be empty");
            return Err(self.sources.name(e, file.as_ref()));
        }
        Ok((store.spool_dir, file))
    }

    /// `spool replay`'s Kafka settings over the file's, validated.
    pub fn kafka(
        &self,
        kafka: KafkaSettings,
        file: Option<&ConfigFile>,
    ) -> Result<KafkaSettings, ConfigError> {
        let kafka = layer(kafka, file, &self.sources)?;
        kafka.validate().map_err(|e| self.sources.name(e, file))?;
        Ok(kafka)
    }
}

/// The server's settings as given by flags and environment, before the file.
#[derive(Clone, Debug, Default, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub file: ConfigFileArg,
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub session: SessionSettings,
    #[command(flatten)]
    pub limits: LimitSettings,
    #[command(flatten)]
    pub edge: EdgeSettings,
    #[command(flatten)]
    pub spool: SpoolSettings,
    #[command(flatten)]
    pub store: SpoolDirSettings,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[command(flatten)]
    pub log: LogSettings,
    #[arg(skip)]
    pub sources: Sources,
}

/// Checks one file value against its group's type, so an error names the key; `None`
/// for a key no group has.
pub(super) fn check_file_value(key: &str, value: &toml::Value) -> Option<Result<(), String>> {
    fn check<G: Group>(key: &str, value: &toml::Value) -> Option<Result<(), String>> {
        if !G::keys().iter().any(|k| k == key) {
            return None;
        }
        let one = toml::Table::from_iter([(key.to_owned(), value.clone())]);
        Some(
            toml::Value::Table(one)
                .try_into::<G>()
                .map(drop)
                .map_err(|e| e.message().trim().replace('\n', " ")),
        )
    }
    check::<ServerSettings>(key, value)
        .or_else(|| check::<SessionSettings>(key, value))
        .or_else(|| check::<LimitSettings>(key, value))
        .or_else(|| check::<EdgeSettings>(key, value))
        .or_else(|| check::<SpoolDirSettings>(key, value))
        .or_else(|| check::<SpoolSettings>(key, value))
        .or_else(|| check::<KafkaSettings>(key, value))
        .or_else(|| check::<LogSettings>(key, value))
}

/// The env variable of a setting: `SMTPGW_` and its long flag name in upper case.
pub(super) fn env_var(long: &str) -> String {
    match long {
        "log-level" => "SMTPGW_LOG".to_owned(),
        _ => format!("SMTPGW_{}", long.to_ascii_uppercase().replace('-', "_")),
    }
}

/// Gives every setting (and `--config`) its `SMTPGW_*` variable, in every subcommand.
pub(super) fn with_env(cmd: clap::Command, settings: &[String]) -> clap::Command {
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut cmd = cmd.mut_args(|a| match a.get_long() {
        Some(long) if long == "config" || settings.iter().any(|s| s == long) => {
            let var = env_var(long);
            a.env(var)
        }
        _ => a,
    });
    for name in subs {
        cmd = cmd.mut_subcommand(name, |s| with_env(s, settings));
    }
    cmd
}

/// The whole command line as the binary parses it.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let settings = ServerArgs::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect::<Vec<_>>();
    with_env(Cli::command(), &settings)
}

/// Which settings were given as a flag or an environment variable (and which
/// variable), so the file does not override them and an error names what the user has
/// to fix: the flag, `SMTPGW_REACTORS`, or the file and its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `(long flag name, Some(variable) when from the environment)`.
    pub(super) explicit: Vec<(String, Option<String>)>,
}

impl Sources {
    /// Records the sources of every argument of `cmd` found in `matches`.
    pub fn of(cmd: &clap::Command, matches: &clap::ArgMatches) -> Sources {
        use clap::parser::ValueSource;
        let mut explicit = Vec::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            match matches.value_source(arg.get_id().as_str()) {
                Some(ValueSource::EnvVariable) => explicit.push((
                    long.to_owned(),
                    arg.get_env().map(|v| v.to_string_lossy().into_owned()),
                )),
                Some(ValueSource::CommandLine) => explicit.push((long.to_owned(), None)),
                _ => {}
            }
        }
        Sources { explicit }
    }

    /// The setting (a field name) was given as a flag or variable.
    pub(super) fn is_explicit(&self, field: &str) -> bool {
        let long = field.replace('_', "-");
        self.explicit.iter().any(|(f, _)| *f == long)
    }

    /// Renames an error's flag after the source its value came from: the environment
    /// variable, or `--config FILE: \`key\``, or the flag itself.
    pub fn name(&self, e: ConfigError, file: Option<&ConfigFile>) -> ConfigError {
        let ConfigError::Invalid { flag, msg } = e else {
            return e;
        };
        let key = flag.trim_start_matches('-');
        match self.explicit.iter().find(|(f, _)| f == key) {
            Some((_, Some(var))) => ConfigError::Source {
                origin: var.clone(),
                msg,
            },
            Some((_, None)) => ConfigError::Invalid { flag, msg },
            None => match file {
                Some(file) if file.table.contains_key(key) => ConfigError::Source {
                    origin: format!("--config {}: `{key}`", file.path.display()),
                    msg,
                },
                _ => ConfigError::Invalid { flag, msg },
            },
        }
    }
}

/// Parses the process's command line; see [`parse_cli_from`].
pub fn parse_cli() -> Result<Cli, clap::Error> {
    parse_cli_from(std::env::args_os())
}

/// Parses like `Cli::try_parse_from`, gives every setting its `SMTPGW_*` variable, and
/// records where each value came from (see [`Sources`]). A bad value from a variable is
/// named after the variable.
pub fn parse_cli_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = command();
    let matches = cmd
        .clone()
        .try_get_matches_from(&args)
        .map_err(|e| name_the_variable(&cmd, &args, e))?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.server.sources = Sources::of(&cmd, &matches);
    if let (Some(Command::CheckConfig(args) | Command::PrintConfig(args)), Some((name, m))) =
        (cli.command.as_mut(), matches.subcommand())
    {
        if let Some(sub) = cmd.find_subcommand(name) {
            args.sources = Sources::of(sub, m);
        }
    }
    if let (Some(Command::Spool(spool)), Some(("spool", m))) =
        (cli.command.as_mut(), matches.subcommand())
    {
        if let (Some((name, m)), Some(spool_cmd)) = (m.subcommand(), cmd.find_subcommand("spool")) {
            if let Some(sub) = spool_cmd.find_subcommand(name) {
                spool.dir_mut().sources = Sources::of(sub, m);
            }
        }
    }
    Ok(cli)
}

/// clap names the flag when a variable's value does not parse; say the variable.
pub(super) fn name_the_variable(
    cmd: &clap::Command,
    args: &[OsString],
    e: clap::Error,
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return e;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let long = arg.trim_start_matches('-');
    let long = long.split([' ', '=']).next().unwrap_or(long).to_owned();
    let on_command_line = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a.strip_prefix("--")
            .and_then(|a| a.strip_prefix(long.as_str()))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    let var = env_var(&long);
    let from_env = std::env::var_os(&var).is_some() && has_arg(cmd, &long);
    if on_command_line || !from_env {
        return e;
    }
    let reason = match std::error::Error::source(&e) {
        Some(source) => source.to_string(),
        None => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => format!(
                    "invalid value {value:?}; possible values: {}",
                    valid.join(", ")
                ),
                _ => format!("invalid value {value:?}"),
            }
        }
    };
    clap::Error::raw(e.kind(), format!("{var}: {reason}\n"))
}

pub(super) fn has_arg(cmd: &clap::Command, long: &str) -> bool {
    cmd.get_arguments().any(|a| a.get_long() == Some(long))
        || cmd.get_subcommands().any(|s| has_arg(s, long))
}

impl SpoolCommand {
    fn dir_mut(&mut self) -> &mut SpoolDirArg {
        match self {
            SpoolCommand::Ls { dir, .. }
            | SpoolCommand::Hold { dir, .. }
            | SpoolCommand::Release { dir, .. }
            | SpoolCommand::Delete { dir, .. }
            | SpoolCommand::Stat { dir, .. }
            | SpoolCommand::Cat { dir, .. }
            | SpoolCommand::Export { dir, .. }
            | SpoolCommand::Replay { dir, .. }
            | SpoolCommand::Check { dir }
            | SpoolCommand::Prune { dir, .. } => dir,
        }
    }
}
