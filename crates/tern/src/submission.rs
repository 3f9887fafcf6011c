//! Message submission rules (RFC 6409) for what an authenticated user sends:
//! the author fields must be the user's own, and a message missing `Date:`
//! or `Message-ID:` gets them (RFC 6409 §8.2, §8.3).
//!
//! Invariants:
//! - Every `From:` mailbox and the `Sender:` mailbox must be addresses the
//!   user owns: their own addresses (with any `+tag`), aliases that reach
//!   their mailbox, and the addresses or `@domain`s they are allowed to send
//!   as. Postfix, Stalwart and chasquid leave the header open by default:
//!   the envelope alone says nothing about what the recipient sees.
//! - A message with no `From:`, more than one, or one that does not parse
//!   is refused (RFC 5322 §3.6 requires exactly one): a second `From:` would
//!   let a user show a stranger's address beside their own.
//!
//! Errors: refusals are `Reply`s (`550 5.7.1` not yours, `550 5.6.0`
//! malformed), given at the end of data.

use mail_parser::{HeaderName, MessageParser};
use tern_proto::Reply;

/// The header section of a message: up to and including the empty line,
/// or all of it when there is no body.
pub fn header_section(content: &[u8]) -> &[u8] {
    match memchr::memmem::find(content, b"\r\n\r\n") {
        Some(end) => &content[..end + 4],
        None if content.starts_with(b"\r\n") => &content[..2],
        None => content,
    }
}

/// Checks the author fields of a message `user` submitted; `owns` says
/// whether an address is theirs (`AuthenticatedUser::may_send_as`).
pub fn check_author(user: &str, owns: impl Fn(&str) -> bool, header: &[u8]) -> Result<(), Reply> {
    let malformed = |what: &str| Reply::enhanced(550, (5, 6, 0), format!("Error: {what}"));
    let Some(message) = MessageParser::default().parse_headers(header) else {
        return Err(malformed("the message has no header section"));
    };
    let mut froms = 0;
    for h in message.headers() {
        let field = match h.name {
            HeaderName::From => "From:",
            HeaderName::Sender => "Sender:",
            _ => continue,
        };
        if h.name == HeaderName::From {
            froms += 1;
        }
        let addresses: Vec<String> = h
            .value
            .as_address()
            .map(|a| {
                a.iter()
                    .filter_map(|a| a.address.as_deref().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if addresses.is_empty() || addresses.iter().any(|a| !a.contains('@')) {
            return Err(malformed(&format!("the {field} header does not parse")));
        }
        if let Some(stranger) = addresses.iter().find(|a| !owns(a)) {
            return Err(Reply::enhanced(
                550,
                (5, 7, 1),
                format!("Error: {field} <{stranger}> is not an address of user {user}"),
            ));
        }
    }
    match froms {
        0 => Err(malformed("the message has no From: header")),
        1 => Ok(()),
        _ => Err(malformed("the message has more than one From: header")),
    }
}

/// The domain of the (first) `From:` address: the DKIM signing domain,
/// which DMARC aligns with.
pub fn author_domain(header: &[u8]) -> Option<String> {
    let message = MessageParser::default().parse_headers(header)?;
    let address = message.from()?.first()?.address.as_deref()?;
    let (_, domain) = address.rsplit_once('@')?;
    Some(domain.to_lowercase())
}

/// The `Date:` and `Message-ID:` fields a submitted message lacks, ready
/// to be put in front of it (RFC 6409 §8.2, §8.3).
pub fn missing_fields(header: &[u8], hostname: &str, queue_id: &str) -> Vec<u8> {
    let (mut has_date, mut has_id) = (false, false);
    if let Some(message) = MessageParser::default().parse_headers(header) {
        for h in message.headers() {
            match h.name {
                HeaderName::Date => has_date = true,
                HeaderName::MessageId => has_id = true,
                _ => {}
            }
        }
    }
    let mut out = String::new();
    if !has_date {
        out.push_str(&format!("Date: {}\r\n", chrono::Local::now().to_rfc2822()));
    }
    if !has_id {
        let unique: u64 = rand::random();
        out.push_str(&format!(
            "Message-ID: <{queue_id}.{unique:016x}@{hostname}>\r\n"
        ));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn runtime() -> crate::config::Runtime {
        crate::config::parse(
            r#"
hostname = "mx.test"
[local]
domains = ["ours.test"]
catch_all = { "ours.test" = "bob" }
[[user]]
name = "alice"
addresses = ["alice@ours.test"]
[[user]]
name = "bob"
addresses = ["bob@ours.test"]
[aliases]
"sales@ours.test" = ["alice", "bob"]
"fwd@ours.test" = ["someone@elsewhere.test"]
"#,
            Path::new("/tmp"),
        )
        .expect("valid test config")
    }

    fn alice(allowed: &[&str]) -> crate::auth::AuthenticatedUser {
        crate::auth::AuthenticatedUser {
            name: "alice".into(),
            via: crate::auth::Via::Password,
            addresses: vec![],
            allowed_senders: allowed.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn check(header: &str) -> Result<(), (u16, String)> {
        let rt = runtime();
        let user = alice(&[]);
        check_author("alice", |a| user.may_send_as(a, &rt), header.as_bytes()).map_err(|r| {
            let e = r.enhanced.unwrap();
            (r.code, format!("{}.{}.{}", e.0, e.1, e.2))
        })
    }

    #[test]
    fn a_user_owns_their_addresses_tags_and_aliases_that_reach_them() {
        let rt = runtime();
        let a = alice(&[]);
        for addr in [
            "alice@ours.test",
            "Alice@OURS.test",
            "alice+news@ours.test",
            "sales@ours.test",
        ] {
            assert!(a.may_send_as(addr, &rt), "{addr}");
        }
        for addr in [
            "alice",
            "",
            "bob@ours.test",
            "fwd@ours.test",
            "nobody@ours.test",
            "alice@elsewhere.test",
            "postmaster@ours.test",
        ] {
            assert!(
                !a.may_send_as(addr, &rt),
                "{addr} (catch-all and postmaster are not ownership)"
            );
        }
        let extra = alice(&["boss@elsewhere.test", "@team.test"]);
        assert!(extra.may_send_as("BOSS@elsewhere.test", &rt));
        assert!(extra.may_send_as("anyone@team.test", &rt));
        assert!(!extra.may_send_as("anyone@sub.team.test", &rt));
    }

    #[test]
    fn author_fields_must_be_owned() {
        assert_eq!(
            check("From: Alice <alice@ours.test>\r\nSubject: x\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check("From: =?utf-8?q?Al=C3=AFce?= <sales@ours.test>\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check("From: alice@ours.test\r\nSender: sales@ours.test\r\n\r\n"),
            Ok(())
        );
        let not_hers = Err((550, "5.7.1".to_string()));
        assert_eq!(check("From: Bob <bob@ours.test>\r\n\r\n"), not_hers);
        assert_eq!(
            check("From: alice@ours.test, bob@ours.test\r\n\r\n"),
            not_hers
        );
        assert_eq!(
            check("From: alice@ours.test\r\nSender: bob@ours.test\r\n\r\n"),
            not_hers
        );
        assert_eq!(check("From: group: bob@ours.test;\r\n\r\n"), not_hers);
        let malformed = Err((550, "5.6.0".to_string()));
        assert_eq!(check("Subject: no author\r\n\r\n"), malformed);
        assert_eq!(
            check("From: alice@ours.test\r\nFrom: bob@ours.test\r\n\r\n"),
            not_hers
        );
        assert_eq!(
            check("From: alice@ours.test\r\nFrom: alice@ours.test\r\n\r\n"),
            malformed
        );
        assert_eq!(check("From: not an address\r\n\r\n"), malformed);
        assert_eq!(check("From:\r\n\r\n"), malformed);
    }

    #[test]
    fn missing_date_and_message_id_are_supplied() {
        let both =
            String::from_utf8(missing_fields(b"From: a@b\r\n\r\n", "mx.test", "Q1")).unwrap();
        assert!(both.starts_with("Date: "), "{both}");
        assert!(both.contains("\r\nMessage-ID: <Q1."), "{both}");
        assert!(both.ends_with("@mx.test>\r\n"), "{both}");
        let none = missing_fields(
            b"Date: Sun, 6 Dec 2026 05:00:00 +0000\r\nMessage-ID: <x@y>\r\n\r\n",
            "mx.test",
            "Q1",
        );
        assert!(none.is_empty());
        assert_eq!(header_section(b"A: b\r\n\r\nbody\r\n\r\n"), b"A: b\r\n\r\n");
        assert_eq!(header_section(b"A: b\r\n"), b"A: b\r\n");
        assert_eq!(header_section(b"\r\nbody"), b"\r\n");
    }
}
