//! Outbound routing: recipient domain → the destination it belongs to and
//! the ordered hosts (with addresses) to try for it.
//!
//! A domain goes by MX (RFC 5321 §5.1) unless a configured route says
//! otherwise: a per-domain transport first (exact domain, then the closest
//! `.parent` entry), then the global relay host. The fallback relay is only
//! for MX deliveries that keep failing; the scheduler decides when.
//!
//! MX rules: records sorted by preference, random order among equal
//! preferences (the caller's RNG, so tests are deterministic); no MX →
//! implicit MX (the domain's own addresses); a lone null MX (RFC 7505) →
//! permanent 5.1.10; NXDOMAIN → permanent 5.1.2; if our own host name is an
//! MX, it and every less preferred MX are dropped (§5.1, so we never relay
//! to ourselves or our backups), and if that leaves nothing we are the best
//! MX without a route: permanent 5.4.6. MX hosts without addresses are
//! skipped; if none has one, the failure is temporary. An address-literal
//! domain (`user@[192.0.2.1]`) is that address, with no DNS.
//!
//! Invariants: every [`Delivery`] has at least one host, every TCP host at
//! least one address; addresses of one host alternate between the families
//! in the configured preference, so the caller falls back to the other
//! family by trying the next address; a configured route never fails
//! permanently (a broken relay is our fault, not the recipient's: mail
//! waits for the administrator instead of bouncing).
//!
//! Not done: recognising our own addresses (not only our host name) among
//! the MX hosts; grouping domains that share one MX host set under one
//! destination; per-route TLS policy and AUTH (the SMTP client's part).
//!
//! Errors: [`RouteError`], each with its RFC 3463 enhanced code and whether
//! it is permanent; [`Routes::from_config`] returns [`ConfigError`]s naming
//! the key.

mod spec;
#[cfg(test)]
mod tests;

pub use spec::{LMTP_PORT, NextHop, RouteSpec, SMTP_PORT, Transport, parse_route};

use crate::config::{ConfigError, valid_domain};
use crate::dns::{Dns, DnsError, MxRecord};
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// At most this many MX hosts are looked up per domain, so a hostile zone
/// with hundreds of MX records costs bounded DNS work (Postfix: 5 addresses).
pub const MAX_MX_HOSTS: usize = 10;

/// The key the scheduler groups deliveries by: `mx:example.com`,
/// `relay:[10.0.0.1]:25`, `lmtp:unix:/run/dovecot/lmtp`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination(String);

impl Destination {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn for_spec(spec: &RouteSpec) -> Destination {
        let hops: Vec<String> = spec.hops.iter().map(NextHop::to_string).collect();
        let kind = match spec.transport {
            Transport::Smtp => "relay",
            Transport::Lmtp => "lmtp",
        };
        Destination(format!("{kind}:{}", hops.join(",")))
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which address families are used, and which first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressFamilies {
    Ipv6First,
    /// The default: large receivers hold IPv6 senders to stricter rules
    /// (reverse DNS, authentication), so IPv4 first costs fewer refusals.
    #[default]
    Ipv4First,
    Ipv4Only,
    Ipv6Only,
}

impl FromStr for AddressFamilies {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "ipv6-first" => Ok(AddressFamilies::Ipv6First),
            "ipv4-first" => Ok(AddressFamilies::Ipv4First),
            "ipv4-only" => Ok(AddressFamilies::Ipv4Only),
            "ipv6-only" => Ok(AddressFamilies::Ipv6Only),
            _ => Err(format!(
                "{text:?} is not an address family preference (expected \"ipv4-first\", \
                 \"ipv6-first\", \"ipv4-only\" or \"ipv6-only\")"
            )),
        }
    }
}

impl AddressFamilies {
    fn wants_ipv4(self) -> bool {
        self != AddressFamilies::Ipv6Only
    }

    fn wants_ipv6(self) -> bool {
        self != AddressFamilies::Ipv4Only
    }

    /// Alternates families, preferred first, so one failing family costs
    /// one attempt before the other is tried (RFC 8305 §4 does the same).
    pub fn order(self, ipv4: &[Ipv4Addr], ipv6: &[Ipv6Addr]) -> Vec<IpAddr> {
        let v4 = ipv4.iter().map(|&ip| IpAddr::V4(ip));
        let v6 = ipv6.iter().map(|&ip| IpAddr::V6(ip));
        let (first, second): (Vec<IpAddr>, Vec<IpAddr>) = match self {
            AddressFamilies::Ipv6First => (v6.collect(), v4.collect()),
            AddressFamilies::Ipv4First => (v4.collect(), v6.collect()),
            AddressFamilies::Ipv4Only => (v4.collect(), Vec::new()),
            AddressFamilies::Ipv6Only => (v6.collect(), Vec::new()),
        };
        let mut ordered = Vec::with_capacity(first.len() + second.len());
        let (mut a, mut b) = (first.into_iter(), second.into_iter());
        loop {
            match (a.next(), b.next()) {
                (None, None) => return ordered,
                (x, y) => ordered.extend(x.into_iter().chain(y)),
            }
        }
    }
}

/// Where one host is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Addresses in the order to try.
    Tcp(Vec<SocketAddr>),
    Unix(PathBuf),
}

/// One host to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The MX host name, the configured name, or the address as written:
    /// what logs and `queue show` name as "which host".
    pub name: String,
    /// The MX preference; `None` for an implicit MX or a configured hop.
    pub preference: Option<u16>,
    pub target: Target,
}

/// Everything one delivery attempt needs to know about where to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub destination: Destination,
    pub transport: Transport,
    /// In the order to try; never empty.
    pub hosts: Vec<Host>,
}

/// Why a domain has no route now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// RFC 7505: a lone null MX.
    NullMx { domain: String },
    /// NXDOMAIN, or a name that cannot exist.
    NoSuchDomain { domain: String, detail: String },
    /// No MX, and the domain itself has no address (Postfix bounces too).
    NoAddress { domain: String },
    /// We are the best MX and no other route exists.
    LoopsBackToMyself { domain: String },
    /// A lookup failed in a way that may pass.
    DnsFailure { domain: String, error: DnsError },
    /// MX hosts exist but none of them has an address now.
    NoReachableHost { domain: String, detail: String },
    /// A configured route (relay, transport) could not be resolved.
    RouteUnresolved { route: String, detail: String },
}

impl RouteError {
    /// Permanent errors bounce the recipient; the rest defer it.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RouteError::NullMx { .. }
                | RouteError::NoSuchDomain { .. }
                | RouteError::NoAddress { .. }
                | RouteError::LoopsBackToMyself { .. }
        )
    }

    /// The RFC 3463 enhanced status code for the DSN and the logs.
    pub fn enhanced_code(&self) -> &'static str {
        match self {
            RouteError::NullMx { .. } => "5.1.10",
            RouteError::NoSuchDomain { .. } => "5.1.2",
            RouteError::NoAddress { .. } => "5.4.4",
            RouteError::LoopsBackToMyself { .. } => "5.4.6",
            RouteError::DnsFailure { .. } => "4.4.3",
            RouteError::NoReachableHost { .. } | RouteError::RouteUnresolved { .. } => "4.4.4",
        }
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NullMx { domain } => {
                write!(f, "domain {domain} does not accept mail (null MX)")
            }
            RouteError::NoSuchDomain { domain, detail } => {
                write!(f, "domain {domain} not found: {detail}")
            }
            RouteError::NoAddress { domain } => {
                write!(f, "domain {domain} has no MX and no address")
            }
            RouteError::LoopsBackToMyself { domain } => {
                write!(f, "mail for {domain} loops back to myself")
            }
            RouteError::DnsFailure { error, .. } => write!(f, "DNS lookup failed: {error}"),
            RouteError::NoReachableHost { domain, detail } => {
                write!(f, "no MX host of {domain} has an address: {detail}")
            }
            RouteError::RouteUnresolved { route, detail } => {
                write!(f, "route {route} unusable: {detail}")
            }
        }
    }
}

impl std::error::Error for RouteError {}

/// The configured routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// The smarthost for every domain without its own transport.
    pub relay: Option<RouteSpec>,
    /// Lower-cased domain (or `.parent` for its subdomains) → route.
    pub transports: BTreeMap<String, RouteSpec>,
    /// Used instead of MX when direct delivery keeps failing.
    pub fallback_relay: Option<RouteSpec>,
}

/// Proposed configuration keys, named in errors so `check-config` points
/// at the line.
pub const RELAY_KEY: &str = "route.relay";
pub const TRANSPORTS_KEY: &str = "route.transports";
pub const FALLBACK_RELAY_KEY: &str = "route.fallback_relay";

impl Routes {
    /// Validates route strings as they come from the configuration file;
    /// every problem is reported with its key.
    pub fn from_config(
        relay: Option<&str>,
        transports: &BTreeMap<String, String>,
        fallback_relay: Option<&str>,
    ) -> Result<Routes, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let relay = relay.and_then(|text| checked_route(&mut errors, RELAY_KEY.into(), text, true));
        let fallback_relay = fallback_relay
            .and_then(|text| checked_route(&mut errors, FALLBACK_RELAY_KEY.into(), text, true));
        let mut parsed = BTreeMap::new();
        for (domain, text) in transports {
            let key = format!("{TRANSPORTS_KEY}.{domain:?}");
            let lower = domain.trim().to_lowercase();
            let bare = lower.strip_prefix('.').unwrap_or(&lower);
            if !valid_domain(bare) {
                errors.push(ConfigError {
                    key,
                    message: format!(
                        "{domain:?} is not a domain (\"example.org\", or \".example.org\" \
                         for its subdomains)"
                    ),
                    line: None,
                });
                continue;
            }
            if let Some(spec) = checked_route(&mut errors, key, text, false) {
                parsed.insert(lower, spec);
            }
        }
        if errors.is_empty() {
            Ok(Routes {
                relay,
                transports: parsed,
                fallback_relay,
            })
        } else {
            Err(errors)
        }
    }

    /// The configured route for `domain`, or `None` for MX delivery.
    pub fn configured(&self, domain: &str) -> Option<&RouteSpec> {
        self.transport(domain).or(self.relay.as_ref())
    }

    /// The per-domain transport for `domain`, if any: it also takes a local
    /// domain's mail (LMTP into a mail store) instead of our Maildirs.
    pub fn transport(&self, domain: &str) -> Option<&RouteSpec> {
        let domain = domain.strip_suffix('.').unwrap_or(domain).to_lowercase();
        if let Some(spec) = self.transports.get(&domain) {
            return Some(spec);
        }
        // The closest parent entry wins: ".b.example" before ".example".
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(spec) = self.transports.get(&format!(".{parent}")) {
                return Some(spec);
            }
            rest = parent;
        }
        None
    }

    /// The destination `domain`'s mail is grouped under.
    pub fn destination(&self, domain: &str) -> Destination {
        match self.configured(domain) {
            Some(spec) => Destination::for_spec(spec),
            None => Destination(format!(
                "mx:{}",
                domain.strip_suffix('.').unwrap_or(domain).to_lowercase()
            )),
        }
    }
}

/// One route string from the configuration; a problem goes into `errors`
/// under `key`. Relays must speak SMTP.
fn checked_route(
    errors: &mut Vec<ConfigError>,
    key: String,
    text: &str,
    smtp_only: bool,
) -> Option<RouteSpec> {
    match parse_route(text) {
        Ok(spec) if smtp_only && spec.transport != Transport::Smtp => {
            errors.push(ConfigError {
                key,
                message: "a relay host speaks SMTP: use a per-domain transport for LMTP".into(),
                line: None,
            });
            None
        }
        Ok(spec) => Some(spec),
        Err(message) => {
            errors.push(ConfigError {
                key,
                message,
                line: None,
            });
            None
        }
    }
}

/// How MX delivery behaves, apart from the configured routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSettings {
    /// Our host name: an MX naming it is us (RFC 5321 §5.1 loop rule).
    pub hostname: String,
    pub families: AddressFamilies,
    /// The port MX hosts are reached on: 25, except in tests where several
    /// receivers share loopback.
    pub mx_port: u16,
}

/// Resolves domains into deliveries: the configured routes over DNS.
#[derive(Debug, Clone)]
pub struct Router {
    dns: Dns,
    routes: Routes,
    hostname: String,
    families: AddressFamilies,
    mx_port: u16,
}

/// The outcome of looking up one host's addresses.
enum Addresses {
    Found(Vec<IpAddr>),
    /// NXDOMAIN or no record of an enabled family: a dead end, not a retry.
    None(String),
    Temporary(DnsError),
}

impl Router {
    pub fn new(dns: Dns, routes: Routes, settings: RouterSettings) -> Router {
        let hostname = settings.hostname.to_lowercase();
        Router {
            dns,
            routes,
            hostname: hostname.strip_suffix('.').unwrap_or(&hostname).to_string(),
            families: settings.families,
            mx_port: settings.mx_port,
        }
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The destination `domain`'s mail is grouped under (no DNS).
    pub fn destination(&self, domain: &str) -> Destination {
        self.routes.destination(domain)
    }

    /// Where mail for `domain` goes now. Looked up at every attempt, so a
    /// configuration or DNS change applies to queued mail.
    pub async fn resolve<R: Rng + ?Sized>(
        &self,
        domain: &str,
        rng: &mut R,
    ) -> Result<Delivery, RouteError> {
        let domain = domain.strip_suffix('.').unwrap_or(domain).to_lowercase();
        if let Some(spec) = self.routes.configured(&domain) {
            return self.resolve_spec(spec, rng).await;
        }
        // RFC 5321 §4.1.3: `user@[192.0.2.1]` names the host itself: no DNS.
        if let Some(inside) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            return self.address_literal(&domain, inside);
        }
        Ok(Delivery {
            destination: self.routes.destination(&domain),
            transport: Transport::Smtp,
            hosts: self.resolve_mx(&domain, self.mx_port, rng).await?,
        })
    }

    fn address_literal(&self, domain: &str, inside: &str) -> Result<Delivery, RouteError> {
        let Some(ip) = spec::address_literal(inside) else {
            return Err(RouteError::NoSuchDomain {
                domain: domain.to_string(),
                detail: "not an IPv4 or IPv6 address literal".into(),
            });
        };
        let enabled = match ip {
            IpAddr::V4(_) => self.families.wants_ipv4(),
            IpAddr::V6(_) => self.families.wants_ipv6(),
        };
        if !enabled {
            return Err(RouteError::NoReachableHost {
                domain: domain.to_string(),
                detail: format!("{ip}: address family disabled by configuration"),
            });
        }
        Ok(Delivery {
            destination: self.routes.destination(domain),
            transport: Transport::Smtp,
            hosts: vec![Host {
                name: domain.to_string(),
                preference: None,
                target: Target::Tcp(vec![SocketAddr::new(ip, self.mx_port)]),
            }],
        })
    }

    /// The fallback relay for `domain`, when one is configured and the
    /// domain goes by MX (a configured route has no fallback: it is the
    /// administrator's choice already).
    pub async fn resolve_fallback<R: Rng + ?Sized>(
        &self,
        domain: &str,
        rng: &mut R,
    ) -> Option<Result<Delivery, RouteError>> {
        let spec = self.routes.fallback_relay.as_ref()?;
        if self.routes.configured(domain).is_some() {
            return None;
        }
        Some(self.resolve_spec(spec, rng).await)
    }

    async fn resolve_spec<R: Rng + ?Sized>(
        &self,
        spec: &RouteSpec,
        rng: &mut R,
    ) -> Result<Delivery, RouteError> {
        let mut hosts = Vec::new();
        let mut problems = Vec::new();
        for hop in &spec.hops {
            match hop {
                NextHop::Address(addr) => hosts.push(Host {
                    name: addr.ip().to_string(),
                    preference: None,
                    target: Target::Tcp(vec![*addr]),
                }),
                NextHop::Unix(path) => hosts.push(Host {
                    name: path.display().to_string(),
                    preference: None,
                    target: Target::Unix(path.clone()),
                }),
                NextHop::Host { host, port } => match self.addresses(host, rng).await {
                    Addresses::Found(ips) => hosts.push(Host {
                        name: host.clone(),
                        preference: None,
                        target: tcp(&ips, *port),
                    }),
                    Addresses::None(why) => problems.push(why),
                    Addresses::Temporary(error) => problems.push(error.to_string()),
                },
                NextHop::Mx { domain, port } => match self.resolve_mx(domain, *port, rng).await {
                    Ok(found) => hosts.extend(found),
                    Err(error) => problems.push(error.to_string()),
                },
            }
        }
        if hosts.is_empty() {
            return Err(RouteError::RouteUnresolved {
                route: spec.to_string(),
                detail: problems.join("; "),
            });
        }
        Ok(Delivery {
            destination: Destination::for_spec(spec),
            transport: spec.transport,
            hosts,
        })
    }

    /// RFC 5321 §5.1 for one domain.
    async fn resolve_mx<R: Rng + ?Sized>(
        &self,
        domain: &str,
        port: u16,
        rng: &mut R,
    ) -> Result<Vec<Host>, RouteError> {
        let records = self
            .dns
            .mx(domain)
            .await
            .map_err(|error| lookup_error(domain, error))?;
        if records.is_empty() {
            return self.implicit_mx(domain, port, rng).await;
        }
        let records = order_mx(domain, records, &self.hostname, rng)?;
        let mut hosts = Vec::new();
        let mut dead_ends = Vec::new();
        let mut temporary = None;
        for record in records {
            // RFC 5321 §5.1 / RFC 1035: an MX names a host. An address here
            // is a broken zone; Postfix and Exim refuse it too.
            if record.exchange.parse::<IpAddr>().is_ok() {
                dead_ends.push(format!(
                    "{}: an MX record must name a host, not an address",
                    record.exchange
                ));
                continue;
            }
            match self.addresses(&record.exchange, rng).await {
                Addresses::Found(ips) => hosts.push(Host {
                    target: tcp(&ips, port),
                    name: record.exchange,
                    preference: Some(record.preference),
                }),
                Addresses::None(why) => dead_ends.push(why),
                Addresses::Temporary(error) => {
                    temporary.get_or_insert(error);
                }
            }
        }
        if !hosts.is_empty() {
            return Ok(hosts);
        }
        match temporary {
            Some(error) => Err(RouteError::DnsFailure {
                domain: domain.to_string(),
                error,
            }),
            None => Err(RouteError::NoReachableHost {
                domain: domain.to_string(),
                detail: dead_ends.join("; "),
            }),
        }
    }

    /// RFC 5321 §5.1: no MX → the domain itself, as if MX 0.
    async fn implicit_mx<R: Rng + ?Sized>(
        &self,
        domain: &str,
        port: u16,
        rng: &mut R,
    ) -> Result<Vec<Host>, RouteError> {
        if domain == self.hostname {
            return Err(RouteError::LoopsBackToMyself {
                domain: domain.to_string(),
            });
        }
        match self.addresses(domain, rng).await {
            Addresses::Found(ips) => Ok(vec![Host {
                name: domain.to_string(),
                preference: None,
                target: tcp(&ips, port),
            }]),
            Addresses::None(_) => Err(RouteError::NoAddress {
                domain: domain.to_string(),
            }),
            Addresses::Temporary(error) => Err(RouteError::DnsFailure {
                domain: domain.to_string(),
                error,
            }),
        }
    }

    /// A host's addresses of the enabled families, in the preferred order;
    /// equal addresses are shuffled, as DNS round robin intends.
    async fn addresses<R: Rng + ?Sized>(&self, host: &str, rng: &mut R) -> Addresses {
        let v4 = async {
            match self.families.wants_ipv4() {
                true => self.dns.ipv4(host).await,
                false => Ok(Vec::new()),
            }
        };
        let v6 = async {
            match self.families.wants_ipv6() {
                true => self.dns.ipv6(host).await,
                false => Ok(Vec::new()),
            }
        };
        let (v4, v6) = tokio::join!(v4, v6);
        let (mut v4, mut v6) = match (v4, v6) {
            (Ok(v4), Ok(v6)) => (v4, v6),
            // One family answering is enough to deliver; the other one's
            // failure only matters when nothing else is there.
            (Ok(v4), Err(e)) => {
                if v4.is_empty() {
                    return failure(host, e);
                }
                (v4, Vec::new())
            }
            (Err(e), Ok(v6)) => {
                if v6.is_empty() {
                    return failure(host, e);
                }
                (Vec::new(), v6)
            }
            (Err(e4), Err(e6)) => {
                // A temporary failure of either family wins: the name may yet exist.
                let e = if e4.is_permanent() { e6 } else { e4 };
                return failure(host, e);
            }
        };
        v4.shuffle(rng);
        v6.shuffle(rng);
        let ips = self.families.order(&v4, &v6);
        if ips.is_empty() {
            Addresses::None(format!("{host}: no address"))
        } else {
            Addresses::Found(ips)
        }
    }
}

fn failure(host: &str, error: DnsError) -> Addresses {
    if error.is_permanent() {
        Addresses::None(format!("{host}: {error}"))
    } else {
        Addresses::Temporary(error)
    }
}

fn tcp(ips: &[IpAddr], port: u16) -> Target {
    Target::Tcp(ips.iter().map(|&ip| SocketAddr::new(ip, port)).collect())
}

fn lookup_error(domain: &str, error: DnsError) -> RouteError {
    if error.is_permanent() {
        RouteError::NoSuchDomain {
            domain: domain.to_string(),
            detail: error.to_string(),
        }
    } else {
        RouteError::DnsFailure {
            domain: domain.to_string(),
            error,
        }
    }
}

/// The MX records to try, in order (pure: no DNS).
///
/// Sorted by preference, shuffled within each preference; a lone null MX is
/// a permanent failure, a null MX among others is ignored; our own host and
/// everything not more preferred than it are dropped, and if that drops
/// everything, mail for the domain would loop back to us. At most
/// [`MAX_MX_HOSTS`] are kept.
pub fn order_mx<R: Rng + ?Sized>(
    domain: &str,
    mut records: Vec<MxRecord>,
    hostname: &str,
    rng: &mut R,
) -> Result<Vec<MxRecord>, RouteError> {
    if !records.is_empty() && records.iter().all(MxRecord::is_null) {
        return Err(RouteError::NullMx {
            domain: domain.to_string(),
        });
    }
    records.retain(|r| !r.is_null());
    // Shuffle first, then a stable sort: equal preferences stay shuffled.
    records.shuffle(rng);
    records.sort_by_key(|r| r.preference);
    let hostname = hostname
        .strip_suffix('.')
        .unwrap_or(hostname)
        .to_lowercase();
    if let Some(ours) = records.iter().position(|r| r.exchange == hostname) {
        let our_preference = records[ours].preference;
        records.retain(|r| r.preference < our_preference);
        if records.is_empty() {
            return Err(RouteError::LoopsBackToMyself {
                domain: domain.to_string(),
            });
        }
    }
    records.truncate(MAX_MX_HOSTS);
    Ok(records)
}
