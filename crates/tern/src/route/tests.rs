use super::*;
use crate::dns::DnsSettings;
use crate::dns::testserver::{TestDns, Zone};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;

const ZONE: &str = "
pref.example      MX 20 b.mx.example
pref.example      MX 10 a.mx.example
pref.example      MX 30 c.mx.example
a.mx.example      A 127.0.0.2
b.mx.example      A 127.0.0.3
c.mx.example      A 127.0.0.4

equal.example     MX 10 a.mx.example
equal.example     MX 10 b.mx.example
equal.example     MX 20 c.mx.example

implicit.example  A 127.0.0.5
implicit.example  AAAA ::5
noaddr.example    EXISTS
nullmx.example    MX 0 .
broken.example    SERVFAIL
slow.example      TIMEOUT

skip.example      MX 10 gone.mx.example
skip.example      MX 20 empty.mx.example
skip.example      MX 30 b.mx.example
empty.mx.example  EXISTS
allgone.example   MX 10 gone.mx.example
allgone.example   MX 20 empty.mx.example
mxtemp.example    MX 10 broken.mx.example
mxtemp.example    MX 20 b.mx.example
broken.mx.example SERVFAIL
alltemp.example   MX 10 broken.mx.example
iplit.example     MX 10 127.0.0.9
cname.example     MX 10 alias.mx.example
alias.mx.example  CNAME a.mx.example

self.example      MX 10 a.mx.example
self.example      MX 20 mail.tern.test
self.example      MX 30 c.mx.example
selfbest.example  MX 10 Mail.Tern.Test
selfbest.example  MX 20 b.mx.example
mail.tern.test    A 127.0.0.1

dual.example      MX 10 dual.mx.example
dual.mx.example   A 127.0.0.6
dual.mx.example   A 127.0.0.7
dual.mx.example   AAAA ::6
dual.mx.example   AAAA ::7
v6.example        MX 10 v6.mx.example
v6.mx.example     AAAA ::8
";

const HOSTNAME: &str = "mail.tern.test";

async fn start() -> TestDns {
    TestDns::start(Zone::parse(ZONE).unwrap(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn router_with(server: &TestDns, routes: Routes, families: AddressFamilies) -> Router {
    router_timing_out(server, routes, families, Duration::from_secs(10))
}

/// Only the never-answering name should reach the timeout: a loaded test
/// machine must not turn slow answers into failures.
fn router_timing_out(
    server: &TestDns,
    routes: Routes,
    families: AddressFamilies,
    timeout: Duration,
) -> Router {
    let dns = Dns::new(&DnsSettings {
        nameservers: vec![server.addr()],
        timeout,
        attempts: 1,
        ..DnsSettings::default()
    })
    .unwrap();
    Router::new(
        dns,
        routes,
        RouterSettings {
            hostname: HOSTNAME.into(),
            families,
            mx_port: 2525,
        },
    )
}

fn router(server: &TestDns) -> Router {
    router_with(server, Routes::default(), AddressFamilies::Ipv4First)
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn names(delivery: &Delivery) -> Vec<&str> {
    delivery.hosts.iter().map(|h| h.name.as_str()).collect()
}

fn addrs(host: &Host) -> Vec<String> {
    match &host.target {
        Target::Tcp(addrs) => addrs.iter().map(|a| a.to_string()).collect(),
        Target::Unix(path) => vec![path.display().to_string()],
    }
}

#[tokio::test]
async fn mx_hosts_come_in_preference_order_with_their_addresses() {
    let server = start().await;
    let delivery = router(&server)
        .resolve("Pref.Example.", &mut rng(1))
        .await
        .unwrap();
    assert_eq!(delivery.destination.as_str(), "mx:pref.example");
    assert_eq!(delivery.transport, Transport::Smtp);
    assert_eq!(
        names(&delivery),
        ["a.mx.example", "b.mx.example", "c.mx.example"]
    );
    assert_eq!(
        delivery
            .hosts
            .iter()
            .map(|h| h.preference)
            .collect::<Vec<_>>(),
        [Some(10), Some(20), Some(30)]
    );
    assert_eq!(addrs(&delivery.hosts[0]), ["127.0.0.2:2525"]);
}

#[tokio::test]
async fn equal_preferences_are_shuffled_by_the_given_rng() {
    let server = start().await;
    let router = router(&server);
    let mut seen = std::collections::HashSet::new();
    for seed in 0..32 {
        let first = router
            .resolve("equal.example", &mut rng(seed))
            .await
            .unwrap();
        let again = router
            .resolve("equal.example", &mut rng(seed))
            .await
            .unwrap();
        assert_eq!(first, again, "same seed, same order");
        let order = names(&first);
        assert_eq!(order[2], "c.mx.example", "the less preferred MX stays last");
        seen.insert(order[0].to_string());
    }
    assert_eq!(
        seen.len(),
        2,
        "both equal MX hosts come first for some seed"
    );
}

#[tokio::test]
async fn no_mx_means_the_domain_itself() {
    let server = start().await;
    let delivery = router(&server)
        .resolve("implicit.example", &mut rng(1))
        .await
        .unwrap();
    assert_eq!(names(&delivery), ["implicit.example"]);
    assert_eq!(delivery.hosts[0].preference, None);
    assert_eq!(addrs(&delivery.hosts[0]), ["127.0.0.5:2525", "[::5]:2525"]);

    let err = router(&server)
        .resolve("noaddr.example", &mut rng(1))
        .await
        .unwrap_err();
    assert!(matches!(err, RouteError::NoAddress { .. }), "{err:?}");
    assert!(err.is_permanent());
}

#[tokio::test]
async fn null_mx_and_nxdomain_fail_permanently() {
    let server = start().await;
    let router = router(&server);
    let null = router
        .resolve("nullmx.example", &mut rng(1))
        .await
        .unwrap_err();
    assert_eq!(
        null,
        RouteError::NullMx {
            domain: "nullmx.example".into()
        }
    );
    assert!(null.is_permanent());
    assert_eq!(null.enhanced_code(), "5.1.10");
    assert!(null.to_string().contains("does not accept mail"), "{null}");

    let nx = router
        .resolve("nowhere.example", &mut rng(1))
        .await
        .unwrap_err();
    assert!(matches!(nx, RouteError::NoSuchDomain { .. }), "{nx:?}");
    assert!(nx.is_permanent());
    assert_eq!(nx.enhanced_code(), "5.1.2");
}

#[tokio::test]
async fn servfail_and_timeouts_are_temporary() {
    let server = start().await;
    let router = router_timing_out(
        &server,
        Routes::default(),
        AddressFamilies::Ipv4First,
        Duration::from_millis(300),
    );
    for domain in ["broken.example", "slow.example", "alltemp.example"] {
        let err = router.resolve(domain, &mut rng(1)).await.unwrap_err();
        assert!(
            matches!(err, RouteError::DnsFailure { .. }),
            "{domain}: {err:?}"
        );
        assert!(!err.is_permanent());
        assert_eq!(err.enhanced_code(), "4.4.3");
    }
}

#[tokio::test]
async fn mx_hosts_without_addresses_are_skipped() {
    let server = start().await;
    let router = router(&server);
    let delivery = router.resolve("skip.example", &mut rng(1)).await.unwrap();
    assert_eq!(names(&delivery), ["b.mx.example"]);

    // A temporary failure of one MX host does not hold up the others.
    let delivery = router.resolve("mxtemp.example", &mut rng(1)).await.unwrap();
    assert_eq!(names(&delivery), ["b.mx.example"]);

    for domain in ["allgone.example", "iplit.example"] {
        let err = router.resolve(domain, &mut rng(1)).await.unwrap_err();
        assert!(matches!(err, RouteError::NoReachableHost { .. }), "{err:?}");
        assert!(!err.is_permanent());
    }
    let err = router
        .resolve("iplit.example", &mut rng(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an address"), "{err}");
}

#[tokio::test]
async fn an_address_literal_domain_needs_no_dns() {
    let server = start().await;
    let router = router(&server);
    let delivery = router.resolve("[127.0.0.7]", &mut rng(1)).await.unwrap();
    assert_eq!(delivery.destination.as_str(), "mx:[127.0.0.7]");
    assert_eq!(addrs(&delivery.hosts[0]), ["127.0.0.7:2525"]);
    let v6 = router.resolve("[IPv6:::1]", &mut rng(1)).await.unwrap();
    assert_eq!(addrs(&v6.hosts[0]), ["[::1]:2525"]);
    let err = router
        .resolve("[300.1.1.1]", &mut rng(1))
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    let v4only = router_with(&server, Routes::default(), AddressFamilies::Ipv4Only);
    let err = v4only.resolve("[::1]", &mut rng(1)).await.unwrap_err();
    assert!(!err.is_permanent(), "{err:?}");
}

#[tokio::test]
async fn an_mx_host_that_is_a_cname_is_followed() {
    let server = start().await;
    let delivery = router(&server)
        .resolve("cname.example", &mut rng(1))
        .await
        .unwrap();
    assert_eq!(names(&delivery), ["alias.mx.example"]);
    assert_eq!(addrs(&delivery.hosts[0]), ["127.0.0.2:2525"]);
}

#[tokio::test]
async fn our_own_host_and_worse_mx_are_dropped() {
    let server = start().await;
    let router = router(&server);
    let delivery = router.resolve("self.example", &mut rng(1)).await.unwrap();
    assert_eq!(names(&delivery), ["a.mx.example"]);

    let err = router
        .resolve("selfbest.example", &mut rng(1))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        RouteError::LoopsBackToMyself {
            domain: "selfbest.example".into()
        }
    );
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.4.6");

    // Implicit MX pointing at ourselves.
    let err = router
        .resolve("mail.tern.test", &mut rng(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RouteError::LoopsBackToMyself { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn address_families_interleave_in_the_preferred_order() {
    let server = start().await;
    let family = |host: &Host| match &host.target {
        Target::Tcp(addrs) => addrs.iter().map(|a| a.is_ipv6()).collect::<Vec<_>>(),
        Target::Unix(_) => Vec::new(),
    };
    let cases = [
        (AddressFamilies::Ipv4First, vec![false, true, false, true]),
        (AddressFamilies::Ipv6First, vec![true, false, true, false]),
        (AddressFamilies::Ipv4Only, vec![false, false]),
        (AddressFamilies::Ipv6Only, vec![true, true]),
    ];
    for (families, expected) in cases {
        let router = router_with(&server, Routes::default(), families);
        let delivery = router.resolve("dual.example", &mut rng(3)).await.unwrap();
        assert_eq!(family(&delivery.hosts[0]), expected, "{families:?}");
    }
    // An MX host with only IPv6 is no host at all for an IPv4-only sender.
    let router = router_with(&server, Routes::default(), AddressFamilies::Ipv4Only);
    let err = router.resolve("v6.example", &mut rng(1)).await.unwrap_err();
    assert!(matches!(err, RouteError::NoReachableHost { .. }), "{err:?}");
}

#[test]
fn family_order_keeps_the_rest_of_the_longer_family() {
    let v4 = [Ipv4Addr::new(127, 0, 0, 1)];
    let v6 = [
        Ipv6Addr::LOCALHOST,
        "::2".parse().unwrap(),
        "::3".parse().unwrap(),
    ];
    let order = AddressFamilies::Ipv4First.order(&v4, &v6);
    assert_eq!(
        order,
        [
            IpAddr::V4(v4[0]),
            IpAddr::V6(v6[0]),
            IpAddr::V6(v6[1]),
            IpAddr::V6(v6[2])
        ]
    );
    assert_eq!(
        "IPv6-First".parse::<AddressFamilies>().unwrap(),
        AddressFamilies::Ipv6First
    );
    assert!("both".parse::<AddressFamilies>().is_err());
}

#[test]
fn order_mx_caps_the_host_count_and_ignores_a_null_mx_among_others() {
    let records: Vec<MxRecord> = (0..30)
        .map(|i| MxRecord {
            preference: i,
            exchange: format!("mx{i}.example"),
        })
        .chain([MxRecord {
            preference: 0,
            exchange: ".".into(),
        }])
        .collect();
    let ordered = order_mx("big.example", records, HOSTNAME, &mut rng(1)).unwrap();
    assert_eq!(ordered.len(), MAX_MX_HOSTS);
    assert_eq!(ordered[0].exchange, "mx0.example");
}

fn table(relay: Option<&str>, transports: &[(&str, &str)], fallback: Option<&str>) -> Routes {
    let transports = transports
        .iter()
        .map(|(d, r)| (d.to_string(), r.to_string()))
        .collect();
    Routes::from_config(relay, &transports, fallback).unwrap()
}

#[tokio::test]
async fn configured_routes_override_mx() {
    let server = start().await;
    let routes = table(
        Some("[a.mx.example]:587"),
        &[
            ("local.example", "lmtp:unix:/run/dovecot/lmtp"),
            (".sub.example", "smtp:[127.0.0.1]:2526,[::1]:2526"),
            ("pref.example", "pref.example:2527"),
        ],
        None,
    );
    let router = router_with(&server, routes, AddressFamilies::Ipv4First);

    let lmtp = router.resolve("local.example", &mut rng(1)).await.unwrap();
    assert_eq!(lmtp.transport, Transport::Lmtp);
    assert_eq!(lmtp.destination.as_str(), "lmtp:unix:/run/dovecot/lmtp");
    assert_eq!(
        lmtp.hosts[0].target,
        Target::Unix("/run/dovecot/lmtp".into())
    );

    let sub = router
        .resolve("a.b.sub.example", &mut rng(1))
        .await
        .unwrap();
    assert_eq!(
        sub.destination.as_str(),
        "relay:[127.0.0.1]:2526,[::1]:2526"
    );
    assert_eq!(names(&sub), ["127.0.0.1", "::1"]);

    // An unbracketed name is looked up by MX, on the configured port.
    let pref = router.resolve("pref.example", &mut rng(1)).await.unwrap();
    assert_eq!(pref.destination.as_str(), "relay:pref.example:2527");
    assert_eq!(addrs(&pref.hosts[0]), ["127.0.0.2:2527"]);

    // Everything else goes to the smarthost, by its address, not its MX.
    let other = router
        .resolve("nowhere.example", &mut rng(1))
        .await
        .unwrap();
    assert_eq!(other.destination.as_str(), "relay:[a.mx.example]:587");
    assert_eq!(addrs(&other.hosts[0]), ["127.0.0.2:587"]);
    assert_eq!(router.destination("Nowhere.Example"), other.destination);
}

#[tokio::test]
async fn a_broken_configured_route_defers_and_never_bounces() {
    let server = start().await;
    for relay in ["[gone.mx.example]", "nullmx.example", "broken.example"] {
        let router = router_with(
            &server,
            table(Some(relay), &[], None),
            AddressFamilies::Ipv4First,
        );
        let err = router
            .resolve("pref.example", &mut rng(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RouteError::RouteUnresolved { .. }),
            "{relay}: {err:?}"
        );
        assert!(!err.is_permanent(), "{relay}");
    }
}

#[tokio::test]
async fn the_fallback_relay_is_only_for_mx_deliveries() {
    let server = start().await;
    let routes = table(
        None,
        &[("local.example", "lmtp:[127.0.0.1]")],
        Some("[127.0.0.1]:2600"),
    );
    let router = router_with(&server, routes, AddressFamilies::Ipv4First);
    let fallback = router
        .resolve_fallback("pref.example", &mut rng(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fallback.destination.as_str(), "relay:[127.0.0.1]:2600");
    assert!(
        router
            .resolve_fallback("local.example", &mut rng(1))
            .await
            .is_none()
    );
    assert!(router.routes().fallback_relay.is_some());
}

#[test]
fn route_strings_parse_into_specs() {
    let smtp = |hops: Vec<NextHop>| RouteSpec {
        transport: Transport::Smtp,
        hops,
    };
    let lmtp = |hops: Vec<NextHop>| RouteSpec {
        transport: Transport::Lmtp,
        hops,
    };
    let addr = |s: &str| NextHop::Address(s.parse().unwrap());
    let cases = [
        ("smtp:[127.0.0.1]:2525", smtp(vec![addr("127.0.0.1:2525")])),
        ("[127.0.0.1]", smtp(vec![addr("127.0.0.1:25")])),
        ("127.0.0.1:26", smtp(vec![addr("127.0.0.1:26")])),
        ("[::1]:587", smtp(vec![addr("[::1]:587")])),
        ("[IPv6:2001:db8::1]", smtp(vec![addr("[2001:db8::1]:25")])),
        ("2001:db8::1", smtp(vec![addr("[2001:db8::1]:25")])),
        (
            "Relay.Example.",
            smtp(vec![NextHop::Mx {
                domain: "relay.example".into(),
                port: 25,
            }]),
        ),
        (
            "localhost:587",
            smtp(vec![NextHop::Mx {
                domain: "localhost".into(),
                port: 587,
            }]),
        ),
        (
            "SMTP:[relay.example]:587, [10.0.0.2]",
            smtp(vec![
                NextHop::Host {
                    host: "relay.example".into(),
                    port: 587,
                },
                addr("10.0.0.2:25"),
            ]),
        ),
        (
            "lmtp:unix:/run/dovecot/lmtp",
            lmtp(vec![NextHop::Unix("/run/dovecot/lmtp".into())]),
        ),
        (
            "lmtp:inet:mail.example:2424",
            lmtp(vec![NextHop::Host {
                host: "mail.example".into(),
                port: 2424,
            }]),
        ),
        ("lmtp:[127.0.0.1]", lmtp(vec![addr("127.0.0.1:24")])),
    ];
    for (text, expected) in cases {
        let spec = parse_route(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(spec, expected, "{text}");
        // The canonical form reads back as the same route.
        assert_eq!(parse_route(&spec.to_string()).unwrap(), spec, "{text}");
    }
}

#[test]
fn bad_route_strings_say_what_is_wrong() {
    let cases = [
        ("", "empty route"),
        ("smtp:", "empty next hop"),
        ("esmtp:relay.example", "unknown transport"),
        ("[127.0.0.1", "missing \"]\""),
        ("[127.0.0.1]:0", "bad port"),
        ("[127.0.0.1]:65536", "bad port"),
        ("relay.example:smtp", "bad port"),
        ("[127.0.0.1]x", "after \"]\""),
        ("2001:db8::zz:25", "in brackets"),
        ("bad_host.example", "not a valid host name"),
        ("[-bad.example]", "not a valid host name"),
        ("a.example,,b.example", "empty next hop"),
        ("smtp:unix:/run/x", "lmtp:unix"),
        ("lmtp:unix:run/lmtp", "absolute"),
    ];
    for (text, needle) in cases {
        let err = parse_route(text).unwrap_err();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn config_errors_name_their_key() {
    let transports = [
        (
            "good.example".to_string(),
            "lmtp:unix:/run/lmtp".to_string(),
        ),
        ("bad domain".to_string(), "[127.0.0.1]".to_string()),
        ("bad.example".to_string(), "lmtp:[x".to_string()),
    ]
    .into_iter()
    .collect();
    let errors = Routes::from_config(
        Some("lmtp:unix:/run/lmtp"),
        &transports,
        Some("relay.example:0"),
    )
    .unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            RELAY_KEY,
            FALLBACK_RELAY_KEY,
            "route.transports.\"bad domain\"",
            "route.transports.\"bad.example\"",
        ]
    );
    assert!(errors[0].message.contains("SMTP"), "{}", errors[0]);
}

#[tokio::test]
async fn resolving_can_run_on_any_worker_thread() {
    fn assert_send<T: Send>(_: &T) {}
    let server = start().await;
    let router = router(&server);
    let mut rng = rng(1);
    let resolving = router.resolve("pref.example", &mut rng);
    assert_send(&resolving);
    assert!(resolving.await.is_ok());
}
