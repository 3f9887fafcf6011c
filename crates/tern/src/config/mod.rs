//! Configuration: the TOML schema, the embedded default, and validation into
//! a [`Runtime`], the immutable snapshot every other part of the daemon reads.
//!
//! Invariants: a `Runtime` only exists if every key validated; all addresses
//! and domains in it are lower-cased (lookups are case-insensitive, RFC 5321
//! §2.4 lets us treat local parts case-insensitively for our own domains);
//! every alias target resolves to a user, a local address or a remote address.
//!
//! Not here: recipient resolution (`recipients.rs`), runtime reload.
//!
//! Errors: [`load`] and [`Runtime::from_file_config`] return every problem
//! found, each naming its key, so `tern check-config` can print them all at once.

mod auth;
mod dkim;
mod locate;
mod metrics;
mod outbound;
mod recipients;
mod schema;
mod sendmail;
mod server;
mod submission;
mod validate;

pub use auth::{AuthConfig, users_file_of};
pub use dkim::DkimSettings;
pub use outbound::OutboundSettings;
use recipients::MAX_ALIAS_DEPTH;
pub use recipients::{Destination, Resolution};
pub use schema::{FileConfig, LimitsConfig, ListenerConfig, LogConfig};
pub use sendmail::{SenderRule, SendmailSettings, default_socket, sendmail_settings_of};
pub use server::{DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, MailboxAccess, RunAs};
/// Shared with route parsing, so a route names hosts by the same rules.
pub(crate) use validate::valid_domain;
use validate::*;

use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_proto::{BareLfPolicy, NulPolicy};

/// The listener's job. Only `mx` (port 25 style: anyone may send to our
/// domains, nobody may relay unless trusted) exists so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Mail from other servers (port 25): STARTTLS offered, no AUTH.
    Mx,
    /// Mail from users' programs (RFC 6409, port 587): STARTTLS, then AUTH.
    Submission,
    /// Submission over implicit TLS (RFC 8314, port 465).
    Smtps,
    /// `tern sendmail` on this host, over the local submission socket
    /// (`[sendmail]`); not a listener role.
    Local,
}

impl Role {
    /// The config's name of each role, in the order `check-config` lists them.
    pub const NAMES: [(&'static str, Role); 3] = [
        ("mx", Role::Mx),
        ("submission", Role::Submission),
        ("smtps", Role::Smtps),
    ];

    /// TLS starts with the connection, before the greeting.
    pub fn implicit_tls(self) -> bool {
        self == Role::Smtps
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Role::Local => "local",
            _ => Role::NAMES
                .iter()
                .find(|(_, r)| *r == *self)
                .map_or("?", |(n, _)| n),
        };
        f.write_str(name)
    }
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: SocketAddr,
    pub role: Role,
}

/// A local mailbox owner.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// First configured address, or `name@<first local domain>`; used as the
    /// `Delivered-To:` address when the user is reached by name.
    pub primary_address: String,
    pub maildir: PathBuf,
    /// Who owns the Maildir's folders and files, and their modes.
    pub access: MailboxAccess,
}

/// One configuration problem, tied to the key that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
    /// The line of the config file it is about, when it can be told.
    pub line: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}: {} (line {line})", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Limits after validation, in the units the code uses.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: usize,
    pub max_rejected_recipients: usize,
    pub max_junk_commands: usize,
    pub max_received_headers: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub greeting_delay: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub min_free_space: u64,
    pub bare_lf: BareLfPolicy,
    pub nul: NulPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub segment_size: u64,
    pub draft_memory_limit: usize,
    pub commit_wait: Duration,
}

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Most messages handed to the local delivery agent in one batch (their
    /// fsyncs and the `new/` directory syncs are shared).
    pub batch_size: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// A recipient still undelivered this long after arrival fails.
    pub give_up: Duration,
    /// A recipient still deferred this long after arrival is reported to
    /// the sender once; `None`: never.
    pub delay_notice: Option<Duration>,
}

/// The configuration in force, replaced whole by a reload: readers take a
/// snapshot (`load_full`) and keep it for a session or a delivery batch, so
/// no reader ever sees half of one config and half of another.
pub type LiveRuntime = arc_swap::ArcSwap<Runtime>;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub hostname: String,
    pub data_dir: PathBuf,
    /// `[server]`: the account to drop to when started as root.
    pub run_as: Option<RunAs>,
    pub listeners: Vec<Listener>,
    pub local_domains: HashSet<String>,
    pub users: HashMap<String, User>,
    /// Lower-cased address → user name.
    pub addresses: HashMap<String, String>,
    /// Lower-cased address → raw targets (user names or addresses).
    pub aliases: HashMap<String, Vec<String>>,
    pub subaddress_separator: Option<char>,
    pub postmaster: String,
    /// Domain → user receiving unknown local parts.
    pub catch_all: HashMap<String, String>,
    pub trusted_networks: Vec<IpNet>,
    pub limits: Limits,
    pub spool: SpoolSettings,
    pub delivery: DeliverySettings,
    pub outbound: OutboundSettings,
    /// Certificates offered by STARTTLS and implicit TLS; empty: a
    /// self-signed one kept in `<data_dir>/tls/`.
    pub tls_certificates: Vec<CertificateFiles>,
    pub dkim: DkimSettings,
    pub log: LogConfig,
    /// `[auth]`: the users file and the login limits.
    pub auth: crate::auth::AuthSettings,
    /// What submission listeners offer in EHLO, strongest first (SCRAM-PLUS
    /// included: the engine offers it over TLS only).
    pub auth_mechanisms: std::sync::Arc<[String]>,
    /// `[submission]`: per-user egress limits and the circuit breaker.
    pub egress: crate::egress::EgressLimits,
    /// `submission.received_client_address`: whether the `Received:` field
    /// of an authenticated user's mail names their client.
    pub received_client_address: bool,
    /// `metrics.address`: where `GET /metrics` is served; `None`: off.
    pub metrics: Option<SocketAddr>,
    /// `[sendmail]`: the local submission socket.
    pub sendmail: SendmailSettings,
}

impl Runtime {
    /// `limits.max_message_size` lowered to what the spool can store under
    /// the process's file-size limit (`None`: it was within it already).
    pub fn fit_to_storage(&mut self) -> Option<u64> {
        let largest = crate::spool::largest_storable_message()?;
        (self.limits.max_message_size > largest).then(|| {
            self.limits.max_message_size = largest;
            largest
        })
    }

    /// Domains (and addresses) are compared in one case form everywhere:
    /// `str::to_lowercase`, which also folds non-ASCII (U-label) domains.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domains.contains(&domain.to_lowercase())
    }

    /// RFC 5321 §3.6.2: relaying is for clients we know. Loopback is trusted
    /// only when configured, so a local proxy cannot turn us into an open relay.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted_networks.iter().any(|net| net.contains(&ip))
    }

    /// The protocol engine's settings for a session on a listener of `role`
    /// with a client at `peer`. `mx` never offers AUTH (RFC 6409 §3.1:
    /// submission is a separate service); submission roles offer it over
    /// TLS only, or also in plain text to loopback clients when
    /// `auth.plaintext_on_loopback` says so, and require it before MAIL.
    pub fn server_config_for(&self, role: Role, peer: IpAddr) -> tern_proto::ServerConfig {
        // A local user's program: no TLS to offer over a Unix socket, and
        // the kernel's peer credentials stand in for AUTH.
        // Its content is what scripts print: a bare CR from a progress bar
        // (curl, wget, rsync) or a NUL would cost cron its whole report, and
        // nothing on our own host smuggles, so they are mended, not refused
        // (Postfix's sendmail keeps such mail too).
        if role == Role::Local {
            return tern_proto::ServerConfig {
                bare_lf: BareLfPolicy::Normalize,
                nul: NulPolicy::Strip,
                ..self.server_config()
            };
        }
        let submission = role != Role::Mx;
        tern_proto::ServerConfig {
            // There is always a certificate (a self-signed one by default);
            // implicit TLS has it already.
            starttls: !role.implicit_tls(),
            auth_mechanisms: if submission {
                self.auth_mechanisms.clone()
            } else {
                Default::default()
            },
            auth_without_tls: submission
                && self.auth.plaintext_on_loopback
                && canonical_ip(peer).is_loopback(),
            require_auth: submission,
            ..self.server_config()
        }
    }

    /// The protocol engine's settings shared by every listener.
    pub fn server_config(&self) -> tern_proto::ServerConfig {
        tern_proto::ServerConfig {
            hostname: self.hostname.clone(),
            greeting_text: "ESMTP Tern".to_string(),
            max_command_line: self.limits.max_command_line,
            max_text_line: self.limits.max_text_line,
            max_message_size: self.limits.max_message_size,
            max_recipients: self.limits.max_recipients,
            max_errors: self.limits.max_errors,
            max_rejected_recipients: self.limits.max_rejected_recipients,
            max_junk_commands: self.limits.max_junk_commands,
            max_received_headers: self.limits.max_received_headers,
            bare_lf: self.limits.bare_lf,
            nul: self.limits.nul,
            // No STARTTLS and no AUTH yet: the session driver does not run
            // them (the engine's defaults keep the old EHLO reply).
            ..tern_proto::ServerConfig::default()
        }
    }
}

/// A client address in the form policy and headers use: an IPv4 client seen
/// on a dual-stack socket (`::ffff:192.0.2.1`) is the IPv4 client it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A tracing filter whose every directive names a level: `info`,
/// `tern=debug`, `warn,tern::queue=trace`. A bare word that is not a level
/// (`warning`, a typo) is a valid filter to tracing, meaning "everything
/// from a module of that name": it would silently turn all logging off.
fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    !filter.trim().is_empty()
        && filter
            .split(',')
            .all(|directive| match directive.rsplit_once('=') {
                Some((target, level)) => !target.trim().is_empty() && is_level(level),
                None => is_level(directive),
            })
        && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Runtime, Vec<ConfigError>> {
    load_with(path, KeyFiles::Check)
}

/// Whether validation loads the TLS certificate and key files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFiles {
    /// Load each (check-config, start-up): a server that starts can offer them.
    Check,
    /// Leave them to the caller: a reload, running as `server.user`, may
    /// not be able to read keys that root read at start-up, and decides
    /// itself what that means.
    Skip,
}

/// [`load`], with the certificate files loaded or not.
pub fn load_with(path: &Path, keys: KeyFiles) -> Result<Runtime, Vec<ConfigError>> {
    let (text, base) = read_file(path)?;
    parse_with(&text, &base, keys)
}

/// A config file's text and the directory its relative paths are relative
/// to, made absolute so nothing depends on the working directory later.
pub(crate) fn read_file(path: &Path) -> Result<(String, PathBuf), Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            key: path.display().to_string(),
            message: format!("cannot read config file: {e}"),
            line: None,
        }]
    })?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
    Ok((text, base))
}

/// Parses TOML text; relative paths in it are taken relative to `base`.
/// Every error is reported, TOML syntax and unknown keys included, each
/// with its line where it can be told (see `locate`).
pub fn parse(text: &str, base: &Path) -> Result<Runtime, Vec<ConfigError>> {
    parse_with(text, base, KeyFiles::Check)
}

/// [`parse`], with the certificate files loaded or not.
pub fn parse_with(text: &str, base: &Path, keys: KeyFiles) -> Result<Runtime, Vec<ConfigError>> {
    let (file, mut errors) = locate::deserialize_all(text);
    let checked = file.map(|file| Runtime::from_file_config_with(file, base, keys));
    match checked {
        Some(Ok(runtime)) if errors.is_empty() => return Ok(runtime),
        Some(Err(more)) => errors.extend(more.into_iter().map(|mut e| {
            e.line = e.line.or_else(|| locate::line_of_key(text, &e.key));
            e
        })),
        _ => {}
    }
    Err(errors)
}

fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().replace('\n', " ");
    let key = e
        .span()
        .map(|span| key_at(text, span.start))
        .unwrap_or_else(|| "toml".to_string());
    ConfigError {
        key,
        message,
        line: e.span().map(|span| locate::line_at(text, span.start)),
    }
}

/// The dotted key whose value starts at byte `offset` of `text`: the key on
/// that line, prefixed by the nearest `[section]` above it. serde's type
/// errors only carry a byte span, and an administrator wants the key.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return format!("line {}", locate::line_at(text, line_start));
    };
    let key = key.trim().trim_matches('"');
    let section = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_string(),
    }
}

/// Each configured certificate must load, with a key that belongs to it:
/// a server that starts must be able to offer it.
fn check_tls(
    file: &FileConfig,
    base: &Path,
    keys: KeyFiles,
    errors: &mut Errors,
) -> Vec<CertificateFiles> {
    let mut out = Vec::new();
    for (i, c) in file.tls.certificates.iter().enumerate() {
        let files = CertificateFiles {
            cert: absolute(base, &c.cert),
            key: absolute(base, &c.key),
        };
        if keys == KeyFiles::Check
            && let Err(e) = crate::tls::check(&files)
        {
            errors.push(format!("tls.certificates[{i}]"), e);
        }
        out.push(files);
    }
    out
}

/// `spool.commit_wait` beyond this would add more to every answer than a
/// disk sync ever costs.
const MAX_COMMIT_WAIT: Duration = Duration::from_millis(50);

/// The configuration used when `tern serve` gets no `--config`: it works on a
/// fresh machine without root, on loopback only.
pub const EMBEDDED_DEFAULT: &str = r#"
hostname = "localhost"
data_dir = "tern-data"

[local]
domains = ["localhost"]
postmaster = "me"

[[user]]
name = "me"
addresses = ["me@localhost"]

[metrics]
address = "127.0.0.1:9525"
"#;

/// Runtime for the embedded default, with `data_dir` relative to the
/// current working directory.
pub fn embedded_default() -> Result<Runtime, Vec<ConfigError>> {
    let (text, base) = config_text(None)?;
    parse(&text, &base)
}

/// The text of `config` (or of the embedded default, whose relative paths
/// are relative to the current directory) and the directory its relative
/// paths are relative to.
pub(crate) fn config_text(config: Option<&Path>) -> Result<(String, PathBuf), Vec<ConfigError>> {
    match config {
        Some(path) => read_file(path),
        None => {
            let cwd = std::env::current_dir().map_err(|e| {
                vec![ConfigError {
                    key: "data_dir".into(),
                    message: format!("cannot read the current directory: {e}"),
                    line: None,
                }]
            })?;
            Ok((EMBEDDED_DEFAULT.to_string(), cwd))
        }
    }
}

impl Runtime {
    /// Validates a parsed file; returns every error found.
    pub fn from_file_config(file: FileConfig, base: &Path) -> Result<Runtime, Vec<ConfigError>> {
        Runtime::from_file_config_with(file, base, KeyFiles::Check)
    }

    /// [`Runtime::from_file_config`], with the certificate files loaded or not.
    pub fn from_file_config_with(
        mut file: FileConfig,
        base: &Path,
        keys: KeyFiles,
    ) -> Result<Runtime, Vec<ConfigError>> {
        apply_defaults(&mut file);
        let mut errors = Errors(Vec::new());
        let hostname = file.hostname.clone().unwrap_or_else(system_hostname);
        if !valid_domain(&hostname) {
            errors.push("hostname", format!("{hostname:?} is not a valid host name"));
        }
        let data_dir = absolute(
            base,
            file.data_dir.as_deref().unwrap_or(Path::new("tern-data")),
        );

        let run_as = server::check_server(&file, &mut errors);
        let mailbox = server::check_mailbox(&file, &mut errors);
        let listeners = check_listeners(&file, &mut errors);
        let local_domains = check_domains(&file, &mut errors);
        let first_domain = file.local.domains.first().map(|d| d.to_lowercase());
        let (users, addresses) = check_users(
            &file,
            &data_dir,
            base,
            first_domain,
            &local_domains,
            mailbox,
            &mut errors,
        );
        let aliases = check_aliases(&file, &users, &local_domains, &mut errors);

        let postmaster = match &file.local.postmaster {
            Some(name) => {
                if !users.contains_key(name) {
                    errors.push(
                        "local.postmaster",
                        format!("{name:?} is not a configured [[user]]"),
                    );
                }
                name.clone()
            }
            None => file
                .user
                .first()
                .map(|u| u.name.clone())
                .unwrap_or_default(),
        };
        if postmaster.is_empty() {
            errors.push(
                "user",
                "at least one [[user]] is needed: postmaster mail must be deliverable (RFC 5321 §4.5.1)",
            );
        }
        let mut catch_all = HashMap::new();
        for (domain, user) in &file.local.catch_all {
            let domain = domain.to_lowercase();
            if !local_domains.contains(&domain) {
                errors.push(
                    format!("local.catch_all.{domain}"),
                    "not one of local.domains",
                );
            }
            if !users.contains_key(user) {
                errors.push(
                    format!("local.catch_all.{domain}"),
                    format!("{user:?} is not a configured [[user]]"),
                );
            }
            catch_all.insert(domain, user.clone());
        }
        let subaddress_separator = check_separator(&file, &mut errors);

        let mut trusted_networks = Vec::new();
        for (i, net) in file.relay.trusted_networks.iter().enumerate() {
            match parse_network(net) {
                Some(n) => trusted_networks.push(n),
                None => errors.push(
                    format!("relay.trusted_networks[{i}]"),
                    format!("{net:?} is not an IP network (e.g. \"192.0.2.0/24\", \"::1/128\")"),
                ),
            }
        }

        let limits = check_limits(&file.limits, &mut errors);
        let spool_dir = file
            .spool
            .dir
            .as_deref()
            .map(|d| absolute(base, d))
            .unwrap_or_else(|| data_dir.join("spool"));
        if file.spool.segment_size < 1024 * 1024 {
            errors.push("spool.segment_size", "must be at least 1048576 (1 MiB)");
        }
        validate::at_most(
            &mut errors,
            "spool.segment_size",
            file.spool.segment_size,
            4 << 30,
        );
        validate::at_most(
            &mut errors,
            "spool.draft_memory_limit",
            u64::try_from(file.spool.draft_memory_limit).unwrap_or(u64::MAX),
            1 << 30,
        );
        let spool = SpoolSettings {
            dir: spool_dir,
            segment_size: file.spool.segment_size,
            draft_memory_limit: file.spool.draft_memory_limit,
            commit_wait: validate::duration(
                &mut errors,
                "spool.commit_wait",
                &file.spool.commit_wait,
                Duration::ZERO,
                MAX_COMMIT_WAIT,
            ),
        };
        let delivery = check_delivery(&file, &mut errors);
        let outbound = outbound::check_outbound(&file, base, &mut errors);
        let tls_certificates = check_tls(&file, base, keys, &mut errors);
        let dkim = dkim::check_dkim(&file, &data_dir, base, &local_domains, &mut errors);
        let auth = auth::check_auth(&file.auth, base, &data_dir, &mut errors);
        let egress = submission::check_submission(&file, &mut errors);
        let metrics = metrics::check_metrics(&file, &listeners, &mut errors);
        let sendmail = sendmail::check_sendmail(&file, base, &data_dir, &mut errors);
        if !matches!(file.log.format.as_str(), "text" | "json") {
            errors.push("log.format", "must be \"text\" or \"json\"");
        }
        if !is_log_filter(&file.log.level) {
            errors.push(
                "log.level",
                format!(
                    "{:?} is not a tracing filter (e.g. \"info\")",
                    file.log.level
                ),
            );
        }

        if !errors.0.is_empty() {
            return Err(errors.0);
        }
        let runtime = Runtime {
            hostname,
            data_dir,
            run_as,
            listeners,
            local_domains,
            users,
            addresses,
            aliases,
            subaddress_separator,
            postmaster,
            catch_all,
            trusted_networks,
            limits,
            spool,
            delivery,
            outbound,
            tls_certificates,
            dkim,
            log: file.log,
            auth_mechanisms: crate::auth::Accounts::mechanisms(true)
                .into_iter()
                .map(str::to_string)
                .collect(),
            auth,
            egress,
            received_client_address: file.submission.received_client_address,
            metrics,
            sendmail,
        };
        // Each target must lead somewhere: a loop, a chain deeper than the
        // expansion allows or a local address nobody owns would otherwise
        // show only at RCPT time, as "User unknown".
        for (alias, target) in runtime.dead_alias_targets() {
            errors.push(
                format!("aliases.{alias:?}"),
                format!("target {target:?} reaches no mailbox (an alias loop, a chain deeper than {MAX_ALIAS_DEPTH} aliases, or a local address no user has)"),
            );
        }
        if !errors.0.is_empty() {
            return Err(errors.0);
        }
        Ok(runtime)
    }
}

/// What an empty file means: the embedded default's listener, domain and
/// user, so every key is optional and a minimal file is a working server.
#[cfg(test)]
mod tests;
