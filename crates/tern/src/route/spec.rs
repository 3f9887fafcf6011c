//! Route strings as an administrator writes them, parsed into [`RouteSpec`].
//!
//! Grammar (Postfix's next-hop conventions, so its users recognise them):
//!
//! ```text
//! route     = [ "smtp:" | "lmtp:" ] hop *( "," hop )
//! smtp hop  = name [ ":" port ]          MX lookup of name (port 25)
//!           | "[" name "]" [ ":" port ]  the name's own A/AAAA, no MX lookup
//!           | "[" ip "]" [ ":" port ]    no DNS at all ("[IPv6:…]" also read)
//!           | ipv4 [ ":" port ]
//! lmtp hop  = "unix:" absolute-path
//!           | [ "inet:" ] ( name | "[" name "]" | "[" ip "]" | ipv4 ) [ ":" port ]
//!                                        never an MX lookup; port 24
//! ```
//!
//! Invariants: a parsed spec has at least one hop; names are lower-cased
//! and checked with the same rule as the rest of the configuration;
//! `RouteSpec`'s `Display` is canonical and parses back to the same spec.
//! Errors: a `String` saying what is wrong with which part of the text, for
//! `check-config` to print under the key.

use crate::config::valid_domain;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// RFC 5321 §4.5.4 / IANA: the SMTP port.
pub const SMTP_PORT: u16 = 25;
/// RFC 2033 §4 / IANA: the LMTP port.
pub const LMTP_PORT: u16 = 24;

/// The protocol spoken to a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Smtp,
    Lmtp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Smtp => "smtp",
            Transport::Lmtp => "lmtp",
        })
    }
}

/// One next hop of a configured route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// An unbracketed SMTP name: its MX records decide, as for any domain.
    Mx { domain: String, port: u16 },
    /// A bracketed name (any name for LMTP): its own addresses, no MX.
    Host { host: String, port: u16 },
    /// An IP address: no DNS at all.
    Address(SocketAddr),
    /// LMTP over a Unix socket.
    Unix(PathBuf),
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::Mx { domain, port } => write!(f, "{domain}:{port}"),
            NextHop::Host { host, port } => write!(f, "[{host}]:{port}"),
            NextHop::Address(addr) => write!(f, "[{}]:{}", addr.ip(), addr.port()),
            NextHop::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A configured route: a protocol and the next hops tried in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteSpec {
    pub transport: Transport,
    pub hops: Vec<NextHop>,
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.transport)?;
        for (i, hop) in self.hops.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{hop}")?;
        }
        Ok(())
    }
}

/// Reads a route string; see the module documentation for the grammar.
pub fn parse_route(text: &str) -> Result<RouteSpec, String> {
    let text = text.trim();
    let (transport, rest) = split_transport(text)?;
    let mut hops = Vec::new();
    for item in rest.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("empty next hop in {text:?}"));
        }
        let hop = match transport {
            Transport::Smtp => parse_smtp_hop(item),
            Transport::Lmtp => parse_lmtp_hop(item),
        }
        .map_err(|e| format!("{item:?}: {e}"))?;
        hops.push(hop);
    }
    Ok(RouteSpec { transport, hops })
}

/// Splits off `smtp:`/`lmtp:`; a bare `word:` that is not `host:port` is an
/// unknown transport rather than a host named after it.
fn split_transport(text: &str) -> Result<(Transport, &str), String> {
    if text.is_empty() {
        return Err("empty route".into());
    }
    if let Some((scheme, rest)) = text.split_once(':') {
        let is_scheme = !scheme.is_empty()
            && scheme.chars().all(|c| c.is_ascii_alphabetic())
            && (rest.is_empty() || !rest.chars().all(|c| c.is_ascii_digit()));
        if is_scheme {
            return match scheme.to_ascii_lowercase().as_str() {
                "smtp" => Ok((Transport::Smtp, rest)),
                "lmtp" => Ok((Transport::Lmtp, rest)),
                other => Err(format!(
                    "unknown transport {other:?} (expected \"smtp:\" or \"lmtp:\")"
                )),
            };
        }
    }
    Ok((Transport::Smtp, text))
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("bad port {text:?} (expected 1 to 65535)")),
    }
}

/// `[…]` with an optional `:port` after it: the inside and the port.
fn split_bracketed(item: &str, default_port: u16) -> Result<(&str, u16), String> {
    let Some((inside, after)) = item.strip_prefix('[').and_then(|rest| rest.split_once(']')) else {
        return Err("missing \"]\"".into());
    };
    let port = match after {
        "" => default_port,
        _ => match after.strip_prefix(':') {
            Some(port) => parse_port(port)?,
            None => return Err(format!("unexpected {after:?} after \"]\"")),
        },
    };
    Ok((inside, port))
}

pub(super) fn address_literal(inside: &str) -> Option<IpAddr> {
    // RFC 5321 §4.1.3 writes IPv6 literals as "IPv6:…"; accept it too.
    let bare = match inside.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("ipv6:") => &inside[5..],
        _ => inside,
    };
    bare.parse().ok()
}

fn host_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_lowercase();
    if valid_domain(&name) {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a valid host name"))
    }
}

/// A hop that is bracketed, an IP address, or `name[:port]`; `bare_name`
/// decides what an unbracketed name means for this transport.
fn parse_inet_hop(
    item: &str,
    default_port: u16,
    bare_name: fn(String, u16) -> NextHop,
) -> Result<NextHop, String> {
    if item.starts_with('[') {
        let (inside, port) = split_bracketed(item, default_port)?;
        return match address_literal(inside) {
            Some(ip) => Ok(NextHop::Address(SocketAddr::new(ip, port))),
            None => Ok(NextHop::Host {
                host: host_name(inside)?,
                port,
            }),
        };
    }
    if let Ok(ip) = item.parse::<IpAddr>() {
        return Ok(NextHop::Address(SocketAddr::new(ip, default_port)));
    }
    let (name, port) = match item.rsplit_once(':') {
        Some((name, port)) => (name, parse_port(port)?),
        None => (item, default_port),
    };
    if name.contains(':') {
        return Err("an IPv6 address with a port must be in brackets: \"[2001:db8::1]:25\"".into());
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(NextHop::Address(SocketAddr::new(ip, port)));
    }
    Ok(bare_name(host_name(name)?, port))
}

fn parse_smtp_hop(item: &str) -> Result<NextHop, String> {
    if item.to_ascii_lowercase().starts_with("unix:") {
        return Err("a Unix socket needs \"lmtp:unix:/path\"".into());
    }
    parse_inet_hop(item, SMTP_PORT, |domain, port| NextHop::Mx { domain, port })
}

fn parse_lmtp_hop(item: &str) -> Result<NextHop, String> {
    let lower = item.to_ascii_lowercase();
    if lower.starts_with("unix:") {
        let path = PathBuf::from(&item[5..]);
        if !path.is_absolute() {
            return Err("the socket path must be absolute".into());
        }
        return Ok(NextHop::Unix(path));
    }
    let item = if lower.starts_with("inet:") {
        &item[5..]
    } else {
        item
    };
    // LMTP is never routed by MX (RFC 2033 §1: it is for the last hop
    // inside a site), so a bare name is the host itself.
    parse_inet_hop(item, LMTP_PORT, |host, port| NextHop::Host { host, port })
}
