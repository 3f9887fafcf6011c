//! DKIM private keys: reading them from PEM files, making new ones, and the
//! DNS TXT record that publishes a key's public half.
//!
//! Formats read: PKCS#8 (`BEGIN PRIVATE KEY`, RSA or Ed25519, v1 or v2) and
//! PKCS#1 (`BEGIN RSA PRIVATE KEY`). Formats written: PKCS#8 v1, what
//! `openssl genpkey` writes, so keys move freely between Tern and other
//! signers. RSA keys are 2048 to 8192 bits (aws-lc-rs refuses smaller ones,
//! and RFC 8301 §3.2 asks for at least 2048 anyway).
//!
//! Invariants: a [`KeyFile`] holds a key that parsed as the algorithm it
//! names, so building a signer from it cannot fail later.
//!
//! Errors: [`KeyError`] says what is wrong; callers add the file name and
//! the key's domain and selector.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::fmt;
use std::path::Path;

/// A DKIM signing algorithm (RFC 6376 §3.3, RFC 8463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::RsaSha256, Algorithm::Ed25519Sha256];

    /// The `a=` name, also the name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    /// The key type as the DNS record's `k=` tag names it.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa",
            Algorithm::Ed25519Sha256 => "ed25519",
        }
    }

    pub fn parse(text: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == text)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with a key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read it: {0}")]
    Unreadable(String),
    #[error("not a PEM private key ({0})")]
    NotPem(String),
    #[error(
        "an EC (SEC1) key: DKIM signs with RSA or Ed25519 keys (PKCS#8 \"BEGIN PRIVATE KEY\", or PKCS#1 \"BEGIN RSA PRIVATE KEY\")"
    )]
    EcKey,
    #[error("an RSA key that cannot sign: {0} (keys of 2048 to 8192 bits can)")]
    BadRsa(String),
    #[error("a PKCS#8 key that is neither RSA nor Ed25519")]
    UnknownPkcs8,
    #[error("holds an {found} key, but the key is configured as {configured}")]
    WrongAlgorithm {
        found: Algorithm,
        configured: Algorithm,
    },
    #[error("cannot make a key: {0}")]
    Generate(String),
}

/// A private key read from its file: its algorithm and its DER bytes,
/// checked to parse as that algorithm.
pub struct KeyFile {
    pub algorithm: Algorithm,
    der: PrivateKeyDer<'static>,
}

/// The key stays out of logs and panic messages.
impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl KeyFile {
    /// Reads and checks the key in `path`.
    pub fn read(path: &Path) -> Result<KeyFile, KeyError> {
        let pem = std::fs::read(path).map_err(|e| KeyError::Unreadable(e.to_string()))?;
        KeyFile::from_pem(&pem)
    }

    /// Parses PEM text holding one private key.
    pub fn from_pem(pem: &[u8]) -> Result<KeyFile, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                KeyError::NotPem("no BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY section".into())
            }
            other => KeyError::NotPem(other.to_string()),
        })?;
        let algorithm = match &der {
            PrivateKeyDer::Pkcs1(pkcs1) => {
                aws_lc_rs::rsa::KeyPair::from_der(pkcs1.secret_pkcs1_der())
                    .map_err(rsa_rejected)?;
                Algorithm::RsaSha256
            }
            PrivateKeyDer::Pkcs8(pkcs8) => {
                let bytes = pkcs8.secret_pkcs8_der();
                if Ed25519KeyPair::from_pkcs8(bytes).is_ok() {
                    Algorithm::Ed25519Sha256
                } else {
                    match aws_lc_rs::rsa::KeyPair::from_pkcs8(bytes) {
                        Ok(_) => Algorithm::RsaSha256,
                        // An RSA key that aws-lc-rs refuses (too small) says
                        // so; anything else is some other algorithm.
                        Err(e) if is_rsa_pkcs8(bytes) => return Err(rsa_rejected(e)),
                        Err(_) => return Err(KeyError::UnknownPkcs8),
                    }
                }
            }
            PrivateKeyDer::Sec1(_) => return Err(KeyError::EcKey),
            _ => return Err(KeyError::UnknownPkcs8),
        };
        Ok(KeyFile { algorithm, der })
    }

    /// Reads `path` and checks it holds a key of `expected`.
    pub fn read_as(path: &Path, expected: Option<Algorithm>) -> Result<KeyFile, KeyError> {
        let key = KeyFile::read(path)?;
        match expected {
            Some(configured) if configured != key.algorithm => Err(KeyError::WrongAlgorithm {
                found: key.algorithm,
                configured,
            }),
            _ => Ok(key),
        }
    }

    /// The key in the form mail-auth signs with.
    pub fn signing_key(&self) -> Result<DkimKey, KeyError> {
        match self.algorithm {
            Algorithm::RsaSha256 => RsaKey::<Sha256>::from_key_der(self.der.clone_key())
                .map(DkimKey::Rsa)
                .map_err(|e| KeyError::BadRsa(e.to_string())),
            Algorithm::Ed25519Sha256 => {
                Ed25519Key::from_pkcs8_der(self.der.secret_der())
                    .map(DkimKey::Ed25519)
                    // from_pem accepted it as Ed25519 PKCS#8 already.
                    .map_err(|_| KeyError::UnknownPkcs8)
            }
        }
    }

    /// The `p=` value of the key's DNS record: base64 of the DER
    /// SubjectPublicKeyInfo for RSA (RFC 6376 §3.6.1, what `openssl rsa
    /// -pubout` prints and every verifier reads), of the 32 raw public key
    /// octets for Ed25519 (RFC 8463 §4).
    pub fn public_key_base64(&self) -> Result<String, KeyError> {
        let public = match (&self.der, self.algorithm) {
            (PrivateKeyDer::Pkcs1(pkcs1), _) => {
                let pair = aws_lc_rs::rsa::KeyPair::from_der(pkcs1.secret_pkcs1_der())
                    .map_err(rsa_rejected)?;
                rsa_spki(&pair)?
            }
            (PrivateKeyDer::Pkcs8(pkcs8), Algorithm::RsaSha256) => {
                let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
                    .map_err(rsa_rejected)?;
                rsa_spki(&pair)?
            }
            (PrivateKeyDer::Pkcs8(pkcs8), Algorithm::Ed25519Sha256) => {
                Ed25519KeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
                    .map_err(|_| KeyError::UnknownPkcs8)?
                    .public_key()
                    .as_ref()
                    .to_vec()
            }
            _ => return Err(KeyError::UnknownPkcs8),
        };
        Ok(tern_proto::base64::encode(&public))
    }

    /// The TXT record text publishing this key: `v=DKIM1; k=...; p=...`.
    pub fn dns_txt(&self) -> Result<String, KeyError> {
        Ok(format!(
            "v=DKIM1; k={}; p={}",
            self.algorithm.key_type(),
            self.public_key_base64()?
        ))
    }

    /// Makes a new key: RSA 2048 bits (RFC 8301 §3.2: what every verifier
    /// takes; larger keys make records some DNS providers' forms mangle) or
    /// Ed25519. Returns it with its PEM text.
    pub fn generate(algorithm: Algorithm) -> Result<(KeyFile, String), KeyError> {
        let generated = |e: aws_lc_rs::error::Unspecified| KeyError::Generate(e.to_string());
        let pkcs8 = match algorithm {
            Algorithm::RsaSha256 => {
                let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(generated)?;
                let der =
                    AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).map_err(generated)?;
                der.as_ref().to_vec()
            }
            Algorithm::Ed25519Sha256 => Ed25519KeyPair::generate()
                .and_then(|pair| pair.to_pkcs8v1())
                .map_err(generated)?
                .as_ref()
                .to_vec(),
        };
        let pem = pem("PRIVATE KEY", &pkcs8);
        let key = KeyFile::from_pem(pem.as_bytes())?;
        Ok((key, pem))
    }
}

/// aws-lc-rs names its reasons in CamelCase (`TooSmall`).
fn rsa_rejected(e: aws_lc_rs::error::KeyRejected) -> KeyError {
    let reason = match e.to_string().as_str() {
        "TooSmall" => "smaller than 2048 bits".to_string(),
        "TooLarge" => "larger than 8192 bits".to_string(),
        "InvalidEncoding" => "not a valid RSA key".to_string(),
        other => other.to_string(),
    };
    KeyError::BadRsa(reason)
}

fn rsa_spki(pair: &aws_lc_rs::rsa::KeyPair) -> Result<Vec<u8>, KeyError> {
    pair.public_key()
        .as_der()
        .map(|der| der.as_ref().to_vec())
        .map_err(|e| KeyError::BadRsa(e.to_string()))
}

/// rsaEncryption (1.2.840.113549.1.1.1) as DER, which a PKCS#8 RSA key
/// carries in its AlgorithmIdentifier.
const RSA_ENCRYPTION_OID: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];

fn is_rsa_pkcs8(der: &[u8]) -> bool {
    der.windows(RSA_ENCRYPTION_OID.len())
        .take(32)
        .any(|w| w == RSA_ENCRYPTION_OID)
}

/// PEM text (RFC 7468): base64 lines of 64 characters between the labels.
pub fn pem(label: &str, der: &[u8]) -> String {
    let encoded = tern_proto::base64::encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A TXT record's text as zone-file character-strings: each at most 255
/// octets (RFC 1035 §3.3), quoted, separated by a space. The record's value
/// is their concatenation (RFC 6376 §3.6.2.2).
pub fn txt_strings(text: &str) -> String {
    text.as_bytes()
        .chunks(255)
        .map(|chunk| {
            // The DKIM record text is ASCII without quotes or backslashes,
            // but escape them anyway so any text stays one record.
            let s = String::from_utf8_lossy(chunk);
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A selector as Tern accepts it: DNS labels of letters, digits and
/// hyphens, separated by dots (RFC 6376 §3.1), at most 63 octets each. It
/// is also a file name (`<selector>.key`), so this keeps it free of `/`
/// and of a leading dot.
pub fn valid_selector(selector: &str) -> bool {
    !selector.is_empty()
        && selector.len() <= 200
        && selector.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}
