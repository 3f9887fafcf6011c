//! The administrator's control channel: a local Unix stream socket through
//! which `tern queue ...` asks the running server about its queue and steers
//! it (flush, hold, release, delete), and `tern user release` lets a user's
//! mail held by the circuit breaker go.
//!
//! # Protocol
//! The client connects to [`socket_path`] (`<data_dir>/control.sock`), writes
//! one [`ControlRequest`] as a JSON line (`{"command":"show","id":"..."}`),
//! and reads one JSON line back: `{"ok": <value>}` or `{"error": "text"}`.
//! Then the server closes. The shapes of the `ok` values are the queue
//! manager's; [`render`] documents them and turns them into text.
//!
//! This module only carries requests: [`serve`] forwards each parsed request
//! on a [`ControlSender`] together with a oneshot for the reply, and whoever
//! owns the queue answers it.
//!
//! # Invariants
//! - Only the server's user and root can connect: the socket is created with
//!   mode 0600 in a private (0700) directory and moved into place, so it is
//!   never reachable with looser permissions, and each peer's credentials are
//!   checked again on accept.
//! - Every connection is bounded: a request line of at most
//!   [`MAX_REQUEST_LINE`] bytes, [`CONNECTION_DEADLINE`] from accept to the
//!   reply, and at most [`MAX_CONNECTIONS`] served at once (more wait in the
//!   listen backlog).
//! - A bad request (too long, not JSON, an unknown command) gets an error
//!   reply; nothing a client sends can stop the listener.
//! - A live server's socket is never removed: a socket file is removed at
//!   start only when nothing answers on it, and at shutdown only if it is
//!   still the one this server bound.
//!
//! # Not done here
//! Interpreting requests (the queue manager's), authentication beyond the
//! file mode and peer uid, several requests per connection.
//!
//! # Errors
//! [`serve`] fails when the socket cannot be created or another process
//! already answers on it (`AddrInUse`). [`request`] returns
//! [`ControlError::NotRunning`] when nothing listens, and the server's error
//! reply as [`ControlError::Server`].

pub mod render;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Longest request line, newline included.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Time a connection gets from accept to the end of its reply.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest reply the client reads; a queue listing of a few hundred thousand
/// messages fits.
pub const MAX_REPLY: u64 = 256 * 1024 * 1024;
/// How long the client waits for the reply: the server's deadline plus
/// slack for writing a large one.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// When the deadline has passed, the error reply still gets this long.
const LATE_REPLY_GRACE: Duration = Duration::from_secs(1);

/// One request from the administrator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Every queued message with its recipients' state.
    List,
    /// One message, with its envelope details.
    Show { id: String },
    /// Attempt now: one message, or every deferred recipient.
    Flush { id: Option<String> },
    /// Stop attempting a message until released.
    Hold { id: String },
    /// Undo `Hold`.
    Release { id: String },
    /// Remove a message from the queue without a bounce.
    Delete { id: String },
    /// Per-destination state of the outbound scheduler.
    Destinations,
    /// `tern user release`: end the circuit breaker's hold of a user in the
    /// running server and let their queued mail go (the users file's mark
    /// is cleared by the command itself).
    ReleaseUser { name: String },
}

/// The answer to a request: a JSON value, or an error text for the
/// administrator.
pub type ControlReply = Result<serde_json::Value, String>;

/// Where [`serve`] hands requests, each with the oneshot its reply goes to.
pub type ControlSender = mpsc::Sender<(ControlRequest, oneshot::Sender<ControlReply>)>;

/// The reply as it travels: `{"ok": value}` or `{"error": "text"}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireReply {
    Ok(serde_json::Value),
    Error(String),
}

/// What can go wrong asking the server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("tern is not running (nothing listens on {0})")]
    NotRunning(PathBuf),
    #[error("no reply from tern within {}s", CLIENT_TIMEOUT.as_secs())]
    Timeout,
    #[error("cannot talk to tern on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("tern sent a reply that is not understood: {0}")]
    Protocol(String),
    /// The server understood the request and refused or failed it.
    #[error("{0}")]
    Server(String),
}

/// The control socket of the server whose data directory is `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Binds the control socket at `path` and serves it until `shutdown` is
/// cancelled; forwards each request to `tx` and writes the reply back. The
/// socket file is removed when the returned task ends.
///
/// Call it within a tokio runtime, and only while holding the spool lock: a
/// socket nobody answers on is taken to be a dead server's and replaced.
pub fn serve(
    path: &Path,
    tx: ControlSender,
    shutdown: CancellationToken,
) -> io::Result<tokio::task::JoinHandle<()>> {
    serve_with_deadline(path, tx, shutdown, CONNECTION_DEADLINE)
}

fn serve_with_deadline(
    path: &Path,
    tx: ControlSender,
    shutdown: CancellationToken,
    deadline: Duration,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(path)?;
    let identity = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))?;
    let path = path.to_path_buf();
    info!(path = %path.display(), "control.listening");
    Ok(tokio::spawn(async move {
        accept_loop(listener, tx, &shutdown, deadline).await;
        // Another server may have taken the path over since (after a stale
        // check of its own); its socket is not ours to remove.
        if let Ok(m) = std::fs::symlink_metadata(&path)
            && (m.dev(), m.ino()) == identity
        {
            let _ = std::fs::remove_file(&path);
        }
        debug!("control.stopped");
    }))
}

/// Creates the socket with mode 0600 at `path`, replacing a stale one.
fn bind(path: &Path) -> io::Result<UnixListener> {
    remove_stale(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // bind() creates the file with the process umask, and changing the umask
    // would race with every other thread creating files. Binding inside a
    // directory only we can enter and renaming afterwards means the socket
    // is never reachable before its mode is 0600. The name stays short:
    // socket paths are limited to about 100 bytes.
    let private = parent.join(format!(".cs{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| with_path(e, &private))?;
    let result = (|| {
        let temp = private.join("s");
        let listener = UnixListener::bind(&temp).map_err(|e| with_path(e, &temp))?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temp, path).map_err(|e| with_path(e, path))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Removes a socket file nobody answers on; refuses to touch a live socket
/// or anything that is not a socket.
pub(crate) fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, path)),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another process answers on it", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "control.stale_socket_removed");
            std::fs::remove_file(path).map_err(|e| with_path(e, path))
        }
        Err(e) => Err(with_path(e, path)),
    }
}

async fn accept_loop(
    listener: UnixListener,
    tx: ControlSender,
    shutdown: &CancellationToken,
    deadline: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let our_uid = unsafe { libc::geteuid() };
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: pause rather than spin on them.
                    warn!(error = %e, "control.accept_failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == our_uid || cred.uid() == 0 => {}
            Ok(cred) => {
                warn!(uid = cred.uid(), "control.peer_refused");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "control.peer_unknown");
                continue;
            }
        }
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = handle(stream, &tx, deadline) => {}
            }
            drop(permit);
        });
    }
}

/// Serves one connection: one request line in, one reply line out.
async fn handle(stream: UnixStream, tx: &ControlSender, limit: Duration) {
    let deadline = Instant::now() + limit;
    let (read, mut write) = stream.into_split();
    let reply = match tokio::time::timeout_at(deadline, read_and_dispatch(read, tx)).await {
        Ok(reply) => reply,
        Err(_) => Err(format!(
            "no complete request and reply within {}s",
            limit.as_secs_f64()
        )),
    };
    if let Err(e) = &reply {
        debug!(error = %e, "control.request_failed");
    }
    let wire = match reply {
        Ok(v) => WireReply::Ok(v),
        Err(e) => WireReply::Error(e),
    };
    let mut line = match serde_json::to_vec(&wire) {
        Ok(l) => l,
        // Only a Value with a non-string map key could fail; say so instead.
        Err(e) => format!("{{\"error\":\"reply not encodable: {e}\"}}").into_bytes(),
    };
    line.push(b'\n');
    let write_by = deadline.max(Instant::now() + LATE_REPLY_GRACE);
    let _ = tokio::time::timeout_at(write_by, async {
        write.write_all(&line).await?;
        write.shutdown().await
    })
    .await;
}

async fn read_and_dispatch(
    read: tokio::net::unix::OwnedReadHalf,
    tx: &ControlSender,
) -> ControlReply {
    let mut line = Vec::new();
    let mut limited = tokio::io::BufReader::new(read).take(MAX_REQUEST_LINE as u64 + 1);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST_LINE {
        return Err(format!("request line longer than {MAX_REQUEST_LINE} bytes"));
    }
    let request = parse_request(&line)?;
    let (reply_to, reply) = oneshot::channel();
    tx.send((request, reply_to))
        .await
        .map_err(|_| "the queue manager is not running".to_string())?;
    reply
        .await
        .map_err(|_| "the queue manager dropped the request".to_string())?
}

/// The request in `line` (an unterminated last line is accepted).
fn parse_request(line: &[u8]) -> Result<ControlRequest, String> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request".into());
    }
    serde_json::from_slice(text).map_err(|e| format!("bad request: {e}"))
}

/// Sends `req` to the server listening on `path` and waits for its reply.
/// Blocking; for the command line.
pub fn request(path: &Path, req: &ControlRequest) -> Result<serde_json::Value, ControlError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout,
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning(path.to_path_buf()));
        }
        Err(e) => return Err(io_err(e)),
    };
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    if line.len() > MAX_REQUEST_LINE {
        return Err(ControlError::Protocol(format!(
            "request longer than {MAX_REQUEST_LINE} bytes"
        )));
    }
    stream.write_all(&line).map_err(io_err)?;
    let mut reply = Vec::new();
    BufReader::new(io::Read::take(&stream, MAX_REPLY))
        .read_until(b'\n', &mut reply)
        .map_err(io_err)?;
    parse_reply(&reply)
}

/// The value or error in one reply line.
fn parse_reply(line: &[u8]) -> Result<serde_json::Value, ControlError> {
    if line.is_empty() {
        return Err(ControlError::Protocol(
            "the connection closed without a reply".into(),
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(ControlError::Protocol(format!(
            "the reply is cut short after {} bytes",
            line.len()
        )));
    }
    match serde_json::from_slice::<WireReply>(line) {
        Ok(WireReply::Ok(v)) => Ok(v),
        Ok(WireReply::Error(e)) => Err(ControlError::Server(e)),
        Err(e) => Err(ControlError::Protocol(e.to_string())),
    }
}
