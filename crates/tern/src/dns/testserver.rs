//! A small authoritative DNS server on loopback for tests: the unit tests of
//! `dns` and `route` start it in-process, and `examples/test-dns.rs` (which
//! includes this file) serves a zone file for the Python integration tests.
//! Nothing here is part of the daemon: it needs `hickory-server`, a
//! dev-dependency.
//!
//! Zone text, one entry per line, `#` starts a comment, names are
//! case-insensitive and the trailing dot is optional:
//!
//! ```text
//! example.com      MX 10 mx1.example.com
//! example.net      MX 0 .                  # null MX (RFC 7505)
//! mx1.example.com  A 127.0.0.2
//! mx1.example.com  AAAA ::1
//! www.example.com  CNAME mx1.example.com
//! broken.example   SERVFAIL                # every query for the name
//! closed.example   REFUSED
//! slow.example     TIMEOUT                 # never answered
//! empty.example    EXISTS                  # the name exists, with no records
//! s1._domainkey.example.com TXT v=DKIM1; k=ed25519; p=...
//! ```
//!
//! A TXT entry's text is the rest of the line, white space runs made one
//! space, split into 255-octet character-strings when longer.
//!
//! A name with no entry at all is NXDOMAIN; a name with entries but none of
//! the asked type (after following CNAMEs) is NODATA (NOERROR, no answer).
//!
//! Invariants: answers only what the zone says; never recurses or forwards,
//! so a test can never reach the internet through it.
//! Errors: [`Zone::parse`] names the line and what is wrong with it.

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Long enough that any resolver under test gives up first.
const NEVER: Duration = Duration::from_secs(3600);
/// A CNAME chain longer than this is answered as far as it got.
const MAX_CNAME_CHAIN: usize = 8;

/// How the server answers one name, beyond its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    ServFail,
    Refused,
    Timeout,
}

/// The records and behaviours the test server answers with.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: HashMap<LowerName, Vec<Record>>,
    behaviours: HashMap<LowerName, Behaviour>,
}

fn fqdn(text: &str) -> Result<Name, String> {
    let mut name = Name::from_ascii(text).map_err(|e| format!("bad name {text:?}: {e}"))?;
    name.set_fqdn(true);
    Ok(name)
}

impl Zone {
    /// Reads zone text in the format of the module documentation.
    pub fn parse(text: &str) -> Result<Zone, String> {
        let mut zone = Zone::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            zone.add_line(&fields)
                .map_err(|e| format!("line {}: {e}", index + 1))?;
        }
        Ok(zone)
    }

    fn add_line(&mut self, fields: &[&str]) -> Result<(), String> {
        let (owner, kind, data) = match fields {
            [owner, kind, data @ ..] => (fqdn(owner)?, kind.to_ascii_uppercase(), data),
            _ => return Err("expected: NAME TYPE [DATA]".into()),
        };
        let rdata = match (kind.as_str(), data) {
            ("A", [ip]) => RData::A(A(ip.parse().map_err(|e| format!("bad A {ip:?}: {e}"))?)),
            ("AAAA", [ip]) => RData::AAAA(AAAA(
                ip.parse().map_err(|e| format!("bad AAAA {ip:?}: {e}"))?,
            )),
            ("MX", [preference, exchange]) => RData::MX(MX::new(
                preference
                    .parse()
                    .map_err(|e| format!("bad MX preference {preference:?}: {e}"))?,
                fqdn(exchange)?,
            )),
            ("CNAME", [target]) => RData::CNAME(CNAME(fqdn(target)?)),
            ("TXT", words) if !words.is_empty() => {
                let text = words.join(" ");
                RData::TXT(TXT::new(
                    text.as_bytes()
                        .chunks(255)
                        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
                        .collect(),
                ))
            }
            ("SERVFAIL" | "REFUSED" | "TIMEOUT" | "EXISTS", []) => {
                let behaviour = match kind.as_str() {
                    "SERVFAIL" => Behaviour::ServFail,
                    "REFUSED" => Behaviour::Refused,
                    "TIMEOUT" => Behaviour::Timeout,
                    _ => {
                        self.records.entry(LowerName::new(&owner)).or_default();
                        return Ok(());
                    }
                };
                self.behaviours.insert(LowerName::new(&owner), behaviour);
                return Ok(());
            }
            _ => return Err(format!("cannot read {kind} entry {:?}", fields.join(" "))),
        };
        self.records
            .entry(LowerName::new(&owner))
            .or_default()
            .push(Record::from_rdata(owner, 60, rdata));
        Ok(())
    }

    /// The answer section for `name`/`kind`, following CNAMEs inside the
    /// zone; `None` when the name does not exist (NXDOMAIN).
    fn answer(&self, name: &LowerName, kind: RecordType) -> Option<Vec<Record>> {
        let mut answers = Vec::new();
        let mut current = name.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let Some(records) = self.records.get(&current) else {
                // A CNAME pointing out of the zone answers with the CNAME alone.
                return (!answers.is_empty()).then_some(answers);
            };
            let matching: Vec<Record> = records
                .iter()
                .filter(|r| r.record_type() == kind)
                .cloned()
                .collect();
            if !matching.is_empty() {
                answers.extend(matching);
                return Some(answers);
            }
            let alias = records.iter().find_map(|r| match &r.data {
                RData::CNAME(target) => Some(target.0.clone()),
                _ => None,
            });
            match alias {
                Some(target) if kind != RecordType::CNAME => {
                    answers.extend(records.iter().cloned());
                    current = LowerName::new(&target);
                }
                _ => return Some(answers),
            }
        }
        Some(answers)
    }
}

/// The request handler: answers from a [`Zone`].
pub struct ZoneHandler {
    zone: Zone,
}

#[async_trait::async_trait]
impl RequestHandler for ZoneHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = true;
        let edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            edns
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let query = match request.request_info() {
            Ok(info) => info.query.clone(),
            Err(_) => {
                metadata.response_code = ResponseCode::FormErr;
                return send(&mut response_handle, builder.build_no_records(metadata)).await;
            }
        };
        let name = query.name();
        let answers = match self.zone.behaviours.get(name) {
            Some(Behaviour::ServFail) => {
                metadata.response_code = ResponseCode::ServFail;
                Vec::new()
            }
            Some(Behaviour::Refused) => {
                metadata.response_code = ResponseCode::Refused;
                Vec::new()
            }
            Some(Behaviour::Timeout) => {
                tokio::time::sleep(NEVER).await;
                return ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
            }
            None => match self.zone.answer(name, query.query_type()) {
                Some(answers) => answers,
                None => {
                    metadata.response_code = ResponseCode::NXDomain;
                    Vec::new()
                }
            },
        };
        let response = builder.build(metadata, answers.iter(), [], [], []);
        send(&mut response_handle, response).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let metadata = *response.metadata();
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => ResponseInfo::from(Header {
            metadata,
            counts: HeaderCounts::default(),
        }),
    }
}

/// A running test server; dropping it stops it.
pub struct TestDns {
    addr: SocketAddr,
    _server: Server<ZoneHandler>,
}

impl TestDns {
    /// Serves `zone` over UDP and TCP on `bind` (port 0: a free port, the
    /// same for both protocols). Must be called inside a tokio runtime.
    pub async fn start(zone: Zone, bind: SocketAddr) -> std::io::Result<TestDns> {
        let mut last_error = None;
        // Port 0 gives a free UDP port; the same TCP port is free most of the
        // time, so a few tries are enough.
        for _ in 0..20 {
            let udp = tokio::net::UdpSocket::bind(bind).await?;
            let addr = udp.local_addr()?;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let mut server = Server::new(ZoneHandler { zone });
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(10), 64);
                    return Ok(TestDns {
                        addr,
                        _server: server,
                    });
                }
                Err(e) => last_error = Some(e),
            }
            if bind.port() != 0 {
                break;
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no free port")))
    }

    /// The address resolvers under test are pointed at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
