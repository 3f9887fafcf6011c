//! Validation of the parsed file, key by key: each `check_*` turns one
//! section into its runtime form and records every problem with its key
//! (nothing stops at the first error, so `tern check-config` lists them all).
//! Also the defaults an empty file gets.

use super::schema::{FileConfig, LimitsConfig, ListenerConfig, UserConfig};
use super::{ConfigError, DeliverySettings, Limits, Listener, Role, User};
use ipnet::IpNet;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_proto::{BareLfPolicy, NulPolicy};

pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            message: message.into(),
            line: None,
        });
    }
}

/// Parses a duration that must lie in `min..=max` (bounded so that no
/// deadline arithmetic can overflow and no typo parks a session for years).
pub(super) fn duration(
    errors: &mut Errors,
    key: &str,
    value: &str,
    min: Duration,
    max: Duration,
) -> Duration {
    match humantime::parse_duration(value) {
        Ok(d) if (min..=max).contains(&d) => d,
        Ok(_) => {
            errors.push(
                key,
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
            min
        }
        Err(e) => {
            errors.push(
                key,
                format!("invalid duration {value:?}: {e} (examples: \"300ms\", \"5m\")"),
            );
            min
        }
    }
}

pub(super) const SECOND: Duration = Duration::from_secs(1);
pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);

/// The largest message we accept: bodies are held in memory for delivery and
/// a spool record's length is 32 bits.
pub(super) const MAX_MESSAGE_SIZE: u64 = 1024 * 1024 * 1024;

/// Checks `domain` is a plausible DNS name (RFC 1035 letters-digits-hyphen labels).
pub(crate) fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

pub(super) fn split_address(address: &str) -> Option<(&str, &str)> {
    let (local, domain) = address.rsplit_once('@')?;
    (!local.is_empty() && valid_domain(domain)).then_some((local, domain))
}

/// The listeners of a config that names none: loopback only, unprivileged
/// ports, one per role.
const DEFAULT_LISTENERS: [(&str, &str); 3] = [
    ("127.0.0.1:2525", "mx"),
    ("127.0.0.1:5587", "submission"),
    ("127.0.0.1:5465", "smtps"),
];

pub(super) fn apply_defaults(file: &mut FileConfig) {
    if file.listener.is_empty() {
        for (address, role) in DEFAULT_LISTENERS {
            file.listener.push(ListenerConfig {
                address: address.into(),
                role: role.into(),
            });
        }
    }
    if file.local.domains.is_empty() {
        file.local.domains.push("localhost".into());
    }
    if file.user.is_empty() {
        let domain = file.local.domains[0].to_lowercase();
        file.user.push(UserConfig {
            name: "me".into(),
            addresses: vec![format!("me@{domain}")],
            maildir: None,
            owner: None,
            group: None,
        });
    }
}

pub(super) fn system_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| valid_domain(h))
        .unwrap_or_else(|| "localhost".to_string())
}

pub(super) fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

pub(super) fn parse_network(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

pub(super) fn check_listeners(file: &FileConfig, errors: &mut Errors) -> Vec<Listener> {
    if file.listener.is_empty() {
        errors.push("listener", "at least one [[listener]] is needed");
    }
    let mut out = Vec::new();
    for (i, l) in file.listener.iter().enumerate() {
        let address = l.address.parse::<SocketAddr>();
        if address.is_err() {
            errors.push(
                format!("listener[{i}].address"),
                format!(
                    "{:?} is not IP:port (e.g. \"127.0.0.1:2525\", \"[::1]:2525\")",
                    l.address
                ),
            );
        }
        let role = Role::NAMES
            .iter()
            .find(|(name, _)| *name == l.role)
            .map(|(_, role)| *role);
        if role.is_none() {
            let known: Vec<String> = Role::NAMES.iter().map(|(n, _)| format!("{n:?}")).collect();
            errors.push(
                format!("listener[{i}].role"),
                format!(
                    "{:?} is not a known role (known: {})",
                    l.role,
                    known.join(", ")
                ),
            );
        }
        if let (Ok(address), Some(role)) = (address, role) {
            out.push(Listener { address, role });
        }
    }
    out
}

pub(super) fn check_domains(file: &FileConfig, errors: &mut Errors) -> HashSet<String> {
    let mut set = HashSet::new();
    if file.local.domains.is_empty() {
        errors.push("local.domains", "at least one local domain is needed");
    }
    for (i, d) in file.local.domains.iter().enumerate() {
        if !valid_domain(d) {
            errors.push(
                format!("local.domains[{i}]"),
                format!("{d:?} is not a valid domain"),
            );
        }
        set.insert(d.to_lowercase());
    }
    set
}

pub(super) type UserMaps = (HashMap<String, User>, HashMap<String, String>);

pub(super) fn check_users(
    file: &FileConfig,
    data_dir: &Path,
    base: &Path,
    first_domain: Option<String>,
    local_domains: &HashSet<String>,
    mailbox: super::MailboxAccess,
    errors: &mut Errors,
) -> UserMaps {
    let mut users = HashMap::new();
    let mut addresses = HashMap::new();
    for (i, u) in file.user.iter().enumerate() {
        let key = format!("user[{i}]");
        let name_ok = !u.name.is_empty()
            && u.name.len() <= 64
            && u.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && !u.name.starts_with('.');
        if !name_ok {
            // The name becomes a directory under data_dir: no separators, no dot-dot.
            errors.push(
                format!("{key}.name"),
                format!(
                    "{:?} must be 1-64 of [A-Za-z0-9._-], not starting with '.'",
                    u.name
                ),
            );
            continue;
        }
        if users.contains_key(&u.name) {
            errors.push(
                format!("{key}.name"),
                format!("duplicate user {:?}", u.name),
            );
            continue;
        }
        for (j, a) in u.addresses.iter().enumerate() {
            let lower = a.to_lowercase();
            match split_address(&lower) {
                Some((_, domain)) if local_domains.contains(domain) => {}
                Some(_) => errors.push(
                    format!("{key}.addresses[{j}]"),
                    format!("{a:?} is not in a local domain"),
                ),
                None => {
                    errors.push(
                        format!("{key}.addresses[{j}]"),
                        format!("{a:?} is not local@domain"),
                    );
                    continue;
                }
            }
            if let Some(other) = addresses.insert(lower, u.name.clone()) {
                errors.push(
                    format!("{key}.addresses[{j}]"),
                    format!("{a:?} already belongs to user {other:?}"),
                );
            }
        }
        let primary_address = u
            .addresses
            .first()
            .map(|a| a.to_lowercase())
            .unwrap_or_else(|| {
                format!(
                    "{}@{}",
                    u.name.to_lowercase(),
                    first_domain.clone().unwrap_or_default()
                )
            });
        let maildir = u
            .maildir
            .as_deref()
            .map(|m| absolute(base, m))
            .unwrap_or_else(|| data_dir.join("mail").join(&u.name).join("Maildir"));
        users.insert(
            u.name.clone(),
            User {
                name: u.name.clone(),
                primary_address,
                maildir,
                access: super::server::user_access(mailbox, u, &key, errors),
            },
        );
    }
    (users, addresses)
}

pub(super) fn check_aliases(
    file: &FileConfig,
    users: &HashMap<String, User>,
    local_domains: &HashSet<String>,
    errors: &mut Errors,
) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for (alias, targets) in &file.aliases {
        let key = format!("aliases.{alias:?}");
        let lower = alias.to_lowercase();
        match split_address(&lower) {
            Some((_, domain)) if local_domains.contains(domain) => {}
            _ => {
                errors.push(&key, "an alias must be an address in one of local.domains");
                continue;
            }
        }
        if targets.is_empty() {
            errors.push(&key, "an alias needs at least one target");
        }
        for t in targets {
            let ok = if t.contains('@') {
                split_address(t).is_some()
            } else {
                users.contains_key(t.as_str())
            };
            if !ok {
                errors.push(
                    &key,
                    format!("target {t:?} is neither a configured user nor local@domain"),
                );
            }
        }
        out.insert(
            lower,
            targets
                .iter()
                .map(|t| {
                    if t.contains('@') {
                        t.to_lowercase()
                    } else {
                        t.clone()
                    }
                })
                .collect(),
        );
    }
    out
}

pub(super) fn check_separator(file: &FileConfig, errors: &mut Errors) -> Option<char> {
    let sep = &file.local.subaddress_separator;
    let mut chars = sep.chars();
    match (chars.next(), chars.next()) {
        (None, _) => None,
        (Some(c), None) if c.is_ascii_punctuation() && c != '@' && c != '"' => Some(c),
        _ => {
            errors.push(
                "local.subaddress_separator",
                "must be one ASCII punctuation character (e.g. \"+\"), or \"\" to disable",
            );
            None
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// Reports `key` when `value` is above `max`. Every count and size has an
/// upper bound: a value far past anything useful is a typo, and unchecked
/// it overflows the arithmetic built on it.
pub(super) fn at_most(errors: &mut Errors, key: &str, value: u64, max: u64) {
    if value > max {
        errors.push(key, format!("must be at most {max}"));
    }
}

/// The value named by `value` among two `choices`; anything else is
/// reported under `key`, and the first choice (the default) stands in.
fn one_of<T: Copy>(errors: &mut Errors, key: &str, value: &str, choices: [(&str, T); 2]) -> T {
    match choices.iter().find(|(name, _)| *name == value) {
        Some(&(_, chosen)) => chosen,
        None => {
            let [(a, default), (b, _)] = choices;
            errors.push(key, format!("must be \"{a}\" or \"{b}\""));
            default
        }
    }
}

pub(super) fn check_limits(l: &LimitsConfig, errors: &mut Errors) -> Limits {
    let as_u64 = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    for (key, value, max) in [
        ("limits.max_command_line", as_u64(l.max_command_line), MIB),
        ("limits.max_text_line", as_u64(l.max_text_line), MIB),
        ("limits.max_message_size", l.max_message_size, 1 << 40),
        ("limits.max_recipients", as_u64(l.max_recipients), 100_000),
        ("limits.max_errors", as_u64(l.max_errors), 1_000_000),
        (
            "limits.max_rejected_recipients",
            as_u64(l.max_rejected_recipients),
            1_000_000,
        ),
        (
            "limits.max_junk_commands",
            as_u64(l.max_junk_commands),
            1_000_000,
        ),
        (
            "limits.max_received_headers",
            as_u64(l.max_received_headers),
            1_000,
        ),
        (
            "limits.max_connections",
            as_u64(l.max_connections),
            1_000_000,
        ),
        (
            "limits.max_connections_per_ip",
            as_u64(l.max_connections_per_ip),
            1_000_000,
        ),
    ] {
        at_most(errors, key, value, max);
    }
    if l.max_received_headers < 1 {
        errors.push(
            "limits.max_received_headers",
            "must be at least 1 (RFC 5321 §6.3 asks for at least 100)",
        );
    }
    if l.max_command_line < 512 {
        // RFC 5321 §4.5.3.1.4: a command line may be 512 octets.
        errors.push(
            "limits.max_command_line",
            "must be at least 512 (RFC 5321 §4.5.3.1.4)",
        );
    }
    if l.max_text_line != 0 && l.max_text_line < 1000 {
        errors.push(
            "limits.max_text_line",
            "must be 0 (no limit) or at least 1000 (RFC 5321 §4.5.3.1.6)",
        );
    }
    if l.max_recipients < 1 {
        errors.push(
            "limits.max_recipients",
            "must be at least 1 (RFC 5321 §4.5.3.1.8 asks for 100)",
        );
    }
    if l.max_errors < 1 {
        errors.push("limits.max_errors", "must be at least 1");
    }
    if l.max_rejected_recipients < 1 {
        errors.push("limits.max_rejected_recipients", "must be at least 1");
    }
    if l.max_junk_commands < 1 {
        errors.push("limits.max_junk_commands", "must be at least 1");
    }
    if l.max_connections < 1 {
        errors.push("limits.max_connections", "must be at least 1");
    }
    if l.max_connections_per_ip < 1 {
        errors.push("limits.max_connections_per_ip", "must be at least 1");
    }
    let bare_lf = one_of(
        errors,
        "limits.bare_lf",
        &l.bare_lf,
        [
            ("reject", BareLfPolicy::Reject),
            ("normalize", BareLfPolicy::Normalize),
        ],
    );
    let nul = one_of(
        errors,
        "limits.nul",
        &l.nul,
        [("reject", NulPolicy::Reject), ("strip", NulPolicy::Strip)],
    );
    if !(1..=MAX_MESSAGE_SIZE).contains(&l.max_message_size) {
        errors.push(
            "limits.max_message_size",
            format!("must be between 1 and {MAX_MESSAGE_SIZE} (1 GiB)"),
        );
    }
    let command_timeout = duration(
        errors,
        "limits.command_timeout",
        &l.command_timeout,
        SECOND,
        DAY,
    );
    let data_timeout = duration(errors, "limits.data_timeout", &l.data_timeout, SECOND, DAY);
    // Clients give up waiting for a greeting after a while.
    let greeting_delay = duration(
        errors,
        "limits.greeting_delay",
        &l.greeting_delay,
        Duration::ZERO,
        Duration::from_secs(30),
    );
    let min_free_space = l.min_free_space.unwrap_or_else(|| {
        l.max_message_size
            .saturating_add(l.max_message_size / 2)
            .max(16 * 1024 * 1024)
    });
    Limits {
        max_command_line: l.max_command_line,
        max_text_line: l.max_text_line,
        max_message_size: l.max_message_size,
        max_recipients: l.max_recipients,
        max_errors: l.max_errors,
        max_rejected_recipients: l.max_rejected_recipients,
        max_junk_commands: l.max_junk_commands,
        max_received_headers: l.max_received_headers,
        command_timeout,
        data_timeout,
        greeting_delay,
        max_connections: l.max_connections,
        max_connections_per_ip: l.max_connections_per_ip,
        min_free_space,
        bare_lf,
        nul,
    }
}

pub(super) fn check_delivery(file: &FileConfig, errors: &mut Errors) -> DeliverySettings {
    let d = &file.delivery;
    if d.batch_size < 1 {
        errors.push("delivery.batch_size", "must be at least 1");
    }
    at_most(
        errors,
        "delivery.batch_size",
        u64::try_from(d.batch_size).unwrap_or(u64::MAX),
        100_000,
    );
    let retry_initial = duration(
        errors,
        "delivery.retry_initial",
        &d.retry_initial,
        SECOND,
        DAY,
    );
    let retry_max = duration(errors, "delivery.retry_max", &d.retry_max, SECOND, 7 * DAY);
    if retry_max < retry_initial {
        errors.push(
            "delivery.retry_max",
            "must not be less than delivery.retry_initial",
        );
    }
    let (give_up, delay_notice) = super::outbound::check_lifetimes(file, errors);
    DeliverySettings {
        batch_size: d.batch_size,
        retry_initial,
        retry_max,
        give_up,
        delay_notice,
    }
}
