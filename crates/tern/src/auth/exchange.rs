//! One `AUTH` exchange: a [`SaslServer`] driven against [`Accounts`]. The
//! session feeds it the client's decoded responses and sends what it
//! answers; every path ends in one [`LoginOutcome`].

use super::guard::ScramLookup;
use super::sasl::{
    ChannelBinding, Mechanism, SaslServer, SaslStep, TLS_EXPORTER_LABEL, TLS_EXPORTER_LEN,
    new_server_nonce,
};
use super::{Accounts, Attempt, AuthenticatedUser, LoginOutcome, Service};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// What the session does next.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep {
    /// Send `334 <base64 of these bytes>` (an empty challenge is `334 `)
    /// and pass the client's decoded answer to the next `step`.
    Challenge(Vec<u8>),
    /// The exchange is over: answer with `outcome.reply()`.
    Done(LoginOutcome),
}

/// The mechanism is not one we have, or needs TLS this connection lacks:
/// `504 5.5.4 Unrecognized authentication type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedMechanism(pub String);

impl fmt::Display for UnsupportedMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unsupported SASL mechanism {:?}", self.0)
    }
}

impl std::error::Error for UnsupportedMechanism {}

/// One authentication exchange (owns an `Arc<Accounts>`, so it can live in
/// the session's state between client lines).
#[derive(Debug)]
pub struct Exchange {
    accounts: Arc<Accounts>,
    sasl: SaslServer,
    attempt: Attempt,
    scram: Option<(String, ScramLookup)>,
    /// SCRAM: verified, waiting for the client's empty answer.
    verified: Option<AuthenticatedUser>,
    finished: bool,
}

impl Accounts {
    /// Starts an exchange for the mechanism the client named in `AUTH`.
    /// `binding` carries the TLS exporter (needed by -PLUS) and whether
    /// -PLUS was in this session's EHLO reply (for SCRAM's downgrade check).
    pub fn start(
        self: &Arc<Self>,
        mechanism: &str,
        client_ip: IpAddr,
        service: Service,
        binding: ChannelBinding,
    ) -> Result<Exchange, UnsupportedMechanism> {
        let m = Mechanism::from_name(mechanism)
            .filter(|m| !m.needs_tls() || binding.tls_exporter.is_some())
            .ok_or_else(|| UnsupportedMechanism(mechanism.to_string()))?;
        Ok(Exchange {
            accounts: self.clone(),
            sasl: SaslServer::new(m, binding, new_server_nonce()),
            attempt: Attempt {
                client_ip,
                service,
                mechanism: m,
            },
            scram: None,
            verified: None,
            finished: false,
        })
    }

    /// The mechanisms to advertise, strongest first: SCRAM-SHA-256-PLUS
    /// only when `channel_binding` (this connection's [`tls_exporter`] is
    /// `Some`: TLS 1.3). Whether PLAIN/LOGIN may be offered without TLS is
    /// the session's rule, not this list's.
    pub fn mechanisms(channel_binding: bool) -> Vec<&'static str> {
        Mechanism::ALL
            .into_iter()
            .filter(|m| channel_binding || !m.needs_tls())
            .map(Mechanism::name)
            .collect()
    }
}

/// The RFC 9266 `tls-exporter` binding data of a server connection (label
/// "EXPORTER-Channel-Binding", empty context, 32 bytes), for
/// [`ChannelBinding::tls_exporter`]. Only under TLS 1.3: RFC 9266 §3 makes
/// TLS 1.2 safe only with the extended master secret, which rustls does not
/// insist on. `None` also while the handshake is not complete. A session
/// offers SCRAM-SHA-256-PLUS exactly when this is `Some`.
pub fn tls_exporter(conn: &rustls::ServerConnection) -> Option<[u8; TLS_EXPORTER_LEN]> {
    if conn.is_handshaking() || conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return None;
    }
    conn.export_keying_material([0u8; TLS_EXPORTER_LEN], TLS_EXPORTER_LABEL, Some(&[]))
        .ok()
}

impl Exchange {
    pub fn mechanism(&self) -> Mechanism {
        self.attempt.mechanism
    }

    /// Feeds the client's next response: the first call gets the AUTH
    /// command's initial response (`None` when there was none), later
    /// calls the answer to the last challenge. After `Done`, further calls
    /// return `Done(Malformed)`.
    pub async fn step(&mut self, response: Option<&[u8]>) -> AuthStep {
        if self.finished {
            return AuthStep::Done(LoginOutcome::Malformed);
        }
        let mut step = self.sasl.step(response);
        loop {
            let next = match step {
                SaslStep::Challenge(bytes) => return AuthStep::Challenge(bytes),
                SaslStep::CheckPassword { login, password } => {
                    let outcome = self
                        .accounts
                        .verify_password(&login, &password, &self.attempt)
                        .await;
                    return self.done(outcome);
                }
                SaslStep::NeedScramCredentials { login } => {
                    match self.accounts.scram_lookup(&login, &self.attempt).await {
                        Ok(lookup) => {
                            let next = self.sasl.scram_credentials(lookup.credentials.clone());
                            self.scram = Some((login, lookup));
                            next
                        }
                        Err(outcome) => return self.done(outcome),
                    }
                }
                SaslStep::ScramVerified {
                    login,
                    key_index,
                    server_final,
                } => {
                    let outcome = match &self.scram {
                        Some((_, lookup)) => {
                            self.accounts
                                .scram_result(&login, lookup, Some(key_index), &self.attempt)
                                .await
                        }
                        None => LoginOutcome::Malformed,
                    };
                    return match outcome {
                        LoginOutcome::Success(user) => {
                            self.verified = Some(user);
                            AuthStep::Challenge(server_final)
                        }
                        other => self.done(other),
                    };
                }
                SaslStep::Completed => {
                    let outcome = match self.verified.take() {
                        Some(user) => LoginOutcome::Success(user),
                        None => LoginOutcome::Malformed,
                    };
                    return self.done(outcome);
                }
                SaslStep::Failed(failure) => {
                    let outcome = match &self.scram {
                        Some((login, lookup)) if failure.is_wrong_credentials() => {
                            self.accounts
                                .scram_result(login, lookup, None, &self.attempt)
                                .await
                        }
                        _ => {
                            let login = self.scram.as_ref().map(|(l, _)| l.as_str());
                            self.accounts
                                .refused_exchange(login, login.is_some(), failure, &self.attempt)
                                .await
                        }
                    };
                    return self.done(outcome);
                }
            };
            step = next;
        }
    }

    fn done(&mut self, outcome: LoginOutcome) -> AuthStep {
        self.finished = true;
        AuthStep::Done(outcome)
    }
}

#[cfg(test)]
mod tests;
