//! The credential store: `<data_dir>/users.toml` (or `auth.users_file`),
//! one `[[user]]` per login. What it holds per user:
//!
//! ```toml
//! [[user]]
//! name = "alice"                         # the login (case-insensitive)
//! addresses = ["alice@example.test"]     # owned, besides the main config's
//! allowed_senders = ["@example.test"]    # may also send as these
//! password = "$argon2id$v=19$m=19456,t=2,p=1$...$..."
//! scram_salt = "base64"                  # shared by all of alice's secrets
//! scram_iterations = 10000
//! scram_stored_key = "base64"            # of the password (never the password)
//! scram_server_key = "base64"
//! [user.limits]                          # egress limits of this user
//! max_messages_per_hour = 1000           # (each optional; `[submission]`'s
//! max_recipients_per_hour = 5000         #  values otherwise)
//! max_new_recipients_per_day = 1000
//! [user.held]                            # circuit breaker: logins refused
//! reason = "sent 500 messages in 5 minutes"
//! since = "2026-12-07T10:00:00Z"
//! [[user.app_password]]                  # submission only, revocable one by one
//! label = "phone"
//! id = "k3mz"                            # first group of the app password
//! created = "2026-12-07T10:00:00Z"
//! hash = "$argon2id$..."
//! scram_stored_key = "base64"
//! scram_server_key = "base64"
//! ```
//!
//! A user imported from Dovecot has `password = "$6$..."` (SHA512-CRYPT) or
//! an argon2 string and no SCRAM keys: SCRAM is refused for that password
//! until `tern user passwd` sets it again (the server could compute the keys
//! after a successful PLAIN login, but it does not write this file).
//!
//! Invariants of a loaded [`Users`]: names are unique ignoring case and
//! valid; every hash parses with bounded cost; SCRAM keys exist only with a
//! salt and iteration count; app password labels and ids are unique per user.
//!
//! Writes (`tern user`) are atomic: a temporary file, fsync, rename, fsync of
//! the directory, mode 0600; concurrent `tern user` runs serialise on a lock
//! file. The server reads through [`UserStore`], which re-reads the file
//! only when its identity (inode, size, mtime, ctime) changed, checked at
//! every login (`CHECK_INTERVAL`).

use super::secret::{self, ScramKeys, ScramSalt, StoredHash};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use toml::Spanned;

/// Why the users file cannot be used: names the file and, when known, the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    fn io(path: &Path, what: &str, e: &io::Error) -> StoreError {
        StoreError {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot {what}: {e}"),
        }
    }

    /// Whether this is an I/O failure rather than bad content.
    pub fn is_io(&self) -> bool {
        self.line.is_none() && self.message.starts_with("cannot ")
    }
}

/// The circuit breaker's mark: logins are refused until `tern user release`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub reason: String,
    /// RFC 3339.
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPassword {
    pub label: String,
    /// Public identifier: the first group of the app password.
    pub id: String,
    /// RFC 3339.
    pub created: String,
    pub hash: StoredHash,
    pub scram: Option<ScramKeys>,
}

/// One login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub addresses: Vec<String>,
    pub allowed_senders: Vec<String>,
    pub password: Option<StoredHash>,
    pub scram_salt: Option<ScramSalt>,
    /// The password's SCRAM keys (none for an imported hash).
    pub password_scram: Option<ScramKeys>,
    pub app_passwords: Vec<AppPassword>,
    pub held: Option<Held>,
    /// Overrides of `[submission]`'s egress limits.
    pub limits: crate::egress::UserLimits,
}

impl UserRecord {
    pub fn new(name: &str) -> UserRecord {
        UserRecord {
            name: name.to_string(),
            addresses: Vec::new(),
            allowed_senders: Vec::new(),
            password: None,
            scram_salt: None,
            password_scram: None,
            app_passwords: Vec::new(),
            held: None,
            limits: crate::egress::UserLimits::default(),
        }
    }

    /// Changes whenever a secret of this user changes: cached verdicts carry
    /// it, so a new password or a revoked app password is never answered
    /// from the cache.
    pub fn secrets_version(&self) -> u64 {
        let mut text = String::new();
        if let Some(p) = &self.password {
            text.push_str(p.as_str());
        }
        text.push('\n');
        for app in &self.app_passwords {
            text.push_str(&app.label);
            text.push(' ');
            text.push_str(app.hash.as_str());
            text.push('\n');
        }
        let digest = secret::sha256(text.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    pub fn app_password(&self, label: &str) -> Option<&AppPassword> {
        self.app_passwords.iter().find(|a| a.label == label)
    }
}

/// A user name: what `tern user add` accepts and a login can be. The
/// config's user-name characters plus `@` and `+`, so an address can be a
/// login too.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@+".contains(c))
}

/// An app password label: short, printable, no separators.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 64
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Addresses are compared lower-cased, as the main config does.
fn valid_address(address: &str) -> bool {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && crate::config::valid_domain(domain)
                && !address.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

/// `alice@example.test` or `@example.test` (any address of that domain).
pub fn valid_sender_pattern(pattern: &str) -> bool {
    match pattern.strip_prefix('@') {
        Some(domain) => crate::config::valid_domain(domain),
        None => valid_address(pattern),
    }
}

/// Every user of the file, in file order.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Vec<Arc<UserRecord>>,
    /// Lower-cased name → index in `users`.
    index: HashMap<String, usize>,
    /// Key of the decoy SCRAM salts given for unknown logins; kept in the
    /// file so the decoy stays the same across restarts (a salt that changed
    /// at every restart would tell a real user from an invented one).
    decoy_key: Option<Vec<u8>>,
}

impl Users {
    pub fn get(&self, login: &str) -> Option<&Arc<UserRecord>> {
        self.index
            .get(&login.to_lowercase())
            .map(|&i| &self.users[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &UserRecord> {
        self.users.iter().map(|u| u.as_ref())
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn decoy_key(&self) -> Option<&[u8]> {
        self.decoy_key.as_deref()
    }

    /// Adds or replaces (same name, ignoring case) a user.
    pub fn put(&mut self, user: UserRecord) {
        let key = user.name.to_lowercase();
        match self.index.get(&key) {
            Some(&i) => self.users[i] = Arc::new(user),
            None => {
                self.index.insert(key, self.users.len());
                self.users.push(Arc::new(user));
            }
        }
    }

    pub fn remove(&mut self, login: &str) -> Option<UserRecord> {
        let i = self.index.remove(&login.to_lowercase())?;
        let removed = self.users.remove(i);
        self.reindex();
        Some(Arc::unwrap_or_clone(removed))
    }

    /// A copy of a user to change and [`put`](Self::put) back.
    pub fn clone_user(&self, login: &str) -> Option<UserRecord> {
        self.get(login).map(|u| UserRecord::clone(u))
    }

    fn reindex(&mut self) {
        self.index = self
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.to_lowercase(), i))
            .collect();
    }

    /// Reads `path`; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Users, StoreError> {
        match fs::read_to_string(path) {
            Ok(text) => Users::parse(&text, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Users::default()),
            Err(e) => Err(StoreError::io(path, "read the users file", &e)),
        }
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Users, StoreError> {
        let line_of = |offset: usize| {
            let before = &text.as_bytes()[..offset.min(text.len())];
            before.iter().filter(|&&b| b == b'\n').count() + 1
        };
        let err = |offset: Option<usize>, message: String| StoreError {
            path: path.to_path_buf(),
            line: offset.map(line_of),
            message,
        };
        let file: FileToml = toml::from_str(text)
            .map_err(|e| err(e.span().map(|s| s.start), e.message().replace('\n', " ")))?;
        let mut users = Users {
            decoy_key: match &file.decoy_key {
                Some(k) => Some(
                    B64.decode(k)
                        .ok()
                        .filter(|k| k.len() >= 16)
                        .ok_or_else(|| err(None, "decoy_key: not base64 of 16+ bytes".into()))?,
                ),
                None => None,
            },
            ..Users::default()
        };
        for u in file.users {
            let at = Some(u.name.span().start);
            let record = u.into_record().map_err(|message| err(at, message))?;
            if users.get(&record.name).is_some() {
                return Err(err(
                    at,
                    format!("user {:?} appears twice (names ignore case)", record.name),
                ));
            }
            users.put(record);
        }
        Ok(users)
    }

    /// The file's text.
    pub fn to_toml(&self) -> Result<String, String> {
        let file = FileToml {
            decoy_key: self.decoy_key.as_ref().map(|k| B64.encode(k)),
            users: self
                .users
                .iter()
                .map(|u| UserToml::from_record(u))
                .collect(),
        };
        let body = toml::to_string(&file).map_err(|e| e.to_string())?;
        Ok(format!(
            "# Tern logins, written by `tern user` (see `tern user --help`).\n\
             # The running server picks up changes at the next login.\n\n{body}"
        ))
    }

    /// Writes `path` atomically, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let text = self.to_toml().map_err(|message| StoreError {
            path: path.to_path_buf(),
            line: None,
            message,
        })?;
        write_atomically(path, text.as_bytes())
            .map_err(|e| StoreError::io(path, "write the users file", &e))
    }

    /// Read-modify-write under an exclusive lock (`<file>.lock`), so two
    /// `tern user` commands at once cannot lose each other's change. The
    /// decoy key is created on the first write.
    pub fn edit<T>(
        path: &Path,
        change: impl FnOnce(&mut Users) -> Result<T, String>,
    ) -> Result<Result<T, String>, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::create_dir_durable(dir)
                .map_err(|e| StoreError::io(dir, "create the directory", &e))?;
        }
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| StoreError::io(&lock_path, "open the lock file", &e))?;
        crate::privileges::hand_over_file(&lock)
            .map_err(|e| StoreError::io(&lock_path, "give the lock file to server.user", &e))?;
        flock_exclusive(&lock).map_err(|e| StoreError::io(&lock_path, "lock", &e))?;
        let mut users = Users::load(path)?;
        if users.decoy_key.is_none() {
            users.decoy_key = Some(random_key().to_vec());
        }
        match change(&mut users) {
            Ok(value) => {
                users.save(path)?;
                Ok(Ok(value))
            }
            Err(message) => Ok(Err(message)),
        }
        // The lock is released when `lock` is closed.
    }
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    key
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

fn flock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Temporary file in the same directory, fsync, rename over `path`, fsync
/// of the directory: a crash leaves the old file or the new one, never half.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A root-run `tern user` leaves the file to server.user, before the
        // server can see it.
        crate::privileges::hand_over_file(&file)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        crate::fsutil::sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

// ---- the file's shape ----

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decoy_key: Option<String>,
    #[serde(default, rename = "user", skip_serializing_if = "Vec::is_empty")]
    users: Vec<UserToml>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserToml {
    name: Spanned<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    allowed_senders: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_iterations: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_stored_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_server_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limits: Option<LimitsToml>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    held: Option<HeldToml>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    app_password: Vec<AppPasswordToml>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsToml {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_messages_per_hour: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_recipients_per_hour: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_new_recipients_per_day: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeldToml {
    reason: String,
    since: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppPasswordToml {
    label: String,
    id: String,
    created: String,
    hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_stored_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scram_server_key: Option<String>,
}

fn decode_key(what: &str, text: &str) -> Result<[u8; 32], String> {
    B64.decode(text)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
        .ok_or_else(|| format!("{what}: not base64 of 32 bytes"))
}

fn scram_pair(
    what: &str,
    stored: &Option<String>,
    server: &Option<String>,
) -> Result<Option<ScramKeys>, String> {
    match (stored, server) {
        (Some(stored), Some(server)) => Ok(Some(ScramKeys {
            stored_key: decode_key(&format!("{what}scram_stored_key"), stored)?,
            server_key: decode_key(&format!("{what}scram_server_key"), server)?,
        })),
        (None, None) => Ok(None),
        _ => Err(format!(
            "{what}scram_stored_key and scram_server_key go together"
        )),
    }
}

fn check_time(what: &str, text: &str) -> Result<(), String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|_| ())
        .map_err(|_| format!("{what}: {text:?} is not an RFC 3339 time"))
}

impl UserToml {
    fn into_record(self) -> Result<UserRecord, String> {
        let name = self.name.into_inner();
        if !valid_name(&name) {
            return Err(format!(
                "name {name:?}: 1-128 of A-Z a-z 0-9 . _ - @ +, not starting with a dot"
            ));
        }
        let lower = |v: Vec<String>| v.into_iter().map(|a| a.to_lowercase()).collect();
        let addresses: Vec<String> = lower(self.addresses);
        if let Some(bad) = addresses.iter().find(|a| !valid_address(a)) {
            return Err(format!("addresses: {bad:?} is not an address"));
        }
        let allowed_senders: Vec<String> = lower(self.allowed_senders);
        if let Some(bad) = allowed_senders.iter().find(|a| !valid_sender_pattern(a)) {
            return Err(format!(
                "allowed_senders: {bad:?} is neither an address nor @domain"
            ));
        }
        let password = self
            .password
            .as_deref()
            .map(StoredHash::parse)
            .transpose()
            .map_err(|e| format!("password: {e}"))?;
        let scram_salt = match (&self.scram_salt, self.scram_iterations) {
            (Some(salt), Some(n)) => Some(ScramSalt {
                salt: B64
                    .decode(salt)
                    .ok()
                    .filter(|s| !s.is_empty())
                    .ok_or("scram_salt: not base64")?,
                iterations: secret::check_scram_iterations(n)?,
            }),
            (None, None) => None,
            _ => return Err("scram_salt and scram_iterations go together".into()),
        };
        let password_scram = scram_pair("", &self.scram_stored_key, &self.scram_server_key)?;
        if password_scram.is_some() && password.is_none() {
            return Err("SCRAM keys without a password".into());
        }
        let mut app_passwords: Vec<AppPassword> = Vec::new();
        for app in self.app_password {
            let what = format!("app password {:?}: ", app.label);
            if !valid_label(&app.label) {
                return Err(format!("{what}label: 1-64 of A-Z a-z 0-9 . _ -"));
            }
            if app.id.len() != secret::APP_ID_LEN
                || secret::app_password_id(&format!("{0}-{0}-{0}-{0}-{0}", app.id)).is_none()
            {
                return Err(format!("{what}id {:?} is not an app password id", app.id));
            }
            if app_passwords.iter().any(|a| a.label == app.label) {
                return Err(format!("{what}label appears twice"));
            }
            if app_passwords.iter().any(|a| a.id == app.id) {
                return Err(format!("{what}id {:?} appears twice", app.id));
            }
            check_time(&format!("{what}created"), &app.created)?;
            let scram = scram_pair(&what, &app.scram_stored_key, &app.scram_server_key)?;
            app_passwords.push(AppPassword {
                hash: StoredHash::parse(&app.hash).map_err(|e| format!("{what}hash: {e}"))?,
                label: app.label,
                id: app.id,
                created: app.created,
                scram,
            });
        }
        let has_scram_keys =
            password_scram.is_some() || app_passwords.iter().any(|a| a.scram.is_some());
        if has_scram_keys && scram_salt.is_none() {
            return Err("SCRAM keys without scram_salt and scram_iterations".into());
        }
        let held = match self.held {
            Some(h) => {
                check_time("held.since", &h.since)?;
                Some(Held {
                    reason: h.reason,
                    since: h.since,
                })
            }
            None => None,
        };
        let limits = match self.limits {
            Some(l) => {
                let limits = crate::egress::UserLimits {
                    max_messages_per_hour: l.max_messages_per_hour,
                    max_recipients_per_hour: l.max_recipients_per_hour,
                    max_new_recipients_per_day: l.max_new_recipients_per_day,
                };
                if [
                    limits.max_messages_per_hour,
                    limits.max_recipients_per_hour,
                    limits.max_new_recipients_per_day,
                ]
                .contains(&Some(0))
                {
                    return Err("limits: each must be at least 1".into());
                }
                limits
            }
            None => crate::egress::UserLimits::default(),
        };
        Ok(UserRecord {
            name,
            addresses,
            allowed_senders,
            password,
            scram_salt,
            password_scram,
            app_passwords,
            held,
            limits,
        })
    }

    fn from_record(u: &UserRecord) -> UserToml {
        let key = |k: &[u8; 32]| B64.encode(k);
        UserToml {
            name: Spanned::new(0..0, u.name.clone()),
            addresses: u.addresses.clone(),
            allowed_senders: u.allowed_senders.clone(),
            password: u.password.as_ref().map(|p| p.as_str().to_string()),
            scram_salt: u.scram_salt.as_ref().map(|s| B64.encode(&s.salt)),
            scram_iterations: u.scram_salt.as_ref().map(|s| s.iterations),
            scram_stored_key: u.password_scram.as_ref().map(|k| key(&k.stored_key)),
            scram_server_key: u.password_scram.as_ref().map(|k| key(&k.server_key)),
            limits: (!u.limits.is_empty()).then_some(LimitsToml {
                max_messages_per_hour: u.limits.max_messages_per_hour,
                max_recipients_per_hour: u.limits.max_recipients_per_hour,
                max_new_recipients_per_day: u.limits.max_new_recipients_per_day,
            }),
            held: u.held.as_ref().map(|h| HeldToml {
                reason: h.reason.clone(),
                since: h.since.clone(),
            }),
            app_password: u
                .app_passwords
                .iter()
                .map(|a| AppPasswordToml {
                    label: a.label.clone(),
                    id: a.id.clone(),
                    created: a.created.clone(),
                    hash: a.hash.as_str().to_string(),
                    scram_stored_key: a.scram.as_ref().map(|k| key(&k.stored_key)),
                    scram_server_key: a.scram.as_ref().map(|k| key(&k.server_key)),
                })
                .collect(),
        }
    }
}

// ---- the server's view ----

/// What identifies one version of the file: a rename gives a new inode, an
/// edit in place a new size or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &Path) -> io::Result<Option<FileStamp>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

struct Loaded {
    users: Arc<Users>,
    stamp: Option<FileStamp>,
    /// The stamp of a version that failed to parse, so its error is logged
    /// once, not every second.
    rejected: Option<FileStamp>,
}

/// The server's handle on the users file: [`snapshot`](Self::snapshot) is
/// cheap (an `Arc` clone) and looks at the file at most once per
/// [`CHECK_INTERVAL`]; a changed file is re-read then. A version that does
/// not parse is logged (`auth.users_file` event, with file and line) and
/// the previous one stays in force.
pub struct UserStore {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    started: Instant,
    /// Milliseconds after `started` before which nobody looks at the file.
    next_check_ms: AtomicU64,
    reloads: AtomicU64,
}

/// How stale the server's view of the users file may be: not at all. A
/// `stat` per login costs about a microsecond, while a login that fails
/// because a password set a moment ago is not seen yet counts as a failure
/// and holds the account back (`account_retry_interval`).
pub const CHECK_INTERVAL: Duration = Duration::ZERO;

impl UserStore {
    /// Reads the file (missing: no users yet).
    pub fn open(path: &Path) -> Result<UserStore, StoreError> {
        let before = stamp(path).map_err(|e| StoreError::io(path, "stat", &e))?;
        let users = Users::load(path)?;
        Ok(UserStore {
            path: path.to_path_buf(),
            loaded: RwLock::new(Loaded {
                users: Arc::new(users),
                stamp: before,
                rejected: None,
            }),
            started: Instant::now(),
            next_check_ms: AtomicU64::new(ms(CHECK_INTERVAL)),
            reloads: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the file was re-read since `open`.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// The current users.
    pub fn snapshot(&self) -> Arc<Users> {
        self.snapshot_at(Instant::now())
    }

    pub(crate) fn snapshot_at(&self, now: Instant) -> Arc<Users> {
        let now_ms = ms(now.saturating_duration_since(self.started));
        let due = self.next_check_ms.load(Ordering::Relaxed);
        // One caller per interval wins the compare-exchange and looks at the
        // file; everyone else reads the current snapshot.
        if now_ms >= due
            && self
                .next_check_ms
                .compare_exchange(
                    due,
                    now_ms + ms(CHECK_INTERVAL),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.check_file();
        }
        match self.loaded.read() {
            Ok(l) => l.users.clone(),
            Err(poisoned) => poisoned.into_inner().users.clone(),
        }
    }

    fn check_file(&self) {
        let current = match stamp(&self.path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(event = "auth.users_file", path = %self.path.display(), error = %e, "cannot stat the users file; keeping the users read before");
                return;
            }
        };
        {
            let loaded = match self.loaded.read() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            if loaded.stamp == current || (current.is_some() && loaded.rejected == current) {
                return;
            }
        }
        let result = Users::load(&self.path);
        let mut loaded = match self.loaded.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        match result {
            Ok(users) => {
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event = "auth.users_file", path = %self.path.display(), users = users.len(), "users file re-read");
                loaded.users = Arc::new(users);
                loaded.stamp = current;
                loaded.rejected = None;
            }
            Err(e) => {
                tracing::error!(event = "auth.users_file", error = %e, "users file not loaded; the previous version stays in force");
                loaded.rejected = current;
            }
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
