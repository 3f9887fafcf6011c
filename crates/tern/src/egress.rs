//! Per-user egress limits for authenticated submission, and the circuit
//! breaker that contains a stolen account.
//!
//! A stolen password is the usual way a small server ends up on blocklists:
//! the thief logs in and sprays. Three limits per user slow that down
//! (messages per hour, recipients per hour, distinct new recipients per day),
//! answered with `451 4.7.1` so an honest client simply retries later. When a
//! user goes far past a limit ([`EgressLimits::breaker_factor`] times it in
//! its window) or remote servers refuse many of their recipients
//! ([`EgressLimits::breaker_remote_rejects`] an hour), the breaker trips:
//! the user is marked held in the users file (logins refused), sessions
//! already logged in are refused at MAIL, and the outbound manager holds
//! every queued message of theirs until `tern user release`.
//!
//! Invariants:
//! - Only mail of an authenticated session counts, and only recipients that
//!   leave the server ([`Route::Remote`](crate::spool::Route) after alias
//!   expansion): local deliveries, bounces and delay notices never count
//!   (Tern's own notices are not submitted through a session at all).
//! - The counters are behind [`EgressCounters`]; [`MemoryCounters`] keeps
//!   bounded memory per user (a fixed number of buckets per window, at most
//!   [`MAX_KNOWN_RECIPIENTS`] remembered recipients).
//! - A held user stays held until released: the users file's marker is the
//!   record that survives a restart; this module keeps the running server's
//!   copy, read from that file at start.
//!
//! Not done: a shared backend (Redis) for several servers.
//!
//! Errors: a users file that cannot be written when the breaker trips is
//! logged; the hold stands in memory for this run.

use crate::auth::Users;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tern_proto::Reply;
use tokio::sync::mpsc;
use tracing::{error, warn};

/// Milliseconds since the Unix epoch (the outbound scheduler's clock).
pub type Millis = i64;

/// Default of `submission.max_messages_per_hour`: a busy person sends a few
/// dozen messages a day; a hundred in an hour is already unusual.
pub const DEFAULT_MAX_MESSAGES_PER_HOUR: u32 = 100;
/// Default of `submission.max_recipients_per_hour`: room for a few large
/// mailings to a team, far below what a spam run needs.
pub const DEFAULT_MAX_RECIPIENTS_PER_HOUR: u32 = 500;
/// Default of `submission.max_new_recipients_per_day`: people write mostly
/// to the same correspondents; a spammer writes to new ones only.
pub const DEFAULT_MAX_NEW_RECIPIENTS_PER_DAY: u32 = 200;
/// Default of `submission.breaker_factor`.
pub const DEFAULT_BREAKER_FACTOR: u32 = 3;
/// Default of `submission.breaker_remote_rejects`.
pub const DEFAULT_BREAKER_REMOTE_REJECTS: u32 = 50;
/// Default of `submission.rate_window` (the "hour" of the hourly limits).
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(3600);
/// Default of `submission.new_recipients_window` (the "day").
pub const DEFAULT_NEW_RECIPIENTS_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Recipients remembered per user (about 100 bytes each); past that the
/// least recently written-to are forgotten and count as new again.
pub const MAX_KNOWN_RECIPIENTS: usize = 10_000;
/// Buckets per window: counts are exact to 1/60 of the window.
const BUCKETS: i64 = 60;

/// The server-wide limits (`[submission]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressLimits {
    pub max_messages_per_hour: u32,
    pub max_recipients_per_hour: u32,
    pub max_new_recipients_per_day: u32,
    /// Trip when attempts reach this many times a limit within its window.
    pub breaker_factor: u32,
    /// Trip when remote servers permanently refuse this many of a user's
    /// recipients within `rate_window`.
    pub breaker_remote_rejects: u32,
    pub rate_window: Duration,
    pub new_recipients_window: Duration,
}

impl Default for EgressLimits {
    fn default() -> Self {
        EgressLimits {
            max_messages_per_hour: DEFAULT_MAX_MESSAGES_PER_HOUR,
            max_recipients_per_hour: DEFAULT_MAX_RECIPIENTS_PER_HOUR,
            max_new_recipients_per_day: DEFAULT_MAX_NEW_RECIPIENTS_PER_DAY,
            breaker_factor: DEFAULT_BREAKER_FACTOR,
            breaker_remote_rejects: DEFAULT_BREAKER_REMOTE_REJECTS,
            rate_window: DEFAULT_RATE_WINDOW,
            new_recipients_window: DEFAULT_NEW_RECIPIENTS_WINDOW,
        }
    }
}

/// One user's overrides, from the users file's `[user.limits]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserLimits {
    pub max_messages_per_hour: Option<u32>,
    pub max_recipients_per_hour: Option<u32>,
    pub max_new_recipients_per_day: Option<u32>,
}

impl UserLimits {
    pub fn is_empty(&self) -> bool {
        *self == UserLimits::default()
    }
}

/// What is counted per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// MAIL commands refused over the messages limit: with `Messages`, the
    /// breaker's measure (a MAIL that ends up local-only must not count, and
    /// its recipients are not known at MAIL).
    RefusedMessages,
    /// Committed messages with a remote recipient.
    Messages,
    RecipientAttempts,
    /// Remote recipients of committed messages.
    Recipients,
    NewRecipientAttempts,
    NewRecipients,
    /// Recipients refused permanently by remote servers.
    RemoteRejects,
}

/// Where the counts live: in memory by default, shared among servers later.
pub trait EgressCounters: Send + Sync {
    /// Adds `n` to `user`'s `counter` at `now`.
    fn add(&self, user: &str, counter: Counter, n: u32, now: Millis, window: Millis);
    /// The sum over `(now - window, now]`.
    fn count(&self, user: &str, counter: Counter, now: Millis, window: Millis) -> u32;
    /// Whether `user` wrote to `recipient` (lower-cased) within `window`.
    fn knows(&self, user: &str, recipient: &str, now: Millis, window: Millis) -> bool;
    fn remember(&self, user: &str, recipient: &str, now: Millis);
    /// Forgets everything about `user` (after a release).
    fn reset(&self, user: &str);
}

/// Counts in fixed buckets of a sliding window: at most [`BUCKETS`] + 1
/// entries per counter, whatever the rate.
#[derive(Default)]
struct Series(VecDeque<(Millis, u32)>);

impl Series {
    fn add(&mut self, n: u32, now: Millis, window: Millis) {
        let width = (window / BUCKETS).max(1);
        let bucket = now.div_euclid(width) * width;
        match self.0.back_mut() {
            Some((start, count)) if *start == bucket => *count = count.saturating_add(n),
            _ => self.0.push_back((bucket, n)),
        }
        self.expire(now, window);
    }

    fn expire(&mut self, now: Millis, window: Millis) {
        let width = (window / BUCKETS).max(1);
        while let Some((start, _)) = self.0.front() {
            if start + width <= now - window {
                self.0.pop_front();
            } else {
                break;
            }
        }
    }

    fn count(&self, now: Millis, window: Millis) -> u32 {
        let width = (window / BUCKETS).max(1);
        self.0
            .iter()
            .filter(|(start, _)| start + width > now - window && *start <= now)
            .fold(0u32, |sum, (_, n)| sum.saturating_add(*n))
    }
}

#[derive(Default)]
struct UserCounts {
    series: HashMap<Counter, Series>,
    /// Recipient → when last written to.
    known: HashMap<String, Millis>,
}

/// The in-memory [`EgressCounters`]: one mutex, held for microseconds.
#[derive(Default)]
pub struct MemoryCounters {
    users: Mutex<HashMap<String, UserCounts>>,
}

impl MemoryCounters {
    fn with<T>(&self, user: &str, f: impl FnOnce(&mut UserCounts) -> T) -> T {
        let mut users = match self.users.lock() {
            Ok(u) => u,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(users.entry(user.to_lowercase()).or_default())
    }
}

impl EgressCounters for MemoryCounters {
    fn add(&self, user: &str, counter: Counter, n: u32, now: Millis, window: Millis) {
        self.with(user, |u| {
            u.series.entry(counter).or_default().add(n, now, window)
        });
    }

    fn count(&self, user: &str, counter: Counter, now: Millis, window: Millis) -> u32 {
        self.with(user, |u| {
            u.series.get(&counter).map_or(0, |s| s.count(now, window))
        })
    }

    fn knows(&self, user: &str, recipient: &str, now: Millis, window: Millis) -> bool {
        self.with(user, |u| {
            u.known.get(recipient).is_some_and(|at| *at > now - window)
        })
    }

    fn remember(&self, user: &str, recipient: &str, now: Millis) {
        self.with(user, |u| {
            u.known.insert(recipient.to_string(), now);
            if u.known.len() > MAX_KNOWN_RECIPIENTS {
                // Rare (a user past 10000 correspondents): drop the oldest
                // tenth at once, so the scan is paid once per thousand.
                let mut times: Vec<Millis> = u.known.values().copied().collect();
                times.sort_unstable();
                let cut = times[times.len() / 10];
                u.known.retain(|_, at| *at > cut);
            }
        });
    }

    fn reset(&self, user: &str) {
        let mut users = match self.users.lock() {
            Ok(u) => u,
            Err(poisoned) => poisoned.into_inner(),
        };
        users.remove(&user.to_lowercase());
    }
}

/// The running server's egress state: limits, counters, held users, and
/// where a trip is announced.
pub struct Egress {
    /// Replaced by a config reload; counters and holds stay.
    limits: arc_swap::ArcSwap<EgressLimits>,
    counters: Box<dyn EgressCounters>,
    /// Lower-cased names of held users.
    held: Mutex<HashSet<String>>,
    /// Where the held marker is written; None in tests.
    users_file: Option<PathBuf>,
    /// The outbound manager, which holds a tripped user's queued mail.
    tripped: Option<mpsc::UnboundedSender<String>>,
}

fn ms(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX / 4)
}

fn limit_reply(what: &str) -> Reply {
    Reply::enhanced(
        451,
        (4, 7, 1),
        format!("Error: {what} limit reached, try again later"),
    )
}

fn held_reply(user: &str) -> Reply {
    Reply::enhanced(
        451,
        (4, 7, 1),
        format!("Error: account {user} held by the administrator, try again later"),
    )
}

impl Egress {
    /// `held_users`: the users the users file marks held at start.
    pub fn new(
        limits: EgressLimits,
        counters: Box<dyn EgressCounters>,
        users_file: Option<PathBuf>,
        tripped: Option<mpsc::UnboundedSender<String>>,
        held_users: impl IntoIterator<Item = String>,
    ) -> Egress {
        Egress {
            limits: arc_swap::ArcSwap::from_pointee(limits),
            counters,
            held: Mutex::new(held_users.into_iter().map(|u| u.to_lowercase()).collect()),
            users_file,
            tripped,
        }
    }

    /// A reload's limits apply from the next message on; what was counted
    /// still counts.
    pub fn set_limits(&self, limits: EgressLimits) {
        self.limits.store(std::sync::Arc::new(limits));
    }

    /// The names the users file marks held.
    pub fn held_in(users: &Users) -> Vec<String> {
        users
            .iter()
            .filter(|u| u.held.is_some())
            .map(|u| u.name.clone())
            .collect()
    }

    fn held_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        match self.held.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn is_held(&self, user: &str) -> bool {
        self.held_set().contains(&user.to_lowercase())
    }

    /// `451 4.7.1` for a held user: nothing more is taken from them.
    pub fn not_held(&self, user: &str) -> Result<(), Reply> {
        if self.is_held(user) {
            return Err(held_reply(user));
        }
        Ok(())
    }

    fn effective(&self, user: &UserLimits) -> (u32, u32, u32) {
        (
            user.max_messages_per_hour
                .unwrap_or(self.limits.load().max_messages_per_hour),
            user.max_recipients_per_hour
                .unwrap_or(self.limits.load().max_recipients_per_hour),
            user.max_new_recipients_per_day
                .unwrap_or(self.limits.load().max_new_recipients_per_day),
        )
    }

    /// Trips the breaker when `attempts` reached `breaker_factor` x `limit`.
    fn check_breaker(&self, user: &str, attempts: u32, limit: u32, what: &str) {
        let trip_at = limit.saturating_mul(self.limits.load().breaker_factor.max(1));
        if attempts >= trip_at {
            self.trip(
                user,
                &format!(
                    "{attempts} {what} attempts, {}x the limit of {limit}",
                    self.limits.load().breaker_factor
                ),
            );
        }
    }

    /// MAIL from an authenticated `user`: refused when held or when the
    /// messages-per-hour limit is reached.
    pub fn mail(&self, user: &str, overrides: &UserLimits, now: Millis) -> Result<(), Reply> {
        self.not_held(user)?;
        let (max_messages, _, _) = self.effective(overrides);
        let window = ms(self.limits.load().rate_window);
        let c = &self.counters;
        let sent = c.count(user, Counter::Messages, now, window);
        if sent < max_messages {
            return Ok(());
        }
        c.add(user, Counter::RefusedMessages, 1, now, window);
        let attempts = sent.saturating_add(c.count(user, Counter::RefusedMessages, now, window));
        self.check_breaker(user, attempts, max_messages, "message");
        if self.is_held(user) {
            return Err(held_reply(user));
        }
        Err(limit_reply("messages per hour"))
    }

    /// RCPT of a remote recipient. `pending` and `pending_new` are the remote
    /// recipients (and new ones) this transaction already accepted: they
    /// count once the message is committed, and must not let one message
    /// carry past the limit.
    pub fn rcpt(
        &self,
        user: &str,
        overrides: &UserLimits,
        recipient: &str,
        pending: u32,
        pending_new: u32,
        now: Millis,
    ) -> Result<RcptVerdict, Reply> {
        if self.is_held(user) {
            return Err(held_reply(user));
        }
        let (_, max_rcpts, max_new) = self.effective(overrides);
        let hour = ms(self.limits.load().rate_window);
        let day = ms(self.limits.load().new_recipients_window);
        let c = &self.counters;
        let recipient = recipient.to_lowercase();
        c.add(user, Counter::RecipientAttempts, 1, now, hour);
        let attempts = c.count(user, Counter::RecipientAttempts, now, hour);
        self.check_breaker(user, attempts, max_rcpts, "recipient");
        let new = !c.knows(user, &recipient, now, day);
        if new {
            c.add(user, Counter::NewRecipientAttempts, 1, now, day);
            let attempts = c.count(user, Counter::NewRecipientAttempts, now, day);
            self.check_breaker(user, attempts, max_new, "new recipient");
        }
        if self.is_held(user) {
            return Err(held_reply(user));
        }
        let sent = c.count(user, Counter::Recipients, now, hour);
        if sent.saturating_add(pending) >= max_rcpts {
            return Err(limit_reply("recipients per hour"));
        }
        if new {
            let sent_new = c.count(user, Counter::NewRecipients, now, day);
            if sent_new.saturating_add(pending_new) >= max_new {
                return Err(limit_reply("new recipients per day"));
            }
        }
        Ok(RcptVerdict { new })
    }

    /// A committed message of `user` with these remote recipients.
    pub fn committed(&self, user: &str, remote: &[String], now: Millis) {
        if remote.is_empty() {
            return;
        }
        let hour = ms(self.limits.load().rate_window);
        let day = ms(self.limits.load().new_recipients_window);
        let c = &self.counters;
        c.add(user, Counter::Messages, 1, now, hour);
        let n = u32::try_from(remote.len()).unwrap_or(u32::MAX);
        c.add(user, Counter::Recipients, n, now, hour);
        let mut new = 0u32;
        for r in remote {
            let r = r.to_lowercase();
            if !c.knows(user, &r, now, day) {
                new += 1;
            }
            c.remember(user, &r, now);
        }
        if new > 0 {
            c.add(user, Counter::NewRecipients, new, now, day);
        }
    }

    /// A remote server refused one of `user`'s recipients for good.
    pub fn remote_reject(&self, user: &str, now: Millis) {
        let hour = ms(self.limits.load().rate_window);
        self.counters
            .add(user, Counter::RemoteRejects, 1, now, hour);
        let rejects = self.counters.count(user, Counter::RemoteRejects, now, hour);
        if rejects >= self.limits.load().breaker_remote_rejects.max(1) && !self.is_held(user) {
            self.trip(
                user,
                &format!("{rejects} recipients refused by remote servers within an hour"),
            );
        }
    }

    /// Holds `user`: sessions are refused from now on, the users file gets
    /// the marker (logins refused, survives a restart) and the outbound
    /// manager holds their queued mail. Once per hold.
    pub fn trip(&self, user: &str, reason: &str) {
        if !self.held_set().insert(user.to_lowercase()) {
            return;
        }
        warn!(event = "egress.breaker_tripped", user, reason);
        if let Some(tx) = &self.tripped {
            let _ = tx.send(user.to_string());
        }
        if let Some(path) = self.users_file.clone() {
            let (user, reason) = (user.to_string(), reason.to_string());
            let write = move || mark_held(&path, &user, &reason);
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn_blocking(write);
                }
                Err(_) => write(),
            }
        }
    }

    /// Ends a hold in this server: the user may submit again, with fresh
    /// counters. Whether they were held.
    pub fn release(&self, user: &str) -> bool {
        let was = self.held_set().remove(&user.to_lowercase());
        self.counters.reset(user);
        was
    }
}

/// A RCPT the limits let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcptVerdict {
    /// Not written to within the new-recipients window.
    pub new: bool,
}

fn mark_held(path: &std::path::Path, user: &str, reason: &str) {
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let result = Users::edit(path, |users| {
        let mut record = users
            .clone_user(user)
            .ok_or_else(|| format!("no user {user:?}"))?;
        if record.held.is_none() {
            record.held = Some(crate::auth::store::Held {
                reason: reason.to_string(),
                since,
            });
        }
        users.put(record);
        Ok(())
    });
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            error!(event = "egress.mark_failed", user, error = %e, "the hold stands for this run only")
        }
        Err(e) => {
            error!(event = "egress.mark_failed", user, error = %e, "the hold stands for this run only")
        }
    }
}

#[cfg(test)]
mod tests;
