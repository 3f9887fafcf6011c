//! The service manager's notification protocol (`sd_notify`, used by
//! systemd's `Type=notify`): one datagram per state change, sent to the
//! Unix socket named by `NOTIFY_SOCKET` (a path, or an abstract address
//! written with a leading `@`).
//!
//! The server says `READY=1` once its listeners accept and the spool is
//! open (so `systemctl start` returns when mail can be taken), `STOPPING=1`
//! when it starts draining on SIGTERM, and `RELOADING=1` then `READY=1`
//! around a SIGHUP reload.
//!
//! Without `NOTIFY_SOCKET` (not started by a service manager) every call is
//! a no-op. A failed send is logged and otherwise ignored: the manager then
//! times the start out, which says more than a server refusing to run.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use tracing::warn;

/// The environment variable that names the manager's socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The service is up: listeners accept, the spool is open.
pub const READY: &str = "READY=1";
/// The service is draining and will exit.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the
/// service manager. `Ok(false)`: there is none to tell.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os(NOTIFY_SOCKET).as_deref(), state)
}

fn notify_to(target: Option<&std::ffi::OsStr>, state: &str) -> io::Result<bool> {
    let Some(target) = target else {
        return Ok(false);
    };
    let address = socket_address(target.as_encoded_bytes())?;
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(true)
}

/// [`notify`], with a failure logged rather than returned.
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        warn!(event = "service.notify_failed", state, error = %e, "the service manager was not told");
    }
}

/// `RELOADING=1` with the monotonic time the protocol asks to go with it
/// (systemd 253 and later ignore a reload notification without it).
pub fn reloading() -> String {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = (now.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(now.tv_nsec as u64 / 1_000);
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// `NOTIFY_SOCKET`'s value as a socket address: `@name` is the abstract
/// address `name` (Linux), anything else a path.
fn socket_address(value: &[u8]) -> io::Result<SocketAddr> {
    match value {
        [] => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        )),
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        path => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names() {
        let path = socket_address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        use std::os::linux::net::SocketAddrExt;
        let abstract_name = socket_address(b"@tern/notify").unwrap();
        assert_eq!(abstract_name.as_abstract_name(), Some(&b"tern/notify"[..]));
        assert!(socket_address(b"").is_err());
    }

    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tern-test-notify-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        let target = std::ffi::OsString::from(format!("@{name}"));
        assert!(notify_to(Some(&target), READY).unwrap());
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(reloading().starts_with("RELOADING=1\nMONOTONIC_USEC="));
        assert!(!notify_to(None, STOPPING).unwrap());
    }
}
