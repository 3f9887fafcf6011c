//! `tern dkim generate` and `tern dns-records`: making DKIM keys, and
//! printing the DNS records a domain needs, in zone-file syntax (`;`
//! comments included) so the output can be pasted into a zone as it is.
//!
//! Key files: `<dkim.dir>/<domain>/<selector>.key`, mode 0600, in folders
//! created with mode 0700; written to a temporary name, synced, then linked
//! into place, so a key file is complete or absent, and an existing key is
//! replaced only with `--force`. Run as root for a server whose data folder
//! belongs to another user, the new folders and files are given to that
//! user (the server must read them).
//!
//! Selectors: by default `tern<YYYYMM>-rsa` and `tern<YYYYMM>-ed25519` (a
//! new month gives new selectors, which is what a key rotation needs); with
//! `--selector S`, exactly `S` for one algorithm, `S-rsa` and `S-ed25519`
//! for both (one selector publishes one key).
//!
//! Errors: a message for the command line (`Err(String)`), naming the file.

use super::keys::{Algorithm, KeyFile, txt_strings, valid_selector};
use crate::config::{Runtime, valid_domain};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// `tern dkim ...`
#[derive(clap::Subcommand)]
pub enum DkimCommand {
    /// Make signing keys for DOMAIN and print the DNS TXT records that
    /// publish them. Keys go to <dkim.dir>/DOMAIN/SELECTOR.key (dkim.dir
    /// defaults to <data_dir>/dkim), where the server finds them at its next
    /// start when DOMAIN is one of local.domains. Default selectors:
    /// tern<YYYYMM>-rsa and tern<YYYYMM>-ed25519; with --selector S, S for one
    /// algorithm or S-rsa and S-ed25519 for both
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The domain whose mail the keys sign (the domain of the From: address)
    pub domain: String,
    /// Selector (DNS label(s): letters, digits, hyphens, dots)
    #[arg(long)]
    pub selector: Option<String>,
    /// Which keys: rsa (RSA-2048, rsa-sha256), ed25519 (ed25519-sha256), or
    /// both (every message gets both signatures)
    #[arg(long, value_enum, default_value = "both")]
    pub algorithm: AlgorithmChoice,
    /// Replace an existing key file of the same selector (its old DNS record
    /// then no longer matches: mail in transit signed with it fails)
    #[arg(long)]
    pub force: bool,
    /// TOML config file (for data_dir, dkim.dir and local.domains); without
    /// it, the embedded default (./tern-data)
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum AlgorithmChoice {
    Rsa,
    Ed25519,
    Both,
}

impl AlgorithmChoice {
    fn algorithms(self) -> Vec<Algorithm> {
        match self {
            AlgorithmChoice::Rsa => vec![Algorithm::RsaSha256],
            AlgorithmChoice::Ed25519 => vec![Algorithm::Ed25519Sha256],
            AlgorithmChoice::Both => vec![Algorithm::RsaSha256, Algorithm::Ed25519Sha256],
        }
    }
}

/// What `generate` made: the zone text for standard output, and notes for
/// the administrator (standard error).
#[derive(Debug)]
pub struct Generated {
    pub records: String,
    pub notes: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// The selector of each key `generate` makes.
pub fn selectors(
    selector: Option<&str>,
    choice: AlgorithmChoice,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<(Algorithm, String)> {
    let algorithms = choice.algorithms();
    let suffix = |a: Algorithm| match a {
        Algorithm::RsaSha256 => "rsa",
        Algorithm::Ed25519Sha256 => "ed25519",
    };
    match selector {
        Some(s) if algorithms.len() == 1 => vec![(algorithms[0], s.to_string())],
        Some(s) => algorithms
            .into_iter()
            .map(|a| (a, format!("{s}-{}", suffix(a))))
            .collect(),
        None => {
            let base = format!("tern{}", now.format("%Y%m"));
            algorithms
                .into_iter()
                .map(|a| (a, format!("{base}-{}", suffix(a))))
                .collect()
        }
    }
}

/// The owner name of the DKIM record of `selector` for `domain`.
fn record_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{}.", a_label(domain))
}

fn a_label(domain: &str) -> String {
    mail_auth::common::to_a_label(&domain.to_lowercase()).into_owned()
}

/// The zone line publishing `key` under `selector` for `domain`.
pub fn dkim_record(selector: &str, domain: &str, key: &KeyFile) -> Result<String, String> {
    let txt = key
        .dns_txt()
        .map_err(|e| format!("cannot compute the public key: {e}"))?;
    Ok(format!(
        "{} IN TXT {}",
        record_name(selector, domain),
        txt_strings(&txt)
    ))
}

/// Makes the keys of `tern dkim generate` and returns their records.
pub fn generate(
    runtime: &Runtime,
    domain: &str,
    selector: Option<&str>,
    choice: AlgorithmChoice,
    force: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Generated, String> {
    let domain = domain.trim_end_matches('.').to_lowercase();
    if !valid_domain(&domain) {
        return Err(format!("{domain:?} is not a valid domain"));
    }
    if let Some(s) = selector
        && !valid_selector(s)
    {
        return Err(format!(
            "{s:?} is not a selector (letters, digits and hyphens, labels separated by dots)"
        ));
    }
    let planned = selectors(selector, choice, now);
    let dir = &runtime.dkim.dir;
    let folder = dir.join(&domain);
    let paths: Vec<PathBuf> = planned
        .iter()
        .map(|(_, s)| super::key_path(dir, &domain, s))
        .collect();
    // Refuse before writing anything, so "both" never leaves one new key
    // beside one refused.
    if !force {
        for path in &paths {
            if path.exists() {
                return Err(format!(
                    "{} exists: that selector has a key already. Choose another --selector, or \
                     pass --force to replace it (mail signed with the old key then fails until the \
                     new record is published)",
                    path.display()
                ));
            }
        }
    }
    let owner = server_owner(&runtime.data_dir);
    let created_dir = !dir.exists();
    let created_folder = !folder.exists();
    crate::fsutil::create_dir_durable(&folder).map_err(|e| e.to_string())?;
    if let Some(owner) = owner {
        if created_dir {
            give(dir, owner)?;
        }
        if created_folder {
            give(&folder, owner)?;
        }
    }

    let mut records = String::new();
    let mut files = Vec::new();
    for ((algorithm, selector), path) in planned.iter().zip(&paths) {
        let (key, pem) = KeyFile::generate(*algorithm)
            .map_err(|e| format!("cannot make the {algorithm} key: {e}"))?;
        write_key(&folder, path, selector, pem.as_bytes(), force, owner)?;
        let _ = writeln!(
            records,
            "; DKIM key of {domain}, selector {selector} ({algorithm}), in {}",
            path.display()
        );
        let _ = writeln!(records, "{}", dkim_record(selector, &domain, &key)?);
        files.push(path.clone());
    }

    let mut notes = vec![format!(
        "publish the record(s) above in the zone of {domain}, then restart tern (keys are read at \
         start-up); a DNS provider's form wants the name without \".{}.\" and the quoted parts \
         joined into one text",
        a_label(&domain)
    )];
    let found = runtime.dkim.discover && runtime.is_local_domain(&domain);
    let named = runtime
        .dkim
        .keys_for(&domain)
        .any(|k| k.config_key != "dkim.dir");
    if !found && !named {
        notes.push(if runtime.dkim.discover {
            format!(
                "{domain} is not one of local.domains: its mail is signed with these keys only \
                 once it is, or once a [[dkim.key]] entry names them"
            )
        } else {
            format!(
                "dkim.discover is false: {domain}'s mail is signed with these keys only once a \
                 [[dkim.key]] entry names them"
            )
        });
    }
    let old: Vec<String> = runtime
        .dkim
        .keys_for(&domain)
        .filter(|k| !files.contains(&k.path))
        .map(|k| format!("{} ({})", k.selector, k.path.display()))
        .collect();
    if !old.is_empty() {
        notes.push(format!(
            "{domain} also has the key(s) {}: every key signs, so move an old one out of the way \
             (rename it, e.g. to .key.old) once its successor is published",
            old.join(", ")
        ));
    }
    Ok(Generated {
        records,
        notes,
        files,
    })
}

/// The user a root-run command hands new key files to: `server.user` when
/// configured (see `privileges::commands_hand_over_to`), else the owner of
/// the server's data folder, when that is not root. `None`: keep our own.
fn server_owner(data_dir: &Path) -> Option<(u32, u32)> {
    if let Some(owner) = crate::privileges::command_file_owner() {
        return Some(owner);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return None;
    }
    let meta = std::fs::metadata(data_dir).ok()?;
    (meta.uid() != 0).then_some((meta.uid(), meta.gid()))
}

fn give(path: &Path, (uid, gid): (u32, u32)) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot give {} to uid {uid}: {e}", path.display()))
}

/// Writes one key file: a temporary file (0600) synced, then linked to
/// `path` (which fails if a key appeared there meanwhile) or, with
/// `force`, renamed over it; then the folder is synced.
fn write_key(
    folder: &Path,
    path: &Path,
    selector: &str,
    pem: &[u8],
    force: bool,
    owner: Option<(u32, u32)>,
) -> Result<(), String> {
    let temp = folder.join(format!(".{selector}.key.tmp"));
    let failed =
        |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| failed("create", &temp, e))?;
    let written = file
        .write_all(pem)
        .and_then(|()| file.sync_all())
        .map_err(|e| failed("write", &temp, e))
        .and_then(|()| match owner {
            Some(owner) => give(&temp, owner),
            None => Ok(()),
        })
        .and_then(|()| {
            if force {
                std::fs::rename(&temp, path).map_err(|e| failed("write", path, e))
            } else {
                std::fs::hard_link(&temp, path).map_err(|e| failed("write", path, e))
            }
        });
    let _ = std::fs::remove_file(&temp);
    written?;
    crate::fsutil::sync_dir(folder).map_err(|e| e.to_string())
}

/// The text of `tern dns-records DOMAIN`, and notes for standard error.
pub fn dns_records(
    runtime: &Runtime,
    domain: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(String, Vec<String>), String> {
    let domain = domain.trim_end_matches('.').to_lowercase();
    if !valid_domain(&domain) {
        return Err(format!("{domain:?} is not a valid domain"));
    }
    let zone = format!("{}.", a_label(&domain));
    let host = format!("{}.", a_label(&runtime.hostname));
    let mut notes = Vec::new();
    if !runtime.hostname.contains('.') {
        notes.push(format!(
            "hostname is {:?}: set hostname in the config to this host's public name, which the \
             MX record and the MTA-STS policy name",
            runtime.hostname
        ));
    }
    if !runtime.is_local_domain(&domain) {
        notes.push(format!(
            "{domain} is not one of local.domains: this server does not accept its mail yet"
        ));
    }
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push('\n');
    };
    line(&format!(
        "; DNS records for {domain}, for the Tern mail server {}.",
        runtime.hostname
    ));
    line("; Zone-file syntax with absolute names. Lines after a PLACEHOLDER comment hold values");
    line("; to replace with your own before publishing.");
    line("");
    line(&format!(
        "; MX: mail for {domain} goes to this host. {host} needs its own A/AAAA records, and its"
    ));
    line("; addresses PTR records naming it back (receivers check them on mail it sends).");
    line(&format!("{zone} IN MX 10 {host}"));
    line("");
    line(&format!(
        "; SPF (RFC 7208): mail from {domain} comes from its MX hosts; \"-all\": any other sender fails."
    ));
    line(
        "; Add ip4:/ip6:/include: terms for other hosts that send its mail (a web shop, a newsletter",
    );
    line("; service). Receivers allow at most 10 DNS lookups per SPF check.");
    line(&format!("{zone} IN TXT \"v=spf1 mx -all\""));
    line("");
    let keys: Vec<_> = runtime.dkim.keys_for(&domain).collect();
    if keys.is_empty() {
        line(&format!(
            "; DKIM (RFC 6376): no key for {domain} yet. `tern dkim generate {domain}` makes keys and"
        ));
        line("; prints their records; run dns-records again afterwards.");
    } else {
        line(&format!(
            "; DKIM (RFC 6376): the public keys Tern signs {domain}'s mail with, one record per selector."
        ));
        for spec in keys {
            let key = KeyFile::read_as(&spec.path, Some(spec.algorithm)).map_err(|e| {
                format!(
                    "DKIM key {} for {domain} ({}): {e}",
                    spec.selector,
                    spec.path.display()
                )
            })?;
            line(&format!(
                "; selector {} ({})",
                spec.selector, spec.algorithm
            ));
            line(&dkim_record(&spec.selector, &domain, &key)?);
        }
    }
    line("");
    line(
        "; DMARC (RFC 7489): what receivers do with mail whose From: domain passes neither aligned",
    );
    line(
        "; SPF nor aligned DKIM. Start with p=none and read the daily reports; once they show all",
    );
    line("; your mail passing, move to p=quarantine, then p=reject.");
    line(&format!(
        "; PLACEHOLDER: rua= the mailbox for aggregate reports (an address in {domain} needs no"
    ));
    line("; further record; one elsewhere needs that domain's consent, RFC 7489 §7.1).");
    line(&format!(
        "_dmarc.{zone} IN TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}\""
    ));
    line("");
    line("; MTA-STS (RFC 8461): tells senders to deliver to the MX only over TLS with a valid");
    line("; certificate.");
    line("; PLACEHOLDER: id= must change every time the policy file changes.");
    line(&format!(
        "_mta-sts.{zone} IN TXT \"v=STSv1; id={}\"",
        now.format("%Y%m%d%H%M%S")
    ));
    line(&format!(
        "; It takes effect only with the policy served at https://mta-sts.{domain}/.well-known/mta-sts.txt"
    ));
    line(&format!(
        "; (a web server with a valid certificate for mta-sts.{domain}; Tern does not serve it):"
    ));
    line(";   version: STSv1");
    line(";   mode: testing");
    line(&format!(";   mx: {}", runtime.hostname));
    line(";   max_age: 86400");
    line("; Keep mode: testing until the TLS reports show no failures, then mode: enforce and a");
    line("; longer max_age (e.g. 604800).");
    line("");
    line("; TLS-RPT (RFC 8460): where senders report failed TLS connections to the MX.");
    line("; PLACEHOLDER: rua= the mailbox for the reports.");
    line(&format!(
        "_smtp._tls.{zone} IN TXT \"v=TLSRPTv1; rua=mailto:tls-reports@{domain}\""
    ));
    Ok((out, notes))
}
