//! Server-side TLS: the certificates Tern offers (STARTTLS on `mx` and
//! `submission` listeners, implicit TLS on `smtps`), chosen by the name the
//! client asks for (SNI), reloaded on SIGHUP without touching connections.
//!
//! Invariants:
//! - TLS 1.2 and 1.3 only, with aws-lc-rs as the one crypto provider.
//! - There is always a certificate: with none configured, a self-signed one
//!   for the host name is made once and kept in `<data_dir>/tls/`, so the
//!   embedded default offers STARTTLS too (opportunistic TLS between MTAs
//!   does not verify certificates: encryption beats plain text).
//! - A reload that fails (unreadable file, key not matching its
//!   certificate) changes nothing: the certificates in use stay.
//! - Sessions already running keep the certificate they negotiated; new
//!   handshakes see the reloaded set at once (the acceptor's resolver reads
//!   it per handshake).
//!
//! Errors: `String`s naming the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::CertificateFiles;

/// File names of the generated certificate, under `<data_dir>/tls/`.
const SELF_SIGNED_CERT: &str = "self-signed.crt";
const SELF_SIGNED_KEY: &str = "self-signed.key";

/// What one session learnt from its TLS handshake: for the `Received:`
/// header, the logs and SCRAM-PLUS channel binding.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// e.g. "TLSv1.3".
    pub version: String,
    /// e.g. "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
    /// The name the client asked for (SNI), if any.
    pub server_name: Option<String>,
    /// RFC 9266 `tls-exporter` channel-binding data (TLS 1.3 only: see
    /// `auth::tls_exporter`).
    pub channel_binding: Option<[u8; 32]>,
}

impl TlsInfo {
    /// Reads the negotiated parameters off a finished handshake.
    pub fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => "unknown".to_string(),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown")
            .to_string();
        let channel_binding = crate::auth::tls_exporter(conn);
        TlsInfo {
            version,
            cipher,
            server_name: conn.server_name().map(str::to_string),
            channel_binding,
        }
    }
}

/// The certificates on offer, by name.
#[derive(Debug)]
struct CertSet {
    /// Lower-case DNS names (`*.example.org` for wildcards) and the key
    /// that serves them, in configuration order.
    by_name: Vec<(String, Arc<CertifiedKey>)>,
    /// For clients that send no name or one we have no certificate for:
    /// the first configured certificate.
    default: Arc<CertifiedKey>,
}

impl CertSet {
    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.default.clone();
        };
        let exact = self.by_name.iter().find(|(n, _)| *n == name);
        // A wildcard covers exactly one leftmost label (RFC 6125 §6.4.3).
        let wildcard = || {
            let parent = name.split_once('.')?.1;
            self.by_name
                .iter()
                .find(|(n, _)| n.strip_prefix("*.") == Some(parent))
        };
        exact
            .or_else(wildcard)
            .map(|(_, k)| k.clone())
            .unwrap_or_else(|| self.default.clone())
    }
}

/// rustls asks this for a certificate on every handshake.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertSet>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(set.pick(hello.server_name()))
    }
}

/// Where the certificates come from, kept for reloads.
#[derive(Debug, Clone)]
pub struct TlsSource {
    /// Configured certificate/key files; empty means the self-signed one.
    pub files: Vec<CertificateFiles>,
    pub data_dir: PathBuf,
    pub hostname: String,
}

/// The server's TLS: an acceptor for handshakes and what reloads it.
pub struct ServerTls {
    pub acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    /// What a plain reload reads again; a config reload replaces it.
    source: RwLock<TlsSource>,
    provider: Arc<CryptoProvider>,
}

/// Certificates loaded for a config reload, not yet in use.
pub struct PreparedTls {
    set: CertSet,
    source: TlsSource,
}

impl ServerTls {
    /// Loads (or, with none configured, makes) the certificates.
    pub fn load(source: TlsSource) -> Result<ServerTls, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let set = load_set(&source, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(set)),
        });
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            source: RwLock::new(source),
            provider,
        })
    }

    /// Loads the certificates of a new config without using them yet: a
    /// reload installs them only once every other part of the new config
    /// has loaded too.
    pub fn prepare(&self, source: TlsSource) -> Result<PreparedTls, String> {
        let set = load_set(&source, &self.provider)?;
        Ok(PreparedTls { set, source })
    }

    /// New handshakes use `prepared` from now on; open sessions keep theirs.
    pub fn install(&self, prepared: PreparedTls) {
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = prepared.source;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(prepared.set);
    }

    /// Reads the certificate files again; on any error the ones in use stay.
    pub fn reload(&self) -> Result<(), String> {
        let source = self
            .source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let set = load_set(&source, &self.provider)?;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(())
    }

    /// The DNS names the current certificates cover (for the start-up log).
    pub fn names(&self) -> Vec<String> {
        let set = self
            .resolver
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        set.by_name.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Whether a certificate and its key load and belong together.
pub fn check(files: &CertificateFiles) -> Result<(), String> {
    load_certified_key(files, &rustls::crypto::aws_lc_rs::default_provider()).map(|_| ())
}

fn load_set(source: &TlsSource, provider: &CryptoProvider) -> Result<CertSet, String> {
    let files = if source.files.is_empty() {
        vec![self_signed(&source.data_dir, &source.hostname)?]
    } else {
        source.files.clone()
    };
    let mut by_name = Vec::new();
    let mut default = None;
    for f in &files {
        let key = load_certified_key(f, provider)?;
        let names = dns_names(&key.cert[0]);
        if names.is_empty() {
            tracing::warn!(cert = %f.cert.display(), "tls.certificate_without_dns_names");
        }
        for n in names {
            by_name.push((n, key.clone()));
        }
        default.get_or_insert(key);
    }
    let default = default.ok_or("no certificate")?;
    Ok(CertSet { by_name, default })
}

fn load_certified_key(
    f: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .map_err(|e| format!("{}: {e}", f.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", f.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", f.cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&f.key).map_err(|e| format!("{}: {e}", f.key.display()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|e| {
            format!(
                "{} with {}: {e} (does the key belong to the certificate?)",
                f.key.display(),
                f.cert.display()
            )
        })
}

/// The DNS names of a certificate's subject alternative names, lower-case.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee
            .valid_dns_names()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The self-signed certificate for `hostname`, made on first use.
fn self_signed(data_dir: &Path, hostname: &str) -> Result<CertificateFiles, String> {
    let dir = data_dir.join("tls");
    let files = CertificateFiles {
        cert: dir.join(SELF_SIGNED_CERT),
        key: dir.join(SELF_SIGNED_KEY),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    crate::fsutil::create_dir_durable(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let made = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| format!("cannot make a self-signed certificate for {hostname}: {e}"))?;
    // The key first: a certificate without its key would be kept forever.
    write_private(&files.key, made.signing_key.serialize_pem().as_bytes())?;
    write_private(&files.cert, made.cert.pem().as_bytes())?;
    tracing::info!(cert = %files.cert.display(), name = hostname, "tls.self_signed_created");
    Ok(files)
}

/// Writes a file durably, readable by its owner only (temp file, fsync,
/// rename, directory fsync).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_files(dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
        let made = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, made.cert.pem()).unwrap();
        std::fs::write(&files.key, made.signing_key.serialize_pem()).unwrap();
        files
    }

    fn source(dir: &Path, files: Vec<CertificateFiles>) -> TlsSource {
        TlsSource {
            files,
            data_dir: dir.to_path_buf(),
            hostname: "mx.example.test".into(),
        }
    }

    #[test]
    fn self_signed_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let tls = ServerTls::load(source(tmp.path(), vec![])).unwrap();
        assert_eq!(tls.names(), vec!["mx.example.test".to_string()]);
        let key = tmp.path().join("tls").join(SELF_SIGNED_KEY);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let first = std::fs::read(&key).unwrap();
        ServerTls::load(source(tmp.path(), vec![])).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), first, "not made again");
    }

    #[test]
    fn sni_picks_by_name_and_wildcard_else_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let a = cert_files(tmp.path(), "a", &["mail.a.test"]);
        let b = cert_files(tmp.path(), "b", &["*.b.test", "b.test"]);
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let set = load_set(&source(tmp.path(), vec![a, b]), &provider).unwrap();
        let names = |k: Arc<CertifiedKey>| dns_names(&k.cert[0]);
        assert_eq!(names(set.pick(Some("MAIL.A.TEST."))), vec!["mail.a.test"]);
        assert_eq!(names(set.pick(Some("mx.b.test")))[0], "*.b.test");
        assert_eq!(names(set.pick(Some("b.test")))[0], "*.b.test");
        // A wildcard covers one label only.
        assert_eq!(names(set.pick(Some("x.mx.b.test"))), vec!["mail.a.test"]);
        assert_eq!(names(set.pick(None)), vec!["mail.a.test"]);
    }

    #[test]
    fn a_failed_reload_keeps_the_certificates_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let a = cert_files(tmp.path(), "a", &["mail.a.test"]);
        let tls = ServerTls::load(source(tmp.path(), vec![a.clone()])).unwrap();
        // A key that does not belong to the certificate.
        let other = cert_files(tmp.path(), "other", &["mail.a.test"]);
        std::fs::copy(&other.key, &a.key).unwrap();
        let err = tls.reload().unwrap_err();
        assert!(err.contains("a.key"), "{err}");
        assert_eq!(tls.names(), vec!["mail.a.test"]);
        // A good new pair is picked up.
        std::fs::copy(&other.cert, &a.cert).unwrap();
        let renamed = cert_files(tmp.path(), "c", &["new.a.test"]);
        std::fs::copy(&renamed.cert, &a.cert).unwrap();
        std::fs::copy(&renamed.key, &a.key).unwrap();
        tls.reload().unwrap();
        assert_eq!(tls.names(), vec!["new.a.test"]);
    }

    #[test]
    fn unreadable_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = CertificateFiles {
            cert: tmp.path().join("nope.crt"),
            key: tmp.path().join("nope.key"),
        };
        let err = ServerTls::load(source(tmp.path(), vec![missing]))
            .err()
            .unwrap();
        assert!(err.contains("nope.crt"), "{err}");
    }
}
