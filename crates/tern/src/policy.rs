//! Policy: what a session may do, decided per SMTP phase. The session driver
//! asks; it does I/O and nothing else.
//!
//! One hook per phase (`connect`, `helo`, `mail`, `rcpt`, `data`,
//! `end_of_data`; AUTH's checks, limits before any hash and held accounts,
//! live in `auth::Accounts`), each returning a [`Verdict`] (or the reply of
//! a refusal) the driver hands to the protocol engine. Filtering (blocklists, greylisting,
//! SPF, milters) plugs into the same hooks.
//!
//! Invariants:
//! - Never an open relay: a recipient outside our domains is accepted only
//!   from a trusted network or an authenticated user.
//! - Addresses that route through a local domain to somewhere else (the
//!   classic relay tricks: `user%other@ours`, `other!user@ours`,
//!   `"user@other"@ours`; source routes are dropped by the parser, so
//!   `<@ours:user@other>` is judged as `user@other`) are refused with
//!   `550 5.7.1` whoever asks: Tern never interprets them, and a catch-all
//!   must not quietly accept them either.
//!
//! Errors: none; every refusal is a reply with its enhanced status code.

use std::net::{IpAddr, SocketAddr};

use tern_proto::{Decision, ForwardPath, Mailbox, Reply};
use tracing::info;

use crate::auth::AuthenticatedUser;
use crate::config::{Resolution, Role, Runtime, SenderRule};
use crate::egress::{Egress, UserLimits};
use crate::sendmail::LocalClient;
use crate::spool::Route;
use crate::submission;

/// What a session is, as far as policy cares.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    pub session_id: u64,
    pub peer: SocketAddr,
    /// Our end of the connection: mail to its address literal is ours.
    pub local_ip: Option<IpAddr>,
    pub role: Role,
    pub tls: bool,
    /// The authenticated user, once AUTH succeeded.
    pub user: Option<String>,
    /// The local user's program on the sendmail socket, if that is the client.
    pub local: Option<LocalClient>,
}

/// A hook's answer.
pub type Verdict = Decision;

/// Where an accepted recipient goes: each destination address and its route.
pub type Destinations = Vec<(String, Route)>;

/// The rules of one server configuration.
pub struct Policy<'a> {
    pub runtime: &'a Runtime,
    /// Per-user egress limits and the circuit breaker.
    pub egress: &'a Egress,
}

impl Policy<'_> {
    /// Connection: every client may talk (RFC 5321 §3.1); early talkers are
    /// the engine's business. Connect-time filters (DNS blocklists) answer
    /// here.
    pub fn connect(&self, _facts: &SessionFacts) -> Verdict {
        Decision::Accept
    }

    /// HELO/EHLO: the engine checked the syntax; no name is refused for
    /// what it says (RFC 5321 §4.1.4: a mismatch is no reason). HELO
    /// filters answer here.
    pub fn helo(&self, _facts: &SessionFacts, _domain: &str) -> Verdict {
        Decision::Accept
    }

    /// MAIL: an authenticated user sends only as an address they own
    /// (RFC 6409 §6.1; the null sender included: a user's client never
    /// sends bounces), and within their egress limits (`451 4.7.1`).
    pub fn mail(
        &self,
        facts: &SessionFacts,
        login: Option<&AuthenticatedUser>,
        sender: &str,
        limits: &UserLimits,
    ) -> Verdict {
        if let Some(client) = &facts.local {
            return self.local_sender(facts, client, sender);
        }
        let Some(login) = login else {
            return Decision::Accept;
        };
        if !login.may_send_as(sender, self.runtime) {
            info!(event = "mail.reject", session_id = facts.session_id, user = %login.name, from = %sender, reason = "sender not owned");
            return Decision::Reject(Reply::enhanced(
                553,
                (5, 7, 1),
                format!(
                    "<{sender}>: Sender address rejected: not owned by user {}",
                    login.name
                ),
            ));
        }
        if let Err(reply) = self
            .egress
            .mail(&login.name, limits, crate::outbound::now_millis())
        {
            info!(event = "mail.reject", session_id = facts.session_id, user = %login.name, reason = "egress limit");
            return Decision::Reject(reply);
        }
        Decision::Accept
    }

    /// MAIL from a local user's program: `sendmail.sender = "own"` keeps
    /// an ordinary user to `login@origin` (and the null sender); root and
    /// the server's own user run bounces and the administrator's scripts and
    /// may name any sender, as may everyone under the default `"any"`.
    fn local_sender(&self, facts: &SessionFacts, client: &LocalClient, sender: &str) -> Verdict {
        let settings = &self.runtime.sendmail;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let ours = client.uid == 0 || client.uid == unsafe { libc::geteuid() };
        if settings.sender == SenderRule::Any || ours || sender.is_empty() {
            return Decision::Accept;
        }
        let own = client.login.as_deref().is_some_and(|login| {
            sender.eq_ignore_ascii_case(&format!("{login}@{}", settings.origin))
        });
        if own {
            return Decision::Accept;
        }
        info!(event = "mail.reject", session_id = facts.session_id, uid = client.uid, from = %sender, reason = "sender not owned");
        Decision::Reject(Reply::enhanced(
            553,
            (5, 7, 1),
            format!(
                "<{sender}>: Sender address rejected: uid {} may only send as {}@{}",
                client.uid,
                client.login.as_deref().unwrap_or("?"),
                settings.origin
            ),
        ))
    }

    /// DATA: the breaker may have tripped since MAIL (at one of this
    /// transaction's RCPTs, or in another session of the same user).
    pub fn data(&self, login: Option<&AuthenticatedUser>) -> Verdict {
        match login.map(|l| self.egress.not_held(&l.name)) {
            Some(Err(reply)) => Decision::Reject(reply),
            _ => Decision::Accept,
        }
    }

    /// End of data, for an authenticated user's message: its author fields
    /// must be theirs (`550 5.7.1`); the answer is the `Date:` and
    /// `Message-ID:` fields it lacks (RFC 6409 §8), to be put in front.
    pub fn end_of_data(
        &self,
        facts: &SessionFacts,
        login: &AuthenticatedUser,
        header: &[u8],
        queue_id: &str,
    ) -> Result<Vec<u8>, Reply> {
        let owns = |address: &str| login.may_send_as(address, self.runtime);
        if let Err(reply) = submission::check_author(&login.name, owns, header) {
            info!(event = "message.rejected", session_id = facts.session_id, user = %login.name, reason = %reply.lines.join(" "));
            return Err(reply);
        }
        Ok(submission::missing_fields(
            header,
            &self.runtime.hostname,
            queue_id,
        ))
    }

    /// RCPT: who the recipient is and whether this client may send there.
    pub fn rcpt(&self, facts: &SessionFacts, to: &ForwardPath) -> Result<Destinations, Reply> {
        let runtime = self.runtime;
        let (given, resolution) = match to {
            ForwardPath::Postmaster => ("Postmaster".to_string(), runtime.resolve_postmaster()),
            ForwardPath::Mailbox(m) => {
                if let Some(trick) = relay_trick(runtime, m) {
                    info!(event = "rcpt.reject", session_id = facts.session_id, rcpt = %m, reason = trick);
                    return Err(Reply::enhanced(
                        550,
                        (5, 7, 1),
                        format!("<{m}>: Relay access denied ({trick} not supported)"),
                    ));
                }
                (m.to_string(), resolve_mailbox(runtime, m, facts.local_ip))
            }
        };
        match resolution {
            Resolution::Unknown => {
                info!(event = "rcpt.reject", session_id = facts.session_id, rcpt = %given, reason = "unknown user");
                Err(Reply::enhanced(
                    550,
                    (5, 1, 1),
                    format!("<{given}>: Recipient address rejected: User unknown"),
                ))
            }
            Resolution::Relay if !self.may_relay(facts) => {
                info!(event = "rcpt.reject", session_id = facts.session_id, rcpt = %given, reason = "relay denied");
                Err(Reply::enhanced(
                    550,
                    (5, 7, 1),
                    format!("<{given}>: Relay access denied"),
                ))
            }
            Resolution::Relay => Ok(vec![(given, Route::Remote)]),
            Resolution::Local(list) => Ok(local_routes(runtime, list)),
        }
    }

    /// RFC 5321 §3.6.2: relaying is for clients we know: trusted networks
    /// and authenticated users.
    fn may_relay(&self, facts: &SessionFacts) -> bool {
        facts.user.is_some() || facts.local.is_some() || self.runtime.is_trusted(facts.peer.ip())
    }
}

/// The relay trick an address of one of our domains hides in its local
/// part, if any.
fn relay_trick(runtime: &Runtime, mailbox: &Mailbox) -> Option<&'static str> {
    let tern_proto::Domain::Name(domain) = &mailbox.domain else {
        return None;
    };
    if !runtime.is_local_domain(domain) {
        return None;
    }
    let local = &mailbox.local_part;
    if local.contains('@') {
        Some("an address inside the local part")
    } else if local.contains('%') {
        Some("percent-hack routing")
    } else if local.contains('!') {
        Some("bang-path routing")
    } else {
        None
    }
}

fn resolve_mailbox(runtime: &Runtime, mailbox: &Mailbox, local_ip: Option<IpAddr>) -> Resolution {
    match &mailbox.domain {
        tern_proto::Domain::Name(domain) => runtime.resolve(&mailbox.local_part, domain),
        // Our own address literal names this host (RFC 1123 §5.2.17), and
        // postmaster must always be reachable (RFC 5321 §4.5.1); no other
        // mailbox lives there. Relaying it would send the mail back to us.
        tern_proto::Domain::AddressLiteral(literal)
            if local_ip.is_some() && literal_ip(literal) == local_ip =>
        {
            if mailbox.local_part.eq_ignore_ascii_case("postmaster") {
                runtime.resolve_postmaster()
            } else {
                Resolution::Unknown
            }
        }
        // Other address literals are never one of our domains (RFC 5321
        // §4.1.3 lets us refuse them); relaying to them needs trust like any
        // other relay.
        tern_proto::Domain::AddressLiteral(_) => Resolution::Relay,
    }
}

/// The IP of an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`),
/// IPv4-mapped IPv6 as IPv4; None for a general (tagged) literal.
pub(crate) fn literal_ip(literal: &str) -> Option<IpAddr> {
    let inner = literal.strip_prefix('[')?.strip_suffix(']')?;
    let ip = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => IpAddr::V6(inner[5..].parse().ok()?),
        _ => IpAddr::V4(inner.parse().ok()?),
    };
    Some(crate::config::canonical_ip(ip))
}

/// Where each destination of a local address goes: the user's Maildir, or
/// outbound for a forwarding address and for a local domain with its own
/// transport (LMTP into a mail store).
pub fn local_routes(runtime: &Runtime, list: Vec<crate::config::Destination>) -> Destinations {
    list.into_iter()
        .map(|d| match d.mailbox {
            Some(_)
                if runtime
                    .outbound
                    .routes
                    .transport(crate::spool::domain_of(&d.address))
                    .is_some() =>
            {
                (d.address, Route::Remote)
            }
            Some(mailbox) => (d.address, Route::Local { mailbox }),
            None => (d.address, Route::Remote),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn runtime(extra: &str) -> Runtime {
        let text = format!(
            r#"
hostname = "mx.test"
[local]
domains = ["ours.test"]
catch_all = {{ "ours.test" = "alice" }}
[[user]]
name = "alice"
addresses = ["alice@ours.test"]
{extra}
"#
        );
        crate::config::parse(&text, Path::new("/tmp")).expect("valid test config")
    }

    fn facts(user: Option<&str>, peer: &str) -> SessionFacts {
        SessionFacts {
            session_id: 1,
            peer: peer.parse().unwrap(),
            local_ip: Some("192.0.2.25".parse().unwrap()),
            role: Role::Mx,
            tls: false,
            user: user.map(str::to_string),
            local: None,
        }
    }

    /// Egress with the default limits and nobody held.
    fn no_limits() -> Egress {
        Egress::new(
            crate::egress::EgressLimits::default(),
            Box::new(crate::egress::MemoryCounters::default()),
            None,
            None,
            Vec::new(),
        )
    }

    fn rcpt(rt: &Runtime, f: &SessionFacts, path: &str) -> Result<Destinations, Reply> {
        let (to, _) = tern_proto::parse_forward_path(path).expect(path);
        let egress = no_limits();
        Policy {
            runtime: rt,
            egress: &egress,
        }
        .rcpt(f, &to)
    }

    fn local(uid: u32, login: &str) -> SessionFacts {
        SessionFacts {
            local: Some(LocalClient {
                uid,
                pid: Some(42),
                login: Some(login.into()),
            }),
            role: Role::Local,
            ..facts(None, "127.0.0.1:0")
        }
    }

    fn mail(rt: &Runtime, f: &SessionFacts, sender: &str) -> Verdict {
        let egress = no_limits();
        Policy {
            runtime: rt,
            egress: &egress,
        }
        .mail(f, None, sender, &UserLimits::default())
    }

    #[test]
    fn local_clients_relay_and_the_sender_rule_applies_to_them() {
        let rt = runtime("");
        // Not trusted by address (loopback is not), yet a local user may
        // send anywhere, as Postfix's sendmail may.
        assert!(rcpt(&rt, &facts(None, "127.0.0.1:0"), "<x@remote.test>").is_err());
        let user = local(4242, "cron");
        assert_eq!(
            rcpt(&rt, &user, "<x@remote.test>").unwrap(),
            vec![("x@remote.test".to_string(), Route::Remote)]
        );
        // Default "any": every sender.
        assert_eq!(mail(&rt, &user, "ceo@bank.test"), Decision::Accept);
        let own = runtime("[sendmail]\nsender = \"own\"");
        assert_eq!(mail(&own, &user, "cron@ours.test"), Decision::Accept);
        assert_eq!(mail(&own, &user, "CRON@Ours.Test"), Decision::Accept);
        assert_eq!(mail(&own, &user, ""), Decision::Accept);
        match mail(&own, &user, "alice@ours.test") {
            Decision::Reject(r) => assert_eq!(
                (r.code, r.enhanced.map(|e| (e.0, e.1, e.2))),
                (553, Some((5, 7, 1)))
            ),
            other => panic!("{other:?}"),
        }
        // root may name any sender.
        assert_eq!(
            mail(&own, &local(0, "root"), "alice@ours.test"),
            Decision::Accept
        );
    }

    #[test]
    fn relay_tricks_are_refused_even_with_a_catch_all_and_for_trusted_clients() {
        let rt = runtime("[relay]\ntrusted_networks = [\"198.51.100.0/24\"]");
        for f in [
            facts(None, "203.0.113.9:1"),
            facts(None, "198.51.100.7:1"),
            facts(Some("alice"), "203.0.113.9:1"),
        ] {
            for path in [
                "<user%other.test@ours.test>",
                "<other.test!user@ours.test>",
                "<\"user@other.test\"@ours.test>",
                "<@ours.test:user%other.test@ours.test>",
                "<\"user%other.test\"@OURS.TEST>",
            ] {
                let reply = rcpt(&rt, &f, path).expect_err(path);
                assert_eq!(
                    (reply.code, reply.enhanced.map(|e| (e.0, e.1, e.2))),
                    (550, Some((5, 7, 1))),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn relaying_needs_trust_or_authentication() {
        let rt = runtime("[relay]\ntrusted_networks = [\"198.51.100.0/24\"]");
        for path in [
            "<bob@other.test>",
            "<@ours.test:bob@other.test>",
            "<bob@[192.0.2.99]>",
        ] {
            let stranger = rcpt(&rt, &facts(None, "203.0.113.9:1"), path).expect_err(path);
            assert_eq!(stranger.code, 550, "{path}");
            assert!(
                rcpt(&rt, &facts(None, "198.51.100.7:1"), path).is_ok(),
                "{path}"
            );
            assert!(
                rcpt(&rt, &facts(Some("alice"), "203.0.113.9:1"), path).is_ok(),
                "{path}"
            );
        }
        // Local mail is for anyone.
        assert!(rcpt(&rt, &facts(None, "203.0.113.9:1"), "<alice@ours.test>").is_ok());
        assert!(
            rcpt(&rt, &facts(None, "203.0.113.9:1"), "<nobody@ours.test>").is_ok(),
            "catch-all"
        );
    }

    #[test]
    fn mail_hook_holds_a_user_to_their_own_addresses() {
        let rt = runtime("");
        let egress = no_limits();
        let policy = Policy {
            runtime: &rt,
            egress: &egress,
        };
        let alice = AuthenticatedUser {
            name: "alice".into(),
            via: crate::auth::Via::Password,
            addresses: vec![],
            allowed_senders: vec![],
        };
        let f = facts(Some("alice"), "203.0.113.9:1");
        let limits = UserLimits::default();
        let code = |v: Verdict| match v {
            Decision::Reject(r) => r.code,
            _ => 250,
        };
        assert_eq!(
            code(policy.mail(&f, Some(&alice), "alice@ours.test", &limits)),
            250
        );
        assert_eq!(
            code(policy.mail(&f, Some(&alice), "alice+x@ours.test", &limits)),
            250
        );
        assert_eq!(
            code(policy.mail(&f, Some(&alice), "bob@ours.test", &limits)),
            553
        );
        assert_eq!(code(policy.mail(&f, Some(&alice), "", &limits)), 553);
        // Strangers on mx: no sender rule (SPF and friends come later).
        assert_eq!(
            code(policy.mail(
                &facts(None, "203.0.113.9:1"),
                None,
                "bob@ours.test",
                &limits
            )),
            250
        );
        assert_eq!(code(policy.data(Some(&alice))), 250);
    }

    #[test]
    fn literal_ip_reads_both_literal_forms() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(literal_ip("[192.0.2.1]"), Some(v4));
        assert_eq!(literal_ip("[IPv6:::ffff:192.0.2.1]"), Some(v4));
        assert_eq!(literal_ip("[ipv6:2001:db8::1]"), "2001:db8::1".parse().ok());
        assert_eq!(literal_ip("[tag:whatever]"), None);
        assert_eq!(literal_ip("192.0.2.1"), None);
        assert_eq!(literal_ip("[IPv6:192.0.2.1]"), None);
    }
}
