//! The TLS side of STARTTLS for the delivery driver: the per-route mode,
//! the rustls client configurations and the handshake itself.
//!
//! Invariants:
//! - Only aws-lc-rs does the cryptography, handed to rustls explicitly: no
//!   process-wide default provider is needed or consulted.
//! - TLS 1.2 and 1.3 only.
//! - `Opportunistic` and `Require` encrypt without judging the certificate
//!   (any chain, any name), but the handshake signatures are still checked
//!   against the certificate's key: an on-path attacker must at least hold
//!   a key, and the session is not merely obfuscated. `Verify` checks the
//!   chain against the bundled web PKI roots plus the configured CA file,
//!   and the name against the routed host name (or its IP).
//! - The configurations are built once per CA file and shared by every
//!   connection; a CA file that cannot be read is not cached, so a fixed
//!   file is picked up without a restart.
//!
//! Not done: DANE (TLSA), MTA-STS, client certificates, certificate
//! pinning, revocation checks.
//!
//! Errors: [`TlsSetupError`] for a CA file that cannot be used; a failed
//! handshake is a `String` reason that the driver puts into the
//! connection's temporary failure.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, IpAddr, ServerName, UnixTime};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tern_proto::client::TlsPolicy;

/// How a route uses STARTTLS, like Postfix's `smtp_tls_security_level`
/// (`none`, `may`, `encrypt`, `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not checked; plain text when it is
    /// not offered, refused, or the handshake fails (then the same address
    /// is retried at once without STARTTLS).
    #[default]
    Opportunistic,
    /// STARTTLS or a temporary failure; certificate not checked.
    Require,
    /// STARTTLS or a temporary failure, and the certificate must chain to a
    /// trusted root and name the host routed to.
    Verify,
}

impl TlsMode {
    /// The client's side of the mode: whether STARTTLS is sent and what a
    /// missing or refused STARTTLS means.
    pub fn policy(self) -> TlsPolicy {
        match self {
            TlsMode::None => TlsPolicy::None,
            TlsMode::Opportunistic => TlsPolicy::Opportunistic,
            TlsMode::Require | TlsMode::Verify => TlsPolicy::Require,
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::None => "none",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Require => "require",
            TlsMode::Verify => "verify",
        })
    }
}

/// A CA file (or the rustls setup) that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("CA file {path} holds no usable certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// The configurations a settings' connections share, built on first use
/// (or by [`super::SmtpSettings::prepare_tls`]) and shared by the settings'
/// clones. Leave it at its default. The verifying configuration is kept
/// with the CA file it was built from and rebuilt when asked for another,
/// so a settings made with struct update syntax from another never uses
/// the other's roots.
#[derive(Clone, Default)]
pub struct TlsCache(Arc<Mutex<Slots>>);

#[derive(Default)]
struct Slots {
    /// Opportunistic and Require: any certificate.
    unverified: Option<Arc<ClientConfig>>,
    /// Verify: roots (and the CA file they include) and name.
    verified: Option<(Option<PathBuf>, Arc<ClientConfig>)>,
}

impl fmt::Debug for TlsCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsCache")
    }
}

impl TlsCache {
    /// The configuration for `mode` (`None` uses none; it gets the
    /// unverified one, never used).
    pub(super) fn config(
        &self,
        mode: TlsMode,
        ca_file: Option<&Path>,
    ) -> Result<Arc<ClientConfig>, TlsSetupError> {
        // A poisoned lock only means another thread panicked while building:
        // each slot holds a complete value or none.
        let mut slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if mode != TlsMode::Verify {
            if let Some(config) = &slots.unverified {
                return Ok(config.clone());
            }
            let config = Arc::new(unverified()?);
            slots.unverified = Some(config.clone());
            return Ok(config);
        }
        if let Some((key, config)) = &slots.verified
            && key.as_deref() == ca_file
        {
            return Ok(config.clone());
        }
        let config = Arc::new(verified(ca_file)?);
        slots.verified = Some((ca_file.map(Path::to_path_buf), config.clone()));
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn rustls_error(e: impl fmt::Display) -> TlsSetupError {
    TlsSetupError::Rustls(e.to_string())
}

fn unverified() -> Result<ClientConfig, TlsSetupError> {
    let provider = provider();
    let any = Arc::new(AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(rustls_error)?
        .dangerous()
        .with_custom_certificate_verifier(any)
        .with_no_client_auth())
}

fn verified(ca_file: Option<&Path>) -> Result<ClientConfig, TlsSetupError> {
    let provider = provider();
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(rustls_error)?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(rustls_error)?
        .with_webpki_verifier(verifier)
        .with_no_client_auth())
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsSetupError> {
    let ca_error = |reason: String| TlsSetupError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| ca_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| ca_error(e.to_string()))?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Accepts any certificate chain for any name, but checks that the server
/// signed the handshake with the certificate's key.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The name the certificate is checked against and sent as SNI: the routed
/// host name when it is a DNS name (SNI only then), its IP when it is an
/// IP literal. A name that is neither (a Unix socket's path) falls back to
/// the connected address, or loopback, which only `Verify` minds.
pub(super) fn server_name(host: &str, connected: Option<SocketAddr>) -> ServerName<'static> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .map(|h| h.strip_prefix("IPv6:").unwrap_or(h))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(IpAddr::from(ip));
    }
    // The DNS root's dot is not part of the name a certificate carries.
    let dns = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
    if let Ok(name) = ServerName::try_from(dns) {
        return name;
    }
    let ip = connected
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    ServerName::IpAddress(IpAddr::from(ip))
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384" for a finished handshake.
pub(super) fn describe(conn: &rustls::ClientConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    match conn.negotiated_cipher_suite() {
        Some(suite) => {
            let suite = suite.suite();
            match suite.as_str() {
                Some(name) => format!("{version} {name}"),
                None => format!("{version} {suite:?}"),
            }
        }
        None => version,
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn names_for_sni_and_verification() {
        assert_eq!(
            server_name("MX.Example.", None),
            ServerName::try_from("mx.example").unwrap()
        );
        assert!(matches!(
            server_name("192.0.2.1", None),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[IPv6:2001:db8::1]", None),
            ServerName::IpAddress(_)
        ));
        let addr: SocketAddr = "198.51.100.7:25".parse().unwrap();
        assert_eq!(
            server_name("/run/dovecot/lmtp", Some(addr)),
            ServerName::IpAddress(IpAddr::from(addr.ip()))
        );
    }

    #[test]
    fn modes_map_to_client_policies() {
        assert_eq!(TlsMode::Verify.policy(), TlsPolicy::Require);
        assert_eq!(TlsMode::Require.policy(), TlsPolicy::Require);
        assert_eq!(TlsMode::Opportunistic.policy(), TlsPolicy::Opportunistic);
        assert_eq!(TlsMode::None.policy(), TlsPolicy::None);
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TlsCache::default();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            cache.config(TlsMode::Verify, Some(&missing)),
            Err(TlsSetupError::CaFile { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            cache.config(TlsMode::Verify, Some(&empty)),
            Err(TlsSetupError::NoCertificate { .. })
        ));
        // The CA file is Verify's alone.
        assert!(cache.config(TlsMode::Require, Some(&missing)).is_ok());
        let first = cache.config(TlsMode::Verify, None).unwrap();
        let again = cache.config(TlsMode::Verify, None).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "built once per CA file");
    }
}
