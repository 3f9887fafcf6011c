//! Accept loops: one per configured listener, with the total and per-client
//! connection limits applied before a session exists.
//!
//! A connection over a limit gets `421 4.7.0` and is closed (RFC 5321 §3.8
//! allows 421 at connection time); it never takes a session slot. Accept
//! errors (e.g. out of file descriptors) back off briefly instead of spinning.
//!
//! Not here: anything SMTP beyond that one refusal line.

use crate::config::Role;
use crate::conn::Conn;
use crate::session::{self, Context};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Connection counts, total and per client: per address on the network,
/// per uid on the local sendmail socket.
pub struct ConnectionLimits<K = IpAddr> {
    /// Atomics: a reload changes them under open sessions (which keep
    /// their slots even when now over a lowered limit).
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    counts: Mutex<(usize, HashMap<K, usize>)>,
}

/// Holds one slot; releases it when the session ends.
pub struct Slot<K: Hash + Eq = IpAddr> {
    limits: Arc<ConnectionLimits<K>>,
    ip: K,
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.limits.counts.lock() {
            counts.0 = counts.0.saturating_sub(1);
            if let Some(n) = counts.1.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    counts.1.remove(&self.ip);
                }
            }
        }
    }
}

impl<K: Hash + Eq + Copy> ConnectionLimits<K> {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimits<K>> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            counts: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn set(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// A slot, or the reason there is none.
    pub fn acquire(self: &Arc<Self>, ip: K) -> Result<Slot<K>, &'static str> {
        let mut counts = self.counts.lock().map_err(|_| "limits unavailable")?;
        if counts.0 >= self.max_total.load(Ordering::Relaxed) {
            return Err("too many connections");
        }
        let per_ip = counts.1.get(&ip).copied().unwrap_or(0);
        if per_ip >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err("too many connections from your address");
        }
        counts.0 += 1;
        counts.1.insert(ip, per_ip + 1);
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }
}

/// Accepts on `listener` until shutdown, spawning sessions on `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    role: Role,
    ctx: Arc<Context>,
    limits: Arc<ConnectionLimits>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(event = "listener.accept_error", error = %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match limits.acquire(peer.ip()) {
            Ok(slot) => {
                crate::metrics::connection_accepted(role);
                let ctx = ctx.clone();
                let local = stream.local_addr().ok();
                tracker.spawn(async move {
                    session::run(Conn::Tcp(stream), peer, local, role, ctx).await;
                    drop(slot);
                });
            }
            Err(reason) => {
                crate::metrics::connection_refused(role);
                info!(event = "session.refused", client = %peer, reason);
                let hostname = ctx.runtime.load().hostname.clone();
                tracker.spawn(refuse(stream, hostname, reason));
            }
        }
    }
}

/// `421 4.7.0` to a client over a connection limit, then the close.
pub(crate) async fn refuse(
    mut stream: impl tokio::io::AsyncWrite + Unpin,
    hostname: String,
    reason: &'static str,
) {
    let line = format!("421 4.7.0 {hostname} Error: {reason}, try again later\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_total_and_per_ip_and_release_on_drop() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = limits.acquire(a).unwrap();
        let _s2 = limits.acquire(a).unwrap();
        assert!(limits.acquire(a).is_err(), "third from one address");
        let _s3 = limits.acquire(b).unwrap();
        assert!(limits.acquire(b).is_err(), "total reached");
        drop(s1);
        assert!(limits.acquire(a).is_ok());
    }

    #[test]
    fn a_uid_holds_at_most_its_cap_and_gets_slots_back() {
        // The sendmail socket's use: no total here, a cap per uid.
        let limits = ConnectionLimits::<u32>::new(usize::MAX, 2);
        let a = limits.acquire(1000).expect("first");
        let _b = limits.acquire(1000).expect("second");
        assert!(limits.acquire(1000).is_err(), "over the cap");
        assert!(limits.acquire(33).is_ok(), "another user is not held back");
        drop(a);
        assert!(limits.acquire(1000).is_ok(), "a slot came back");
    }
}
