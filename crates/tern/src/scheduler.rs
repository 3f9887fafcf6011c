//! The outbound scheduler: which pending recipients to attempt next, at which
//! destination, and how fast each destination may be sent to.
//!
//! Pure: no I/O, no clock, no tokio. The caller passes the time in (unix
//! milliseconds, [`Millis`]) and the randomness comes from an RNG seeded at
//! construction, so every decision is reproducible in tests.
//!
//! # Model
//! Work is per recipient ([`RcptKey`]: queue id and index in the envelope),
//! grouped by **destination**: an opaque key the router chooses
//! (`"mx:example.com"`, `"relay:smtp.example.net:587"`, `"lmtp:/run/dovecot"`).
//! [`Scheduler::poll`] hands out [`Job`]s: one destination, one message and
//! every recipient of that message due there (one transaction, several
//! RCPTs), up to [`SchedulerConfig::max_recipients_per_job`].
//!
//! Per destination (Postfix's windows, plus what Postfix lacks):
//! - a **concurrency window**: jobs in flight at once. It starts at
//!   [`WindowPolicy::initial`], grows by one after a window's worth of
//!   successful jobs (additive increase, Postfix's `1/concurrency` feedback)
//!   and is halved on a throttling reply (multiplicative decrease), within
//!   `1..=max`;
//! - a **delivery rate**, unlimited until the destination first throttles us;
//!   then it is set to half the rate we were starting jobs at, enforced as an
//!   earliest start time for the next job, raised by a constant on each
//!   success and unlimited again once it passes [`RatePolicy::unlimited_above`];
//! - **dead-destination detection**: after [`SchedulerConfig::dead_after`]
//!   consecutive connection failures the destination gets one probe job at a
//!   time, at backoff intervals, and its other recipients wait instead of
//!   each paying the connect timeout; any session revives it.
//!
//! Destinations are served round-robin: a destination that just got a job
//! goes to the back of the ring, so one with ten thousand due messages delays
//! one with a single due message by at most one job per other ready
//! destination. The global limit ([`SchedulerConfig::max_in_flight`]) caps
//! jobs in flight across all destinations. A driver that keeps a connection
//! open asks [`Scheduler::next_job_for`] for that destination's next message;
//! it gets one only while no other destination waits for a slot.
//!
//! A recipient deferred by a throttling reply waits its ordinary backoff, like
//! any deferral: the slowdown is the destination's, not the recipient's.
//! A destination with nothing pending is forgotten unless it holds something
//! the next message needs (dead, rate-limited, failing), so memory follows
//! the queue, not the number of domains ever mailed.
//!
//! Replies are sorted by [`classify`] into success, throttling, temporary and
//! permanent failure from the code, the enhanced code and a few lower-cased
//! phrases; there is no rule per provider.
//!
//! # Invariants
//! - A recipient is in exactly one state: waiting (in its destination's due
//!   index), held (message on hold, in no index), or in flight (in exactly one
//!   job).
//! - A job is started only while its destination has fewer jobs in flight than
//!   its window and the whole scheduler fewer than `max_in_flight`; a halved
//!   window may leave more in flight than the new window until they finish.
//! - A dead destination has at most one job (the probe) in flight that was
//!   started while it was dead.
//! - One throttling event halves a destination once: replies to jobs started
//!   before the last decrease carry no news (TCP's one-decrease-per-window).
//! - No attempt starts after the give-up time: a deferral whose next attempt
//!   would fall after it expires the recipient at once, and a recipient still
//!   waiting then (a dead destination, a full window) expires in `poll`. Held
//!   messages do not expire while held; on release they expire if due to.
//! - Adding, dispatching and completing cost O(log n) per recipient touched
//!   (n pending recipients); `poll` looks only at destinations that can
//!   start a job or whose timer is due. `flush` and `explain` walk the queue.
//!
//! # Not done here
//! Routing (MX lookup, the choice of destination: the caller's), keeping
//! connections and per-server RCPT limits (the SMTP driver's), durability
//! (the caller records [`Settled`] in the spool; after a restart the
//! learned windows, rates and dead states start afresh), delay notices and
//! bounces, config reload (a new [`Scheduler`] would lose the learned state).
//!
//! # Errors
//! [`SchedulerError::UnknownJob`] when `complete` is given a job that is not
//! in flight (completed twice, or from before a restart). Nothing else fails:
//! unknown messages are ignored and report `false`, and config values out of
//! range are brought into range by [`Scheduler::new`].

use crate::spool::MsgId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::time::Duration;
use tern_proto::reply::EnhancedCode;

/// Unix time in milliseconds: whole seconds are too coarse for a delivery
/// rate of hundreds of messages a second to one destination.
pub type Millis = i64;

/// Converts a duration to [`Millis`], saturating (a config of years must not
/// wrap into the past).
pub fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// Where a recipient's mail goes, as the router names it. Opaque here: two
/// recipients share a window, a rate and a dead state exactly when their
/// destinations are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Destination(String);

impl Destination {
    pub fn new(key: impl Into<String>) -> Destination {
        Destination(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Destination {
    fn from(s: &str) -> Destination {
        Destination::new(s)
    }
}

impl From<String> for Destination {
    fn from(s: String) -> Destination {
        Destination(s)
    }
}

/// One recipient of one message: the queue id and the index into
/// `Envelope::recipients` (stable for the message's life, as STATE records
/// need).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RcptKey {
    pub msg: MsgId,
    pub rcpt: usize,
}

/// Names one delivery attempt handed out by [`Scheduler::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job-{}", self.0)
    }
}

/// Delay before attempt `attempts + 1`: doubling from `initial`, capped at
/// `max`, minus up to 10% jitter so that deferred mail does not retry in
/// lockstep after a restart (chasquid `nextDelay`); never above `max`.
pub fn backoff(initial: Duration, max: Duration, attempts: u32, jitter: f64) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    let base = exp.min(max);
    base - base.mul_f64(jitter.clamp(0.0, 1.0) * 0.1)
}

/// When to try a deferred recipient again, and when to give up. The defaults
/// are `[delivery]`'s (`retry_initial` 5 min, `retry_max` 67 min), close to
/// Postfix's (`minimal_backoff_time` 300 s, `maximal_backoff_time` 4000 s),
/// and Postfix's `maximal_queue_lifetime` (5 d).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Wait after the first failed attempt; doubles with each further one.
    pub first_retry: Duration,
    /// Longest wait between two attempts.
    pub max_retry: Duration,
    /// Age of a message (since it was received) after which its recipients
    /// are no longer attempted and expire.
    pub give_up: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            first_retry: Duration::from_secs(300),
            max_retry: Duration::from_secs(67 * 60),
            give_up: Duration::from_secs(5 * 24 * 3600),
        }
    }
}

impl RetryPolicy {
    /// The wait after `attempts` failed attempts (1 for the first), with
    /// `jitter` in `0.0..=1.0` taking up to 10% off.
    pub fn delay(&self, attempts: u32, jitter: f64) -> Duration {
        backoff(self.first_retry, self.max_retry, attempts, jitter)
    }
}

/// A destination's concurrency window (jobs in flight at once).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowPolicy {
    /// The window of a destination never seen before (Postfix: 5).
    pub initial: u32,
    /// The window never grows past this (Postfix: 20).
    pub max: u32,
}

impl Default for WindowPolicy {
    fn default() -> WindowPolicy {
        WindowPolicy {
            initial: 5,
            max: 20,
        }
    }
}

/// A destination's delivery rate (jobs started per minute) once it has
/// throttled us.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RatePolicy {
    /// Throttling never brings the rate below this.
    pub min_per_minute: f64,
    /// Each successful job raises a limited rate by this much.
    pub increase_per_success: f64,
    /// A rate that grows past this is lifted altogether; the window alone
    /// limits the destination again.
    pub unlimited_above: f64,
}

impl Default for RatePolicy {
    fn default() -> RatePolicy {
        RatePolicy {
            min_per_minute: 1.0,
            increase_per_success: 1.0,
            unlimited_above: 6000.0,
        }
    }
}

/// Everything the scheduler can be told. Values out of range are brought into
/// range by [`Scheduler::new`] (a window of at least 1, and so on).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SchedulerConfig {
    pub retry: RetryPolicy,
    pub window: WindowPolicy,
    pub rate: RatePolicy,
    /// Jobs in flight across all destinations.
    pub max_in_flight: usize,
    /// Recipients of one message one job carries (Postfix's
    /// `default_destination_recipient_limit` is 50); the driver still splits
    /// a job at the server's own limit.
    pub max_recipients_per_job: usize,
    /// Consecutive connection failures after which a destination is dead.
    pub dead_after: u32,
    /// A flush of the whole queue spreads the new due times over this long,
    /// so that mail deferred during an outage is not retried in one instant.
    pub flush_spread: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            retry: RetryPolicy::default(),
            window: WindowPolicy::default(),
            rate: RatePolicy::default(),
            max_in_flight: 100,
            max_recipients_per_job: 50,
            dead_after: 5,
            flush_spread: Duration::from_secs(60),
        }
    }
}

impl SchedulerConfig {
    /// The same config with every value in the range the scheduler relies on.
    fn normalized(mut self) -> SchedulerConfig {
        self.window.max = self.window.max.max(1);
        self.window.initial = self.window.initial.clamp(1, self.window.max);
        self.max_in_flight = self.max_in_flight.max(1);
        self.max_recipients_per_job = self.max_recipients_per_job.max(1);
        self.dead_after = self.dead_after.max(1);
        // A zero first retry would retry a failing recipient in a busy loop.
        self.retry.first_retry = self.retry.first_retry.max(Duration::from_millis(1));
        self.retry.max_retry = self.retry.max_retry.max(self.retry.first_retry);
        let r = &mut self.rate;
        if !(r.min_per_minute.is_finite() && r.min_per_minute > 0.0) {
            r.min_per_minute = RatePolicy::default().min_per_minute;
        }
        if !(r.increase_per_success.is_finite() && r.increase_per_success >= 0.0) {
            r.increase_per_success = RatePolicy::default().increase_per_success;
        }
        if !(r.unlimited_above.is_finite() && r.unlimited_above >= 2.0 * r.min_per_minute) {
            r.unlimited_above = (2.0 * r.min_per_minute).max(RatePolicy::default().unlimited_above);
        }
        self
    }
}

/// What a reply means for the scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyClass {
    /// 2xx or 3xx.
    Success,
    /// The receiver asks us to slow down: the destination's window and rate
    /// are halved, the recipient is deferred.
    Throttled,
    /// Any other 4xx (and garbage): the recipient is deferred.
    TempFail,
    /// 5xx: the recipient fails.
    PermFail,
    /// No SMTP reply at all: refused, unreachable, timed out. Never returned
    /// by [`classify`]; the driver reports it.
    ConnectFail,
}

/// Phrases receivers use when they throttle (lower case). Taken from the
/// replies of Gmail, Outlook, Yahoo and common rate-limiting milters; a
/// phrase must be specific enough not to match an ordinary temporary failure
/// (a full mailbox, "quota exceeded", a DNS error).
const THROTTLE_PHRASES: &[&str] = &[
    "rate limit",
    "rate-limit",
    "ratelimit",
    "unusual rate",
    "receiving mail at a rate",
    "too many connections",
    "too many concurrent",
    "too many sessions",
    "too many messages",
    "too fast",
    "too quickly",
    "slow down",
    "throttl",
    "try again later",
    "try later",
    "temporarily deferred",
    "user complaints",
    "server busy",
];

/// Phrases of temporary failures that are not about our sending rate, even
/// when the enhanced code is `4.7.x`: greylisting wants exactly one retry
/// later, not a slower destination.
const NOT_THROTTLE_PHRASES: &[&str] = &["greylist", "graylist", "grey-list", "gray-list"];

/// Sorts a reply (`code`, its enhanced code if any, its text lines joined)
/// into a [`ReplyClass`].
///
/// `421` (the server closes the session) is always throttling. Another 4xx is
/// throttling when its enhanced code is `4.7.x` (policy; except `454`, which
/// is STARTTLS or AUTH trouble) or its text has a throttling phrase, unless it
/// is greylisting or `4.5.3` (too many recipients: the rest go in the next
/// transaction, nothing to slow down for). A code outside 200..=599 is a
/// temporary failure (a broken server must not bounce mail).
pub fn classify(code: u16, enhanced: Option<EnhancedCode>, text: &str) -> ReplyClass {
    match code {
        200..=399 => ReplyClass::Success,
        500..=599 => ReplyClass::PermFail,
        421 => ReplyClass::Throttled,
        400..=499 => {
            let text = text.to_lowercase();
            let has = |phrases: &[&str]| phrases.iter().any(|p| text.contains(p));
            if matches!(enhanced, Some(EnhancedCode(_, 5, 3))) || has(NOT_THROTTLE_PHRASES) {
                return ReplyClass::TempFail;
            }
            let policy = matches!(enhanced, Some(EnhancedCode(_, 7, _))) && code != 454;
            if policy || has(THROTTLE_PHRASES) {
                ReplyClass::Throttled
            } else {
                ReplyClass::TempFail
            }
        }
        _ => ReplyClass::TempFail,
    }
}

/// A recipient the caller hands to the scheduler (a new message, or one
/// loaded from the spool at start-up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecipient {
    /// Index into `Envelope::recipients`.
    pub rcpt: usize,
    pub destination: Destination,
    /// Attempts already made (from the spool's `Deferred` state), 0 if none.
    pub attempts: u32,
    /// When it may be attempted: now for new mail, `next_attempt` for
    /// deferred mail.
    pub due: Millis,
    /// The last reply, for [`Scheduler::explain`].
    pub last_reply: Option<String>,
}

/// One delivery attempt: one message to one destination, some of its
/// recipients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Job {
    pub id: JobId,
    pub destination: Destination,
    pub msg: MsgId,
    /// Indexes into `Envelope::recipients`, ascending.
    pub recipients: Vec<usize>,
    /// The destination is dead and this job tests whether it is back.
    pub probe: bool,
    pub started_at: Millis,
}

/// A recipient that reached its give-up time while waiting: the caller fails
/// it (and bounces).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expired {
    pub key: RcptKey,
    pub destination: Destination,
    pub attempts: u32,
    pub last_reply: Option<String>,
}

/// What [`Scheduler::poll`] hands out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Poll {
    pub jobs: Vec<Job>,
    pub expired: Vec<Expired>,
}

/// The result of one recipient in a job, as the driver saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    Delivered,
    /// Try again later. `class` is [`ReplyClass::Throttled`] when the reply
    /// asked us to slow down ([`classify`]); `reply` is a one-line summary
    /// (code, enhanced code, text, host) for the queue and the logs.
    Deferred {
        class: ReplyClass,
        reply: String,
    },
    Failed {
        reply: String,
    },
}

/// How the job's session went, apart from its recipients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// An SMTP session took place (whatever the recipients' replies were).
    Established,
    /// No session: every host refused, was unreachable or timed out (or the
    /// greeting never came). Counts towards a dead destination.
    Failed { reason: String },
    /// The server throttled the session itself (a `421` greeting, a throttling
    /// reply to EHLO or MAIL).
    Throttled { reply: String },
}

/// Everything the driver reports for a finished job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReport {
    pub connection: Connection,
    /// (recipient index, result). A recipient of the job missing here is
    /// deferred with the connection's reason (or "no result").
    pub recipients: Vec<(usize, RcptResult)>,
}

/// What happens to a recipient after a job: the caller records it in the
/// spool (`Delivered`, `Failed`, `Deferred { attempts, next_attempt }`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "fate", rename_all = "snake_case")]
pub enum Fate {
    Delivered,
    Failed,
    /// Deferred: attempt again at `at` (this was attempt number `attempts`).
    Retry {
        at: Millis,
        attempts: u32,
    },
    /// Deferred, but the next attempt would fall after the give-up time.
    Expired {
        attempts: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Settled {
    pub key: RcptKey,
    pub fate: Fate,
}

/// Why a pending recipient is not being attempted right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Wait {
    /// Due; dispatched at the next poll with a free slot.
    Due,
    /// Waiting out the retry delay after a failed attempt.
    Backoff { until: Millis },
    /// The destination has as many jobs in flight as its window allows.
    WindowFull { in_flight: u32, window: u32 },
    /// The destination's delivery rate (lowered after it throttled us) allows
    /// the next job only then.
    Throttled { until: Millis },
    /// The destination failed to connect too often; only a probe goes there,
    /// next at `next_probe` (in the past while a probe is in flight).
    DestinationDead { next_probe: Millis },
    /// The message is on hold.
    Held,
    /// An attempt is under way.
    InFlight,
    /// Every delivery slot of the server is taken.
    Busy { in_flight: usize, limit: usize },
}

/// One pending recipient, explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RcptExplain {
    pub key: RcptKey,
    pub destination: Destination,
    pub attempts: u32,
    pub due: Millis,
    pub expires_at: Millis,
    pub last_reply: Option<String>,
    pub wait: Wait,
}

/// One destination, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationSummary {
    pub destination: Destination,
    /// Pending recipients (waiting, held or in flight).
    pub queued: usize,
    pub in_flight: u32,
    pub window: u32,
    /// Jobs per minute; `None` while the destination has not throttled us
    /// (or has recovered).
    pub rate_per_minute: Option<f64>,
    /// The rate allows the next job from then on.
    pub next_start: Option<Millis>,
    pub consecutive_failures: u32,
    /// Set while the destination is dead.
    pub next_probe: Option<Millis>,
    /// Times it throttled us (each halving counted once).
    pub throttled: u64,
    /// The last reply or connection error that was not a success.
    pub last_error: Option<String>,
    pub last_error_at: Option<Millis>,
    pub last_success_at: Option<Millis>,
}

/// Pending recipients by state ([`Scheduler::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    pub queued: usize,
    pub deferred: usize,
    pub held: usize,
    pub in_flight: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0} is not in flight")]
    UnknownJob(JobId),
}

struct Msg {
    expires_at: Millis,
    held: bool,
    rcpts: BTreeMap<usize, Rcpt>,
}

struct Rcpt {
    dest: usize,
    attempts: u32,
    due: Millis,
    job: Option<JobId>,
    last_reply: Option<String>,
}

struct Dest {
    name: Destination,
    /// Waiting recipients by due time: the next job takes the first.
    due: BTreeSet<(Millis, MsgId, usize)>,
    /// The same recipients by message, to gather a message's others.
    by_msg: BTreeMap<(MsgId, usize), Millis>,
    /// Every pending recipient routed here (waiting, held or in flight).
    queued: usize,
    in_flight: u32,
    window: u32,
    /// Successful jobs since the window last grew.
    credit: u32,
    /// Jobs per minute, `None` = unlimited.
    rate: Option<f64>,
    next_start: Millis,
    last_start: Option<Millis>,
    /// Average milliseconds between job starts (the rate we were sending at
    /// when a throttle comes).
    interval: Option<f64>,
    /// Jobs ever started here, and how many had been when the window was
    /// last halved: a job numbered at or below that started before it.
    starts: u64,
    decreased_at_start: u64,
    throttled: u64,
    failures: u32,
    /// Next probe time while dead.
    dead: Option<Millis>,
    probes_failed: u32,
    probing: bool,
    last_error: Option<(Millis, String)>,
    last_success: Option<Millis>,
    in_ring: bool,
    timer: Option<Millis>,
}

/// When a destination can next start a job.
enum Wake {
    /// Nothing waiting.
    Idle,
    /// Only a finishing job can change that (window full, probe in flight).
    Completion,
    At(Millis),
}

impl Dest {
    fn new(name: Destination, window: u32) -> Dest {
        Dest {
            name,
            due: BTreeSet::new(),
            by_msg: BTreeMap::new(),
            queued: 0,
            in_flight: 0,
            window,
            credit: 0,
            rate: None,
            next_start: Millis::MIN,
            last_start: None,
            interval: None,
            starts: 0,
            decreased_at_start: 0,
            throttled: 0,
            failures: 0,
            dead: None,
            probes_failed: 0,
            probing: false,
            last_error: None,
            last_success: None,
            in_ring: false,
            timer: None,
        }
    }

    fn wake(&self) -> Wake {
        let Some(&(due, _, _)) = self.due.first() else {
            return Wake::Idle;
        };
        match self.dead {
            // Jobs started before it died may still be in flight: a probe
            // waits for the window like any job.
            Some(_) if self.probing || self.in_flight >= self.window => Wake::Completion,
            Some(probe) => Wake::At(due.max(probe)),
            None if self.in_flight >= self.window => Wake::Completion,
            None => Wake::At(due.max(self.next_start)),
        }
    }

    fn enqueue(&mut self, msg: MsgId, rcpt: usize, due: Millis) {
        self.due.insert((due, msg, rcpt));
        self.by_msg.insert((msg, rcpt), due);
    }

    fn dequeue(&mut self, msg: MsgId, rcpt: usize) {
        if let Some(due) = self.by_msg.remove(&(msg, rcpt)) {
            self.due.remove(&(due, msg, rcpt));
        }
    }

    /// Window and rate after a throttling reply to a job numbered `start`.
    fn throttle(&mut self, start: u64, rate: &RatePolicy, now: Millis) {
        if start <= self.decreased_at_start {
            return;
        }
        self.decreased_at_start = self.starts;
        self.throttled += 1;
        self.window = (self.window / 2).max(1);
        self.credit = 0;
        let sending = match self.interval {
            Some(ms) => 60_000.0 / ms.max(1.0),
            None => rate.unlimited_above,
        };
        let current = self.rate.unwrap_or(f64::INFINITY).min(sending);
        let halved = (current / 2.0)
            .min(rate.unlimited_above / 2.0)
            .max(rate.min_per_minute);
        self.rate = Some(halved);
        // A pause of one interval at the new rate starts now: the reply is
        // the news, not the start of the job that got it.
        self.next_start = self
            .next_start
            .max(now.saturating_add(start_interval(halved)));
    }

    fn succeed(&mut self, window: &WindowPolicy, rate: &RatePolicy) {
        self.credit += 1;
        if self.credit >= self.window {
            self.credit = 0;
            self.window = (self.window + 1).min(window.max);
        }
        if let Some(r) = self.rate {
            let r = r + rate.increase_per_success;
            self.rate = (r < rate.unlimited_above).then_some(r);
        }
    }
}

/// Milliseconds between job starts at `per_minute`.
fn start_interval(per_minute: f64) -> Millis {
    let ms = (60_000.0 / per_minute).ceil();
    if ms.is_finite() && ms >= 1.0 {
        ms as Millis
    } else {
        1
    }
}

struct JobRec {
    dest: usize,
    msg: MsgId,
    rcpts: Vec<usize>,
    /// The destination's start number of this job.
    start: u64,
    probe: bool,
}

/// Gives every waiting recipient of `msg` (unless it is on hold) a new due
/// time; returns the destinations touched.
fn reschedule(
    msgs: &mut HashMap<MsgId, Msg>,
    dests: &mut [Dest],
    msg: MsgId,
    mut due: impl FnMut(usize) -> Millis,
) -> Vec<usize> {
    let mut touched = Vec::new();
    let Some(m) = msgs.get_mut(&msg) else {
        return touched;
    };
    if m.held {
        return touched;
    }
    for (&i, r) in m.rcpts.iter_mut() {
        if r.job.is_none() {
            let dest = &mut dests[r.dest];
            dest.dequeue(msg, i);
            r.due = due(i);
            dest.enqueue(msg, i, r.due);
            touched.push(r.dest);
        }
    }
    touched.sort_unstable();
    touched.dedup();
    touched
}

/// The scheduler. See the module documentation.
pub struct Scheduler {
    cfg: SchedulerConfig,
    rng: StdRng,
    msgs: HashMap<MsgId, Msg>,
    dests: Vec<Dest>,
    dest_ids: HashMap<Destination, usize>,
    jobs: HashMap<JobId, JobRec>,
    next_job: u64,
    in_flight: usize,
    /// Destinations that can start a job now, in round-robin order.
    ring: VecDeque<usize>,
    /// When a destination may become able to start a job. Entries can be
    /// stale (early): popping one only re-examines the destination.
    timers: BinaryHeap<Reverse<(Millis, usize)>>,
    /// Give-up times of the messages not on hold. An entry leaves with its
    /// message: a queue that delivers in seconds must not keep five days of
    /// entries.
    expiries: BTreeSet<(Millis, MsgId)>,
    /// Slots in `dests` of destinations forgotten (see `forget_if_idle`).
    free: Vec<usize>,
}

impl Scheduler {
    /// An empty scheduler. `seed` seeds the jitter (tests pass a constant,
    /// the daemon a random value).
    pub fn new(config: SchedulerConfig, seed: u64) -> Scheduler {
        Scheduler {
            cfg: config.normalized(),
            rng: StdRng::seed_from_u64(seed),
            msgs: HashMap::new(),
            dests: Vec::new(),
            dest_ids: HashMap::new(),
            jobs: HashMap::new(),
            next_job: 1,
            in_flight: 0,
            ring: VecDeque::new(),
            timers: BinaryHeap::new(),
            expiries: BTreeSet::new(),
            free: Vec::new(),
        }
    }

    /// A reloaded config: what was learned (windows, rates, dead
    /// destinations, the queue) stays, brought within the new bounds. Jobs
    /// in flight over a lowered global limit finish; no new one starts
    /// until the count is under it.
    pub fn set_config(&mut self, config: SchedulerConfig) {
        self.cfg = config.normalized();
        let (window, rate) = (&self.cfg.window, &self.cfg.rate);
        for dest in &mut self.dests {
            dest.window = dest.window.clamp(1, window.max);
            dest.rate = dest
                .rate
                .map(|r| r.max(rate.min_per_minute))
                .filter(|r| *r < rate.unlimited_above);
        }
    }

    /// The config in effect (after [`Scheduler::new`] brought it into range).
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Pending recipients (waiting, held or in flight).
    pub fn pending(&self) -> usize {
        self.dests.iter().map(|d| d.queued).sum()
    }

    /// Pending recipients by state (metrics): waiting for a first attempt,
    /// waiting after a failed one, held, in flight.
    pub fn counts(&self) -> QueueCounts {
        let mut c = QueueCounts::default();
        for m in self.msgs.values() {
            for r in m.rcpts.values() {
                let n = if r.job.is_some() {
                    &mut c.in_flight
                } else if m.held {
                    &mut c.held
                } else if r.attempts > 0 {
                    &mut c.deferred
                } else {
                    &mut c.queued
                };
                *n += 1;
            }
        }
        c
    }

    /// Jobs in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the scheduler tracks any recipient of `msg`.
    pub fn contains(&self, msg: MsgId) -> bool {
        self.msgs.contains_key(&msg)
    }

    /// Adds recipients of a message received at `received_at`. A recipient
    /// already waiting is replaced (a new route or due time); one in flight is
    /// left alone (its job's result decides).
    pub fn add(
        &mut self,
        msg: MsgId,
        received_at: Millis,
        recipients: impl IntoIterator<Item = NewRecipient>,
        now: Millis,
    ) {
        let expires_at = received_at.saturating_add(millis(self.cfg.retry.give_up));
        let m = self.msgs.entry(msg).or_insert_with(|| Msg {
            expires_at,
            held: false,
            rcpts: BTreeMap::new(),
        });
        // A new message, or one whose expiry may already have been swept
        // (while its other recipients were in flight). A held message gets
        // its entry back on release.
        if !m.held && (m.rcpts.is_empty() || m.expires_at <= now) {
            self.expiries.insert((m.expires_at, msg));
        }
        let mut touched = Vec::new();
        for r in recipients {
            let dest = self.dest_id(r.destination);
            let Some(m) = self.msgs.get_mut(&msg) else {
                return;
            };
            if let Some(old) = m.rcpts.get(&r.rcpt) {
                if old.job.is_some() {
                    touched.push(dest);
                    continue;
                }
                let old_dest = old.dest;
                self.dests[old_dest].dequeue(msg, r.rcpt);
                self.dests[old_dest].queued -= 1;
                touched.push(old_dest);
            }
            m.rcpts.insert(
                r.rcpt,
                Rcpt {
                    dest,
                    attempts: r.attempts,
                    due: r.due,
                    job: None,
                    last_reply: r.last_reply,
                },
            );
            self.dests[dest].queued += 1;
            if !m.held {
                self.dests[dest].enqueue(msg, r.rcpt, r.due);
            }
            touched.push(dest);
        }
        for d in touched {
            self.refresh(d, now);
            self.forget_if_idle(d);
        }
        self.remove_if_empty(msg);
    }

    /// Drops a message once none of its recipients is pending.
    fn remove_if_empty(&mut self, msg: MsgId) {
        if let Some(m) = self.msgs.get(&msg)
            && m.rcpts.is_empty()
        {
            self.expiries.remove(&(m.expires_at, msg));
            self.msgs.remove(&msg);
        }
    }

    /// Forgets a destination with nothing pending and nothing learned that
    /// the next message to it needs (it is not dead, has no rate limit and no
    /// failures): the set of destinations ever seen grows without bound, the
    /// set of those with mail does not. A window grown past the initial one
    /// is forgotten too, as Postfix forgets an empty queue's.
    fn forget_if_idle(&mut self, d: usize) {
        let dest = &self.dests[d];
        let idle = dest.queued == 0 && dest.in_flight == 0 && dest.dead.is_none();
        if idle
            && dest.rate.is_none()
            && dest.failures == 0
            && self.dest_ids.get(&dest.name) == Some(&d)
        {
            self.dest_ids.remove(&dest.name);
            self.free.push(d);
        }
    }

    fn dest_id(&mut self, name: Destination) -> usize {
        if let Some(&d) = self.dest_ids.get(&name) {
            return d;
        }
        let fresh = Dest::new(name.clone(), self.cfg.window.initial);
        let d = match self.free.pop() {
            Some(d) => {
                // The slot's ring and timer entries stay valid: they name the
                // slot, and an entry for a slot only makes poll look at it.
                let (in_ring, timer) = (self.dests[d].in_ring, self.dests[d].timer);
                self.dests[d] = Dest {
                    in_ring,
                    timer,
                    ..fresh
                };
                d
            }
            None => {
                self.dests.push(fresh);
                self.dests.len() - 1
            }
        };
        self.dest_ids.insert(name, d);
        d
    }

    /// Puts `d` in the ring if it can start a job at `now`, or sets a timer for
    /// when it might.
    fn refresh(&mut self, d: usize, now: Millis) {
        let dest = &mut self.dests[d];
        if let Wake::At(at) = dest.wake() {
            if at <= now {
                if !dest.in_ring {
                    dest.in_ring = true;
                    self.ring.push_back(d);
                }
            } else if dest.timer.is_none_or(|t| at < t) {
                dest.timer = Some(at);
                self.timers.push(Reverse((at, d)));
            }
        }
    }

    /// Hands out the jobs that may start at `now` (round-robin over the
    /// destinations, within windows, rates and the global limit) and the
    /// recipients that reached their give-up time while waiting.
    pub fn poll(&mut self, now: Millis) -> Poll {
        let mut out = Poll::default();
        self.sweep_expired(now, &mut out.expired);
        self.fire_timers(now);
        while self.in_flight < self.cfg.max_in_flight {
            let Some(d) = self.ring.pop_front() else {
                break;
            };
            self.dests[d].in_ring = false;
            if matches!(self.dests[d].wake(), Wake::At(at) if at <= now) {
                out.jobs.push(self.start_job(d, now));
            }
            self.refresh(d, now);
        }
        out
    }

    /// Re-examines every destination whose timer is due.
    fn fire_timers(&mut self, now: Millis) {
        while let Some(&Reverse((at, d))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.dests[d].timer == Some(at) {
                self.dests[d].timer = None;
            }
            self.refresh(d, now);
        }
    }

    /// The next job for `destination` on a connection the driver already has
    /// open to it (connection reuse: call it after completing that
    /// connection's job), if one may start at `now` within the destination's
    /// window and rate and the global limit. Reuse yields while other
    /// destinations wait for a slot: it takes one only if enough remain for
    /// every destination ready in the ring, so a busy destination holding
    /// its connections open never starves a quiet one.
    pub fn next_job_for(&mut self, destination: &Destination, now: Millis) -> Option<Job> {
        let &d = self.dest_ids.get(destination)?;
        self.fire_timers(now);
        let dest = &self.dests[d];
        let others = self.ring.len() - usize::from(dest.in_ring);
        // A dead destination has no open connection; its probe comes from poll.
        if dest.dead.is_some() || self.in_flight + others >= self.cfg.max_in_flight {
            return None;
        }
        if !matches!(dest.wake(), Wake::At(at) if at <= now) {
            return None;
        }
        let job = self.start_job(d, now);
        self.refresh(d, now);
        Some(job)
    }

    fn start_job(&mut self, d: usize, now: Millis) -> Job {
        let id = JobId(self.next_job);
        self.next_job += 1;
        let limit = self.cfg.max_recipients_per_job;
        let dest = &mut self.dests[d];
        let mut rcpts = Vec::new();
        if let Some(&(_, msg, _)) = dest.due.first() {
            let keys = (msg, 0)..=(msg, usize::MAX);
            for (&(_, rcpt), &due) in dest.by_msg.range(keys) {
                if due <= now {
                    rcpts.push((msg, rcpt));
                    if rcpts.len() == limit {
                        break;
                    }
                }
            }
        }
        for &(msg, rcpt) in &rcpts {
            dest.dequeue(msg, rcpt);
        }
        let msg = rcpts.first().map_or(MsgId(0), |&(m, _)| m);
        let probe = dest.dead.is_some();
        dest.probing |= probe;
        dest.in_flight += 1;
        dest.starts += 1;
        if let Some(last) = dest.last_start {
            let gap = (now.saturating_sub(last)).max(0) as f64;
            dest.interval = Some(dest.interval.map_or(gap, |avg| avg * 0.75 + gap * 0.25));
        }
        dest.last_start = Some(now);
        if let Some(rate) = dest.rate {
            dest.next_start = now.saturating_add(start_interval(rate));
        }
        let start = dest.starts;
        let destination = dest.name.clone();
        self.in_flight += 1;
        let recipients: Vec<usize> = rcpts.iter().map(|&(_, r)| r).collect();
        if let Some(m) = self.msgs.get_mut(&msg) {
            for &r in &recipients {
                if let Some(rcpt) = m.rcpts.get_mut(&r) {
                    rcpt.job = Some(id);
                }
            }
        }
        self.jobs.insert(
            id,
            JobRec {
                dest: d,
                msg,
                rcpts: recipients.clone(),
                start,
                probe,
            },
        );
        Job {
            id,
            destination,
            msg,
            recipients,
            probe,
            started_at: now,
        }
    }

    fn sweep_expired(&mut self, now: Millis, out: &mut Vec<Expired>) {
        while let Some(&(at, msg)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            let Some(m) = self.msgs.get_mut(&msg) else {
                continue;
            };
            let waiting: Vec<usize> = m
                .rcpts
                .iter()
                .filter(|(_, r)| r.job.is_none())
                .map(|(&i, _)| i)
                .collect();
            let mut touched = Vec::new();
            for i in waiting {
                if let Some(r) = m.rcpts.remove(&i) {
                    let dest = &mut self.dests[r.dest];
                    dest.dequeue(msg, i);
                    dest.queued -= 1;
                    out.push(Expired {
                        key: RcptKey { msg, rcpt: i },
                        destination: dest.name.clone(),
                        attempts: r.attempts,
                        last_reply: r.last_reply,
                    });
                    touched.push(r.dest);
                }
            }
            if m.rcpts.is_empty() {
                self.msgs.remove(&msg);
            }
            for d in touched {
                self.forget_if_idle(d);
            }
        }
    }

    /// Records the result of a job: updates the destination's window, rate
    /// and dead state, and says what becomes of each of its recipients (in
    /// the job's order; recipients of a message deleted meanwhile are left
    /// out).
    pub fn complete(
        &mut self,
        job: JobId,
        report: &JobReport,
        now: Millis,
    ) -> Result<Vec<Settled>, SchedulerError> {
        let rec = self
            .jobs
            .remove(&job)
            .ok_or(SchedulerError::UnknownJob(job))?;
        self.in_flight -= 1;
        let d = rec.dest;
        let results: HashMap<usize, &RcptResult> =
            report.recipients.iter().map(|(i, r)| (*i, r)).collect();
        let throttled = matches!(report.connection, Connection::Throttled { .. })
            || results.values().any(|r| {
                matches!(
                    r,
                    RcptResult::Deferred {
                        class: ReplyClass::Throttled,
                        ..
                    }
                )
            });
        let delivered = results.values().any(|r| matches!(r, RcptResult::Delivered));
        // A final reply (250 or 550) shows the destination keeping up: both
        // count for the window, as completed deliveries do for Postfix's.
        let answered = delivered
            || results
                .values()
                .any(|r| matches!(r, RcptResult::Failed { .. }));
        let probe_jitter = self.rng.random::<f64>();
        let cfg = &self.cfg;
        let dest = &mut self.dests[d];
        dest.in_flight -= 1;
        if rec.probe {
            dest.probing = false;
        }
        match &report.connection {
            Connection::Failed { reason } => {
                dest.failures = dest.failures.saturating_add(1);
                dest.last_error = Some((now, reason.clone()));
                let probe_at =
                    |n: u32| now.saturating_add(millis(cfg.retry.delay(n, probe_jitter)).max(1));
                if dest.dead.is_some() {
                    // A job started before the destination died says nothing
                    // new; only a failed probe pushes the next one out.
                    if rec.probe {
                        dest.probes_failed = dest.probes_failed.saturating_add(1);
                        dest.dead = Some(probe_at(dest.probes_failed + 1));
                    }
                } else if dest.failures >= cfg.dead_after {
                    dest.probes_failed = 0;
                    dest.dead = Some(probe_at(1));
                }
            }
            Connection::Established | Connection::Throttled { .. } => {
                dest.failures = 0;
                if dest.dead.take().is_some() {
                    dest.probes_failed = 0;
                    dest.window = dest.window.min(cfg.window.initial);
                    dest.credit = 0;
                }
            }
        }
        if throttled {
            dest.throttle(rec.start, &cfg.rate, now);
        } else if answered {
            dest.succeed(&cfg.window, &cfg.rate);
        }
        if delivered {
            dest.last_success = Some(now);
        }
        if let Connection::Throttled { reply } = &report.connection {
            dest.last_error = Some((now, reply.clone()));
        }
        // A recipient the driver did not report on (its session never got
        // that far) is deferred with the session's reason.
        let fallback = match &report.connection {
            Connection::Failed { reason } => reason,
            Connection::Throttled { reply } => reply,
            Connection::Established => "no result reported for this recipient",
        };
        let mut settled = Vec::with_capacity(rec.rcpts.len());
        for &i in &rec.rcpts {
            let Some(m) = self.msgs.get_mut(&rec.msg) else {
                break;
            };
            if m.rcpts.get(&i).is_none_or(|r| r.job != Some(job)) {
                continue;
            }
            let key = RcptKey {
                msg: rec.msg,
                rcpt: i,
            };
            let reply = match results.get(&i) {
                Some(RcptResult::Delivered) => {
                    m.rcpts.remove(&i);
                    self.dests[d].queued -= 1;
                    settled.push(Settled {
                        key,
                        fate: Fate::Delivered,
                    });
                    continue;
                }
                Some(RcptResult::Failed { reply }) => {
                    m.rcpts.remove(&i);
                    let dest = &mut self.dests[d];
                    dest.queued -= 1;
                    dest.last_error = Some((now, reply.clone()));
                    settled.push(Settled {
                        key,
                        fate: Fate::Failed,
                    });
                    continue;
                }
                Some(RcptResult::Deferred { reply, .. }) => {
                    self.dests[d].last_error = Some((now, reply.clone()));
                    reply.clone()
                }
                None => fallback.to_string(),
            };
            let jitter = self.rng.random::<f64>();
            let Some(r) = m.rcpts.get_mut(&i) else {
                continue;
            };
            r.attempts = r.attempts.saturating_add(1);
            r.job = None;
            r.last_reply = Some(reply);
            let delay = millis(self.cfg.retry.delay(r.attempts, jitter)).max(1);
            let at = now.saturating_add(delay);
            if at > m.expires_at {
                let attempts = r.attempts;
                m.rcpts.remove(&i);
                self.dests[d].queued -= 1;
                settled.push(Settled {
                    key,
                    fate: Fate::Expired { attempts },
                });
                continue;
            }
            r.due = at;
            let attempts = r.attempts;
            if !m.held {
                self.dests[d].enqueue(rec.msg, i, at);
            }
            settled.push(Settled {
                key,
                fate: Fate::Retry { at, attempts },
            });
        }
        self.remove_if_empty(rec.msg);
        self.refresh(d, now);
        self.forget_if_idle(d);
        Ok(settled)
    }

    /// Puts a message on hold: none of its recipients is dispatched until
    /// [`Scheduler::release`] (an attempt already under way finishes).
    /// Returns whether the message is known.
    pub fn hold(&mut self, msg: MsgId) -> bool {
        let Some(m) = self.msgs.get_mut(&msg) else {
            return false;
        };
        if !m.held {
            m.held = true;
            self.expiries.remove(&(m.expires_at, msg));
            for (&i, r) in &m.rcpts {
                if r.job.is_none() {
                    self.dests[r.dest].dequeue(msg, i);
                }
            }
        }
        true
    }

    /// Takes a message off hold; its recipients keep their due times (and
    /// expire at the next poll if their give-up time passed meanwhile).
    pub fn release(&mut self, msg: MsgId, now: Millis) -> bool {
        let Some(m) = self.msgs.get_mut(&msg) else {
            return false;
        };
        if m.held {
            m.held = false;
            let mut touched = Vec::new();
            for (&i, r) in &m.rcpts {
                if r.job.is_none() {
                    self.dests[r.dest].enqueue(msg, i, r.due);
                    touched.push(r.dest);
                }
            }
            self.expiries.insert((m.expires_at, msg));
            for d in touched {
                self.refresh(d, now);
            }
        }
        true
    }

    /// Forgets a message (deleted by the administrator, or finished by other
    /// means). A job in flight for it still completes, and its destination
    /// learns from it, but no recipient of it is settled.
    pub fn delete(&mut self, msg: MsgId) -> bool {
        let Some(m) = self.msgs.remove(&msg) else {
            return false;
        };
        self.expiries.remove(&(m.expires_at, msg));
        for (i, r) in m.rcpts {
            let dest = &mut self.dests[r.dest];
            dest.dequeue(msg, i);
            dest.queued -= 1;
            self.forget_if_idle(r.dest);
        }
        true
    }

    /// Makes every waiting recipient of every message not on hold due within
    /// [`SchedulerConfig::flush_spread`] from `now` (uniformly at random, so
    /// the retries after an outage come spread out, and windows and rates
    /// still apply), and lets each dead destination probe now.
    pub fn flush(&mut self, now: Millis) {
        let spread = millis(self.cfg.flush_spread).max(0);
        // In queue-id order: the draws from the RNG must not depend on a
        // HashMap's iteration order, or a seed would not replay a run.
        let mut ids: Vec<MsgId> = self.msgs.keys().copied().collect();
        ids.sort_unstable();
        for msg in ids {
            let rng = &mut self.rng;
            let due = |_| now.saturating_add(rng.random_range(0..=spread));
            reschedule(&mut self.msgs, &mut self.dests, msg, due);
        }
        for d in 0..self.dests.len() {
            let dest = &mut self.dests[d];
            if let Some(probe) = dest.dead {
                dest.dead = Some(probe.min(now));
            }
            self.refresh(d, now);
        }
    }

    /// Makes the waiting recipients of one message due now (and lets their
    /// destinations probe now if dead). Returns whether the message is known.
    pub fn flush_message(&mut self, msg: MsgId, now: Millis) -> bool {
        if !self.msgs.contains_key(&msg) {
            return false;
        }
        let touched = reschedule(&mut self.msgs, &mut self.dests, msg, |_| now);
        for d in touched {
            if let Some(probe) = self.dests[d].dead {
                self.dests[d].dead = Some(probe.min(now));
            }
            self.refresh(d, now);
        }
        true
    }

    /// The earliest time a poll could hand out something new without a job
    /// completing first (`None`: nothing until then). May be early, never
    /// late.
    pub fn next_wakeup(&self) -> Option<Millis> {
        let ready = (!self.ring.is_empty() && self.in_flight < self.cfg.max_in_flight)
            .then_some(Millis::MIN);
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let expiry = self.expiries.first().map(|(at, _)| *at);
        [ready, timer, expiry].into_iter().flatten().min()
    }

    fn wait(&self, m: &Msg, r: &Rcpt, now: Millis) -> Wait {
        if r.job.is_some() {
            return Wait::InFlight;
        }
        if m.held {
            return Wait::Held;
        }
        if r.due > now {
            return Wait::Backoff { until: r.due };
        }
        let dest = &self.dests[r.dest];
        if let Some(next_probe) = dest.dead {
            return Wait::DestinationDead { next_probe };
        }
        if dest.in_flight >= dest.window {
            return Wait::WindowFull {
                in_flight: dest.in_flight,
                window: dest.window,
            };
        }
        if dest.next_start > now {
            return Wait::Throttled {
                until: dest.next_start,
            };
        }
        if self.in_flight >= self.cfg.max_in_flight {
            return Wait::Busy {
                in_flight: self.in_flight,
                limit: self.cfg.max_in_flight,
            };
        }
        Wait::Due
    }

    fn explain_rcpt(&self, msg: MsgId, m: &Msg, i: usize, r: &Rcpt, now: Millis) -> RcptExplain {
        RcptExplain {
            key: RcptKey { msg, rcpt: i },
            destination: self.dests[r.dest].name.clone(),
            attempts: r.attempts,
            due: r.due,
            expires_at: m.expires_at,
            last_reply: r.last_reply.clone(),
            wait: self.wait(m, r, now),
        }
    }

    /// Every pending recipient of `msg` and why it waits (empty if unknown).
    pub fn explain_message(&self, msg: MsgId, now: Millis) -> Vec<RcptExplain> {
        self.msgs.get(&msg).map_or_else(Vec::new, |m| {
            m.rcpts
                .iter()
                .map(|(&i, r)| self.explain_rcpt(msg, m, i, r, now))
                .collect()
        })
    }

    /// Every pending recipient and why it waits, by queue id.
    pub fn explain(&self, now: Millis) -> Vec<RcptExplain> {
        let mut ids: Vec<MsgId> = self.msgs.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .flat_map(|id| self.explain_message(id, now))
            .collect()
    }

    /// One destination's state, if it has been seen.
    pub fn destination(&self, name: &Destination, now: Millis) -> Option<DestinationSummary> {
        self.dest_ids.get(name).map(|&d| self.summary(d, now))
    }

    /// Every destination with pending recipients, by name.
    pub fn destinations(&self, now: Millis) -> Vec<DestinationSummary> {
        let mut out: Vec<DestinationSummary> = (0..self.dests.len())
            .filter(|&d| self.dests[d].queued > 0 || self.dests[d].in_flight > 0)
            .map(|d| self.summary(d, now))
            .collect();
        out.sort_by(|a, b| a.destination.cmp(&b.destination));
        out
    }

    fn summary(&self, d: usize, now: Millis) -> DestinationSummary {
        let dest = &self.dests[d];
        DestinationSummary {
            destination: dest.name.clone(),
            queued: dest.queued,
            in_flight: dest.in_flight,
            window: dest.window,
            rate_per_minute: dest.rate,
            next_start: (dest.next_start > now).then_some(dest.next_start),
            consecutive_failures: dest.failures,
            next_probe: dest.dead,
            throttled: dest.throttled,
            last_error: dest.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: dest.last_error.as_ref().map(|(at, _)| *at),
            last_success_at: dest.last_success,
        }
    }

    /// Checks every internal cross-reference; panics with the first broken
    /// one. For tests.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut queued = vec![0usize; self.dests.len()];
        let mut waiting = vec![0usize; self.dests.len()];
        for (&id, m) in &self.msgs {
            assert!(!m.rcpts.is_empty(), "{id} kept without recipients");
            for (&i, r) in &m.rcpts {
                queued[r.dest] += 1;
                let indexed = self.dests[r.dest].by_msg.get(&(id, i));
                match (r.job, m.held) {
                    (Some(job), _) => {
                        assert!(indexed.is_none(), "{id}/{i} in flight and waiting");
                        let rec = &self.jobs[&job];
                        assert!(rec.msg == id && rec.rcpts.contains(&i) && rec.dest == r.dest);
                    }
                    (None, true) => assert!(indexed.is_none(), "{id}/{i} held and waiting"),
                    (None, false) => {
                        assert_eq!(indexed, Some(&r.due), "{id}/{i} not waiting");
                        assert!(self.dests[r.dest].due.contains(&(r.due, id, i)));
                        waiting[r.dest] += 1;
                    }
                }
            }
        }
        let mut in_flight = vec![0u32; self.dests.len()];
        let mut probes = vec![0u32; self.dests.len()];
        for rec in self.jobs.values() {
            in_flight[rec.dest] += 1;
            probes[rec.dest] += u32::from(rec.probe);
        }
        assert_eq!(self.jobs.len(), self.in_flight);
        assert!(self.in_flight <= self.cfg.max_in_flight);
        for (d, dest) in self.dests.iter().enumerate() {
            assert_eq!(dest.queued, queued[d], "{}: queued", dest.name);
            assert_eq!(dest.due.len(), waiting[d], "{}: due index", dest.name);
            assert_eq!(dest.by_msg.len(), waiting[d], "{}: by_msg index", dest.name);
            assert_eq!(dest.in_flight, in_flight[d], "{}: in flight", dest.name);
            assert!(probes[d] <= 1, "{}: several probes", dest.name);
            assert_eq!(dest.probing, probes[d] == 1, "{}: probing", dest.name);
            assert!((1..=self.cfg.window.max).contains(&dest.window));
            if let Some(rate) = dest.rate {
                assert!(rate >= self.cfg.rate.min_per_minute);
                assert!(rate < self.cfg.rate.unlimited_above);
            }
            assert_eq!(dest.in_ring, self.ring.contains(&d));
            if self.free.contains(&d) {
                assert!(
                    dest.queued == 0 && dest.in_flight == 0,
                    "{}: forgotten busy",
                    dest.name
                );
                assert_ne!(
                    self.dest_ids.get(&dest.name),
                    Some(&d),
                    "{}: forgotten",
                    dest.name
                );
            } else {
                assert_eq!(
                    self.dest_ids.get(&dest.name),
                    Some(&d),
                    "{}: lost",
                    dest.name
                );
            }
        }
        assert_eq!(self.dest_ids.len() + self.free.len(), self.dests.len());
        let expiries: BTreeSet<(Millis, MsgId)> = self
            .msgs
            .iter()
            .filter(|(_, m)| !m.held)
            .map(|(&id, m)| (m.expires_at, id))
            .collect();
        assert!(
            self.expiries.is_subset(&expiries),
            "expiry of a message gone"
        );
    }
}

#[cfg(test)]
mod tests;
