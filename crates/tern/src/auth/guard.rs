//! [`Accounts`]: checks a login against the users file, in this order:
//!
//! 1. the brute-force counters ([`LoginCounters`]) decide whether this
//!    attempt may go on at all: nothing has been hashed yet;
//! 2. the verified-credential cache answers a (login, secret) pair seen in
//!    the last `cache_ttl` without hashing: a mail client logging in again
//!    costs one HMAC, not an argon2 run. Its key is an HMAC-SHA256, under a
//!    per-process random key, of the login and the secret, so the cache
//!    holds nothing a memory dump could test guesses against. Entries carry
//!    the user's secrets version: a new password or a revoked app password
//!    is never answered from the cache. Wrong pairs are cached too: a phone
//!    retrying a stale password costs no hash and counts as one failure,
//!    not one per retry;
//! 3. otherwise exactly one hash is computed, on the blocking pool, at most
//!    `hash_concurrency` at once (a login storm queues there, for at most
//!    [`HASH_QUEUE_TIMEOUT`], instead of taking the async workers). Which
//!    hash: an app password's (found by its public id, the first group) if
//!    the secret has that shape and the service is submission, else the
//!    account password's; an unknown login, or a user without that secret,
//!    is checked against a decoy hash of the same cost, so the answer takes
//!    as long as for a real user.
//!
//! SCRAM needs no hash here (the client does the PBKDF2 work); its lookup
//! passes the same counters, and an unknown login gets a decoy salt derived
//! from the users file's `decoy_key`, stable across restarts.

use super::counters::{Admission, LoginCounters, LoginKey, MemoryCounters, UnixMillis};
use super::sasl::{SaslFailure, ScramCredentials};
use super::secret::{self, HashParams, ScramSalt, Secret, StoredHash};
use super::store::{StoreError, UserRecord, UserStore};
use super::{Attempt, AuthSettings, AuthenticatedUser, LoginOutcome, Service, Via};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Longest a login waits for a hashing slot before it is answered 454.
pub const HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a login waits for another attempt on the same account to
/// conclude ([`Admission::AccountBusy`]), and how often it asks again.
pub const BUSY_ACCOUNT_WAIT: Duration = Duration::from_secs(2);
const BUSY_ACCOUNT_POLL: Duration = Duration::from_millis(20);
/// Most (login, secret) verdicts cached; past that the oldest go.
pub const CACHE_MAX_ENTRIES: usize = 100_000;

/// Where the time comes from: the system clock, or a test's hand.
#[derive(Debug, Clone)]
pub(crate) enum Clock {
    System,
    #[cfg_attr(not(test), allow(dead_code))]
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub(crate) fn now(&self) -> UnixMillis {
        match self {
            Clock::System => u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
            Clock::Manual(ms) => ms.load(Ordering::Relaxed),
        }
    }
}

/// The login checker one server shares among its sessions.
pub struct Accounts {
    store: UserStore,
    counters: Arc<dyn LoginCounters>,
    cache: CredentialCache,
    hash_slots: Arc<Semaphore>,
    decoy_hash: StoredHash,
    /// For decoy SCRAM salts when the users file has no `decoy_key` yet.
    process_decoy_key: [u8; 32],
    params: HashParams,
    clock: Clock,
    hashes: AtomicU64,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("users_file", &self.store.path())
            .finish_non_exhaustive()
    }
}

/// SCRAM lookup result kept by the exchange until the proof is checked.
#[derive(Debug)]
pub(crate) struct ScramLookup {
    pub(crate) credentials: ScramCredentials,
    /// What each key of `credentials` belongs to.
    vias: Vec<Via>,
    user: Option<Arc<UserRecord>>,
    /// Why no key can match (for the log).
    no_keys: Option<&'static str>,
}

impl Accounts {
    /// Reads the users file and builds the in-memory counters.
    pub fn open(settings: &AuthSettings) -> Result<Arc<Accounts>, StoreError> {
        let counters = Arc::new(MemoryCounters::new(settings.limits.clone()));
        Accounts::with_counters(settings, counters)
    }

    /// With other counters (a cluster's shared ones).
    pub fn with_counters(
        settings: &AuthSettings,
        counters: Arc<dyn LoginCounters>,
    ) -> Result<Arc<Accounts>, StoreError> {
        Accounts::build(settings, counters, Clock::System).map(Arc::new)
    }

    pub(crate) fn build(
        settings: &AuthSettings,
        counters: Arc<dyn LoginCounters>,
        clock: Clock,
    ) -> Result<Accounts, StoreError> {
        let store = UserStore::open(&settings.users_file)?;
        let mut decoy_secret = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut decoy_secret);
        let decoy_hash = secret::hash_secret(
            &base64::Engine::encode(&base64::engine::general_purpose::STANDARD, decoy_secret),
            settings.hash_params,
        )
        .map_err(|message| StoreError {
            path: settings.users_file.clone(),
            line: None,
            message: format!("cannot make the decoy hash: {message}"),
        })?;
        let mut process_decoy_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut process_decoy_key);
        Ok(Accounts {
            store,
            counters,
            cache: CredentialCache::new(settings.cache_ttl),
            hash_slots: Arc::new(Semaphore::new(settings.hash_concurrency.max(1))),
            decoy_hash,
            process_decoy_key,
            params: settings.hash_params,
            clock,
            hashes: AtomicU64::new(0),
        })
    }

    /// Password hashes computed so far (decoys included): what the
    /// brute-force limits and the cache are there to keep down.
    pub fn hashes_computed(&self) -> u64 {
        self.hashes.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &UserStore {
        &self.store
    }

    /// PLAIN, LOGIN, or any caller holding a login and a secret. Never
    /// computes a hash when the counters refuse; at most one otherwise.
    pub async fn verify_password(
        &self,
        login: &str,
        secret: &Secret,
        attempt: &Attempt,
    ) -> LoginOutcome {
        let now = self.clock.now();
        let account = account_key(login);
        let key = LoginKey {
            client_ip: attempt.client_ip,
            account: &account,
        };
        if let Some(refused) = self.admit(key, attempt, login).await {
            return refused;
        }
        let users = self.store.snapshot();
        let user = users.get(login).cloned();
        let version = user.as_ref().map_or(UNKNOWN_USER, |u| u.secrets_version());
        let cache_key = self.cache.key(attempt.service, &account, secret.expose());
        match self.cache.lookup(&cache_key, version, now) {
            Some(Some(via)) => {
                if let Some(user) = &user {
                    return self
                        .success(key, now, user, via, attempt, login, true)
                        .await;
                }
            }
            Some(None) => {
                // The same wrong secret again: no hash, no new failure.
                self.counters.ended(key, now).await;
                log(
                    attempt,
                    login,
                    &LoginOutcome::Invalid,
                    None,
                    "repeated wrong secret (cached)",
                );
                return LoginOutcome::Invalid;
            }
            _ => {}
        }
        let (hash, via) = match user
            .as_deref()
            .and_then(|u| candidate(u, secret, attempt.service))
        {
            Some((hash, via)) => (hash.clone(), Some(via)),
            None => (self.decoy_hash.clone(), None),
        };
        let Some(matched) = self.run_hash(hash, secret.clone()).await else {
            self.counters.ended(key, now).await;
            log(
                attempt,
                login,
                &LoginOutcome::Unavailable,
                None,
                "hashing pool busy or failed",
            );
            return LoginOutcome::Unavailable;
        };
        match (matched, via, &user) {
            (true, Some(via), Some(user)) => {
                self.cache
                    .insert(cache_key, version, Some(via.clone()), now);
                self.success(key, now, user, via, attempt, login, false)
                    .await
            }
            _ => {
                self.cache.insert(cache_key, version, None, now);
                self.counters.failed(key, now).await;
                let why = match &user {
                    None => "unknown user",
                    Some(_) => "wrong secret",
                };
                log(attempt, login, &LoginOutcome::Invalid, None, why);
                LoginOutcome::Invalid
            }
        }
    }

    /// Counters first: `Some(outcome)` when the attempt is refused.
    async fn admit(
        &self,
        key: LoginKey<'_>,
        attempt: &Attempt,
        login: &str,
    ) -> Option<LoginOutcome> {
        let mut waited = Duration::ZERO;
        let outcome = loop {
            match self.counters.admit(key, self.clock.now()).await {
                Admission::Admitted => return None,
                Admission::ClientLocked => break LoginOutcome::ClientLocked,
                Admission::AccountLocked => break LoginOutcome::AccountThrottled,
                // A client opening several connections at once: its first
                // attempt holds the account's slot; if that one succeeds, the
                // slot is free and this one is answered from the cache.
                Admission::AccountBusy if waited < BUSY_ACCOUNT_WAIT => {
                    tokio::time::sleep(BUSY_ACCOUNT_POLL).await;
                    waited += BUSY_ACCOUNT_POLL;
                }
                Admission::AccountBusy => break LoginOutcome::AccountThrottled,
            }
        };
        log(attempt, login, &outcome, None, "refused before any hash");
        Some(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    async fn success(
        &self,
        key: LoginKey<'_>,
        now: UnixMillis,
        user: &UserRecord,
        via: Via,
        attempt: &Attempt,
        login: &str,
        cached: bool,
    ) -> LoginOutcome {
        self.counters.succeeded(key, now).await;
        let detail = if cached { "cached" } else { "" };
        if user.held.is_some() {
            log(
                attempt,
                login,
                &LoginOutcome::Held,
                Some(&via),
                "account held",
            );
            return LoginOutcome::Held;
        }
        let outcome = LoginOutcome::Success(AuthenticatedUser {
            name: user.name.clone(),
            via: via.clone(),
            addresses: user.addresses.clone(),
            allowed_senders: user.allowed_senders.clone(),
        });
        log(attempt, login, &outcome, Some(&via), detail);
        outcome
    }

    /// One hash on the blocking pool; `None` when no slot came in time or
    /// the task failed.
    async fn run_hash(&self, hash: StoredHash, secret: Secret) -> Option<bool> {
        let permit =
            tokio::time::timeout(HASH_QUEUE_TIMEOUT, self.hash_slots.clone().acquire_owned())
                .await
                .ok()?
                .ok()?;
        self.hashes.fetch_add(1, Ordering::Relaxed);
        // The permit moves into the task: a client that disconnects while
        // its hash runs still holds the slot until the hash is done.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hash.verify(secret.expose())
        })
        .await
        .ok()
    }

    /// SCRAM, after the client-first message: counters, then the login's
    /// salt and keys (or a decoy).
    pub(crate) async fn scram_lookup(
        &self,
        login: &str,
        attempt: &Attempt,
    ) -> Result<ScramLookup, LoginOutcome> {
        let account = account_key(login);
        let key = LoginKey {
            client_ip: attempt.client_ip,
            account: &account,
        };
        if let Some(refused) = self.admit(key, attempt, login).await {
            return Err(refused);
        }
        let users = self.store.snapshot();
        let user = users.get(login).cloned();
        let mut keys = Vec::new();
        let mut vias = Vec::new();
        if let Some(u) = &user {
            if let Some(k) = &u.password_scram {
                keys.push(k.clone());
                vias.push(Via::Password);
            }
            if attempt.service == Service::Submission {
                for app in &u.app_passwords {
                    if let Some(k) = &app.scram {
                        keys.push(k.clone());
                        vias.push(Via::AppPassword(app.label.clone()));
                    }
                }
            }
        }
        let salt = match user.as_ref().and_then(|u| u.scram_salt.clone()) {
            Some(salt) if !keys.is_empty() => salt,
            _ => {
                let decoy_key = users.decoy_key().unwrap_or(&self.process_decoy_key);
                let salt = secret::hmac_sha256(decoy_key, &[b"scram-salt\0", account.as_bytes()]);
                ScramSalt {
                    salt: salt[..16].to_vec(),
                    iterations: self.params.scram_iterations,
                }
            }
        };
        let no_keys = match &user {
            None => Some("unknown user"),
            Some(_) if keys.is_empty() => {
                Some("no SCRAM keys (imported hash: use PLAIN/LOGIN or set the password again)")
            }
            Some(_) => None,
        };
        if no_keys.is_some() {
            keys.clear();
            vias.clear();
        }
        Ok(ScramLookup {
            credentials: ScramCredentials { salt, keys },
            vias,
            user,
            no_keys,
        })
    }

    /// SCRAM, after the proof: `key_index` is the key it matched (`None`:
    /// none did).
    pub(crate) async fn scram_result(
        &self,
        login: &str,
        lookup: &ScramLookup,
        key_index: Option<usize>,
        attempt: &Attempt,
    ) -> LoginOutcome {
        let now = self.clock.now();
        let account = account_key(login);
        let key = LoginKey {
            client_ip: attempt.client_ip,
            account: &account,
        };
        let matched = key_index.and_then(|i| lookup.vias.get(i).cloned());
        match (matched, &lookup.user) {
            (Some(via), Some(user)) => {
                self.success(key, now, user, via, attempt, login, false)
                    .await
            }
            _ => {
                self.counters.failed(key, now).await;
                let why = lookup.no_keys.unwrap_or("wrong secret (invalid proof)");
                log(attempt, login, &LoginOutcome::Invalid, None, why);
                LoginOutcome::Invalid
            }
        }
    }

    /// An exchange that failed for a reason other than wrong credentials;
    /// `admitted`: the counters admitted it (SCRAM after its lookup).
    pub(crate) async fn refused_exchange(
        &self,
        login: Option<&str>,
        admitted: bool,
        failure: SaslFailure,
        attempt: &Attempt,
    ) -> LoginOutcome {
        let outcome = match failure {
            SaslFailure::Malformed(_) | SaslFailure::OutOfOrder => LoginOutcome::Malformed,
            _ => LoginOutcome::Invalid,
        };
        if let (Some(login), true) = (login, admitted) {
            let account = account_key(login);
            let key = LoginKey {
                client_ip: attempt.client_ip,
                account: &account,
            };
            self.counters.ended(key, self.clock.now()).await;
        }
        log(
            attempt,
            login.unwrap_or(""),
            &outcome,
            None,
            failure.as_str(),
        );
        outcome
    }
}

/// Version recorded for a login nobody has: wrong secrets for unknown
/// logins are cached too, so a repeat costs the same as for a real user.
const UNKNOWN_USER: u64 = 0;

/// The counters' and the cache's name for a login.
fn account_key(login: &str) -> String {
    let mut key = login.to_lowercase();
    if key.len() > super::sasl::MAX_LOGIN_LEN {
        let mut end = super::sasl::MAX_LOGIN_LEN;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

/// The one stored hash `secret` is checked against.
fn candidate<'u>(
    user: &'u UserRecord,
    secret: &Secret,
    service: Service,
) -> Option<(&'u StoredHash, Via)> {
    if service == Service::Submission
        && let Some(id) = secret::app_password_id(secret.expose())
        && let Some(app) = user.app_passwords.iter().find(|a| a.id == id)
    {
        return Some((&app.hash, Via::AppPassword(app.label.clone())));
    }
    user.password.as_ref().map(|p| (p, Via::Password))
}

fn log(attempt: &Attempt, login: &str, outcome: &LoginOutcome, via: Option<&Via>, detail: &str) {
    // As given, escaped: a login with a line feed cannot forge a log line,
    // and stays told apart from the name without it.
    let user: String = login
        .chars()
        .take(128)
        .collect::<String>()
        .escape_debug()
        .to_string();
    let via = via.map(|v| v.to_string()).unwrap_or_default();
    tracing::info!(
        event = "auth.login",
        client = %attempt.client_ip,
        mechanism = %attempt.mechanism,
        service = attempt.service.as_str(),
        user = %user,
        outcome = outcome.as_str(),
        via = %via,
        detail,
    );
}

// ---- the verified-credential cache ----

struct CacheEntry {
    version: u64,
    /// `Some(via)`: the pair is right; `None`: it is wrong.
    verdict: Option<Via>,
    expires: UnixMillis,
}

struct CredentialCache {
    key: [u8; 32],
    ttl: u64,
    entries: Mutex<HashMap<[u8; 32], CacheEntry>>,
}

impl CredentialCache {
    fn new(ttl: Duration) -> CredentialCache {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        CredentialCache {
            key,
            ttl: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Per service: an app password is right for submission, wrong elsewhere.
    fn key(&self, service: Service, account: &str, secret: &str) -> [u8; 32] {
        let len = u64::try_from(account.len())
            .unwrap_or(u64::MAX)
            .to_be_bytes();
        let service = [service as u8];
        secret::hmac_sha256(
            &self.key,
            &[&service, &len, account.as_bytes(), secret.as_bytes()],
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], CacheEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(verdict)` for a live entry of this secrets version.
    fn lookup(&self, key: &[u8; 32], version: u64, now: UnixMillis) -> Option<Option<Via>> {
        if self.ttl == 0 {
            return None;
        }
        let entries = self.lock();
        let entry = entries.get(key)?;
        (entry.version == version && entry.expires > now).then(|| entry.verdict.clone())
    }

    fn insert(&self, key: [u8; 32], version: u64, verdict: Option<Via>, now: UnixMillis) {
        if self.ttl == 0 {
            return;
        }
        let mut entries = self.lock();
        entries.insert(
            key,
            CacheEntry {
                version,
                verdict,
                expires: now.saturating_add(self.ttl),
            },
        );
        if entries.len() > CACHE_MAX_ENTRIES {
            entries.retain(|_, e| e.expires > now);
            let target = CACHE_MAX_ENTRIES - CACHE_MAX_ENTRIES / 10;
            if entries.len() > target {
                let mut expiries: Vec<UnixMillis> = entries.values().map(|e| e.expires).collect();
                let cut = entries.len() - target;
                let (_, &mut keep_from, _) = expiries.select_nth_unstable(cut);
                entries.retain(|_, e| e.expires >= keep_from);
            }
        }
    }
}

#[cfg(test)]
mod tests;
