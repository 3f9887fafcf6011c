//! Failed-login counters: the brute-force limits, consulted before any hash
//! is computed. A trait, because a cluster will keep them in Redis; the
//! in-memory [`MemoryCounters`] is the default.
//!
//! The rules (numbers from [`LoginLimits`], set under `[auth]`):
//! - failures are counted per client IP, per client network (/24 for IPv4,
//!   /64 for IPv6) and per account, each in a sliding window; when a count
//!   reaches its limit that key is locked for the lockout time. A locked IP
//!   or network is refused ([`Admission::ClientLocked`]: the caller answers
//!   `421 4.7.0` and disconnects); a locked account is refused
//!   ([`Admission::AccountLocked`]: `454 4.7.0`, the client may try later).
//! - password spraying (few guesses on many accounts from many addresses)
//!   slips under per-client limits, so an account also takes at most one
//!   attempt per `account_retry_interval` from clients it does not know; an
//!   attempt reserves that slot *before* its hash is computed, and a success
//!   frees it. This bounds the hashes per account to one per interval.
//! - a network from which the account logged in successfully (in the last
//!   [`KNOWN_CLIENT_TTL`]) is a known client of that account: the account
//!   limits do not apply to it, so an attacker spraying an account cannot
//!   lock its owner out at home; the IP and network limits still do.
//! - a success clears the account's failures; it does not clear the
//!   client's (one valid account must not buy guesses on the others).
//!
//! Memory is bounded: at most `max_entries` keys; past that, idle keys go
//! first, then the least recently touched.

use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

/// Milliseconds since the Unix epoch: counters shared between servers need
/// wall-clock time.
pub type UnixMillis = u64;

/// How long a successful login makes its network a known client.
pub const KNOWN_CLIENT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLimits {
    pub max_failures_per_ip: u32,
    pub max_failures_per_network: u32,
    pub max_failures_per_account: u32,
    /// Sliding window the failures are counted in.
    pub window: Duration,
    /// How long a key stays locked once its limit is reached.
    pub lockout: Duration,
    /// Unknown clients: one attempt per account per this interval.
    pub account_retry_interval: Duration,
    /// Most keys kept in memory.
    pub max_entries: usize,
}

impl Default for LoginLimits {
    /// 5 failures per IP, 20 per network, 10 per account in 15 minutes,
    /// locked 15 minutes; one attempt per account per minute from unknown
    /// clients; 100,000 keys (about 400 bytes each: 40 MB at most).
    fn default() -> Self {
        LoginLimits {
            max_failures_per_ip: 5,
            max_failures_per_network: 20,
            max_failures_per_account: 10,
            window: Duration::from_secs(15 * 60),
            lockout: Duration::from_secs(15 * 60),
            account_retry_interval: Duration::from_secs(60),
            max_entries: 100_000,
        }
    }
}

/// Who is trying: the client's address and the account as given
/// (lower-cased, so `Alice` and `alice` share a count).
#[derive(Debug, Clone, Copy)]
pub struct LoginKey<'a> {
    pub client_ip: IpAddr,
    pub account: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go on: verify the secret.
    Admitted,
    /// This IP or its network is locked: refuse and disconnect (421 4.7.0).
    ClientLocked,
    /// The account is locked or its retry slot is taken: refuse (454 4.7.0).
    AccountLocked,
    /// The slot is taken by an attempt still being checked (a client opening
    /// several connections at once): ask again in a moment; if that attempt
    /// succeeds, the slot is free. Counters that cannot tell may answer
    /// `AccountLocked` instead.
    AccountBusy,
}

pub type CounterFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The counters' store. Every call is for one login attempt: `admit` before
/// any hash, then, if admitted, exactly one of `failed`, `succeeded` or
/// `ended` (a client that disconnects mid-exchange calls none: its slot
/// simply expires).
pub trait LoginCounters: Send + Sync {
    fn admit<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, Admission>;
    /// Wrong credentials: counted against the IP, network and account.
    fn failed<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, ()>;
    /// Right credentials: frees the account's slot, makes the network known.
    fn succeeded<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, ()>;
    /// No new verdict (a wrong secret already counted, answered from the
    /// cache; a malformed exchange; no hashing slot): nothing is counted or
    /// freed, but attempts waiting on this one ([`Admission::AccountBusy`])
    /// stop waiting.
    fn ended<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, ()>;
}

/// The network a client address counts in.
pub fn network_of(ip: IpAddr) -> IpAddr {
    match crate::config::canonical_ip(ip) {
        IpAddr::V4(v4) => Ipv4Net::new(v4, 24)
            .map(|n| IpAddr::V4(n.network()))
            .unwrap_or(IpAddr::V4(v4)),
        IpAddr::V6(v6) => Ipv6Net::new(v6, 64)
            .map(|n| IpAddr::V6(n.network()))
            .unwrap_or(IpAddr::V6(v6)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Network(IpAddr),
    Account(Box<str>),
    /// (account, network): that network logged in to that account.
    Known(Box<str>, IpAddr),
}

#[derive(Debug, Default)]
struct Entry {
    /// The most recent failures, at most the key's limit of them.
    failures: VecDeque<UnixMillis>,
    locked_until: UnixMillis,
    /// Accounts: unknown clients wait until then.
    retry_at: UnixMillis,
    /// Accounts: the attempt holding the slot has not concluded yet.
    pending: bool,
    touched: UnixMillis,
}

impl Entry {
    fn idle(&self, now: UnixMillis, window: u64) -> bool {
        self.locked_until <= now
            && self.retry_at <= now
            && self.failures.back().is_none_or(|&t| t + window <= now)
    }
}

/// The default, in-process counters.
#[derive(Debug)]
pub struct MemoryCounters {
    limits: LoginLimits,
    entries: Mutex<HashMap<Key, Entry>>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl MemoryCounters {
    pub fn new(limits: LoginLimits) -> MemoryCounters {
        MemoryCounters {
            limits,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Keys held now (for tests and measurements).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        // A panic while holding the lock leaves counters that are still
        // meaningful: keep using them.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keys(key: &LoginKey<'_>) -> (Key, Key, Key, Key) {
        let ip = crate::config::canonical_ip(key.client_ip);
        let net = network_of(ip);
        let account: Box<str> = key.account.into();
        (
            Key::Ip(ip),
            Key::Network(net),
            Key::Account(account.clone()),
            Key::Known(account, net),
        )
    }

    fn known(entries: &HashMap<Key, Entry>, key: &Key, now: UnixMillis) -> bool {
        entries
            .get(key)
            .is_some_and(|e| e.touched + millis(KNOWN_CLIENT_TTL) > now)
    }

    pub fn admit_now(&self, key: LoginKey<'_>, now: UnixMillis) -> Admission {
        let (ip, net, account, known) = Self::keys(&key);
        let mut entries = self.lock();
        let locked = |k: &Key| entries.get(k).is_some_and(|e| e.locked_until > now);
        if locked(&ip) || locked(&net) {
            return Admission::ClientLocked;
        }
        if Self::known(&entries, &known, now) {
            return Admission::Admitted;
        }
        let entry = entries.entry(account).or_default();
        if entry.locked_until > now {
            return Admission::AccountLocked;
        }
        if entry.retry_at > now {
            return if entry.pending {
                Admission::AccountBusy
            } else {
                Admission::AccountLocked
            };
        }
        entry.retry_at = now + millis(self.limits.account_retry_interval);
        entry.pending = true;
        entry.touched = now;
        self.bound(&mut entries, now);
        Admission::Admitted
    }

    pub fn failed_now(&self, key: LoginKey<'_>, now: UnixMillis) {
        let (ip, net, account, known) = Self::keys(&key);
        let l = &self.limits;
        let mut entries = self.lock();
        let mut counted = vec![
            (ip, l.max_failures_per_ip),
            (net, l.max_failures_per_network),
        ];
        if let Some(e) = entries.get_mut(&account) {
            e.pending = false;
        }
        if !Self::known(&entries, &known, now) {
            counted.push((account, l.max_failures_per_account));
        }
        let (window, lockout) = (millis(l.window), millis(l.lockout));
        for (k, limit) in counted {
            let e = entries.entry(k).or_default();
            e.touched = now;
            while e.failures.front().is_some_and(|&t| t + window <= now) {
                e.failures.pop_front();
            }
            e.failures.push_back(now);
            let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
            if e.failures.len() >= limit {
                e.locked_until = now + lockout;
                e.failures.clear();
            }
        }
        self.bound(&mut entries, now);
    }

    pub fn succeeded_now(&self, key: LoginKey<'_>, now: UnixMillis) {
        let (_, _, account, known) = Self::keys(&key);
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(&account) {
            e.failures.clear();
            e.retry_at = 0;
            e.pending = false;
        }
        entries.entry(known).or_default().touched = now;
        self.bound(&mut entries, now);
    }

    pub fn ended_now(&self, key: LoginKey<'_>) {
        let (_, _, account, _) = Self::keys(&key);
        if let Some(e) = self.lock().get_mut(&account) {
            e.pending = false;
        }
    }

    /// Keeps at most `max_entries`: idle keys go first, then the least
    /// recently touched, down to 90% so this runs once per many inserts.
    fn bound(&self, entries: &mut HashMap<Key, Entry>, now: UnixMillis) {
        let max = self.limits.max_entries.max(16);
        if entries.len() <= max {
            return;
        }
        let window = millis(self.limits.window);
        let known_ttl = millis(KNOWN_CLIENT_TTL);
        entries.retain(|k, e| match k {
            Key::Known(..) => e.touched + known_ttl > now,
            _ => !e.idle(now, window),
        });
        let target = max - max / 10;
        if entries.len() > target {
            let mut ages: Vec<UnixMillis> = entries.values().map(|e| e.touched).collect();
            let cut = entries.len() - target;
            let (_, &mut oldest_kept, _) = ages.select_nth_unstable(cut);
            let mut to_drop = cut;
            entries.retain(|_, e| {
                if to_drop > 0 && e.touched < oldest_kept {
                    to_drop -= 1;
                    false
                } else {
                    true
                }
            });
            if entries.len() > target {
                // Ties at the cut: drop any of them.
                let extra = entries.len() - target;
                let victims: Vec<Key> = entries
                    .iter()
                    .filter(|(_, e)| e.touched == oldest_kept)
                    .take(extra)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in victims {
                    entries.remove(&k);
                }
            }
        }
    }
}

impl LoginCounters for MemoryCounters {
    fn admit<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, Admission> {
        Box::pin(std::future::ready(self.admit_now(key, now)))
    }
    fn failed<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, ()> {
        self.failed_now(key, now);
        Box::pin(std::future::ready(()))
    }
    fn succeeded<'a>(&'a self, key: LoginKey<'a>, now: UnixMillis) -> CounterFuture<'a, ()> {
        self.succeeded_now(key, now);
        Box::pin(std::future::ready(()))
    }
    fn ended<'a>(&'a self, key: LoginKey<'a>, _now: UnixMillis) -> CounterFuture<'a, ()> {
        self.ended_now(key);
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests;
