//! Password hashes and SCRAM keys: making them for a new secret, checking a
//! secret against a stored hash, and the app passwords `tern user` hands out.
//!
//! Stored hashes are self-describing strings: an argon2id PHC string
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`, what Tern writes; `argon2i`
//! and `argon2d` are accepted from imports) or a SHA-crypt string (`$6$` /
//! `$5$`, from a Dovecot import). Verification honours the parameters in the
//! string, so changing [`HashParams::DEFAULT`] later leaves every stored hash
//! valid; parameters are bounded when a hash is loaded, so a hand-edited file
//! cannot make one check take a gigabyte or a minute.
//!
//! Everything here is blocking CPU work: the server calls it on the blocking
//! pool (see `guard.rs`), the CLI directly.

use argon2::password_hash::PasswordVerifier;
use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha_crypt::ShaCrypt;
use sha2::{Digest, Sha256};
use std::fmt;
use subtle::ConstantTimeEq;

/// Cost of the hashes Tern makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Argon2id memory in KiB.
    pub m_kib: u32,
    /// Argon2id passes.
    pub t_cost: u32,
    /// Argon2id lanes.
    pub p_cost: u32,
    /// PBKDF2 iterations of the SCRAM-SHA-256 keys (the client repeats them
    /// at every login).
    pub scram_iterations: u32,
}

impl HashParams {
    /// OWASP's first argon2id recommendation (19 MiB, 2 passes, 1 lane):
    /// about 16 ms per check on this project's 2-core machines, so a core
    /// verifies ~60 logins per second and a stolen users file costs an
    /// attacker the same per guess. 10,000 SCRAM iterations: above RFC 7677's
    /// minimum of 4096, a few milliseconds for a mail client.
    pub const DEFAULT: HashParams = HashParams {
        m_kib: 19 * 1024,
        t_cost: 2,
        p_cost: 1,
        scram_iterations: 10_000,
    };

    /// The cheapest hashes the code accepts: for tests, where the cost is
    /// not what is tested.
    pub const CHEAPEST: HashParams = HashParams {
        m_kib: 8,
        t_cost: 1,
        p_cost: 1,
        scram_iterations: MIN_SCRAM_ITERATIONS,
    };
}

impl Default for HashParams {
    fn default() -> Self {
        HashParams::DEFAULT
    }
}

/// RFC 7677 §4: "at least 4096".
pub const MIN_SCRAM_ITERATIONS: u32 = 4096;
/// Bounds on what a stored hash may ask for (see the module doc).
const MAX_SCRAM_ITERATIONS: u32 = 10_000_000;
const MAX_ARGON2_M_KIB: u32 = 1024 * 1024;
const MAX_ARGON2_T_COST: u32 = 64;
const MAX_ARGON2_P_COST: u32 = 16;
const MAX_SHA_CRYPT_ROUNDS: u32 = 1_000_000;

/// A secret as received or typed: its `Debug` never shows it, so it cannot
/// end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which algorithm a stored hash uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Argon2,
    ShaCrypt,
}

/// A validated stored password hash.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredHash {
    text: String,
    scheme: Scheme,
}

impl fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not the secret, but it is what an offline guesser wants.
        write!(f, "StoredHash({:?}, ***)", self.scheme)
    }
}

impl StoredHash {
    /// Checks that `text` is a hash this module can verify at a bounded
    /// cost. The error says what is wrong, for a message naming the line.
    pub fn parse(text: &str) -> Result<StoredHash, String> {
        if text.starts_with("$argon2") {
            let phc = PasswordHash::new(text)
                .map_err(|e| format!("not a valid argon2 PHC string ({e})"))?;
            let params = Params::try_from(&phc)
                .map_err(|e| format!("argon2 parameters out of range ({e})"))?;
            if params.m_cost() > MAX_ARGON2_M_KIB
                || params.t_cost() > MAX_ARGON2_T_COST
                || params.p_cost() > MAX_ARGON2_P_COST
            {
                return Err(format!(
                    "argon2 parameters too costly (at most m={MAX_ARGON2_M_KIB}, \
                     t={MAX_ARGON2_T_COST}, p={MAX_ARGON2_P_COST})"
                ));
            }
            if phc.salt.is_none() || phc.hash.is_none() {
                return Err("argon2 PHC string without salt or hash".into());
            }
            return Ok(StoredHash {
                text: text.to_string(),
                scheme: Scheme::Argon2,
            });
        }
        if text.starts_with("$6$") || text.starts_with("$5$") {
            let rounds = sha_crypt_rounds(text)?;
            if rounds > MAX_SHA_CRYPT_ROUNDS {
                return Err(format!(
                    "SHA-crypt rounds too costly (at most {MAX_SHA_CRYPT_ROUNDS})"
                ));
            }
            return Ok(StoredHash {
                text: text.to_string(),
                scheme: Scheme::ShaCrypt,
            });
        }
        Err("unknown hash scheme (expected $argon2id$..., $6$... or $5$...)".into())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Whether `secret` matches: one full hash computation, whatever the
    /// outcome. Blocking.
    pub fn verify(&self, secret: &str) -> bool {
        match self.scheme {
            Scheme::Argon2 => match PasswordHash::new(&self.text) {
                Ok(phc) => Argon2::default()
                    .verify_password(secret.as_bytes(), &phc)
                    .is_ok(),
                Err(_) => false,
            },
            Scheme::ShaCrypt => PasswordVerifier::<str>::verify_password(
                &ShaCrypt::default(),
                secret.as_bytes(),
                &self.text,
            )
            .is_ok(),
        }
    }
}

/// `$6$rounds=N$salt$hash` or `$6$salt$hash` (5000 rounds); checks the shape.
fn sha_crypt_rounds(text: &str) -> Result<u32, String> {
    let fields: Vec<&str> = text.split('$').collect();
    // "", "6", [rounds=N], salt, hash
    let (rounds, rest) = match fields.get(2) {
        Some(f) if f.starts_with("rounds=") => {
            let n = f["rounds=".len()..]
                .parse::<u32>()
                .map_err(|_| "SHA-crypt rounds are not a number".to_string())?;
            (n, &fields[3..])
        }
        _ => (5000, fields.get(2..).unwrap_or(&[])),
    };
    let ok = rest.len() == 2
        && rest[0].len() <= 16
        && rest[1].len() >= 43
        && rest.iter().all(|f| {
            f.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
        });
    if !ok {
        return Err("not a valid SHA-crypt string ($6$[rounds=N$]salt$hash)".into());
    }
    Ok(rounds)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // ThreadRng: ChaCha seeded and reseeded from the OS, a CSPRNG.
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A new argon2id PHC string for `secret`, random salt. Blocking.
pub fn hash_secret(secret: &str, params: HashParams) -> Result<StoredHash, String> {
    let argon_params = Params::new(params.m_kib, params.t_cost, params.p_cost, None)
        .map_err(|e| format!("argon2 parameters: {e}"))?;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
    let salt: [u8; 16] = random_bytes();
    let phc = argon2
        .hash_password_with_salt(secret.as_bytes(), &salt)
        .map_err(|e| format!("argon2: {e}"))?;
    StoredHash::parse(&phc.to_string())
}

/// The per-user SCRAM salt and iteration count all its secrets share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramSalt {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl ScramSalt {
    pub fn random(iterations: u32) -> ScramSalt {
        ScramSalt {
            salt: random_bytes::<16>().to_vec(),
            iterations,
        }
    }
}

/// RFC 5802 §3 StoredKey and ServerKey of one secret: enough to check a
/// client's proof and prove ourselves, not enough to log in elsewhere.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKeys(***)")
    }
}

pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// RFC 5802 §3 keys for `password`, SASLprep'd (RFC 4013) as the client
/// will; `None` when SASLprep refuses the password (prohibited characters):
/// such a secret works with PLAIN and LOGIN only. Blocking (PBKDF2).
pub fn scram_keys(password: &str, salt: &ScramSalt) -> Option<ScramKeys> {
    let prepared = stringprep::saslprep(password).ok()?;
    let salted =
        pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(prepared.as_bytes(), &salt.salt, salt.iterations);
    let client_key = hmac_sha256(&salted, &[b"Client Key"]);
    Some(ScramKeys {
        stored_key: sha256(&client_key),
        server_key: hmac_sha256(&salted, &[b"Server Key"]),
    })
}

/// Checks a SCRAM iteration count read from a file.
pub fn check_scram_iterations(n: u32) -> Result<u32, String> {
    if (MIN_SCRAM_ITERATIONS..=MAX_SCRAM_ITERATIONS).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "SCRAM iteration count must be between {MIN_SCRAM_ITERATIONS} and {MAX_SCRAM_ITERATIONS}"
        ))
    }
}

/// Constant-time equality of two byte strings (their lengths are public).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Letters and digits nobody confuses when reading a password aloud
/// (no l/1, o/0): 32 symbols, so each is 5 uniform random bits.
const APP_ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
/// Length of the app password's public identifier, its first group.
pub const APP_ID_LEN: usize = 4;
const APP_GROUPS: usize = 5;

/// A new app password, `idid-xxxx-xxxx-xxxx-xxxx`: the first group is its
/// public identifier (stored in clear, so a login checks one hash instead
/// of one per app password), the other 16 symbols are 80 random bits.
pub fn generate_app_password() -> String {
    let bytes: [u8; APP_GROUPS * APP_ID_LEN] = random_bytes();
    let mut out = String::with_capacity(APP_GROUPS * (APP_ID_LEN + 1));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % APP_ID_LEN == 0 {
            out.push('-');
        }
        // 256 is a multiple of 32: no modulo bias.
        out.push(APP_ALPHABET[usize::from(b % 32)] as char);
    }
    out
}

/// The identifier of `secret` if it has the shape of an app password.
pub fn app_password_id(secret: &str) -> Option<&str> {
    let groups: Vec<&str> = secret.split('-').collect();
    let shaped = groups.len() == APP_GROUPS
        && groups
            .iter()
            .all(|g| g.len() == APP_ID_LEN && g.bytes().all(|b| APP_ALPHABET.contains(&b)));
    shaped.then(|| groups[0])
}

#[cfg(test)]
mod tests;
