//! SASL mechanisms as pure state machines: no I/O, no clock, no store. Each
//! is fed the client's decoded responses and answers with a challenge to
//! send, a request (check this password, give me this login's SCRAM keys),
//! the end of the exchange, or a failure.
//!
//! - `PLAIN` (RFC 4616): `[authzid] NUL authcid NUL passwd`. An authorization
//!   identity other than the authentication identity is refused (no proxy
//!   logins).
//! - `LOGIN` (draft-murchison-sasl-login): "Username:" then "Password:".
//! - `SCRAM-SHA-256` (RFC 5802, RFC 7677) and `SCRAM-SHA-256-PLUS` with the
//!   `tls-exporter` channel binding (RFC 9266): the caller passes the 32
//!   bytes of the TLS exporter (label "EXPORTER-Channel-Binding", empty
//!   context). A client that says `y` (it could bind, but thinks we cannot)
//!   while -PLUS was advertised is being downgraded and fails (RFC 5802 §6).
//!   In SMTP the server-final message goes out as a 334 challenge and the
//!   client answers with an empty response before the 235 (RFC 4954 §4):
//!   [`SaslStep::ScramVerified`] carries it, and the empty answer gives
//!   [`SaslStep::Completed`].
//!
//! Not done: SASLprep of the user name (names are plain ASCII here), SCRAM
//! extensions (refused), channel bindings other than `tls-exporter`.

use super::secret::{ScramKeys, ScramSalt, Secret, ct_eq, hmac_sha256, sha256};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::fmt;

/// Longest login accepted (the store's names are at most 128 bytes).
pub const MAX_LOGIN_LEN: usize = 256;
/// Longest secret accepted.
pub const MAX_SECRET_LEN: usize = 1024;
/// RFC 9266: the tls-exporter channel binding is 32 bytes.
pub const TLS_EXPORTER_LEN: usize = 32;
/// RFC 9266 §2: the exporter label (empty context).
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
    ScramSha256,
    ScramSha256Plus,
}

impl Mechanism {
    /// Strongest first, the order an EHLO reply lists them in.
    pub const ALL: [Mechanism; 4] = [
        Mechanism::ScramSha256Plus,
        Mechanism::ScramSha256,
        Mechanism::Plain,
        Mechanism::Login,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
        }
    }

    /// Case-insensitive, as SASL mechanism names are.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }

    /// Needs the TLS exporter (only offered over TLS).
    pub fn needs_tls(self) -> bool {
        self == Mechanism::ScramSha256Plus
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an exchange failed (for the log; the client only sees the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslFailure {
    /// The client's message does not parse (not UTF-8, missing fields,
    /// too long, a SCRAM attribute out of place).
    Malformed(&'static str),
    /// PLAIN/SCRAM authorization identity other than the login.
    AuthzidRefused,
    /// SCRAM: client says `y` while -PLUS was advertised (RFC 5802 §6).
    ChannelBindingDowngrade,
    /// SCRAM: a binding type other than tls-exporter, or `p=` with the
    /// non-PLUS mechanism, or none with -PLUS.
    ChannelBindingUnsupported,
    /// SCRAM: the `c=` data is not our gs2 header and exporter.
    ChannelBindingMismatch,
    /// SCRAM: the client-final nonce is not the one we made.
    NonceMismatch,
    /// SCRAM: the proof matches none of the login's keys.
    InvalidProof,
    /// A step came in a state that does not take it (a caller bug).
    OutOfOrder,
}

impl SaslFailure {
    /// Whether the client gave wrong credentials (counted as a failed
    /// login), rather than a malformed or refused exchange.
    pub fn is_wrong_credentials(self) -> bool {
        self == SaslFailure::InvalidProof
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SaslFailure::Malformed(what) => what,
            SaslFailure::AuthzidRefused => "authorization identity differs from the login",
            SaslFailure::ChannelBindingDowngrade => {
                "client says the server cannot bind the channel, but -PLUS was offered (downgrade)"
            }
            SaslFailure::ChannelBindingUnsupported => "unsupported channel binding",
            SaslFailure::ChannelBindingMismatch => "channel binding data mismatch",
            SaslFailure::NonceMismatch => "nonce mismatch",
            SaslFailure::InvalidProof => "invalid proof",
            SaslFailure::OutOfOrder => "step out of order",
        }
    }
}

/// What the caller does next.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslStep {
    /// Send this challenge (SMTP: `334 <base64>`, empty allowed) and feed
    /// the client's answer to [`SaslServer::step`].
    Challenge(Vec<u8>),
    /// PLAIN/LOGIN: the exchange is over; check this password for this login.
    CheckPassword {
        login: String,
        password: Secret,
    },
    /// SCRAM: look up the salt, iteration count and keys of `login` and
    /// hand them to [`SaslServer::scram_credentials`].
    NeedScramCredentials {
        login: String,
    },
    /// SCRAM: the proof matched the key at `key_index` of the credentials
    /// given. Send `server_final` as a challenge; the client's (empty)
    /// answer then gives [`SaslStep::Completed`].
    ScramVerified {
        login: String,
        key_index: usize,
        server_final: Vec<u8>,
    },
    /// SCRAM: the client acknowledged our server-final message.
    Completed,
    Failed(SaslFailure),
}

/// What the mechanism knows of the TLS layer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding {
    /// RFC 9266 exporter of this connection; `None` without TLS.
    pub tls_exporter: Option<[u8; TLS_EXPORTER_LEN]>,
    /// Whether the EHLO reply this client saw listed SCRAM-SHA-256-PLUS.
    pub plus_advertised: bool,
}

impl ChannelBinding {
    pub const NONE: ChannelBinding = ChannelBinding {
        tls_exporter: None,
        plus_advertised: false,
    };
}

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBinding")
            .field("tls_exporter", &self.tls_exporter.map(|_| "***"))
            .field("plus_advertised", &self.plus_advertised)
            .finish()
    }
}

/// One login's SCRAM material: the shared salt and iteration count, and
/// every key that may match (the password's and the app passwords').
#[derive(Debug, Clone)]
pub struct ScramCredentials {
    pub salt: ScramSalt,
    pub keys: Vec<ScramKeys>,
}

/// One authentication exchange.
#[derive(Debug)]
pub struct SaslServer {
    mechanism: Mechanism,
    binding: ChannelBinding,
    state: State,
    /// SCRAM: our part of the nonce, until the client-first message.
    pending_nonce: String,
}

enum State {
    /// Nothing received yet.
    Start,
    LoginWantUser,
    LoginWantPassword {
        login: String,
    },
    ScramWantCredentials(ScramFirst),
    ScramWantFinal {
        first: ScramFirst,
        server_first: String,
        nonce: String,
        credentials: ScramCredentials,
    },
    ScramWantAck,
    Done,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        f.write_str(match self {
            State::Start => "Start",
            State::LoginWantUser => "LoginWantUser",
            State::LoginWantPassword { .. } => "LoginWantPassword",
            State::ScramWantCredentials(_) => "ScramWantCredentials",
            State::ScramWantFinal { .. } => "ScramWantFinal",
            State::ScramWantAck => "ScramWantAck",
            State::Done => "Done",
        })
    }
}

/// What the client-first message said.
struct ScramFirst {
    login: String,
    gs2_header: String,
    client_first_bare: String,
    client_nonce: String,
    server_nonce: String,
}

impl SaslServer {
    /// A new exchange. `server_nonce` is the random part SCRAM appends to
    /// the client's nonce (see [`new_server_nonce`]); ignored by PLAIN/LOGIN.
    pub fn new(mechanism: Mechanism, binding: ChannelBinding, server_nonce: String) -> SaslServer {
        SaslServer {
            mechanism,
            binding,
            state: State::Start,
            pending_nonce: server_nonce,
        }
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Feeds the client's next response. The first call gets the AUTH
    /// command's initial response (`None`: there was none; `Some(b"")`: the
    /// client sent `=`).
    pub fn step(&mut self, response: Option<&[u8]>) -> SaslStep {
        let state = std::mem::replace(&mut self.state, State::Done);
        let (next, step) = self.advance(state, response);
        self.state = next;
        step
    }

    /// SCRAM: the credentials asked for by [`SaslStep::NeedScramCredentials`].
    /// For an unknown login, pass a decoy salt and no keys: the exchange
    /// then fails at the proof, like a wrong password.
    pub fn scram_credentials(&mut self, credentials: ScramCredentials) -> SaslStep {
        let state = std::mem::replace(&mut self.state, State::Done);
        let State::ScramWantCredentials(first) = state else {
            return SaslStep::Failed(SaslFailure::OutOfOrder);
        };
        let nonce = format!("{}{}", first.client_nonce, first.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credentials.salt.salt),
            credentials.salt.iterations
        );
        let challenge = server_first.clone().into_bytes();
        self.state = State::ScramWantFinal {
            first,
            server_first,
            nonce,
            credentials,
        };
        SaslStep::Challenge(challenge)
    }

    fn advance(&mut self, state: State, response: Option<&[u8]>) -> (State, SaslStep) {
        let fail = |f| (State::Done, SaslStep::Failed(f));
        match (state, self.mechanism) {
            (State::Start, Mechanism::Plain) => match response {
                // RFC 4954 §4: no initial response, an empty challenge.
                None => (State::Start, SaslStep::Challenge(Vec::new())),
                Some(message) => match parse_plain(message) {
                    Ok((login, password)) => {
                        (State::Done, SaslStep::CheckPassword { login, password })
                    }
                    Err(f) => fail(f),
                },
            },
            (State::Start, Mechanism::Login) => match response {
                None => (
                    State::LoginWantUser,
                    SaslStep::Challenge(b"Username:".to_vec()),
                ),
                // Some clients send the user name as an initial response.
                Some(user) => self.login_user(user),
            },
            (State::LoginWantUser, _) => match response {
                Some(user) => self.login_user(user),
                None => fail(SaslFailure::OutOfOrder),
            },
            (State::LoginWantPassword { login }, _) => match response.map(text) {
                Some(Ok(password)) if !password.is_empty() && password.len() <= MAX_SECRET_LEN => (
                    State::Done,
                    SaslStep::CheckPassword {
                        login,
                        password: Secret::new(password),
                    },
                ),
                _ => fail(SaslFailure::Malformed(
                    "LOGIN password empty, too long or not UTF-8",
                )),
            },
            (State::Start, Mechanism::ScramSha256 | Mechanism::ScramSha256Plus) => match response {
                None => (State::Start, SaslStep::Challenge(Vec::new())),
                Some(message) => match self.scram_first(message) {
                    Ok(first) => {
                        let login = first.login.clone();
                        (
                            State::ScramWantCredentials(first),
                            SaslStep::NeedScramCredentials { login },
                        )
                    }
                    Err(f) => fail(f),
                },
            },
            (
                State::ScramWantFinal {
                    first,
                    server_first,
                    nonce,
                    credentials,
                },
                _,
            ) => match response {
                Some(message) => {
                    match self.scram_final(message, &first, &server_first, &nonce, &credentials) {
                        Ok(step) => (State::ScramWantAck, step),
                        Err(f) => fail(f),
                    }
                }
                None => fail(SaslFailure::OutOfOrder),
            },
            (State::ScramWantAck, _) => match response {
                Some([]) => (State::Done, SaslStep::Completed),
                _ => fail(SaslFailure::Malformed(
                    "SCRAM: non-empty answer to the server-final message",
                )),
            },
            (State::ScramWantCredentials(_), _) | (State::Done, _) => fail(SaslFailure::OutOfOrder),
        }
    }

    fn login_user(&self, user: &[u8]) -> (State, SaslStep) {
        match text(user) {
            Ok(login) if valid_login(&login) => (
                State::LoginWantPassword { login },
                SaslStep::Challenge(b"Password:".to_vec()),
            ),
            _ => (
                State::Done,
                SaslStep::Failed(SaslFailure::Malformed(
                    "LOGIN user name empty, too long or not UTF-8",
                )),
            ),
        }
    }

    /// RFC 5802 §7 client-first-message.
    fn scram_first(&mut self, message: &[u8]) -> Result<ScramFirst, SaslFailure> {
        let message = std::str::from_utf8(message)
            .map_err(|_| SaslFailure::Malformed("SCRAM client-first not UTF-8"))?;
        // gs2-header = cbind-flag "," [authzid] ","
        let mut parts = message.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let authzid = parts
            .next()
            .ok_or(SaslFailure::Malformed("SCRAM gs2 header incomplete"))?;
        let bare = parts
            .next()
            .ok_or(SaslFailure::Malformed("SCRAM gs2 header incomplete"))?;
        let plus = self.mechanism == Mechanism::ScramSha256Plus;
        match flag {
            "n" if plus => return Err(SaslFailure::ChannelBindingUnsupported),
            "n" => {}
            // RFC 5802 §6: the client could bind and believes we cannot;
            // if we advertised -PLUS, someone removed it on the way.
            "y" if plus => return Err(SaslFailure::ChannelBindingUnsupported),
            "y" if self.binding.plus_advertised => {
                return Err(SaslFailure::ChannelBindingDowngrade);
            }
            "y" => {}
            "p=tls-exporter" if plus && self.binding.tls_exporter.is_some() => {}
            f if f.starts_with("p=") => return Err(SaslFailure::ChannelBindingUnsupported),
            _ => return Err(SaslFailure::Malformed("SCRAM channel binding flag")),
        }
        let mut attrs = bare.split(',');
        let first_attr = attrs.next().unwrap_or_default();
        if first_attr.starts_with("m=") {
            return Err(SaslFailure::Malformed("SCRAM mandatory extension"));
        }
        let login = first_attr
            .strip_prefix("n=")
            .ok_or(SaslFailure::Malformed("SCRAM username attribute"))
            .and_then(decode_saslname)?;
        if !valid_login(&login) {
            return Err(SaslFailure::Malformed("SCRAM username empty or too long"));
        }
        if !authzid.is_empty() {
            let authzid = authzid
                .strip_prefix("a=")
                .ok_or(SaslFailure::Malformed("SCRAM authzid"))
                .and_then(decode_saslname)?;
            if authzid != login {
                return Err(SaslFailure::AuthzidRefused);
            }
        }
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b)))
            .ok_or(SaslFailure::Malformed("SCRAM nonce attribute"))?;
        Ok(ScramFirst {
            gs2_header: format!("{flag},{authzid},"),
            client_first_bare: bare.to_string(),
            client_nonce: client_nonce.to_string(),
            server_nonce: std::mem::take(&mut self.pending_nonce),
            login,
        })
    }

    /// RFC 5802 §3 and §7: client-final-message, proof check, server-final.
    fn scram_final(
        &self,
        message: &[u8],
        first: &ScramFirst,
        server_first: &str,
        nonce: &str,
        credentials: &ScramCredentials,
    ) -> Result<SaslStep, SaslFailure> {
        let message = std::str::from_utf8(message)
            .map_err(|_| SaslFailure::Malformed("SCRAM client-final not UTF-8"))?;
        let (without_proof, proof) = message
            .rsplit_once(",p=")
            .ok_or(SaslFailure::Malformed("SCRAM proof attribute"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(SaslFailure::Malformed("SCRAM channel-binding attribute"))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(SaslFailure::Malformed("SCRAM nonce attribute"))?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| SaslFailure::Malformed("SCRAM channel binding not base64"))?;
        let mut expected = first.gs2_header.as_bytes().to_vec();
        if self.mechanism == Mechanism::ScramSha256Plus {
            let exporter = self
                .binding
                .tls_exporter
                .ok_or(SaslFailure::ChannelBindingUnsupported)?;
            expected.extend_from_slice(&exporter);
        }
        if !ct_eq(&cbind, &expected) {
            return Err(SaslFailure::ChannelBindingMismatch);
        }
        if !ct_eq(client_nonce.as_bytes(), nonce.as_bytes()) {
            return Err(SaslFailure::NonceMismatch);
        }
        let proof = B64
            .decode(proof)
            .ok()
            .filter(|p| p.len() == 32)
            .ok_or(SaslFailure::Malformed("SCRAM proof not base64 of 32 bytes"))?;
        let auth_message = format!("{},{server_first},{without_proof}", first.client_first_bare);
        // Every key is tried, so the time taken does not tell which matched.
        let mut matched = None;
        for (i, keys) in credentials.keys.iter().enumerate() {
            let signature = hmac_sha256(&keys.stored_key, &[auth_message.as_bytes()]);
            let mut client_key = [0u8; 32];
            for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(signature)) {
                *k = p ^ s;
            }
            if ct_eq(&sha256(&client_key), &keys.stored_key) && matched.is_none() {
                matched = Some(i);
            }
        }
        let key_index = matched.ok_or(SaslFailure::InvalidProof)?;
        let server_signature = hmac_sha256(
            &credentials.keys[key_index].server_key,
            &[auth_message.as_bytes()],
        );
        Ok(SaslStep::ScramVerified {
            login: first.login.clone(),
            key_index,
            server_final: format!("v={}", B64.encode(server_signature)).into_bytes(),
        })
    }
}

/// 18 random bytes, base64: the server's part of the SCRAM nonce.
pub fn new_server_nonce() -> String {
    let mut bytes = [0u8; 18];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    B64.encode(bytes)
}

fn text(bytes: &[u8]) -> Result<String, SaslFailure> {
    String::from_utf8(bytes.to_vec()).map_err(|_| SaslFailure::Malformed("not UTF-8"))
}

fn valid_login(login: &str) -> bool {
    !login.is_empty() && login.len() <= MAX_LOGIN_LEN && !login.chars().any(char::is_control)
}

/// RFC 4616 §2: `[authzid] NUL authcid NUL passwd`.
fn parse_plain(message: &[u8]) -> Result<(String, Secret), SaslFailure> {
    let message = std::str::from_utf8(message)
        .map_err(|_| SaslFailure::Malformed("PLAIN message not UTF-8"))?;
    let mut parts = message.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslFailure::Malformed(
            "PLAIN message needs exactly two NULs",
        ));
    };
    if !valid_login(authcid) || password.is_empty() || password.len() > MAX_SECRET_LEN {
        return Err(SaslFailure::Malformed(
            "PLAIN login or password empty or too long",
        ));
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslFailure::AuthzidRefused);
    }
    Ok((authcid.to_string(), Secret::new(password)))
}

/// RFC 5802 §5.1 saslname: `=2C` is ',' and `=3D` is '='; any other `=` is
/// an error.
fn decode_saslname(name: &str) -> Result<String, SaslFailure> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3);
        match escape {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(SaslFailure::Malformed("SCRAM saslname escape")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
