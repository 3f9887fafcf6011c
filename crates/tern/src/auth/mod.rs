//! Authentication for SMTP submission: who may log in, with what, and how
//! often they may get it wrong.
//!
//! The session's whole interface is [`Accounts`] (one per server, shared
//! as `Arc<Accounts>`) and the [`Exchange`] it starts per `AUTH` command:
//!
//! ```ignore
//! let accounts = Accounts::open(&runtime.auth)?;            // at start-up
//! // Per TLS session: the RFC 9266 exporter (TLS 1.3 only); -PLUS is offered
//! // in EHLO exactly when it is Some.
//! let binding = ChannelBinding {
//!     tls_exporter: tls_exporter(tls_conn),                 // None without TLS
//!     plus_advertised: /* SCRAM-SHA-256-PLUS was in this EHLO reply */,
//! };
//! // Query::Auth { mechanism, initial } from tern-proto:
//! let mut exchange = match accounts.start(&mechanism, client_ip, Service::Submission, binding) {
//!     Ok(x) => x,
//!     Err(_) => return reply(504, "5.5.4", "Unrecognized authentication type"),
//! };
//! let mut response = initial;                                // Option<Vec<u8>>
//! loop {
//!     match exchange.step(response.as_deref()).await {
//!         AuthStep::Challenge(bytes) => { /* Decision::AuthChallenge(bytes); */
//!             response = Some(next_auth_response().await) }    // Query::AuthResponse
//!         AuthStep::Done(outcome) => break outcome.reply(),  // 235 / 535 / 454 / 421 / 501
//!     }
//! }
//! ```
//!
//! Parts: `secret` (argon2id hashes, SCRAM keys, app passwords), `store`
//! (the users file and its live reload), `import` (Dovecot passwd-file),
//! `sasl` (PLAIN, LOGIN, SCRAM-SHA-256(-PLUS) as pure state machines),
//! `counters` (brute-force limits), `guard` ([`Accounts`]: limits before any
//! hash, the verified-credential cache, hashing on the blocking pool),
//! `exchange` (one AUTH exchange), `cli` (`tern user`).
//!
//! Every attempt is logged as an `auth.login` event: client IP, mechanism,
//! the user as given, the outcome, and whether the password or which app
//! password (by label) was used; never the secret.

pub mod cli;
pub mod counters;
mod exchange;
pub mod guard;
pub mod import;
pub mod sasl;
pub mod secret;
pub mod store;
#[cfg(test)]
pub(crate) mod testutil;

pub use counters::{Admission, LoginCounters, LoginKey, LoginLimits, MemoryCounters};
pub use exchange::{AuthStep, Exchange, UnsupportedMechanism, tls_exporter};
pub use guard::Accounts;
pub use sasl::{ChannelBinding, Mechanism};
pub use secret::{HashParams, Secret};
pub use store::{StoreError, UserStore, Users};

use crate::config::Runtime;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The validated `[auth]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// The credential store (default `<data_dir>/users.toml`).
    pub users_file: PathBuf,
    pub limits: LoginLimits,
    /// How long a verified (login, secret) pair is answered without hashing.
    pub cache_ttl: Duration,
    /// Password hashes computed at once (default: the number of cores).
    pub hash_concurrency: usize,
    /// Cost of the hashes `tern user` makes (not a config key: stored
    /// hashes carry their own parameters).
    pub hash_params: HashParams,
    /// Offer AUTH before TLS to loopback clients (a local web app or
    /// script on the same host; nothing crosses a network in clear).
    pub plaintext_on_loopback: bool,
}

impl AuthSettings {
    pub fn new(users_file: PathBuf) -> AuthSettings {
        AuthSettings {
            users_file,
            limits: LoginLimits::default(),
            cache_ttl: DEFAULT_CACHE_TTL,
            hash_concurrency: default_hash_concurrency(),
            hash_params: HashParams::DEFAULT,
            plaintext_on_loopback: false,
        }
    }
}

pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(10 * 60);

pub fn default_hash_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(2)
}

/// What the login is for. App passwords are accepted for submission only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// SMTP submission (ports 587/465).
    Submission,
    /// Mailbox access (IMAP/POP, later): the account password only.
    Mailbox,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Submission => "submission",
            Service::Mailbox => "mailbox",
        }
    }
}

/// One login attempt's context, for limits and the log.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub client_ip: IpAddr,
    pub service: Service,
    pub mechanism: Mechanism,
}

/// Which secret a login used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Password,
    /// The app password with this label.
    AppPassword(String),
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Password => f.write_str("password"),
            Via::AppPassword(label) => write!(f, "app-password:{label}"),
        }
    }
}

/// A logged-in user, as the session keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedUser {
    /// The user's name in the users file (its spelling, not the client's).
    pub name: String,
    pub via: Via,
    /// Lower-cased addresses the users file gives this user.
    pub addresses: Vec<String>,
    /// Lower-cased extra addresses or `@domain` entries it may send as.
    pub allowed_senders: Vec<String>,
}

impl AuthenticatedUser {
    /// Whether this user may use `address` as the envelope sender (and,
    /// for the policy that checks it, `From:`): an address the main
    /// config gives the user of the same name or an alias reaching their
    /// mailbox (`Runtime::sender_belongs_to`), one of the users file's
    /// `addresses` or `allowed_senders`, or any address of an
    /// `allowed_senders` `@domain`; a subaddress (`alice+tag@`) counts as
    /// its base address. The null sender is not an address: false.
    pub fn may_send_as(&self, address: &str, runtime: &Runtime) -> bool {
        let address = address.to_lowercase();
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        if local.is_empty() || domain.is_empty() {
            return false;
        }
        let base = match runtime.subaddress_separator {
            Some(sep) => match local.split_once(sep) {
                Some((base, _)) if !base.is_empty() => format!("{base}@{domain}"),
                _ => address.clone(),
            },
            None => address.clone(),
        };
        let owns = |a: &str| {
            self.addresses.iter().any(|mine| mine == a)
                || self.allowed_senders.iter().any(|p| p == a)
        };
        runtime.sender_belongs_to(&address, &self.name)
            || owns(&address)
            || owns(&base)
            || self
                .allowed_senders
                .iter()
                .any(|p| p.strip_prefix('@') == Some(domain))
    }
}

/// The end of an authentication attempt, and the SMTP reply it calls for
/// ([`LoginOutcome::reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// `235 2.7.0 Authentication successful`.
    Success(AuthenticatedUser),
    /// Wrong login or secret (the two are not told apart), an app password
    /// outside submission, a refused authorization identity or channel
    /// binding: `535 5.7.8 Authentication credentials invalid`.
    Invalid,
    /// The account takes no attempt from this client now (locked after too
    /// many failures, or its one-per-interval slot is taken):
    /// `454 4.7.0 Temporary authentication failure`; the session goes on.
    AccountThrottled,
    /// This client's IP or network is locked after too many failures:
    /// `421 4.7.0` and close the connection.
    ClientLocked,
    /// Right credentials, but the account is held (circuit breaker) until
    /// `tern user release`: `454 4.7.0`, so mail clients keep the mail and
    /// retry instead of asking for a new password.
    Held,
    /// Nothing was decided: the hashing pool is overloaded or failed:
    /// `454 4.7.0 Temporary authentication failure`.
    Unavailable,
    /// The client's SASL message did not parse: `501 5.5.2`.
    Malformed,
}

/// An SMTP reply for an outcome (RFC 4954 §6 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthReply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: &'static str,
    /// Close the connection after the reply.
    pub disconnect: bool,
}

impl LoginOutcome {
    pub fn reply(&self) -> AuthReply {
        let (code, enhanced, text, disconnect) = match self {
            LoginOutcome::Success(_) => (235, "2.7.0", "Authentication successful", false),
            LoginOutcome::Invalid => (535, "5.7.8", "Authentication credentials invalid", false),
            LoginOutcome::AccountThrottled => (
                454,
                "4.7.0",
                "Temporary authentication failure, try again later",
                false,
            ),
            LoginOutcome::ClientLocked => (
                421,
                "4.7.0",
                "Too many failed logins, closing connection",
                true,
            ),
            LoginOutcome::Held => (
                454,
                "4.7.0",
                "Account held by the administrator, try again later",
                false,
            ),
            LoginOutcome::Unavailable => (454, "4.7.0", "Temporary authentication failure", false),
            LoginOutcome::Malformed => (501, "5.5.2", "Cannot parse authentication data", false),
        };
        AuthReply {
            code,
            enhanced,
            text,
            disconnect,
        }
    }

    /// The log's name for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            LoginOutcome::Success(_) => "success",
            LoginOutcome::Invalid => "invalid",
            LoginOutcome::AccountThrottled => "account-throttled",
            LoginOutcome::ClientLocked => "client-locked",
            LoginOutcome::Held => "held",
            LoginOutcome::Unavailable => "unavailable",
            LoginOutcome::Malformed => "malformed",
        }
    }
}

#[cfg(test)]
mod tests;
