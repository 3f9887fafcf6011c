//! DKIM signing of outgoing messages (RFC 6376, RFC 8463 for Ed25519).
//!
//! [`Signers`] holds every configured key, built once from the config (at
//! start-up, and again on a reload: [`Signers::from_config`] is a function
//! of the config alone). [`Signers::sign`] returns the `DKIM-Signature:`
//! field(s) to put in front of a message: one per key of the domain, so a
//! domain with an RSA and an Ed25519 key gets both signatures (receivers
//! that do not know Ed25519 ignore that one, RFC 8463 §3).
//!
//! What a signature covers: relaxed/relaxed canonicalization (survives the
//! re-folding and whitespace changes relays make), the whole body (no
//! `l=`), a `t=` timestamp and no `x=` unless `dkim.signature_lifetime` is
//! set. Signed fields: those of [`SIGNED_FIELDS`] the message has, every
//! instance of each; `From:` is listed once more than it occurs (so nobody
//! can add a second `From:` that a mail reader would show instead, RFC 6376
//! §8.15), and so are the other fields of [`OVERSIGNED_IF_PRESENT`] that the
//! message has. Fields the message lacks are not listed (apart from
//! `From:`): a mailing list or a re-sender may still add its `List-*` or
//! `Resent-*` fields without breaking the signature.
//!
//! Cost: an RSA-2048 signature is one private-key operation, about 1 ms of
//! CPU; [`Signers::sign_async`] does it on tokio's blocking pool so the
//! session's workers never stall on it.
//!
//! Errors: [`SignError`] (a crypto failure, which a valid key should never
//! produce, or the blocking task failing).

use super::keys::{Algorithm, KeyFile};
use crate::config::{ConfigError, DkimSettings};
use bytes::Bytes;
use mail_auth::common::crypto::{self, DkimKey, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The header fields a signature covers when the message has them: RFC
/// 6376 §5.4.1's list, plus what current signers add: the identity and
/// MIME structure fields (a replayed message cannot swap its
/// `Content-Type` or `Message-ID`), `Sender`, the `Resent-*` and `List-*`
/// families (RFC 8058's `List-Unsubscribe-Post` must be signed for
/// one-click unsubscribe), and the key-exchange fields mail clients act on.
/// Never trace fields (`Received`, `Return-Path`): relays add those.
pub const SIGNED_FIELDS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Content-Disposition",
    "In-Reply-To",
    "References",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Autocrypt",
    "OpenPGP",
];

/// Fields a reader shows as the message's identity: when the message has
/// them they are listed once more than they occur, so a second one added
/// in transit (shown instead of the signed one by some readers) breaks the
/// signature. `From:` is over-signed even when absent.
pub const OVERSIGNED_IF_PRESENT: &[&str] = &[
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
];

/// Why no signature could be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("DKIM signing with {selector}._domainkey.{domain} failed: {message}")]
    Crypto {
        domain: String,
        selector: String,
        message: String,
    },
    #[error("the DKIM signing task did not finish: {0}")]
    Task(String),
}

/// One signing key of one domain.
struct DomainKey {
    /// The `d=` value: the domain as an A-label (RFC 6376 §3.5, DNS names).
    domain: String,
    selector: String,
    algorithm: Algorithm,
    key: SharedKey,
}

/// A key shared by every signature made with it: mail-auth's signer owns
/// its key, and one is built per message (its field list depends on the
/// message), so it gets this cheap handle instead of the key.
#[derive(Clone)]
struct SharedKey(Arc<DkimKey>);

impl SigningKey for SharedKey {
    type Hasher = crypto::Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> crypto::Algorithm {
        self.0.algorithm()
    }
}

struct Inner {
    /// Signing domain (lower-case A-label, so a domain matches whether the
    /// config or the `From:` address writes it as U-label or A-label) →
    /// its keys, RSA first.
    by_domain: HashMap<String, Vec<DomainKey>>,
    /// `x=` is `t=` plus this; `None`: no `x=`.
    lifetime: Option<Duration>,
}

/// Every DKIM key of the configuration, ready to sign. Cheap to clone
/// (shared); `Send + Sync`, so one instance serves every session.
#[derive(Clone)]
pub struct Signers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys()).finish()
    }
}

impl Signers {
    /// Reads every key `settings` names (the ones found under `dkim.dir`
    /// and the `[[dkim.key]]` entries). A key that cannot be read any more
    /// (it was checked when the config was loaded) is an error naming it.
    pub fn from_config(settings: &DkimSettings) -> Result<Signers, Vec<ConfigError>> {
        let mut by_domain: HashMap<String, Vec<DomainKey>> = HashMap::new();
        let mut errors = Vec::new();
        for spec in &settings.keys {
            let loaded = KeyFile::read_as(&spec.path, Some(spec.algorithm))
                .and_then(|file| file.signing_key());
            match loaded {
                Ok(key) => by_domain
                    .entry(lookup_key(&spec.domain))
                    .or_default()
                    .push(DomainKey {
                        domain: mail_auth::common::to_a_label(&spec.domain).into_owned(),
                        selector: spec.selector.clone(),
                        algorithm: spec.algorithm,
                        key: SharedKey(Arc::new(key)),
                    }),
                Err(e) => errors.push(ConfigError {
                    key: spec.config_key.clone(),
                    message: format!(
                        "DKIM key {} for {} ({}): {e}",
                        spec.selector,
                        spec.domain,
                        spec.path.display()
                    ),
                    line: None,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for keys in by_domain.values_mut() {
            keys.sort_by(|a, b| (a.algorithm, &a.selector).cmp(&(b.algorithm, &b.selector)));
        }
        Ok(Signers {
            inner: Arc::new(Inner {
                by_domain,
                lifetime: settings.signature_lifetime,
            }),
        })
    }

    /// No keys at all: nothing is ever signed.
    pub fn is_empty(&self) -> bool {
        self.inner.by_domain.is_empty()
    }

    /// Whether mail from `domain` gets signed (it has at least one key).
    pub fn signs_for(&self, domain: &str) -> bool {
        self.inner.by_domain.contains_key(&lookup_key(domain))
    }

    /// (domain, selector, algorithm) of every key, for the start-up log.
    pub fn keys(&self) -> Vec<(String, String, Algorithm)> {
        let mut keys: Vec<_> = self
            .inner
            .by_domain
            .values()
            .flatten()
            .map(|k| (k.domain.clone(), k.selector.clone(), k.algorithm))
            .collect();
        keys.sort();
        keys
    }

    /// The `DKIM-Signature:` fields for `message`, signed for `domain` (the
    /// domain of its `From:` address, which DMARC aligns with `d=`): each
    /// field folded and ending in CRLF, all of them to be put in front of
    /// the message as it is sent. Empty when `domain` has no key.
    /// `message` is the whole message (header and body) with CRLF line ends.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let Some(keys) = self.inner.by_domain.get(&lookup_key(domain)) else {
            return Ok(Vec::new());
        };
        let fields = fields_to_sign(message);
        let mut out = Vec::with_capacity(keys.len() * 512);
        for k in keys {
            let mut signer = DkimSigner::from_key(k.key.clone())
                .domain(k.domain.clone())
                .selector(k.selector.clone())
                .headers(fields.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            if let Some(lifetime) = self.inner.lifetime {
                signer = signer.expiration(lifetime.as_secs());
            }
            let signature = signer.sign(message).map_err(|e| SignError::Crypto {
                domain: k.domain.clone(),
                selector: k.selector.clone(),
                message: e.to_string(),
            })?;
            out.extend_from_slice(fold_first_line(signature.to_header()).as_bytes());
        }
        Ok(out)
    }

    /// [`Signers::sign`] on tokio's blocking pool: the RSA private-key
    /// operation costs about a millisecond of CPU, too long for a task on
    /// the session workers. `message` is shared, not copied. A domain
    /// without keys returns at once, without the trip to the pool.
    pub async fn sign_async(&self, domain: &str, message: Bytes) -> Result<Vec<u8>, SignError> {
        if !self.signs_for(domain) {
            return Ok(Vec::new());
        }
        let signers = self.clone();
        let domain = domain.to_string();
        tokio::task::spawn_blocking(move || signers.sign(&domain, &message))
            .await
            .map_err(|e| SignError::Task(e.to_string()))?
    }
}

/// How a domain is looked up among the keys.
fn lookup_key(domain: &str) -> String {
    mail_auth::common::to_a_label(domain.trim_end_matches('.')).to_lowercase()
}

/// Lines of a header field should stay within 78 characters (RFC 5322
/// §2.1.1). mail-auth folds every line but the first, which holds `v=`,
/// `a=`, `s=`, `d=` and `c=` and outgrows 78 with a long selector or
/// domain. The space after a `;` there becomes a fold: header
/// canonicalization is relaxed, which turns a fold and the white space
/// around it back into that one space, so the signature is unchanged.
fn fold_first_line(field: String) -> String {
    const MAX_LINE: usize = 78;
    let first_end = field.find("\r\n").unwrap_or(field.len());
    if first_end <= MAX_LINE {
        return field;
    }
    let (first, rest) = field.split_at(first_end);
    let mut out = String::with_capacity(field.len() + 8);
    let mut line_len = 0;
    for (i, piece) in first.split("; ").enumerate() {
        if i > 0 {
            if line_len + 2 + piece.len() > MAX_LINE {
                out.push_str(";\r\n\t");
                line_len = 1;
            } else {
                out.push_str("; ");
                line_len += 2;
            }
        }
        out.push_str(piece);
        line_len += piece.len();
    }
    out.push_str(rest);
    out
}

/// The `h=` list mail-auth is given for `message`: each field of
/// [`SIGNED_FIELDS`] the header has, once (mail-auth then signs every
/// instance of it), and once more for `From` and for the present fields of
/// [`OVERSIGNED_IF_PRESENT`] (mail-auth lists a name it cannot match again
/// as an absent field: the over-signing entry).
pub(crate) fn fields_to_sign(message: &[u8]) -> Vec<&'static str> {
    let present = header_field_names(message);
    let has = |name: &str| {
        present
            .iter()
            .any(|p| p.eq_ignore_ascii_case(name.as_bytes()))
    };
    let mut fields: Vec<&'static str> = SIGNED_FIELDS
        .iter()
        .copied()
        .filter(|name| has(name))
        .collect();
    // From: once more than it occurs: listed twice when present (the
    // message's instance, then "no other"), once when absent.
    fields.push("From");
    fields.extend(
        OVERSIGNED_IF_PRESENT
            .iter()
            .copied()
            .filter(|name| has(name)),
    );
    fields
}

/// The names of the header fields of `message`, in order, each exactly as
/// written before its colon. Stops at the first line that is not a field
/// (the empty line before the body, or anything without a colon), so it
/// never finds a field mail-auth's own parser would not: a field listed in
/// `h=` that the signer did not see would make the signature claim it is
/// absent, and break it.
pub(crate) fn header_field_names(message: &[u8]) -> Vec<&[u8]> {
    let mut names = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let rest = &message[pos..];
        let Some(colon) = rest.iter().position(|&b| b == b':' || b == b'\n') else {
            break;
        };
        if rest[colon] != b':' || colon == 0 {
            break;
        }
        names.push(&rest[..colon]);
        // The field ends at the first line end not followed by folding
        // white space.
        let mut end = colon;
        loop {
            match rest[end..].iter().position(|&b| b == b'\n') {
                Some(lf) => {
                    end += lf + 1;
                    if !matches!(rest.get(end), Some(b' ' | b'\t')) {
                        break;
                    }
                }
                None => {
                    end = rest.len();
                    break;
                }
            }
        }
        pos += end;
    }
    names
}

#[cfg(test)]
mod tests;
