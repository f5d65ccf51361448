//! SMTP AUTH credentials: the users file (`--auth-users`), verifying a password off the
//! reactors, and the per-user limits (failures, message rate).
//!
//! The file has one user a line, `name:PHC-hash[:key=value...]`, the hash an argon2 PHC
//! string as `smtpgw auth hash` prints it; `rate=N` sets the user's messages per minute
//! (0 turns the limit off for that user). `#` starts a comment line. It is read at
//! start (an error stops the start, naming the flag and line) and again on SIGHUP and
//! whenever it changes; a file that does not parse then keeps the users in force.
//!
//! Argon2 costs milliseconds of CPU, so a reactor never verifies: it hands the
//! credentials to [`Verifier::submit`] with a callback, a small pool of threads works a
//! bounded queue, and the callback puts the verdict on the reactor's completion queue,
//! the wake-up path the sink's answers use. A full queue answers `Temporary` at once.
//! An unknown user is verified against a dummy hash of the parameters most users'
//! hashes have (argon2's defaults for an empty file), and an authzid that names someone
//! else against an empty password, so every answer costs the same work and tells
//! nothing about which names exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHashString, PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use password_hash::rand_core::OsRng;
use password_hash::SaltString;
use tracing::{info, warn};
use zeroize::Zeroizing;

/// The longest password AUTH takes, for `smtpgw auth hash` to refuse a longer one.
pub use crate::smtp::auth::MAX_PASSWORD;
use crate::smtp::auth::{AuthRequest, AuthVerdict, MAX_USER};

/// The users file is small; anything larger is a mistake, not a users file.
const MAX_FILE: u64 = 16 * 1024 * 1024;
/// Credentials waiting for a verifier thread at most; past it AUTH gets `454 4.7.0`.
pub const QUEUE: usize = 256;
/// The most an argon2 hash of the users file may ask of a verification: memory in KiB
/// (each of the verifier threads holds this much while it works), passes and lanes.
/// argon2's default, which `smtpgw auth hash` uses, is 19 MiB, 2 passes, 1 lane; a hash
/// asking for gigabytes would take the process down at the first AUTH instead of at
/// start, where the file's line can be named.
const MAX_M_COST_KIB: u32 = 64 * 1024;
const MAX_T_COST: u32 = 10;
const MAX_P_COST: u32 = 16;
/// User names whose failures are remembered at most (expired ones are dropped first).
const MAX_TRACKED_USERS: usize = 64 * 1024;

/// One user of the file.
#[derive(Clone, Debug)]
struct User {
    hash: PasswordHashString,
    /// Messages per minute; `None` takes `--max-message-rate-per-user`.
    rate: Option<u32>,
}

/// The users file, parsed.
#[derive(Clone, Debug, Default)]
pub struct Users {
    users: HashMap<String, User>,
    /// What an unknown name is verified against (see [`Users::with_dummy`]).
    dummy: Option<PasswordHashString>,
}

/// Why a users file cannot be used: its line and what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsersError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("{path}: line {line}: {msg}")]
    Line {
        path: String,
        line: usize,
        msg: String,
    },
}

impl Users {
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let file_err = |msg: String| UsersError::File {
            path: path.display().to_string(),
            msg,
        };
        let bytes =
            crate::files::read_regular_file(path, MAX_FILE).map_err(|e| file_err(e.to_string()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| file_err(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
        Users::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Users, UsersError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |msg: String| UsersError::Line {
                path: path.display().to_string(),
                line: i + 1,
                msg,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or_default();
            if name.is_empty() || name.len() > MAX_USER || name.chars().any(char::is_control) {
                return Err(err(format!(
                    "user name must be 1 to {MAX_USER} characters without controls"
                )));
            }
            let hash = fields
                .next()
                .ok_or_else(|| err("expected name:hash (made by `smtpgw auth hash`)".into()))?;
            let parsed = PasswordHash::new(hash)
                .map_err(|e| err(format!("`{name}`: not a PHC hash string: {e}")))?;
            if parsed.algorithm.as_str() != "argon2id"
                && parsed.algorithm.as_str() != "argon2i"
                && parsed.algorithm.as_str() != "argon2d"
            {
                return Err(err(format!(
                    "`{name}`: hash algorithm {} is not argon2 (make one with `smtpgw auth hash`)",
                    parsed.algorithm
                )));
            }
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(err(format!(
                    "`{name}`: the hash string has no salt or no hash (make one with `smtpgw auth hash`)"
                )));
            }
            let params = argon2::Params::try_from(&parsed)
                .map_err(|e| err(format!("`{name}`: the hash's argon2 parameters: {e}")))?;
            if params.m_cost() > MAX_M_COST_KIB
                || params.t_cost() > MAX_T_COST
                || params.p_cost() > MAX_P_COST
            {
                return Err(err(format!(
                    "`{name}`: the hash asks for m={} KiB, t={}, p={}; at most m={MAX_M_COST_KIB} \
                     KiB ({} MiB), t={MAX_T_COST}, p={MAX_P_COST} are accepted, so that a \
                     verification cannot exhaust memory (make one with `smtpgw auth hash`)",
                    params.m_cost(),
                    params.t_cost(),
                    params.p_cost(),
                    MAX_M_COST_KIB / 1024,
                )));
            }
            let mut user = User {
                hash: parsed.serialize(),
                rate: None,
            };
            for option in fields {
                match option.split_once('=') {
                    Some(("rate", n)) => {
                        user.rate = Some(n.parse().map_err(|_| {
                            err(format!(
                            "`{name}`: rate must be a number of messages per minute (got `{n}`)"
                        ))
                        })?)
                    }
                    _ => {
                        return Err(err(format!(
                            "`{name}`: unknown option `{option}` (known: rate=N)"
                        )))
                    }
                }
            }
            if users.insert(name.to_owned(), user).is_some() {
                return Err(err(format!("user `{name}` appears twice")));
            }
        }
        Ok(Users { users, dummy: None })
    }

    /// Makes the hash an unknown name is verified against, with the parameters most
    /// of the file's hashes have (argon2's defaults for an empty file): hashes made by
    /// another tool, with other costs, would otherwise tell a known name (a wrong
    /// password at their cost) from an unknown one (at the default cost).
    pub fn with_dummy(mut self, path: &Path) -> Result<Users, UsersError> {
        // Algorithm, version and parameters: the hash without its salt and output.
        let mut costs: HashMap<String, (usize, &PasswordHashString)> = HashMap::new();
        for user in self.users.values() {
            let h = user.hash.password_hash();
            let key = format!("{}${:?}${}", h.algorithm, h.version, h.params);
            costs.entry(key).or_insert((0, &user.hash)).0 += 1;
        }
        let made = match costs
            .into_iter()
            .max_by(|a, b| (a.1 .0, &b.0).cmp(&(b.1 .0, &a.0)))
        {
            Some((_, (_, like))) => hash_like(DUMMY_PASSWORD, &like.password_hash()),
            None => hash_password(DUMMY_PASSWORD),
        };
        let dummy = made
            .ok()
            .and_then(|h| PasswordHashString::new(&h).ok())
            .ok_or_else(|| UsersError::File {
                path: path.display().to_string(),
                msg: "cannot make the hash unknown names are verified against".into(),
            })?;
        self.dummy = Some(dummy);
        Ok(self)
    }
}

/// The password of the hash unknown names are verified against (never accepted).
const DUMMY_PASSWORD: &[u8] = b"dummy password for unknown users";

/// A hash of `password` with the algorithm, version and parameters of `like`.
fn hash_like(
    password: &[u8],
    like: &PasswordHash<'_>,
) -> Result<String, argon2::password_hash::Error> {
    let algorithm = argon2::Algorithm::try_from(like.algorithm)?;
    let version = like
        .version
        .map(argon2::Version::try_from)
        .transpose()?
        .unwrap_or_default();
    let params = argon2::Params::try_from(like)?;
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::new(algorithm, version, params)
        .hash_password(password, &salt)?
        .to_string())
}

/// The hash `smtpgw auth hash` prints: argon2id with the crate's default (OWASP)
/// parameters and a random salt.
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

/// The per-user and per-name counts, by GCRA like the per-address limiter.
struct Rates {
    /// Failures per name, known or not.
    failures: NameRates,
    /// Messages per authenticated user.
    messages: NameRates,
}

/// Names and their GCRA theoretical arrival times (ns since `Verifier::origin`), at
/// most [`MAX_TRACKED_USERS`]: past it the expired entries go, and if every one is
/// live, all go (forgetting lets a name try again early; it never costs memory).
#[derive(Default)]
struct NameRates(Mutex<HashMap<String, u64>>);

impl NameRates {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `name` may have another event now (spends nothing).
    fn allows(&self, name: &str, g: Gcra, now: u64) -> bool {
        self.map().get(name).is_none_or(|&tat| g.allows(tat, now))
    }

    /// `name` had an event.
    fn spend(&self, name: &str, g: Gcra, now: u64) {
        let mut map = self.map();
        if map.len() >= MAX_TRACKED_USERS && !map.contains_key(name) {
            map.retain(|_, tat| *tat > now);
            if map.len() >= MAX_TRACKED_USERS {
                map.clear();
            }
        }
        let tat = map.entry(name.to_owned()).or_insert(0);
        *tat = (*tat).max(now) + g.interval;
    }
}

/// `n` events per `period`, in bursts of up to `n`.
#[derive(Clone, Copy, Debug)]
struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    fn new(n: u32, period: Duration) -> Gcra {
        let n = n.max(1);
        let interval = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX) / u64::from(n);
        Gcra {
            interval,
            tolerance: interval * u64::from(n - 1),
        }
    }

    fn allows(self, tat: u64, now: u64) -> bool {
        tat.saturating_sub(now) <= self.tolerance
    }
}

/// Settings of the verifier.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub users_file: PathBuf,
    /// Failures per user name per hour before its AUTH gets `421 4.7.0`.
    pub max_failures_per_user: Option<u32>,
    /// Default messages per minute per user (`--max-message-rate-per-user`).
    pub message_rate: Option<u32>,
    /// Verifier threads.
    pub threads: usize,
}

struct Job {
    request: AuthRequest,
    done: Box<dyn FnOnce(AuthVerdict) + Send>,
}

/// The verifier the reactors share; see the module comment.
pub struct Verifier {
    settings: AuthSettings,
    users: RwLock<Arc<Users>>,
    jobs: Sender<Job>,
    rates: Rates,
    origin: Instant,
    /// Verifies in `submit`, on the caller's thread (the deterministic simulation: its
    /// verdicts must follow from its seed, not from a thread's timing).
    inline: bool,
}

crate::smtp::stats::labels! {
    /// `smtpgw_auth_total{result}`.
    pub enum AuthResult {
        Success => "success",
        Failure => "failure",
        Temporary => "temporary",
        Locked => "locked",
    }
}

impl AuthResult {
    /// The result a verdict counts as.
    pub fn of(verdict: AuthVerdict) -> AuthResult {
        match verdict {
            AuthVerdict::Accepted => AuthResult::Success,
            AuthVerdict::Rejected => AuthResult::Failure,
            AuthVerdict::Temporary => AuthResult::Temporary,
            AuthVerdict::Locked => AuthResult::Locked,
        }
    }
}

impl Verifier {
    /// Loads the users file and starts the threads. The error names the file and line.
    pub fn start(settings: AuthSettings) -> Result<Arc<Verifier>, UsersError> {
        let (jobs, rx) = bounded(QUEUE);
        let verifier = Arc::new(Verifier::new(settings, jobs, false)?);
        for i in 0..verifier.settings.threads.max(1) {
            let rx: Receiver<Job> = rx.clone();
            // Weak: the threads end once the last reactor's handle is gone.
            let weak = Arc::downgrade(&verifier);
            std::thread::Builder::new()
                .name(format!("smtpgw-auth-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let Some(v) = weak.upgrade() else { break };
                        let verdict = v.verify(&job.request);
                        (job.done)(verdict);
                    }
                })
                .map_err(|e| UsersError::File {
                    path: verifier.settings.users_file.display().to_string(),
                    msg: format!("cannot start a verifier thread: {e}"),
                })?;
        }
        info!(
            users = verifier.users().len(),
            file = %verifier.settings.users_file.display(),
            "AUTH users loaded"
        );
        Ok(verifier)
    }

    #[cfg(any(test, feature = "testing"))]
    /// A verifier without threads: [`Self::submit`] verifies at once and answers before
    /// it returns (the simulator, `tests/sim`).
    pub fn start_inline(settings: AuthSettings) -> Result<Arc<Verifier>, UsersError> {
        // No thread receives: `submit` never queues.
        let (jobs, _) = bounded(0);
        Ok(Arc::new(Verifier::new(settings, jobs, true)?))
    }

    /// Loads the users file; `inline`: `submit` verifies at once instead of queueing.
    fn new(
        settings: AuthSettings,
        jobs: Sender<Job>,
        inline: bool,
    ) -> Result<Verifier, UsersError> {
        let users = Users::load(&settings.users_file)?.with_dummy(&settings.users_file)?;
        Ok(Verifier {
            users: RwLock::new(Arc::new(users)),
            jobs,
            rates: Rates {
                failures: NameRates::default(),
                messages: NameRates::default(),
            },
            origin: Instant::now(),
            settings,
            inline,
        })
    }

    fn users(&self) -> Arc<Users> {
        self.users.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the users file; one that does not load keeps the users in force.
    /// Returns whether the new file is in force.
    pub fn reload(&self) -> bool {
        let path = &self.settings.users_file;
        match Users::load(path).and_then(|u| u.with_dummy(path)) {
            Ok(users) => {
                info!(users = users.len(), file = %self.settings.users_file.display(), "AUTH users reloaded");
                *self.users.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(users);
                true
            }
            Err(e) => {
                warn!(error = %e, "AUTH users file refused; the users in force stay");
                false
            }
        }
    }

    pub fn users_file(&self) -> &Path {
        &self.settings.users_file
    }

    /// Queues `request`; `done` is called once with the verdict, from a verifier
    /// thread, or at once with `Temporary` when the queue is full.
    pub fn submit(&self, request: AuthRequest, done: Box<dyn FnOnce(AuthVerdict) + Send>) {
        if self.inline {
            return done(self.verify(&request));
        }
        match self.jobs.try_send(Job { request, done }) {
            Ok(()) => {}
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                (job.done)(AuthVerdict::Temporary)
            }
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The verification itself, on a verifier thread.
    pub fn verify(&self, request: &AuthRequest) -> AuthVerdict {
        let now = self.nanos(Instant::now());
        let failures = self
            .settings
            .max_failures_per_user
            .map(|n| Gcra::new(n, Duration::from_secs(3600)));
        if failures.is_some_and(|g| !self.rates.failures.allows(&request.user, g, now)) {
            return AuthVerdict::Locked;
        }
        let users = self.users();
        let known = users.users.get(&*request.user);
        // Always made by `Verifier::start` and `reload`.
        let Some(hash) = known.map(|u| &u.hash).or(users.dummy.as_ref()) else {
            return AuthVerdict::Temporary;
        };
        // An empty password never matches (PLAIN's authzid of someone else), but is
        // verified all the same so that it costs what a wrong one does.
        let password = Zeroizing::new(request.password.to_vec());
        let matches = Argon2::default()
            .verify_password(&password, &hash.password_hash())
            .is_ok();
        if matches && known.is_some() && !password.is_empty() {
            return AuthVerdict::Accepted;
        }
        if let Some(g) = failures {
            self.rates.failures.spend(&request.user, g, now);
        }
        AuthVerdict::Rejected
    }

    fn user_rate(&self, user: &str) -> Option<Gcra> {
        let users = self.users();
        let rate = match users.users.get(user).and_then(|u| u.rate) {
            Some(0) => None,
            Some(n) => Some(n),
            None => self.settings.message_rate,
        };
        rate.map(|n| Gcra::new(n, Duration::from_secs(60)))
    }

    /// Whether `user` may start another message now (spends nothing).
    pub fn message_allowed(&self, user: &str, now: Instant) -> bool {
        self.user_rate(user)
            .is_none_or(|g| self.rates.messages.allows(user, g, self.nanos(now)))
    }

    /// `user` completed a message.
    pub fn message_sent(&self, user: &str, now: Instant) {
        if let Some(g) = self.user_rate(user) {
            self.rates.messages.spend(user, g, self.nanos(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::auth::Mechanism;
    use std::io::Write;

    fn request(user: &str, password: &[u8]) -> AuthRequest {
        AuthRequest {
            user: user.into(),
            password: Zeroizing::new(password.to_vec()),
            mechanism: Mechanism::Plain,
        }
    }

    fn verifier(text: &str, failures: Option<u32>) -> (Arc<Verifier>, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let v = Verifier::start(AuthSettings {
            users_file: f.path().to_owned(),
            max_failures_per_user: failures,
            message_rate: None,
            threads: 1,
        })
        .unwrap();
        (v, f)
    }

    #[test]
    fn the_file_format_and_its_errors() {
        let h = hash_password(b"pw").unwrap();
        let p = Path::new("users");
        let users = Users::parse(&format!("# comment\n\nalice:{h}\nbob:{h}:rate=5\n"), p).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users.users["bob"].rate, Some(5));
        for (text, want) in [
            ("alice\n".to_string(), "line 1: expected name:hash"),
            (
                "alice:nothash\n".into(),
                "line 1: `alice`: not a PHC hash string",
            ),
            (format!("a:{h}\na:{h}\n"), "line 2: user `a` appears twice"),
            (
                format!("a:{h}:rate=x\n"),
                "line 1: `a`: rate must be a number",
            ),
            (
                format!("a:{h}:color=red\n"),
                "line 1: `a`: unknown option `color=red`",
            ),
            (format!(":{h}\n"), "line 1: user name must be"),
            (
                "a:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0\n".into(),
                "line 1: `a`: the hash string has no salt or no hash",
            ),
            (
                "a:$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n".into(),
                "line 1: `a`: hash algorithm pbkdf2-sha256 is not argon2",
            ),
            (
                // 4 GiB a verification: refused at load, not at the first AUTH.
                format!("a:{}\n", h.replacen("m=19456", "m=4194304", 1)),
                "line 1: `a`: the hash asks for m=4194304 KiB, t=2, p=1; at most m=65536",
            ),
            (
                format!("a:{}\n", h.replacen("t=2", "t=1000", 1)),
                "line 1: `a`: the hash asks for m=19456 KiB, t=1000",
            ),
        ] {
            let e = Users::parse(&text, p).unwrap_err().to_string();
            assert!(e.starts_with(&format!("users: {want}")), "{e}");
        }
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("users");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).expect("mkfifo");
        let e = Users::load(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let e = Users::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let e = Users::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn verifies_and_does_not_tell_unknown_from_wrong() {
        let h = hash_password(b"secret").unwrap();
        let (v, _f) = verifier(&format!("alice:{h}\n"), None);
        assert_eq!(
            v.verify(&request("alice", b"secret")),
            AuthVerdict::Accepted
        );
        assert_eq!(v.verify(&request("alice", b"wrong")), AuthVerdict::Rejected);
        assert_eq!(v.verify(&request("bob", b"secret")), AuthVerdict::Rejected);
        // PLAIN's authzid of someone else arrives as an empty password.
        assert_eq!(v.verify(&request("alice", b"")), AuthVerdict::Rejected);
        // The dummy's own password opens nothing.
        assert_eq!(
            v.verify(&request("nobody", b"dummy password for unknown users")),
            AuthVerdict::Rejected
        );
    }

    /// Hashes made by another tool, with other costs: an unknown name is verified at
    /// the cost most of the file's users have, not at argon2's defaults.
    #[test]
    fn unknown_names_cost_what_the_files_hashes_cost() {
        let params = argon2::Params::new(1024, 1, 1, None).unwrap();
        let other = Argon2::new(
            argon2::Algorithm::Argon2i,
            argon2::Version::V0x13,
            params.clone(),
        );
        let salt = SaltString::generate(&mut OsRng);
        let h = other.hash_password(b"secret", &salt).unwrap().to_string();
        let (v, _f) = verifier(&format!("alice:{h}\nbob:{h}\n"), None);
        let users = v.users();
        let dummy = users.dummy.as_ref().unwrap().password_hash();
        assert_eq!(dummy.algorithm.as_str(), "argon2i");
        let costs = |p: &argon2::Params| (p.m_cost(), p.t_cost(), p.p_cost());
        assert_eq!(
            costs(&argon2::Params::try_from(&dummy).unwrap()),
            costs(&params)
        );
        assert_eq!(
            v.verify(&request("alice", b"secret")),
            AuthVerdict::Accepted
        );
        assert_eq!(
            v.verify(&request("nobody", b"secret")),
            AuthVerdict::Rejected
        );
        // An empty file: argon2's defaults, as `smtpgw auth hash` makes them.
        let (v, _f) = verifier("", None);
        let users = v.users();
        let dummy = users.dummy.as_ref().unwrap().password_hash();
        assert_eq!(
            costs(&argon2::Params::try_from(&dummy).unwrap()),
            costs(&argon2::Params::default())
        );
    }

    #[test]
    fn failures_per_user_lock_the_name_for_an_hour() {
        let h = hash_password(b"secret").unwrap();
        let (v, _f) = verifier(&format!("alice:{h}\n"), Some(3));
        for _ in 0..3 {
            assert_eq!(v.verify(&request("alice", b"x")), AuthVerdict::Rejected);
        }
        assert_eq!(v.verify(&request("alice", b"secret")), AuthVerdict::Locked);
        // Names are counted apart, known or not.
        assert_eq!(v.verify(&request("carol", b"x")), AuthVerdict::Rejected);
    }

    #[test]
    fn a_broken_file_keeps_the_users_in_force() {
        let h = hash_password(b"secret").unwrap();
        let (v, f) = verifier(&format!("alice:{h}\n"), None);
        std::fs::write(f.path(), "alice:garbage\n").unwrap();
        assert!(!v.reload());
        assert_eq!(
            v.verify(&request("alice", b"secret")),
            AuthVerdict::Accepted
        );
        let h2 = hash_password(b"new").unwrap();
        std::fs::write(f.path(), format!("alice:{h2}\n")).unwrap();
        assert!(v.reload());
        assert_eq!(
            v.verify(&request("alice", b"secret")),
            AuthVerdict::Rejected
        );
        assert_eq!(v.verify(&request("alice", b"new")), AuthVerdict::Accepted);
    }

    #[test]
    fn submit_answers_through_the_callback_and_a_full_queue_is_temporary() {
        let h = hash_password(b"secret").unwrap();
        let (v, _f) = verifier(&format!("alice:{h}\n"), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        v.submit(
            request("alice", b"secret"),
            Box::new(move |verdict| tx2.send(verdict).unwrap()),
        );
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Ok(AuthVerdict::Accepted)
        );
        // Fill the queue faster than one thread verifies: some answer Temporary at once.
        for _ in 0..QUEUE + 8 {
            let tx = tx.clone();
            v.submit(
                request("alice", b"x"),
                Box::new(move |verdict| {
                    let _ = tx.send(verdict);
                }),
            );
        }
        let got: Vec<_> = (0..QUEUE + 8)
            .map(|_| rx.recv_timeout(Duration::from_secs(120)).unwrap())
            .collect();
        assert!(got.contains(&AuthVerdict::Temporary));
        assert!(got.contains(&AuthVerdict::Rejected));
    }

    /// Per-user message counts are bounded like failure counts, even when every entry
    /// is live (user names come from the users file, but it may hold many).
    #[test]
    fn name_rates_stay_bounded_when_every_entry_is_live() {
        let rates = NameRates::default();
        let g = Gcra::new(1, Duration::from_secs(3600));
        for i in 0..=MAX_TRACKED_USERS {
            rates.spend(&format!("user{i}"), g, 0);
        }
        assert!(rates.map().len() <= MAX_TRACKED_USERS);
        // The newest is remembered.
        assert!(!rates.allows(&format!("user{MAX_TRACKED_USERS}"), g, 0));
    }

    #[test]
    fn message_rate_per_user_from_the_file_or_the_default() {
        let h = hash_password(b"pw").unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(format!("a:{h}:rate=2\nb:{h}\nc:{h}:rate=0\n").as_bytes())
            .unwrap();
        let v = Verifier::start(AuthSettings {
            users_file: f.path().to_owned(),
            max_failures_per_user: None,
            message_rate: Some(1),
            threads: 1,
        })
        .unwrap();
        let t = Instant::now();
        for (user, n) in [("a", 2), ("b", 1)] {
            for _ in 0..n {
                assert!(v.message_allowed(user, t));
                v.message_sent(user, t);
            }
            assert!(!v.message_allowed(user, t), "{user}");
        }
        // rate=0: no limit for that user.
        for _ in 0..10 {
            assert!(v.message_allowed("c", t));
            v.message_sent("c", t);
        }
        assert!(v.message_allowed("a", t + Duration::from_secs(31)));
    }
}
