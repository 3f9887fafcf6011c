//! SIGHUP: the config file is read again and put in force without dropping
//! a connection.
//!
//! All or nothing. Everything the new config needs is loaded first (the
//! file and its validation, the TLS certificates, the DKIM keys, the users
//! file, the outbound resolver and TLS settings); only when all of it
//! loaded is anything replaced, so a reload never leaves the server
//! half-configured. A config that does not validate is refused, each error
//! logged with its key and line, and the running one stays in force.
//!
//! What changes at once: local domains, users, aliases, catch-alls,
//! trusted networks, limits (new sessions; a session keeps the config it
//! started with), connection limits, routes and outbound settings (attempts
//! that start from now on), retry policy, egress limits, certificates, DKIM
//! keys, submission settings. A new data_dir refuses the reload (paths
//! derived from it would change). What needs a restart, because it is bound
//! to a socket, a file or a thread made at start-up: listeners, the spool,
//! `[server]`, `[auth]`, `[log]`, `[metrics]` and `[sendmail]`; a change
//! there is logged with its key, and the running value stays while the
//! rest of the reload goes ahead.

use crate::config::{self, CertificateFiles, ConfigError, KeyFiles, LiveRuntime, Runtime};
use crate::dkim::Signers;
use crate::listener::ConnectionLimits;
use crate::outbound::{AdminHandle, NewConfig, QueueOp};
use crate::session::Context;
use crate::tls::TlsSource;
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{info, warn};

/// What a reload replaces, and where the config comes from.
pub struct Reloader {
    /// The config file; `None`: the embedded default (read again too, so a
    /// reload of it is a harmless no-op).
    pub path: Option<PathBuf>,
    pub runtime: Arc<LiveRuntime>,
    pub ctx: Arc<Context>,
    pub limits: Arc<ConnectionLimits>,
    pub outbound: AdminHandle,
}

/// Why a reload was refused.
#[derive(Debug)]
pub enum ReloadError {
    /// The new config does not validate.
    Invalid(Vec<ConfigError>),
    /// It validated, but a part of it could not be loaded.
    Unloadable { key: String, message: String },
}

impl Reloader {
    /// Reads the config again and puts it in force, or logs why not.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let result = self.try_reload().await;
        match &result {
            Ok(()) => {}
            Err(ReloadError::Invalid(errors)) => {
                for e in errors {
                    warn!(event = "config.reload_refused", key = %e.key, line = e.line, error = %e.message, "the running config stays in force");
                }
            }
            Err(ReloadError::Unloadable { key, message }) => {
                warn!(event = "config.reload_refused", key = %key, error = %message, "the running config stays in force");
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<(), ReloadError> {
        let new = match &self.path {
            Some(path) => config::load_with(path, KeyFiles::Skip),
            None => config::embedded_default(),
        }
        .map_err(ReloadError::Invalid)?;
        let old = self.runtime.load_full();
        // Mailboxes, DKIM keys and the users file default to paths below
        // it: keeping the running one would leave those pointing elsewhere.
        if old.data_dir != new.data_dir {
            return Err(ReloadError::Unloadable {
                key: "data_dir".into(),
                message: format!(
                    "changes only at a restart ({} is in use), and paths derived from it would change with it",
                    old.data_dir.display()
                ),
            });
        }
        let mut new = keep_restart_only(&old, new);
        crate::server::fit_to_storage(&mut new);
        let new = Arc::new(new);

        let source = TlsSource {
            files: new.tls_certificates.clone(),
            data_dir: new.data_dir.clone(),
            hostname: new.hostname.clone(),
        };
        let tls = match self.ctx.tls.prepare(source) {
            Ok(prepared) => Some(prepared),
            // Keys only root may read (a Let's Encrypt privkey.pem) were
            // read at start-up, before the drop: the same files stay in
            // use, and the rest of the config goes ahead.
            Err(message)
                if old.tls_certificates == new.tls_certificates
                    && unreadable(&new.tls_certificates) =>
            {
                warn!(event = "tls.reload_kept", error = %message, "the certificate files cannot be read by this user (server.user); the ones loaded at start-up stay in use");
                None
            }
            Err(message) => {
                // Name the certificate, as check-config does.
                let key = new
                    .tls_certificates
                    .iter()
                    .position(|files| crate::tls::check(files).is_err())
                    .map_or("tls.certificates".to_string(), |i| {
                        format!("tls.certificates[{i}]")
                    });
                return Err(ReloadError::Unloadable { key, message });
            }
        };
        let dkim = Signers::from_config(&new.dkim).map_err(ReloadError::Invalid)?;
        // The drop kept the capabilities to give mailboxes away only if the
        // config at start-up needed them.
        crate::privileges::check_mailbox_owners(&new).map_err(|message| {
            ReloadError::Unloadable {
                key: "mailbox.owner".into(),
                message,
            }
        })?;
        // Logins read the users file themselves; one that cannot be read
        // now would fail every login after the reload.
        crate::auth::store::Users::load(&new.auth.users_file).map_err(|e| {
            ReloadError::Unloadable {
                key: "auth.users_file".into(),
                message: e.to_string(),
            }
        })?;
        // The last step that can fail: it replaces the outbound context
        // only when the new one could be built.
        self.outbound
            .request(QueueOp::Reconfigure(NewConfig(new.clone())))
            .await
            .map_err(|message| ReloadError::Unloadable {
                key: "outbound".into(),
                message,
            })?;

        if let Some(tls) = tls {
            self.ctx.tls.install(tls);
        }
        self.ctx.dkim.store(Arc::new(dkim));
        self.ctx.egress.set_limits(new.egress.clone());
        self.limits.set(
            new.limits.max_connections,
            new.limits.max_connections_per_ip,
        );
        self.runtime.store(new.clone());
        info!(
            event = "config.reloaded",
            domains = new.local_domains.len(),
            users = new.users.len(),
            aliases = new.aliases.len(),
            certificates = ?self.ctx.tls.names(),
        );
        Ok(())
    }
}

/// `new` with the values that only a restart can change put back to the
/// running ones, each change logged with its key.
fn keep_restart_only(old: &Runtime, mut new: Runtime) -> Runtime {
    let mut kept = Vec::new();
    keep("listener", &old.listeners, &mut new.listeners, &mut kept);
    keep("spool", &old.spool, &mut new.spool, &mut kept);
    keep("auth", &old.auth, &mut new.auth, &mut kept);
    keep("log", &old.log, &mut new.log, &mut kept);
    keep("server", &old.run_as, &mut new.run_as, &mut kept);
    keep("metrics", &old.metrics, &mut new.metrics, &mut kept);
    keep("sendmail", &old.sendmail, &mut new.sendmail, &mut kept);
    for key in kept {
        warn!(
            event = "config.reload_needs_restart",
            key, "this section changed but takes effect only at a restart; its running value stays"
        );
    }
    new
}

/// Puts the running value back over a changed one, noting its key.
fn keep<T: PartialEq + Clone>(key: &'static str, old: &T, new: &mut T, kept: &mut Vec<&str>) {
    if old != new {
        kept.push(key);
        *new = old.clone();
    }
}

/// Whether any of the files cannot be opened for lack of permission.
fn unreadable(files: &[CertificateFiles]) -> bool {
    files.iter().any(|f| {
        [&f.cert, &f.key].iter().any(|path| {
            matches!(std::fs::File::open(path), Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied)
        })
    })
}
