//! Validation of `[dkim]` into [`DkimSettings`]: the keys found under
//! `dkim.dir` for the local domains and the `[[dkim.key]]` entries, each
//! read here so that a key that cannot sign shows at `check-config`.
//! How keys are found is described in `crate::dkim`.
//!
//! Errors: every problem goes into the caller's list, naming the key's
//! domain, selector and file.

use super::schema::FileConfig;
use super::validate::{DAY, Errors, absolute, duration, valid_domain};
use crate::dkim::keys::valid_selector;
use crate::dkim::{self, Algorithm, KeyFile, KeySpec};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The validated `[dkim]` section.
#[derive(Debug, Clone)]
pub struct DkimSettings {
    /// Where keys are found and `tern dkim generate` writes:
    /// `<dir>/<domain>/<selector>.key`.
    pub dir: PathBuf,
    /// Whether keys under `dir` sign without being named (`dkim.discover`).
    pub discover: bool,
    /// Every signing key, named ones first, then found ones by domain and
    /// selector.
    pub keys: Vec<KeySpec>,
    /// `x=` is `t=` plus this; `None`: signatures do not expire.
    pub signature_lifetime: Option<Duration>,
}

impl DkimSettings {
    /// The keys that sign mail from `domain`.
    pub fn keys_for<'a>(&'a self, domain: &str) -> impl Iterator<Item = &'a KeySpec> {
        let domain = domain.to_lowercase();
        self.keys.iter().filter(move |k| k.domain == domain)
    }
}

/// Signatures valid for longer than a year protect nothing an expiry would.
const MAX_SIGNATURE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) fn check_dkim(
    file: &FileConfig,
    data_dir: &Path,
    base: &Path,
    local_domains: &HashSet<String>,
    errors: &mut Errors,
) -> DkimSettings {
    let d = &file.dkim;
    let dir = d
        .dir
        .as_deref()
        .map(|p| absolute(base, p))
        .unwrap_or_else(|| data_dir.join("dkim"));
    let lifetime = duration(
        errors,
        "dkim.signature_lifetime",
        &d.signature_lifetime,
        Duration::ZERO,
        MAX_SIGNATURE_LIFETIME,
    );
    if !lifetime.is_zero() && lifetime < DAY {
        // A receiver may hold mail for days before it verifies (greylisting,
        // queues): an expired signature then fails for nothing.
        errors.push(
            "dkim.signature_lifetime",
            "must be \"0s\" (no expiry) or at least 1 day",
        );
    }
    let mut keys = named_keys(file, &dir, base, errors);
    if d.discover {
        found_keys(&dir, local_domains, &mut keys, errors);
    }
    DkimSettings {
        dir,
        discover: d.discover,
        keys,
        signature_lifetime: (!lifetime.is_zero()).then_some(lifetime),
    }
}

fn key_problem(
    domain: &str,
    selector: &str,
    path: &Path,
    problem: impl std::fmt::Display,
) -> String {
    format!(
        "DKIM key {selector} for {domain} ({}): {problem}",
        path.display()
    )
}

/// The `[[dkim.key]]` entries.
fn named_keys(file: &FileConfig, dir: &Path, base: &Path, errors: &mut Errors) -> Vec<KeySpec> {
    let mut keys: Vec<KeySpec> = Vec::new();
    for (i, k) in file.dkim.key.iter().enumerate() {
        let key = format!("dkim.key[{i}]");
        let domain = k.domain.to_lowercase();
        if !valid_domain(&domain) {
            errors.push(
                format!("{key}.domain"),
                format!("{:?} is not a valid domain", k.domain),
            );
            continue;
        }
        if !valid_selector(&k.selector) {
            errors.push(
                format!("{key}.selector"),
                format!(
                    "{:?} is not a selector (letters, digits and hyphens, labels separated by dots)",
                    k.selector
                ),
            );
            continue;
        }
        let algorithm = match k.algorithm.as_deref() {
            None => None,
            Some(text) => match Algorithm::parse(text) {
                Some(a) => Some(a),
                None => {
                    errors.push(
                        format!("{key}.algorithm"),
                        format!("{text:?} is not \"rsa-sha256\" or \"ed25519-sha256\""),
                    );
                    continue;
                }
            },
        };
        if keys
            .iter()
            .any(|s| s.domain == domain && s.selector == k.selector)
        {
            errors.push(
                key,
                format!(
                    "a second key for selector {} of {domain}: one selector publishes one key",
                    k.selector
                ),
            );
            continue;
        }
        let path = k
            .file
            .as_deref()
            .map(|f| absolute(base, f))
            .unwrap_or_else(|| dkim::key_path(dir, &domain, &k.selector));
        match KeyFile::read_as(&path, algorithm) {
            Ok(read) => keys.push(KeySpec {
                domain,
                selector: k.selector.clone(),
                algorithm: read.algorithm,
                path,
                config_key: key,
            }),
            Err(e) => errors.push(
                format!("{key}.file"),
                key_problem(&domain, &k.selector, &path, e),
            ),
        }
    }
    keys
}

/// Adds the keys `<dir>/<domain>/<selector>.key` of the local domains,
/// except those a named key already covers.
fn found_keys(
    dir: &Path,
    local_domains: &HashSet<String>,
    keys: &mut Vec<KeySpec>,
    errors: &mut Errors,
) {
    let mut domains: Vec<&String> = local_domains.iter().collect();
    domains.sort();
    for domain in domains {
        let folder = dir.join(domain);
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                errors.push(
                    "dkim.dir",
                    format!(
                        "cannot read the DKIM keys of {domain} in {}: {e}",
                        folder.display()
                    ),
                );
                continue;
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    errors.push(
                        "dkim.dir",
                        format!(
                            "cannot read the DKIM keys of {domain} in {}: {e}",
                            folder.display()
                        ),
                    );
                    break;
                }
            };
            let name = entry.file_name();
            // Only `*.key` are keys; a renamed old key (`s1.key.old`) or a
            // half-written one (`.s1.key.tmp`) is not.
            let Some(selector) = name.to_str().and_then(|n| n.strip_suffix(".key")) else {
                continue;
            };
            if selector.starts_with('.') {
                continue;
            }
            found.push((selector.to_string(), entry.path()));
        }
        found.sort();
        for (selector, path) in found {
            if !valid_selector(&selector) {
                errors.push(
                    "dkim.dir",
                    format!(
                        "{}: {selector:?} is not a selector name (letters, digits and hyphens, labels separated by dots); rename the file",
                        path.display()
                    ),
                );
                continue;
            }
            if keys
                .iter()
                .any(|k| k.domain == *domain && k.selector == selector)
            {
                continue;
            }
            match KeyFile::read(&path) {
                Ok(read) => keys.push(KeySpec {
                    domain: domain.clone(),
                    selector,
                    algorithm: read.algorithm,
                    path,
                    config_key: "dkim.dir".into(),
                }),
                Err(e) => errors.push("dkim.dir", key_problem(domain, &selector, &path, e)),
            }
        }
    }
}
