//! Connection setup: greeting, EHLO/LHLO (HELO fallback), STARTTLS and
//! AUTH, up to the point where the connection can take a message.
//!
//! Invariants: STARTTLS is sent only when offered and the policy is not
//! `None`, and never twice; after the handshake the capabilities are read
//! anew from a second EHLO (RFC 3207 §4.2); credentials are sent only after
//! TLS unless `auth_without_tls`, and never hold control characters; a 4xx
//! or 5xx during setup ends the connection (QUIT first), except a 5xx to
//! EHLO (HELO instead, SMTP only) and a refused STARTTLS under
//! `Opportunistic` (plain text, reported).
//!
//! Not done: SASL mechanisms other than PLAIN and LOGIN; AUTH before the
//! second EHLO.
//!
//! Errors: none; failures become `Event::Failed` with the server's reply or
//! a `LocalFailure`.

use super::{
    Client, Event, Expect, LocalFailure, Phase, Protocol, Status, TlsPolicy, command_safe,
    sanitize, status_of,
};
use crate::ehlo::Capabilities;
use crate::reply::Reply;

impl Client {
    pub(super) fn on_greeting(&mut self, reply: Reply) {
        match reply.code / 100 {
            2 => self.send_hello(),
            4 | 5 => self.fail_server(reply.clone(), status_of(&reply), true),
            _ => self.fail_local(LocalFailure::OutOfSequence, false),
        }
    }

    pub(super) fn send_hello(&mut self) {
        if !command_safe(&self.config.helo_name) || self.config.helo_name.is_empty() {
            self.fail_local(LocalFailure::BadHeloName, true);
            return;
        }
        let verb = match self.config.protocol {
            Protocol::Smtp => "EHLO",
            Protocol::Lmtp => "LHLO",
        };
        self.write_command(format!("{verb} {}", self.config.helo_name), Expect::Ehlo);
    }

    pub(super) fn on_ehlo(&mut self, reply: Reply) {
        match reply.code / 100 {
            2 => {
                self.caps = Capabilities::from_reply(&reply);
                self.esmtp = true;
                self.after_hello();
            }
            // An old server that does not know EHLO (§4.1.4): 500, 502...
            5 if self.config.protocol == Protocol::Smtp => {
                self.write_command(format!("HELO {}", self.config.helo_name), Expect::Helo);
            }
            4 | 5 => self.fail_server(reply.clone(), status_of(&reply), true),
            _ => self.fail_local(LocalFailure::OutOfSequence, false),
        }
    }

    pub(super) fn on_helo(&mut self, reply: Reply) {
        match reply.code / 100 {
            2 => {
                self.caps = Capabilities::default();
                self.esmtp = false;
                self.after_hello();
            }
            4 | 5 => self.fail_server(reply.clone(), status_of(&reply), true),
            _ => self.fail_local(LocalFailure::OutOfSequence, false),
        }
    }

    pub(super) fn after_hello(&mut self) {
        if !self.tls && self.config.tls != TlsPolicy::None {
            if self.caps.has("STARTTLS") {
                self.write_command("STARTTLS".into(), Expect::StartTls);
                return;
            }
            if self.config.tls == TlsPolicy::Require {
                self.fail_local(LocalFailure::TlsNotOffered, true);
                return;
            }
        }
        self.start_auth();
    }

    pub(super) fn on_starttls(&mut self, reply: Reply) {
        match reply.code / 100 {
            2 => {
                if !self.reader.is_empty() {
                    self.fail_local(LocalFailure::DataBeforeTls, false);
                    return;
                }
                // `receive` refuses any octet that follows in this phase,
                // and only then announces the handshake.
                self.phase = Phase::Handshake;
                self.announce_tls = true;
            }
            4 | 5 if self.config.tls == TlsPolicy::Require => {
                self.fail_local(LocalFailure::TlsRefused, true)
            }
            4 | 5 => {
                self.events.push_back(Event::TlsDeclined(sanitize(&reply)));
                self.start_auth();
            }
            _ => self.fail_local(LocalFailure::OutOfSequence, false),
        }
    }

    pub(super) fn start_auth(&mut self) {
        let Some(creds) = self.config.credentials.clone() else {
            self.ready();
            return;
        };
        if self.authenticated {
            self.ready();
            return;
        }
        if !self.tls && !self.config.auth_without_tls {
            self.fail_local(LocalFailure::AuthNeedsTls, true);
            return;
        }
        let mechanisms = auth_mechanisms(&self.caps);
        let has = |m: &str| mechanisms.iter().any(|x| x == m);
        let printable = |s: &str| !s.chars().any(char::is_control);
        if !printable(&creds.username) || !printable(&creds.password) {
            self.fail_local(LocalFailure::BadCredentials, true);
        } else if has("PLAIN") {
            let mut token = vec![0u8];
            token.extend_from_slice(creds.username.as_bytes());
            token.push(0);
            token.extend_from_slice(creds.password.as_bytes());
            let line = format!("AUTH PLAIN {}", crate::base64::encode(&token));
            self.write_command(line, Expect::AuthDone);
        } else if has("LOGIN") {
            self.write_command("AUTH LOGIN".into(), Expect::AuthUser);
        } else {
            self.fail_local(LocalFailure::AuthNotOffered, true);
        }
    }

    pub(super) fn on_auth(&mut self, expect: Expect, reply: Reply) {
        let Some(creds) = self.config.credentials.clone() else {
            self.fail_local(LocalFailure::OutOfSequence, false);
            return;
        };
        match (expect, reply.code / 100) {
            (Expect::AuthUser, 3) => {
                let line = crate::base64::encode(creds.username.as_bytes());
                self.write_command(line, Expect::AuthPassword);
            }
            (Expect::AuthPassword, 3) => {
                let line = crate::base64::encode(creds.password.as_bytes());
                self.write_command(line, Expect::AuthDone);
            }
            (Expect::AuthDone, 2) => {
                self.authenticated = true;
                self.ready();
            }
            (_, 4 | 5) => self.fail_server(reply, Status::Temporary, true),
            _ => self.fail_local(LocalFailure::OutOfSequence, false),
        }
    }
}

/// The SASL mechanisms in the EHLO reply, upper-cased; also the old
/// `AUTH=LOGIN` form some servers still send.
fn auth_mechanisms(caps: &Capabilities) -> Vec<String> {
    let mut out = Vec::new();
    for (keyword, params) in &caps.extensions {
        if keyword == "AUTH" {
            out.extend(params.iter().map(|p| p.to_ascii_uppercase()));
        } else if let Some(m) = keyword.strip_prefix("AUTH=") {
            out.push(m.to_string());
            out.extend(params.iter().map(|p| p.to_ascii_uppercase()));
        }
    }
    out
}
