//! The server's end of local injection: the `[sendmail] socket`, open to
//! every local user (mode 0666, in a folder of mode 0755 so the data folder
//! can stay closed), each connection an SMTP session of the same engine as
//! the TCP listeners', with the peer's uid and pid from `SO_PEERCRED`.
//!
//! Invariants:
//! - A live server's socket is never removed (a socket file is replaced at
//!   start only when nobody answers on it), and at shutdown only the socket
//!   this server bound is.
//! - At most `limits.max_connections` local sessions run at once; more wait
//!   in the listen backlog (a burst of cron jobs is slowed, not refused).
//!
//! Errors: [`bind`] fails with the path in the message; accept errors are
//! logged and retried after a pause.

use super::{LocalClient, login_of};
use crate::conn::Conn;
use crate::listener::ConnectionLimits;
use crate::session::{self, Context};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Everyone may connect: who they are is the kernel's to say.
const SOCKET_MODE: u32 = 0o666;
/// The socket's folder: enterable by all, writable by the server only.
const FOLDER_MODE: u32 = 0o755;

/// The bound socket.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    identity: (u64, u64),
}

/// Binds the socket at `path` (within a tokio runtime, while holding the
/// spool lock: a socket nobody answers on is taken for a dead server's).
/// A missing folder is created with mode 0755, and `default_folder` (the
/// `public/` folder Tern owns) is given that mode whatever it had.
pub fn bind(path: &Path, default_folder: Option<&Path>) -> io::Result<Listener> {
    let with_path =
        |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .mode(FOLDER_MODE)
                .create(parent)
                .map_err(|e| with_path(e, parent))?;
        }
        // The umask may have narrowed the mode; other users must enter.
        if default_folder == Some(parent) {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(FOLDER_MODE))
                .map_err(|e| with_path(e, parent))?;
        }
    }
    crate::control::remove_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|e| with_path(e, path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| with_path(e, path))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| with_path(e, path))?;
    Ok(Listener {
        listener,
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    })
}

impl Listener {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts until shutdown, each session on `tracker`; removes the
    /// socket file when it ends.
    pub async fn serve(self, ctx: Arc<Context>, tracker: TaskTracker) {
        let slots = Arc::new(Semaphore::new(
            ctx.runtime.load().limits.max_connections.max(1),
        ));
        // The total is the semaphore's (a local client waits for a slot);
        // this one only counts per uid.
        let per_uid = ConnectionLimits::<u32>::new(usize::MAX, 1);
        loop {
            let permit = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(event = "sendmail.accept_error", error = %e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let cred = match stream.peer_cred() {
                Ok(c) => c,
                Err(e) => {
                    // Without a uid nobody can be held to account: no session.
                    warn!(event = "sendmail.peer_unknown", error = %e);
                    continue;
                }
            };
            // One user's runaway script must not take every slot from the
            // others' cron mail: as many sessions per uid as per client
            // address on the network, refused as there with 421 (the
            // client exits 75: try again later).
            let cap = ctx.runtime.load().limits.max_connections_per_ip.max(1);
            per_uid.set(usize::MAX, cap);
            let Ok(uid_slot) = per_uid.acquire(cred.uid()) else {
                warn!(
                    event = "sendmail.uid_limit",
                    uid = cred.uid(),
                    limit = cap,
                    "too many sessions of this user at once"
                );
                let hostname = ctx.runtime.load().hostname.clone();
                tracker.spawn(crate::listener::refuse(
                    stream,
                    hostname,
                    "too many sessions of yours at once",
                ));
                continue;
            };
            let ctx = ctx.clone();
            tracker.spawn(async move {
                let _uid_slot = uid_slot;
                let uid = cred.uid();
                // The password database may be remote (NSS): off the
                // session threads.
                let login = tokio::task::spawn_blocking(move || login_of(uid))
                    .await
                    .ok()
                    .flatten();
                let client = LocalClient {
                    uid,
                    pid: cred.pid(),
                    login,
                };
                session::run_local(Conn::Other(Box::new(stream)), client, ctx).await;
                drop(permit);
            });
        }
        // Another server may have taken the path over since; its socket is
        // not ours to remove.
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
        info!(event = "sendmail.stopped", path = %self.path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_public_replaces_a_stale_socket_and_never_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("public");
        let path = folder.join("submit.sock");
        let first = bind(&path, Some(&folder)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&path), mode(&folder)), (0o666, 0o755));
        // Someone answers on it: not ours to take.
        let err = bind(&path, Some(&folder))
            .err()
            .expect("a live socket is kept");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // A dead server's socket (nobody answers) is replaced.
        drop(first);
        let again = bind(&path, Some(&folder)).unwrap();
        assert_eq!(again.path(), path);
        // A folder the administrator chose keeps its mode.
        let own = dir.path().join("own");
        std::fs::DirBuilder::new().mode(0o750).create(&own).unwrap();
        bind(&own.join("s.sock"), Some(&folder)).unwrap();
        assert_eq!(mode(&own), 0o750);
    }
}
