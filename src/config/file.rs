//! The `--config` file: read through the capped reader, parsed as TOML, checked key by
//! key, and layered under flags and variables.

use super::*;

/// `--config FILE` (or `SMTPGW_CONFIG`), for the server and the `spool` tools alike.
#[derive(Clone, Debug, Default, Args)]
pub struct ConfigFileArg {
    /// TOML file whose keys are the long flag names, e.g. `listen = "[::1]:2525"`;
    /// flags and SMTPGW_* variables win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigFileArg {
    pub fn load(&self) -> Result<Option<ConfigFile>, ConfigError> {
        self.config.as_deref().map(ConfigFile::load).transpose()
    }
}

// ---- The file. ----------------------------------------------------------------------

/// A `--config` file, read and checked: every key known, every value of its type.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub(super) table: toml::Table,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.display().to_string(),
            msg,
        };
        let bytes = crate::files::read_regular_file(path, crate::files::CONFIG_CAP)
            .map_err(|e| file_err(e.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| file_err(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
        ConfigFile::parse(&text, path)
    }

    /// Parses the file's text. Errors are one line and name the offending key.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        let file_err = |msg: String| ConfigError::File {
            path: path.display().to_string(),
            msg,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| file_err(describe(&e, text)))?;
        for (key, value) in &table {
            match check_file_value(key, value) {
                None => {
                    return Err(file_err(format!(
                        "unknown key `{key}` (keys are the long flag names, e.g. `listen`, `accept-domain`)"
                    )))
                }
                Some(Err(msg)) => {
                    return Err(ConfigError::Source {
                        origin: format!("--config {}: `{key}`", path.display()),
                        msg,
                    })
                }
                Some(Ok(())) => {}
            }
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            table,
        })
    }

    /// The group's values from the file, its defaults for keys the file does not have.
    fn group<G: Group>(&self) -> Result<G, ConfigError> {
        let keys = G::keys();
        let sub: toml::Table = self
            .table
            .iter()
            .filter(|(k, _)| keys.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Each value was checked on loading; this only fails on a bug.
        toml::Value::Table(sub)
            .try_into()
            .map_err(|e| ConfigError::File {
                path: self.path.display().to_string(),
                msg: e.message().trim().replace('\n', " "),
            })
    }
}

/// The group as given, with the file's value for every setting not given as a flag or
/// variable.
pub(super) fn layer<G: Group>(
    mut given: G,
    file: Option<&ConfigFile>,
    sources: &Sources,
) -> Result<G, ConfigError> {
    if let Some(file) = file {
        given.layer(file.group()?, &|field| sources.is_explicit(field));
    }
    Ok(given)
}

/// toml's own rendering spans several lines with a source excerpt; this keeps one line,
/// with the line number (and key) so the user can find the spot.
pub(super) fn describe(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return msg;
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.trim().starts_with('[') => {
            format!("line {line_no}: `{}`: {msg}", key.trim())
        }
        _ => format!("line {line_no}: {msg}"),
    }
}
