//! The `[auth]` section: where the users file is, the brute-force limits
//! and the credential cache, validated into [`AuthSettings`]. The users
//! file itself is parsed here too when it exists, so `tern check-config`
//! names its file and line when it does not parse.

use super::ConfigError;
use super::schema::FileConfig;
use super::validate::{DAY, Errors, SECOND, absolute, duration};
use crate::auth::{AuthSettings, LoginLimits, Users};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub users_file: Option<PathBuf>,
    pub max_failures_per_ip: u32,
    pub max_failures_per_network: u32,
    pub max_failures_per_account: u32,
    pub failure_window: String,
    pub lockout: String,
    pub account_retry_interval: String,
    pub cache_ttl: String,
    pub max_tracked: usize,
    pub hash_concurrency: usize,
    pub plaintext_on_loopback: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        let limits = LoginLimits::default();
        let text = |d: Duration| humantime::format_duration(d).to_string();
        AuthConfig {
            users_file: None,
            max_failures_per_ip: limits.max_failures_per_ip,
            max_failures_per_network: limits.max_failures_per_network,
            max_failures_per_account: limits.max_failures_per_account,
            failure_window: text(limits.window),
            lockout: text(limits.lockout),
            account_retry_interval: text(limits.account_retry_interval),
            cache_ttl: text(crate::auth::DEFAULT_CACHE_TTL),
            max_tracked: limits.max_entries,
            // 0: one per core.
            hash_concurrency: 0,
            plaintext_on_loopback: false,
        }
    }
}

fn users_file_path(auth: &AuthConfig, base: &Path, data_dir: &Path) -> PathBuf {
    auth.users_file
        .as_deref()
        .map(|f| absolute(base, f))
        .unwrap_or_else(|| data_dir.join("users.toml"))
}

/// Where the users file of a config file (or of the embedded default) is,
/// read without validating anything else: for `tern user` when the users
/// file itself is what fails validation, so it can still say why (and
/// with the right exit status).
pub fn users_file_of(config: Option<&Path>) -> Result<PathBuf, Vec<ConfigError>> {
    let (text, base) = super::config_text(config)?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| vec![super::toml_error(&text, &e)])?;
    let data_dir = absolute(
        &base,
        file.data_dir.as_deref().unwrap_or(Path::new("tern-data")),
    );
    Ok(users_file_path(&file.auth, &base, &data_dir))
}

pub(super) fn check_auth(
    auth: &AuthConfig,
    base: &Path,
    data_dir: &Path,
    errors: &mut Errors,
) -> AuthSettings {
    let users_file = users_file_path(auth, base, data_dir);
    let count = |errors: &mut Errors, key: &str, value: u32| {
        if !(1..=10_000).contains(&value) {
            errors.push(key, "must be between 1 and 10000");
        }
        value
    };
    let limits = LoginLimits {
        max_failures_per_ip: count(errors, "auth.max_failures_per_ip", auth.max_failures_per_ip),
        max_failures_per_network: count(
            errors,
            "auth.max_failures_per_network",
            auth.max_failures_per_network,
        ),
        max_failures_per_account: count(
            errors,
            "auth.max_failures_per_account",
            auth.max_failures_per_account,
        ),
        window: duration(
            errors,
            "auth.failure_window",
            &auth.failure_window,
            SECOND,
            DAY,
        ),
        lockout: duration(errors, "auth.lockout", &auth.lockout, SECOND, DAY),
        account_retry_interval: duration(
            errors,
            "auth.account_retry_interval",
            &auth.account_retry_interval,
            Duration::ZERO,
            Duration::from_secs(3600),
        ),
        max_entries: auth.max_tracked,
    };
    if !(1000..=10_000_000).contains(&auth.max_tracked) {
        errors.push("auth.max_tracked", "must be between 1000 and 10000000");
    }
    if auth.hash_concurrency > 256 {
        errors.push(
            "auth.hash_concurrency",
            "must be at most 256 (0: one per core)",
        );
    }
    let cache_ttl = duration(
        errors,
        "auth.cache_ttl",
        &auth.cache_ttl,
        Duration::ZERO,
        DAY,
    );
    if let Err(e) = Users::load(&users_file) {
        errors.push("auth.users_file", e.to_string());
    }
    AuthSettings {
        users_file,
        limits,
        cache_ttl,
        hash_concurrency: match auth.hash_concurrency {
            0 => crate::auth::default_hash_concurrency(),
            n => n,
        },
        plaintext_on_loopback: auth.plaintext_on_loopback,
        ..AuthSettings::new(PathBuf::new())
    }
}
