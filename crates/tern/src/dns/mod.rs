//! DNS for outbound delivery: MX, A and AAAA lookups over hickory-resolver,
//! answered in our own small types, with errors sorted into "the domain does
//! not exist" (permanent) and "ask again later" (temporary).
//!
//! The name servers asked are configurable, so tests point Tern at a DNS
//! server on loopback (`testserver`, also served by `examples/test-dns.rs`)
//! and never at the internet; with none configured, `/etc/resolv.conf` is used.
//!
//! Invariants: every name is asked as a fully qualified name (no search
//! domains, which could turn `example` into `example.corp.internal`);
//! `/etc/hosts` is never consulted (mail routing follows DNS, as Postfix's
//! `smtp_host_lookup = dns`); "no records of this type" (NODATA) is an empty
//! answer, not an error, because for MX it means implicit MX.
//!
//! Not done: DNSSEC and DANE (TLSA), which need a validating resolver;
//! lookups over TLS or HTTPS.
//!
//! Errors: [`DnsError`]; only [`DnsError::NxDomain`] and
//! [`DnsError::InvalidName`] are permanent. [`Dns::new`] fails only when
//! the system resolver configuration cannot be read;
//! [`DnsSettings::from_config`] returns [`ConfigError`]s naming the key.

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testserver;

use crate::config::ConfigError;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::{Resolver, TokioResolver};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How Tern asks DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers to ask, in order; empty means the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// How long one query to one server may take.
    pub timeout: Duration,
    /// How many times a query is sent before the lookup fails temporarily.
    pub attempts: usize,
    /// Answers kept in memory (positive and negative, each for its TTL).
    pub cache_size: u64,
}

impl Default for DnsSettings {
    fn default() -> Self {
        // resolv.conf's defaults (timeout:5, attempts:2) would let one dead
        // server hold a delivery for 10 s per name; mail can wait, but the
        // scheduler's slot should not.
        DnsSettings {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            cache_size: 4096,
        }
    }
}

/// Proposed configuration keys, named in errors so `check-config` points
/// at the line.
pub const NAMESERVERS_KEY: &str = "dns.nameservers";
pub const TIMEOUT_KEY: &str = "dns.timeout";
pub const ATTEMPTS_KEY: &str = "dns.attempts";

impl DnsSettings {
    /// Validates the `[dns]` values as written in the configuration file;
    /// every problem is reported with its key.
    pub fn from_config(
        nameservers: &[String],
        timeout: &str,
        attempts: usize,
    ) -> Result<DnsSettings, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut servers = Vec::new();
        for (i, text) in nameservers.iter().enumerate() {
            match parse_nameserver(text) {
                Ok(addr) => servers.push(addr),
                Err(message) => errors.push(ConfigError {
                    key: format!("{NAMESERVERS_KEY}[{i}]"),
                    message,
                    line: None,
                }),
            }
        }
        // Below 100 ms a healthy but distant server looks dead; above a
        // minute a dead one holds a delivery slot for no benefit.
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(60));
        let timeout = match humantime::parse_duration(timeout) {
            Ok(d) if (min..=max).contains(&d) => d,
            Ok(_) => {
                errors.push(ConfigError {
                    key: TIMEOUT_KEY.into(),
                    message: "must be between 100ms and 1m".into(),
                    line: None,
                });
                min
            }
            Err(e) => {
                errors.push(ConfigError {
                    key: TIMEOUT_KEY.into(),
                    message: format!(
                        "invalid duration {timeout:?}: {e} (examples: \"2s\", \"500ms\")"
                    ),
                    line: None,
                });
                min
            }
        };
        if !(1..=10).contains(&attempts) {
            errors.push(ConfigError {
                key: ATTEMPTS_KEY.into(),
                message: "must be between 1 and 10".into(),
                line: None,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(DnsSettings {
            nameservers: servers,
            timeout,
            attempts,
            ..DnsSettings::default()
        })
    }
}

/// Reads one configured name server: `192.0.2.53`, `192.0.2.53:5353`,
/// `[2001:db8::53]:53` or `2001:db8::53`. The port defaults to 53.
pub fn parse_nameserver(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!(
        "{text:?} is not a name server address (an IP address with an optional port: \
         \"127.0.0.1:5353\", \"[::1]:53\")"
    ))
}

/// One MX record (RFC 5321 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// The mail exchanger, lower-cased, without the trailing dot; `"."` for
    /// the root (a null MX, RFC 7505).
    pub exchange: String,
}

impl MxRecord {
    /// RFC 7505 §3: "." names no host: the domain accepts no mail.
    pub fn is_null(&self) -> bool {
        self.exchange == "."
    }
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// NXDOMAIN: the name does not exist. Permanent.
    NxDomain { name: String },
    /// The name cannot be asked at all (empty label, too long). Permanent.
    InvalidName { name: String, reason: String },
    /// The server answered with an error code (SERVFAIL, REFUSED, ...). Temporary.
    ServerFailure { name: String, code: String },
    /// No server answered in time. Temporary.
    Timeout { name: String },
    /// The query could not be sent or its answer not read. Temporary.
    Network { name: String, reason: String },
}

impl DnsError {
    /// True when asking again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DnsError::NxDomain { .. } | DnsError::InvalidName { .. }
        )
    }

    /// The name that was asked.
    pub fn name(&self) -> &str {
        match self {
            DnsError::NxDomain { name }
            | DnsError::InvalidName { name, .. }
            | DnsError::ServerFailure { name, .. }
            | DnsError::Timeout { name }
            | DnsError::Network { name, .. } => name,
        }
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::NxDomain { name } => write!(f, "{name}: no such domain (NXDOMAIN)"),
            DnsError::InvalidName { name, reason } => {
                write!(f, "{name:?}: not a valid domain name: {reason}")
            }
            DnsError::ServerFailure { name, code } => {
                write!(f, "{name}: DNS server answered {code}")
            }
            DnsError::Timeout { name } => write!(f, "{name}: DNS lookup timed out"),
            DnsError::Network { name, reason } => write!(f, "{name}: DNS lookup failed: {reason}"),
        }
    }
}

impl std::error::Error for DnsError {}

/// The resolver the delivery side shares; cheap to clone (one cache).
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl fmt::Debug for Dns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

impl Dns {
    /// Builds the resolver. Must run inside a tokio runtime only when
    /// lookups are made, not here.
    pub fn new(settings: &DnsSettings) -> Result<Dns, String> {
        let mut builder = if settings.nameservers.is_empty() {
            Resolver::builder_tokio()
                .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = settings.timeout;
        options.attempts = settings.attempts;
        options.cache_size = settings.cache_size;
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot set up the DNS resolver: {e}"))?;
        Ok(Dns { resolver })
    }

    /// The MX records of `domain`, in the order the server gave them;
    /// empty when the domain exists but has none (implicit MX applies).
    pub async fn mx(&self, domain: &str) -> Result<Vec<MxRecord>, DnsError> {
        let name = query_name(domain)?;
        let answer = self.resolver.mx_lookup(name).await;
        let records = match answer {
            Ok(lookup) => lookup.answers().iter().map(|r| r.data.clone()).collect(),
            Err(e) => return no_data_or_error(domain, e),
        };
        Ok(mx_records(records))
    }

    /// The IPv4 addresses of `host`; empty when it has none (NODATA).
    /// CNAMEs are followed by the resolver.
    pub async fn ipv4(&self, host: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let name = query_name(host)?;
        match self.resolver.ipv4_lookup(name).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()),
            Err(e) => no_data_or_error(host, e),
        }
    }

    /// The IPv6 addresses of `host`; empty when it has none (NODATA).
    pub async fn ipv6(&self, host: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        let name = query_name(host)?;
        match self.resolver.ipv6_lookup(name).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::AAAA(a) => Some(a.0),
                    _ => None,
                })
                .collect()),
            Err(e) => no_data_or_error(host, e),
        }
    }
}

/// The name as an absolute DNS name, so no search domain is ever appended.
fn query_name(domain: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidName {
        name: domain.to_string(),
        reason,
    };
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.is_empty() {
        return Err(invalid("empty name".into()));
    }
    // IDNA: a U-label domain (RFC 6531) is asked as its A-label form.
    let mut name = Name::from_utf8(trimmed).map_err(|e| invalid(e.to_string()))?;
    name.set_fqdn(true);
    Ok(name)
}

fn mx_records(records: Vec<RData>) -> Vec<MxRecord> {
    records
        .into_iter()
        .filter_map(|data| match data {
            RData::MX(mx) => Some(MxRecord {
                preference: mx.preference,
                exchange: host_name(&mx.exchange),
            }),
            _ => None,
        })
        .collect()
}

/// `Name` → our host name form: lower case, no trailing dot, root as ".".
fn host_name(name: &Name) -> String {
    if name.is_root() {
        return ".".into();
    }
    let text = name.to_ascii().to_lowercase();
    text.strip_suffix('.').map(str::to_string).unwrap_or(text)
}

/// Sorts hickory's error into NODATA (an empty answer) or one of ours.
fn no_data_or_error<T>(name: &str, error: NetError) -> Result<Vec<T>, DnsError> {
    let name = name.to_string();
    match error {
        NetError::Dns(HickoryDnsError::NoRecordsFound(no_records)) => {
            match no_records.response_code {
                ResponseCode::NXDomain => Err(DnsError::NxDomain { name }),
                // NOERROR without answers is NODATA; any other code here is
                // a server that failed to answer.
                ResponseCode::NoError => Ok(Vec::new()),
                code => Err(DnsError::ServerFailure {
                    name,
                    code: code.to_string(),
                }),
            }
        }
        NetError::Dns(HickoryDnsError::ResponseCode(code)) => Err(DnsError::ServerFailure {
            name,
            code: code.to_string(),
        }),
        NetError::Timeout => Err(DnsError::Timeout { name }),
        other => Err(DnsError::Network {
            name,
            reason: other.to_string(),
        }),
    }
}
