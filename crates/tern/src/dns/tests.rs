use super::testserver::{TestDns, Zone};
use super::*;

const ZONE: &str = "
example.com      MX 10 mx1.example.com
example.com      MX 20 MX2.Example.com.
example.net      MX 0 .
mx1.example.com  A 127.0.0.2
mx1.example.com  AAAA ::1
www.example.com  CNAME mx1.example.com
noaddr.example   EXISTS
broken.example   SERVFAIL
closed.example   REFUSED
slow.example     TIMEOUT
";

/// A resolver whose timeout only the never-answering name reaches: a
/// loaded test machine must not turn slow answers into failures.
fn resolver(server: &TestDns, timeout: Duration) -> Dns {
    Dns::new(&DnsSettings {
        nameservers: vec![server.addr()],
        timeout,
        attempts: 1,
        ..DnsSettings::default()
    })
    .unwrap()
}

async fn server() -> (TestDns, Dns) {
    let zone = Zone::parse(ZONE).unwrap();
    let server = TestDns::start(zone, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dns = resolver(&server, Duration::from_secs(10));
    (server, dns)
}

#[tokio::test]
async fn mx_records_come_back_lower_cased_without_the_dot() {
    let (_server, dns) = server().await;
    let mut mx = dns.mx("Example.COM").await.unwrap();
    mx.sort_by_key(|r| r.preference);
    assert_eq!(
        mx,
        vec![
            MxRecord {
                preference: 10,
                exchange: "mx1.example.com".into()
            },
            MxRecord {
                preference: 20,
                exchange: "mx2.example.com".into()
            },
        ]
    );
}

#[tokio::test]
async fn null_mx_is_the_root() {
    let (_server, dns) = server().await;
    let mx = dns.mx("example.net.").await.unwrap();
    assert_eq!(mx.len(), 1);
    assert!(mx[0].is_null());
}

#[tokio::test]
async fn addresses_and_cnames() {
    let (_server, dns) = server().await;
    assert_eq!(
        dns.ipv4("mx1.example.com").await.unwrap(),
        vec![Ipv4Addr::new(127, 0, 0, 2)]
    );
    assert_eq!(
        dns.ipv6("mx1.example.com").await.unwrap(),
        vec![Ipv6Addr::LOCALHOST]
    );
    assert_eq!(
        dns.ipv4("www.example.com").await.unwrap(),
        vec![Ipv4Addr::new(127, 0, 0, 2)]
    );
}

#[tokio::test]
async fn nodata_is_an_empty_answer() {
    let (_server, dns) = server().await;
    assert_eq!(dns.mx("noaddr.example").await.unwrap(), vec![]);
    assert!(dns.ipv4("noaddr.example").await.unwrap().is_empty());
    assert_eq!(dns.mx("mx1.example.com").await.unwrap(), vec![]);
}

#[tokio::test]
async fn errors_are_sorted_into_permanent_and_temporary() {
    let (server, dns) = server().await;
    let nx = dns.mx("nowhere.example").await.unwrap_err();
    assert!(matches!(nx, DnsError::NxDomain { .. }), "{nx:?}");
    assert!(nx.is_permanent());

    let servfail = dns.mx("broken.example").await.unwrap_err();
    assert!(
        matches!(servfail, DnsError::ServerFailure { .. }),
        "{servfail:?}"
    );
    assert!(!servfail.is_permanent());

    let refused = dns.ipv4("closed.example").await.unwrap_err();
    assert!(
        matches!(refused, DnsError::ServerFailure { .. }),
        "{refused:?}"
    );
    assert!(!refused.is_permanent());

    let impatient = resolver(&server, Duration::from_millis(300));
    let timeout = impatient.mx("slow.example").await.unwrap_err();
    assert!(matches!(timeout, DnsError::Timeout { .. }), "{timeout:?}");
    assert!(!timeout.is_permanent());

    let invalid = dns.mx("a..b").await.unwrap_err();
    assert!(invalid.is_permanent(), "{invalid:?}");
}

#[test]
fn nameserver_strings() {
    assert_eq!(
        parse_nameserver("127.0.0.1").unwrap(),
        "127.0.0.1:53".parse().unwrap()
    );
    assert_eq!(
        parse_nameserver("127.0.0.1:5353").unwrap(),
        "127.0.0.1:5353".parse().unwrap()
    );
    assert_eq!(
        parse_nameserver("::1").unwrap(),
        "[::1]:53".parse().unwrap()
    );
    assert!(parse_nameserver("dns.example").is_err());
    assert!(parse_nameserver("127.0.0.1:99999").is_err());
}

#[test]
fn zone_text_errors_name_the_line() {
    let err = Zone::parse("a.example A 127.0.0.1\nb.example MX ten c.example\n").unwrap_err();
    assert!(err.starts_with("line 2:"), "{err}");
}

#[test]
fn settings_from_config_name_each_bad_key() {
    let settings =
        DnsSettings::from_config(&["127.0.0.1:5353".into(), "::1".into()], "2s", 3).unwrap();
    assert_eq!(settings.nameservers.len(), 2);
    assert_eq!(settings.timeout, Duration::from_secs(2));
    assert_eq!(settings.attempts, 3);

    let errors =
        DnsSettings::from_config(&["::1".into(), "ns.example".into()], "forever", 0).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["dns.nameservers[1]", TIMEOUT_KEY, ATTEMPTS_KEY]);
    let errors = DnsSettings::from_config(&[], "10m", 2).unwrap_err();
    assert_eq!(errors[0].key, TIMEOUT_KEY);
}
