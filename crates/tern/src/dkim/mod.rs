//! DKIM: signing outgoing mail with the keys of its `From:` domain, making
//! keys, and the DNS records a domain needs.
//!
//! Where keys come from (config `[dkim]`):
//! - found: every file `<dkim.dir>/<domain>/<selector>.key` where `<domain>`
//!   is one of `local.domains` (lower case) signs that domain's mail with
//!   that selector; its algorithm is the key's own. `dkim.dir` defaults to
//!   `<data_dir>/dkim`, where `tern dkim generate` writes, so a generated
//!   key is used at the next start without any config. `dkim.discover =
//!   false` turns finding off.
//! - named: each `[[dkim.key]]` (domain, selector, optional algorithm, file
//!   defaulting to the same path), for a key kept elsewhere or a domain
//!   that is not local. A named key replaces a found one of the same
//!   domain and selector.
//!
//! Every key is read when the config is loaded, so `tern check-config`
//! names an unreadable file, a file that is not a PEM key, or a key of
//! another algorithm than configured, with its domain and selector.
//!
//! Modules: `keys` (PEM, generation, TXT records), `sign` (the signer the
//! session calls), `cli` (`tern dkim generate`, `tern dns-records`).

pub mod cli;
pub mod keys;
pub mod sign;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use keys::{Algorithm, KeyError, KeyFile};
pub use sign::{SignError, Signers};

use std::path::{Path, PathBuf};

/// One signing key as the configuration names it, checked to exist and to
/// hold a key of `algorithm` when the config was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The signing domain (`d=`), lower case.
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    pub path: PathBuf,
    /// The config key errors about this key are reported under:
    /// `dkim.key[N]` for a named key, `dkim.dir` for a found one.
    pub config_key: String,
}

/// Where `tern dkim generate` writes, and key finding looks for, the key of
/// `domain` with `selector`.
pub fn key_path(dir: &Path, domain: &str, selector: &str) -> PathBuf {
    dir.join(domain.to_lowercase())
        .join(format!("{selector}.key"))
}
