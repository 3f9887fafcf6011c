//! `tern user`: logins for SMTP submission, kept in the users file
//! (`auth.users_file`, default `<data_dir>/users.toml`). Works on the file
//! directly, whether the server runs or not: the server re-reads it within
//! a second of a change.
//!
//! Secrets never come from the command line (it is visible to every user
//! of the machine in `ps`): from a prompt without echo, asked twice, when
//! stdin is a terminal, else from the first line of stdin.
//!
//! Exit status: 0 done; 1 bad usage (an invalid name, label, address or
//! password), an unknown user or label, or a config that does not load;
//! 66 (EX_NOINPUT) an import file that cannot be read; 74 (EX_IOERR) the
//! users file cannot be read or written. clap's own usage errors exit 2,
//! as for every `tern` command.

use super::import::parse_passwd_file;
use super::secret::{self, HashParams, ScramSalt};
use super::store::{self, AppPassword, StoreError, UserRecord, Users};
use clap::{Args, Subcommand};
use serde_json::json;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a login and set its password (prompted, or one line on stdin)
    Add {
        /// The login name: A-Z a-z 0-9 . _ - @ +, up to 128 characters
        name: String,
        /// An address this user owns besides those the main config gives it (repeatable)
        #[arg(long = "address", value_name = "ADDRESS")]
        addresses: Vec<String>,
        /// An extra address, or @domain for a whole domain, the user may send as (repeatable)
        #[arg(long = "allow-sender", value_name = "ADDRESS|@DOMAIN")]
        allowed_senders: Vec<String>,
        #[command(flatten)]
        common: UserArgs,
    },
    /// Set a new password (prompted, or one line on stdin)
    ///
    /// Also gives an imported user SCRAM keys. App passwords stay valid.
    Passwd {
        name: String,
        #[command(flatten)]
        common: UserArgs,
    },
    /// One line per login: addresses, password scheme, SCRAM, app passwords, hold
    List {
        /// Print a JSON array instead (never hashes or keys)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: UserArgs,
    },
    /// Remove a login with its app passwords
    Remove {
        name: String,
        #[command(flatten)]
        common: UserArgs,
    },
    /// Clear a login's hold (set by the circuit breaker): its logins work again
    /// and its held queued mail goes (now if the server runs, else at its start)
    Release {
        name: String,
        #[command(flatten)]
        common: UserArgs,
    },
    /// Set a login's egress limits, in place of [submission]'s
    ///
    /// Without options: prints them. Each option replaces one limit;
    /// --default drops this user's own limits first.
    Limits {
        name: String,
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        messages_per_hour: Option<u32>,
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        recipients_per_hour: Option<u32>,
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        new_recipients_per_day: Option<u32>,
        /// Use [submission]'s limits again
        #[arg(long)]
        default: bool,
        #[command(flatten)]
        common: UserArgs,
    },
    /// Import a Dovecot passwd-file (user:{SCHEME}hash:...)
    ///
    /// ARGON2ID, ARGON2I, SHA512-CRYPT, SHA256-CRYPT and CRYPT ($6$/$5$)
    /// hashes are taken as they are; other schemes are refused with their line
    /// number. Imported logins work with PLAIN and LOGIN, and with SCRAM only
    /// once `tern user passwd` sets their password again. An existing login
    /// gets the imported password (its app passwords stay). Any bad line:
    /// nothing is imported (exit 1), unless --skip-invalid.
    Import {
        /// The passwd-file
        file: PathBuf,
        /// Import the good lines even if others are bad (each is reported)
        #[arg(long)]
        skip_invalid: bool,
        #[command(flatten)]
        common: UserArgs,
    },
    /// App passwords: one generated secret per mail client
    ///
    /// Valid for SMTP submission only, revocable one by one; shown once when
    /// made, stored as a hash.
    AppPassword {
        #[command(subcommand)]
        command: AppPasswordCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppPasswordCommand {
    /// Generate an app password for a login and print it, once
    Add {
        name: String,
        /// What it is for, e.g. "phone" (A-Z a-z 0-9 . _ -, unique per login)
        label: String,
        #[command(flatten)]
        common: UserArgs,
    },
    /// A login's app passwords: label and creation time
    List {
        name: String,
        /// Print a JSON array instead
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: UserArgs,
    },
    /// Revoke one app password: the server refuses it from the next login on
    Revoke {
        name: String,
        label: String,
        #[command(flatten)]
        common: UserArgs,
    },
}

#[derive(Args, Debug)]
pub struct UserArgs {
    /// The server's TOML config file (it says where the users file is);
    /// without it, the embedded default (./tern-data/users.toml)
    #[arg(short, long)]
    config: Option<PathBuf>,
}

const EXIT_USAGE: u8 = 1;
const EXIT_NOINPUT: u8 = 66;
const EXIT_IOERR: u8 = 74;

/// Shortest password `add` and `passwd` accept.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Where the users file is and how to hash.
struct Target {
    users_file: PathBuf,
    params: HashParams,
    /// Where the running server's control socket is; None when the config
    /// did not load (only the users file was found).
    data_dir: Option<PathBuf>,
}

fn target(common: &UserArgs) -> Result<Target, ExitCode> {
    let (label, loaded) = match &common.config {
        Some(p) => (p.display().to_string(), crate::config::load(p)),
        None => (
            "(embedded default)".to_string(),
            crate::config::embedded_default(),
        ),
    };
    match loaded {
        Ok(rt) => {
            // What a root-run command writes goes to server.user, whose
            // server reads and rewrites it.
            crate::privileges::commands_hand_over_to(&rt);
            Ok(Target {
                users_file: rt.auth.users_file,
                params: rt.auth.hash_params,
                data_dir: Some(rt.data_dir),
            })
        }
        // The users file itself is what fails: find it anyway, so the
        // command reports it with its file, line and exit status.
        Err(errors) if errors.iter().all(|e| e.key == "auth.users_file") => {
            match crate::config::users_file_of(common.config.as_deref()) {
                Ok(users_file) => Ok(Target {
                    users_file,
                    params: HashParams::DEFAULT,
                    data_dir: None,
                }),
                Err(_) => {
                    for e in errors {
                        eprintln!("{label}: {e}");
                    }
                    Err(ExitCode::FAILURE)
                }
            }
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{label}: {e}");
            }
            Err(ExitCode::FAILURE)
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("tern: {message}");
    ExitCode::from(code)
}

fn store_failed(e: &StoreError) -> ExitCode {
    fail(
        if e.is_io() { EXIT_IOERR } else { EXIT_USAGE },
        &e.to_string(),
    )
}

/// Runs `tern user ...`.
pub fn run(command: UserCommand) -> ExitCode {
    let result = match command {
        UserCommand::Add {
            name,
            addresses,
            allowed_senders,
            common,
        } => add(&common, &name, addresses, allowed_senders),
        UserCommand::Passwd { name, common } => passwd(&common, &name),
        UserCommand::List { json, common } => list(&common, json),
        UserCommand::Remove { name, common } => edit(&common, |users| {
            users
                .remove(&name)
                .map(|u| format!("removed {}", u.name))
                .ok_or_else(|| format!("no user {name:?}"))
        }),
        UserCommand::Release { name, common } => release(&common, &name),
        UserCommand::Limits {
            name,
            messages_per_hour,
            recipients_per_hour,
            new_recipients_per_day,
            default,
            common,
        } => edit(&common, |users| {
            let mut user = users
                .clone_user(&name)
                .ok_or_else(|| format!("no user {name:?}"))?;
            if default {
                user.limits = Default::default();
            }
            let l = &mut user.limits;
            l.max_messages_per_hour = messages_per_hour.or(l.max_messages_per_hour);
            l.max_recipients_per_hour = recipients_per_hour.or(l.max_recipients_per_hour);
            l.max_new_recipients_per_day = new_recipients_per_day.or(l.max_new_recipients_per_day);
            let show = |v: Option<u32>| v.map_or("default".to_string(), |n| n.to_string());
            let message = format!(
                "{}: messages per hour {}, recipients per hour {}, new recipients per day {}",
                user.name,
                show(l.max_messages_per_hour),
                show(l.max_recipients_per_hour),
                show(l.max_new_recipients_per_day)
            );
            users.put(user);
            Ok(message)
        }),
        UserCommand::Import {
            file,
            skip_invalid,
            common,
        } => import(&common, &file, skip_invalid),
        UserCommand::AppPassword { command } => app_password(command),
    };
    result.unwrap_or_else(|code| code)
}

/// Clears the circuit breaker's mark in the users file (logins work again,
/// and a server started later sends the user's queued mail), then asks a
/// running server to let the held mail go now and restart the user's
/// counters.
fn release(common: &UserArgs, name: &str) -> Result<ExitCode, ExitCode> {
    let mut canonical = name.to_string();
    edit(common, |users| {
        let mut user = users
            .clone_user(name)
            .ok_or_else(|| format!("no user {name:?}"))?;
        canonical = user.name.clone();
        let message = match user.held.take() {
            Some(held) => format!(
                "released {} (held since {}: {})",
                user.name, held.since, held.reason
            ),
            None => format!("{} was not held", user.name),
        };
        users.put(user);
        Ok(message)
    })?;
    let Some(data_dir) = target(common)?.data_dir else {
        return Ok(ExitCode::SUCCESS);
    };
    let socket = crate::control::socket_path(&data_dir);
    let request = crate::control::ControlRequest::ReleaseUser { name: canonical };
    match crate::control::request(&socket, &request) {
        Ok(reply) => {
            let n = reply["affected"].as_u64().unwrap_or(0);
            println!("{n} queued message(s) released");
            Ok(ExitCode::SUCCESS)
        }
        Err(crate::control::ControlError::NotRunning(_)) => {
            println!("tern is not running: the queued mail goes at its next start");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(fail(
            EXIT_IOERR,
            &format!(
                "the hold mark is cleared, but the running server did not release the mail: {e}"
            ),
        )),
    }
}

/// Applies `change` under the users file's lock and prints its message.
fn edit(
    common: &UserArgs,
    change: impl FnOnce(&mut Users) -> Result<String, String>,
) -> Result<ExitCode, ExitCode> {
    let target = target(common)?;
    match Users::edit(&target.users_file, change) {
        Ok(Ok(message)) => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(message)) => Err(fail(EXIT_USAGE, &message)),
        Err(e) => Err(store_failed(&e)),
    }
}

fn add(
    common: &UserArgs,
    name: &str,
    addresses: Vec<String>,
    allowed_senders: Vec<String>,
) -> Result<ExitCode, ExitCode> {
    if !store::valid_name(name) {
        return Err(fail(
            EXIT_USAGE,
            &format!("{name:?} is not a valid login name (A-Z a-z 0-9 . _ - @ +, up to 128)"),
        ));
    }
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_lowercase()).collect();
    let allowed_senders: Vec<String> = allowed_senders.iter().map(|a| a.to_lowercase()).collect();
    if let Some(bad) = addresses
        .iter()
        .find(|a| a.starts_with('@') || !store::valid_sender_pattern(a))
    {
        return Err(fail(EXIT_USAGE, &format!("{bad:?} is not an address")));
    }
    if let Some(bad) = allowed_senders
        .iter()
        .find(|a| !store::valid_sender_pattern(a))
    {
        return Err(fail(
            EXIT_USAGE,
            &format!("{bad:?} is neither an address nor @domain"),
        ));
    }
    let target = target(common)?;
    // Fail before asking for a password the file cannot take.
    match Users::load(&target.users_file) {
        Ok(users) if users.get(name).is_some() => {
            return Err(fail(EXIT_USAGE, &format!("user {name:?} already exists")));
        }
        Ok(_) => {}
        Err(e) => return Err(store_failed(&e)),
    }
    let password = read_new_password()?;
    let salt = ScramSalt::random(target.params.scram_iterations);
    let (hash, keys) = hash_password(&password, &salt, target.params)?;
    let mut user = UserRecord::new(name);
    user.addresses = addresses;
    user.allowed_senders = allowed_senders;
    user.password = Some(hash);
    user.password_scram = keys;
    user.scram_salt = Some(salt);
    edit(common, |users| {
        if users.get(name).is_some() {
            return Err(format!("user {name:?} already exists"));
        }
        users.put(user);
        Ok(format!("added {name}"))
    })
}

fn hash_password(
    password: &str,
    salt: &ScramSalt,
    params: HashParams,
) -> Result<(secret::StoredHash, Option<secret::ScramKeys>), ExitCode> {
    let hash = secret::hash_secret(password, params)
        .map_err(|e| fail(EXIT_USAGE, &format!("cannot hash the password: {e}")))?;
    let keys = secret::scram_keys(password, salt);
    if keys.is_none() {
        eprintln!(
            "tern: note: this password has characters SASLprep (RFC 4013) refuses: it works \
             with PLAIN and LOGIN, not with SCRAM"
        );
    }
    Ok((hash, keys))
}

fn passwd(common: &UserArgs, name: &str) -> Result<ExitCode, ExitCode> {
    let target = target(common)?;
    let existing = match Users::load(&target.users_file) {
        Ok(users) => users.clone_user(name),
        Err(e) => return Err(store_failed(&e)),
    };
    let Some(existing) = existing else {
        return Err(fail(EXIT_USAGE, &format!("no user {name:?}")));
    };
    let password = read_new_password()?;
    // App passwords' keys were made with this salt: keep it.
    let salt = existing
        .scram_salt
        .clone()
        .unwrap_or_else(|| ScramSalt::random(target.params.scram_iterations));
    let (hash, keys) = hash_password(&password, &salt, target.params)?;
    edit(common, |users| {
        let mut user = users
            .clone_user(name)
            .ok_or_else(|| format!("no user {name:?}"))?;
        if user.scram_salt.as_ref().is_some_and(|s| *s != salt) {
            return Err("the user's SCRAM salt changed meanwhile; run passwd again".into());
        }
        user.password = Some(hash);
        user.password_scram = keys;
        user.scram_salt = Some(salt);
        let message = format!("password of {} changed", user.name);
        users.put(user);
        Ok(message)
    })
}

fn scheme_name(user: &UserRecord) -> &'static str {
    match user.password.as_ref().map(|p| p.scheme()) {
        Some(secret::Scheme::Argon2) => "argon2",
        Some(secret::Scheme::ShaCrypt) => "sha-crypt",
        None => "none",
    }
}

fn list(common: &UserArgs, as_json: bool) -> Result<ExitCode, ExitCode> {
    let target = target(common)?;
    let users = Users::load(&target.users_file).map_err(|e| store_failed(&e))?;
    if as_json {
        let rows: Vec<_> = users
            .iter()
            .map(|u| {
                json!({
                    "name": u.name,
                    "addresses": u.addresses,
                    "allowed_senders": u.allowed_senders,
                    "password": scheme_name(u),
                    "scram": u.password_scram.is_some(),
                    "held": u.held.as_ref().map(|h| json!({"reason": h.reason, "since": h.since})),
                    "app_passwords": u.app_passwords.iter().map(app_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        emit(&format!("{}\n", pretty(&json!(rows))));
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    for u in users.iter() {
        out.push_str(&u.name);
        if !u.addresses.is_empty() {
            out.push_str(&format!("  addresses={}", u.addresses.join(",")));
        }
        if !u.allowed_senders.is_empty() {
            out.push_str(&format!("  senders={}", u.allowed_senders.join(",")));
        }
        out.push_str(&format!(
            "  password={}  scram={}  app-passwords={}",
            scheme_name(u),
            if u.password_scram.is_some() {
                "yes"
            } else {
                "no"
            },
            u.app_passwords.len()
        ));
        if let Some(h) = &u.held {
            out.push_str(&format!(
                "  HELD since {}: {}",
                h.since,
                crate::control::render::sanitize(&h.reason)
            ));
        }
        out.push('\n');
    }
    if users.is_empty() {
        out.push_str(&format!("no users in {}\n", target.users_file.display()));
    }
    emit(&out);
    Ok(ExitCode::SUCCESS)
}

fn app_json(a: &AppPassword) -> serde_json::Value {
    json!({"label": a.label, "created": a.created, "scram": a.scram.is_some()})
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// Writes to stdout, ignoring a closed pipe (`tern user list | head`).
fn emit(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn import(common: &UserArgs, file: &Path, skip_invalid: bool) -> Result<ExitCode, ExitCode> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        fail(
            EXIT_NOINPUT,
            &format!("cannot read {}: {e}", file.display()),
        )
    })?;
    let (imported, errors) = parse_passwd_file(&text);
    for e in &errors {
        eprintln!("{}: {e}", file.display());
    }
    if !errors.is_empty() && !skip_invalid {
        return Err(fail(
            EXIT_USAGE,
            &format!(
                "{} bad line(s): nothing imported (--skip-invalid imports the others)",
                errors.len()
            ),
        ));
    }
    edit(common, |users| {
        let (mut added, mut updated) = (0, 0);
        for entry in imported {
            let mut user = match users.clone_user(&entry.name) {
                Some(u) => {
                    updated += 1;
                    u
                }
                None => {
                    added += 1;
                    UserRecord::new(&entry.name)
                }
            };
            user.password = Some(entry.hash);
            // The old keys belong to the old password; the imported hash
            // cannot give new ones.
            user.password_scram = None;
            users.put(user);
        }
        Ok(format!(
            "imported {added} new and {updated} existing user(s); they have no SCRAM keys \
             until `tern user passwd`"
        ))
    })
}

fn app_password(command: AppPasswordCommand) -> Result<ExitCode, ExitCode> {
    match command {
        AppPasswordCommand::Add {
            name,
            label,
            common,
        } => app_password_add(&common, &name, &label),
        AppPasswordCommand::List { name, json, common } => {
            let target = target(&common)?;
            let users = Users::load(&target.users_file).map_err(|e| store_failed(&e))?;
            let user = users
                .get(&name)
                .ok_or_else(|| fail(EXIT_USAGE, &format!("no user {name:?}")))?;
            if json {
                let rows: Vec<_> = user.app_passwords.iter().map(app_json).collect();
                emit(&format!("{}\n", pretty(&json!(rows))));
            } else if user.app_passwords.is_empty() {
                emit(&format!("{} has no app passwords\n", user.name));
            } else {
                let text: String = user
                    .app_passwords
                    .iter()
                    .map(|a| format!("{}  created {}\n", a.label, a.created))
                    .collect();
                emit(&text);
            }
            Ok(ExitCode::SUCCESS)
        }
        AppPasswordCommand::Revoke {
            name,
            label,
            common,
        } => edit(&common, |users| {
            let mut user = users
                .clone_user(&name)
                .ok_or_else(|| format!("no user {name:?}"))?;
            let before = user.app_passwords.len();
            user.app_passwords.retain(|a| a.label != label);
            if user.app_passwords.len() == before {
                return Err(format!("{} has no app password {label:?}", user.name));
            }
            let message = format!("revoked app password {label} of {}", user.name);
            users.put(user);
            Ok(message)
        }),
    }
}

fn app_password_add(common: &UserArgs, name: &str, label: &str) -> Result<ExitCode, ExitCode> {
    if !store::valid_label(label) {
        return Err(fail(
            EXIT_USAGE,
            &format!("{label:?} is not a valid label (A-Z a-z 0-9 . _ -, up to 64)"),
        ));
    }
    let target = target(common)?;
    let users = Users::load(&target.users_file).map_err(|e| store_failed(&e))?;
    let user = users
        .get(name)
        .ok_or_else(|| fail(EXIT_USAGE, &format!("no user {name:?}")))?;
    if user.app_password(label).is_some() {
        return Err(fail(
            EXIT_USAGE,
            &format!("{} already has an app password {label:?}", user.name),
        ));
    }
    let salt = user
        .scram_salt
        .clone()
        .unwrap_or_else(|| ScramSalt::random(target.params.scram_iterations));
    let taken: Vec<String> = user.app_passwords.iter().map(|a| a.id.clone()).collect();
    let password = loop {
        let candidate = secret::generate_app_password();
        if secret::app_password_id(&candidate).is_some_and(|id| !taken.iter().any(|t| t == id)) {
            break candidate;
        }
    };
    let id = secret::app_password_id(&password)
        .unwrap_or_default()
        .to_string();
    let (hash, keys) = hash_password(&password, &salt, target.params)?;
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let label_owned = label.to_string();
    let result = Users::edit(&target.users_file, |users| {
        let mut user = users
            .clone_user(name)
            .ok_or_else(|| format!("no user {name:?}"))?;
        if user.scram_salt.as_ref().is_some_and(|s| *s != salt) {
            return Err("the user's SCRAM salt changed meanwhile; try again".into());
        }
        if user.app_password(&label_owned).is_some()
            || user.app_passwords.iter().any(|a| a.id == id)
        {
            return Err(format!(
                "{} got an app password {label_owned:?} meanwhile",
                user.name
            ));
        }
        user.scram_salt = Some(salt);
        user.app_passwords.push(AppPassword {
            label: label_owned.clone(),
            id,
            created,
            hash,
            scram: keys,
        });
        let name = user.name.clone();
        users.put(user);
        Ok(name)
    });
    match result {
        Ok(Ok(user)) => {
            emit(&format!("{password}\n"));
            eprintln!(
                "app password {label} of {user}: shown once, not stored in clear; valid for SMTP \
                 submission only"
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(message)) => Err(fail(EXIT_USAGE, &message)),
        Err(e) => Err(store_failed(&e)),
    }
}

/// The new password: typed twice without echo on a terminal, else the
/// first line of stdin.
fn read_new_password() -> Result<String, ExitCode> {
    let password = if io::stdin().is_terminal() {
        let first = prompt_hidden("New password: ")
            .map_err(|e| fail(EXIT_IOERR, &format!("cannot read the password: {e}")))?;
        let second = prompt_hidden("Again: ")
            .map_err(|e| fail(EXIT_IOERR, &format!("cannot read the password: {e}")))?;
        if first != second {
            return Err(fail(
                EXIT_USAGE,
                "the two passwords differ; nothing changed",
            ));
        }
        first
    } else {
        let mut line = String::new();
        io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| fail(EXIT_IOERR, &format!("cannot read the password: {e}")))?;
        let line = trim_line_end(line);
        if line.is_empty() {
            return Err(fail(
                EXIT_USAGE,
                "no password: stdin is not a terminal and its first line is empty",
            ));
        }
        line
    };
    check_new_password(&password).map_err(|m| fail(EXIT_USAGE, &m))?;
    Ok(password)
}

fn trim_line_end(mut line: String) -> String {
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    line
}

/// What a new account password must be.
pub fn check_new_password(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(format!(
            "the password must have at least {MIN_PASSWORD_LEN} characters; nothing changed"
        ));
    }
    if password.len() > super::sasl::MAX_SECRET_LEN {
        return Err(format!(
            "the password must have at most {} bytes; nothing changed",
            super::sasl::MAX_SECRET_LEN
        ));
    }
    if password.chars().any(char::is_control) {
        return Err("the password must not contain control characters; nothing changed".into());
    }
    Ok(())
}

/// Reads a line from the terminal on stdin with echo off.
fn prompt_hidden(prompt: &str) -> io::Result<String> {
    eprint!("{prompt}");
    let _ = io::stderr().flush();
    // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(0, &mut term) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let original = term;
    term.c_lflag &= !libc::ECHO;
    term.c_lflag |= libc::ECHONL;
    // SAFETY: sets fd 0's attributes from a termios tcgetattr filled.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &term) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut line = String::new();
    let read = io::stdin().lock().read_line(&mut line);
    // SAFETY: restores the attributes read above.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &original) };
    read?;
    Ok(trim_line_end(line))
}
