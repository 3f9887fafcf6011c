//! EHLO capabilities: what we advertise (server side) and reading a peer's
//! EHLO reply (client side).
//!
//! The server's EHLO reply is `250-<hostname> Hello <domain>` followed by one
//! line per extension (RFC 5321 §4.1.1.1). Per RFC 2034 §3 no enhanced code
//! is used in EHLO replies.
//!
//! Invariants: we advertise exactly the extensions the session implements:
//! PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8
//! (RFC 6531), ENHANCEDSTATUSCODES (RFC 2034), CHUNKING (RFC 3030) and DSN
//! (RFC 3461) always; STARTTLS (RFC 3207) and AUTH (RFC 4954) when the
//! session offers them at that moment (see [`Offers`]). Not BINARYMIME.
//!
//! Not done: the obsolete `AUTH=` EHLO line some old clients looked for.
//!
//! Errors: none; `Capabilities::from_reply` ignores lines it cannot read.

use crate::reply::Reply;

/// The extensions a session offers only in some states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers<'a> {
    /// STARTTLS: configured and TLS not active yet.
    pub starttls: bool,
    /// The SASL mechanisms for the `AUTH` line, in order; empty: no line.
    pub auth: &'a [&'a str],
}

/// Builds the EHLO reply. `max_size` 0 means unlimited: `SIZE` is then
/// advertised without a number (RFC 1870 §4).
pub fn ehlo_reply(hostname: &str, client_domain: &str, max_size: u64, offers: Offers<'_>) -> Reply {
    let size = if max_size == 0 {
        "SIZE".to_string()
    } else {
        format!("SIZE {max_size}")
    };
    // ehlo-greet is 7-bit text (§4.1.1.1): a U-label name is not repeated.
    let greet = if client_domain.is_ascii() {
        format!("{hostname} Hello {client_domain}")
    } else {
        format!("{hostname} Hello")
    };
    let mut lines = vec![
        greet,
        "PIPELINING".to_string(),
        size,
        "8BITMIME".to_string(),
        "SMTPUTF8".to_string(),
        "ENHANCEDSTATUSCODES".to_string(),
        "CHUNKING".to_string(),
        "DSN".to_string(),
    ];
    if offers.starttls {
        lines.push("STARTTLS".to_string());
    }
    if !offers.auth.is_empty() {
        lines.push(format!("AUTH {}", offers.auth.join(" ")));
    }
    Reply {
        code: 250,
        enhanced: None,
        lines,
    }
}

/// A peer's advertised extensions, read from its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Keywords upper-cased, with their parameters, in the order given.
    pub extensions: Vec<(String, Vec<String>)>,
}

impl Capabilities {
    /// Reads the extension lines (every line after the first) of a 250 reply.
    pub fn from_reply(reply: &Reply) -> Capabilities {
        let extensions = reply
            .lines
            .iter()
            .skip(1)
            .filter_map(|l| {
                let mut words = l.split_ascii_whitespace();
                let kw = words.next()?.to_ascii_uppercase();
                Some((kw, words.map(str::to_string).collect()))
            })
            .collect();
        Capabilities { extensions }
    }

    /// True when the keyword was advertised.
    pub fn has(&self, keyword: &str) -> bool {
        self.extensions
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(keyword))
    }

    /// The SIZE limit: `Some(0)` when advertised without a number.
    pub fn size(&self) -> Option<u64> {
        let (_, params) = self.extensions.iter().find(|(k, _)| k == "SIZE")?;
        Some(params.first().and_then(|p| p.parse().ok()).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_and_reads_back() {
        let r = ehlo_reply("mx.example", "client.example", 1000, Offers::default());
        let wire = String::from_utf8(r.to_bytes()).unwrap();
        assert!(wire.starts_with(
            "250-mx.example Hello client.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
        ));
        assert!(wire.ends_with("250 DSN\r\n"));
        let (back, _) = Reply::parse(wire.as_bytes()).unwrap();
        let caps = Capabilities::from_reply(&back);
        for k in [
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ] {
            assert!(caps.has(k), "{k}");
        }
        assert!(!caps.has("BINARYMIME"));
        assert!(!caps.has("STARTTLS"));
        assert!(!caps.has("AUTH"));
        assert_eq!(caps.size(), Some(1000));
        let caps = Capabilities::from_reply(&ehlo_reply("h", "d", 0, Offers::default()));
        assert_eq!(caps.size(), Some(0));
    }

    #[test]
    fn starttls_and_auth_when_offered() {
        let offers = Offers {
            starttls: true,
            auth: &["PLAIN", "SCRAM-SHA-256"],
        };
        let wire = ehlo_reply("h", "d", 0, offers).to_bytes();
        assert!(wire.ends_with(b"250-DSN\r\n250-STARTTLS\r\n250 AUTH PLAIN SCRAM-SHA-256\r\n"));
        let caps = Capabilities::from_reply(&Reply::parse(&wire).unwrap().0);
        assert!(caps.has("STARTTLS") && caps.has("AUTH"));
    }

    #[test]
    fn greeting_line_stays_seven_bit() {
        let r = ehlo_reply("mx.example", "jörg.example", 1000, Offers::default());
        assert_eq!(r.lines[0], "mx.example Hello");
        assert!(r.to_bytes().is_ascii());
    }
}
