//! Shared by the auth tests: a users file in a temporary directory, an
//! `Accounts` on a hand-driven clock, and a SCRAM client written from RFC
//! 5802 (independent of the server code paths it checks, except for the
//! HMAC/SHA-256 primitives).

use super::counters::MemoryCounters;
use super::guard::{Accounts, Clock};
use super::sasl::ChannelBinding;
use super::secret::{self, HashParams, ScramSalt};
use super::store::{AppPassword, UserRecord, Users};
use super::{AuthSettings, LoginLimits};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const T0: u64 = 1_800_000_000_000;

pub(crate) fn settings(dir: &Path) -> AuthSettings {
    AuthSettings {
        hash_params: HashParams::CHEAPEST,
        hash_concurrency: 2,
        ..AuthSettings::new(dir.join("users.toml"))
    }
}

/// A user with a password (argon2id and SCRAM keys).
pub(crate) fn user(name: &str, password: &str) -> UserRecord {
    let salt = ScramSalt::random(HashParams::CHEAPEST.scram_iterations);
    let mut u = UserRecord::new(name);
    u.password = Some(secret::hash_secret(password, HashParams::CHEAPEST).unwrap());
    u.password_scram = secret::scram_keys(password, &salt);
    u.scram_salt = Some(salt);
    u
}

/// Adds an app password; returns the secret.
pub(crate) fn add_app_password(u: &mut UserRecord, label: &str) -> String {
    let password = loop {
        let p = secret::generate_app_password();
        let id = secret::app_password_id(&p).unwrap().to_string();
        if !u.app_passwords.iter().any(|a| a.id == id) {
            break p;
        }
    };
    if u.scram_salt.is_none() {
        u.scram_salt = Some(ScramSalt::random(HashParams::CHEAPEST.scram_iterations));
    }
    let salt = u.scram_salt.clone().unwrap();
    u.app_passwords.push(AppPassword {
        label: label.into(),
        id: secret::app_password_id(&password).unwrap().into(),
        created: "2026-12-07T10:00:00Z".into(),
        hash: secret::hash_secret(&password, HashParams::CHEAPEST).unwrap(),
        scram: secret::scram_keys(&password, &salt),
    });
    password
}

pub(crate) fn write_users(path: &Path, users: Vec<UserRecord>) {
    Users::edit(path, |all| {
        for u in users {
            all.put(u);
        }
        Ok(())
    })
    .unwrap()
    .unwrap();
}

pub(crate) struct Fixture {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
    pub(crate) accounts: Arc<Accounts>,
    pub(crate) clock: Arc<AtomicU64>,
}

impl Fixture {
    pub(crate) fn new(users: Vec<UserRecord>) -> Fixture {
        Fixture::with_limits(users, LoginLimits::default())
    }

    pub(crate) fn with_limits(users: Vec<UserRecord>, limits: LoginLimits) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings(dir.path());
        settings.limits = limits.clone();
        write_users(&settings.users_file, users);
        let clock = Arc::new(AtomicU64::new(T0));
        let counters = Arc::new(MemoryCounters::new(limits));
        let accounts = Accounts::build(&settings, counters, Clock::Manual(clock.clone())).unwrap();
        Fixture {
            path: settings.users_file.clone(),
            _dir: dir,
            accounts: Arc::new(accounts),
            clock,
        }
    }

    pub(crate) fn advance_secs(&self, secs: u64) {
        self.clock.fetch_add(secs * 1000, Ordering::Relaxed);
    }

    /// Makes the store look at the file now (as the next login would).
    pub(crate) fn reload(&self) {
        let later = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        self.accounts.store().snapshot_at(later);
    }
}

/// RFC 5802 client side, for tests.
pub(crate) struct ScramClient {
    pub(crate) gs2_header: String,
    pub(crate) client_first_bare: String,
    pub(crate) cbind_data: Vec<u8>,
    password: String,
    server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    pub(crate) fn new(user: &str, password: &str, gs2_header: &str, cbind_data: &[u8]) -> Self {
        ScramClient::with_nonce(
            user,
            password,
            gs2_header,
            cbind_data,
            "fyko+d2lbbFgONRv9qkxdawL",
        )
    }

    pub(crate) fn with_nonce(
        user: &str,
        password: &str,
        gs2_header: &str,
        cbind_data: &[u8],
        nonce: &str,
    ) -> Self {
        let user = user.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            gs2_header: gs2_header.into(),
            client_first_bare: format!("n={user},r={nonce}"),
            cbind_data: cbind_data.to_vec(),
            password: password.into(),
            server_signature: None,
        }
    }

    pub(crate) fn first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
    }

    pub(crate) fn final_message(&mut self, server_first: &[u8]) -> Vec<u8> {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iterations = 0;
        for attr in server_first.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = v;
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = B64.decode(v).unwrap();
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = v.parse().unwrap();
            }
        }
        let mut cbind = self.gs2_header.as_bytes().to_vec();
        cbind.extend_from_slice(&self.cbind_data);
        let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
        let salted = pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(
            self.password.as_bytes(),
            &salt,
            iterations,
        );
        let client_key = secret::hmac_sha256(&salted, &[b"Client Key"]);
        let stored_key = secret::sha256(&client_key);
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = secret::hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = secret::hmac_sha256(&salted, &[b"Server Key"]);
        self.server_signature = Some(secret::hmac_sha256(&server_key, &[auth_message.as_bytes()]));
        format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
    }

    pub(crate) fn check_server_final(&self, server_final: &[u8]) -> bool {
        let expected = format!("v={}", B64.encode(self.server_signature.unwrap()));
        server_final == expected.as_bytes()
    }
}

pub(crate) fn binding(exporter: Option<[u8; 32]>, plus_advertised: bool) -> ChannelBinding {
    ChannelBinding {
        tls_exporter: exporter,
        plus_advertised,
    }
}
