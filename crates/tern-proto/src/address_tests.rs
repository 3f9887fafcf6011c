//! Tests for `address`: grammar cases from RFC 5321 §4.1.2/§4.1.3 and a
//! format ∘ parse round trip.

use super::*;
use proptest::prelude::*;

fn fwd(s: &str) -> Result<ForwardPath, AddressError> {
    let (p, n) = parse_forward_path(s)?;
    assert_eq!(n, s.len(), "consumed all of {s:?}");
    Ok(p)
}

fn rev(s: &str) -> Result<ReversePath, AddressError> {
    let (p, n) = parse_reverse_path(s)?;
    assert_eq!(n, s.len(), "consumed all of {s:?}");
    Ok(p)
}

fn mbox(local: &str, domain: &str) -> Mailbox {
    let domain = if domain.starts_with('[') {
        Domain::AddressLiteral(domain.into())
    } else {
        Domain::Name(domain.into())
    };
    Mailbox {
        local_part: local.into(),
        domain,
    }
}

#[test]
fn simple_and_null_paths() {
    assert_eq!(rev("<>"), Ok(ReversePath::Null));
    assert_eq!(
        rev("<a.b+c@example.com>"),
        Ok(ReversePath::Mailbox(mbox("a.b+c", "example.com")))
    );
    assert_eq!(fwd("<Postmaster>"), Ok(ForwardPath::Postmaster));
    assert_eq!(fwd("<pOsTmAsTeR>"), Ok(ForwardPath::Postmaster));
    assert_eq!(
        fwd("<postmaster@example.com>"),
        Ok(ForwardPath::Mailbox(mbox("postmaster", "example.com")))
    );
}

#[test]
fn quoted_local_parts_are_unescaped() {
    let m = fwd(r#"<"john \"q\" doe"@example.com>"#).unwrap();
    assert_eq!(
        m,
        ForwardPath::Mailbox(mbox(r#"john "q" doe"#, "example.com"))
    );
    assert_eq!(m.to_string(), r#"<"john \"q\" doe"@example.com>"#);
    // A quoted local part that is a valid dot-string is sent unquoted.
    let m = fwd(r#"<"abc"@example.com>"#).unwrap();
    assert_eq!(m.to_string(), "<abc@example.com>");
    assert_eq!(
        fwd(r#"<""@example.com>"#).unwrap().to_string(),
        r#"<""@example.com>"#
    );
    assert_eq!(
        fwd(r#"<"a\\b"@x>"#),
        Ok(ForwardPath::Mailbox(mbox(r"a\b", "x")))
    );
}

#[test]
fn bad_local_parts() {
    for s in [
        "<.a@b>",
        "<a.@b>",
        "<a..b@b>",
        "<a b@c>",
        "<\"a@b>",
        "<\"a\\\u{7f}\"@b>",
        "<@b>",
        "<a@>",
        "<a>",
    ] {
        assert!(fwd(s).is_err(), "{s:?} must be refused");
    }
    assert!(fwd("<\"a\u{0}\"@b>").is_err());
    assert!(fwd("<\"a\tb\"@b>").is_err());
}

#[test]
fn domains() {
    assert!(parse_domain("mx-1.example.com").is_ok());
    assert!(parse_domain("123.example").is_ok());
    for bad in [
        "-a.com", "a-.com", "a..com", ".a.com", "a.com.", "a_b.com", "", "a b",
    ] {
        assert!(parse_domain(bad).is_err(), "{bad:?}");
    }
    let long_label = "a".repeat(64);
    assert!(parse_domain(&long_label).is_err());
    let long_domain = ["abcdefghi"; 26].join(".");
    assert_eq!(parse_domain(&long_domain), Err(AddressError::DomainTooLong));
}

#[test]
fn address_literals() {
    for ok in [
        "[127.0.0.1]",
        "[001.2.3.255]",
        "[IPv6:::1]",
        "[ipv6:2001:db8::1]",
        "[IPv6:1:2:3:4:5:6:7:8]",
        "[IPv6:::ffff:192.0.2.1]",
        "[IPv6:1:2:3:4:5:6:192.0.2.1]",
        "[x-tag:some-content]",
        // A General-address-literal whose tag is "1" (§4.1.3 allows it).
        "[1:2::3]",
    ] {
        assert_eq!(
            parse_domain(ok),
            Ok(Domain::AddressLiteral(ok.into())),
            "{ok}"
        );
    }
    for bad in [
        "[256.0.0.1]",
        "[1.2.3]",
        "[1.2.3.4.5]",
        "[IPv6:1.2.3.4]",
        "[IPv6:::1%eth0]",
        "[IPv6:1:2:3:4:5:6:7::]",
        "[tag-:x]",
        "[tag:]",
        "[127.0.0.1",
        "[a[b]",
    ] {
        assert!(parse_domain(bad).is_err(), "{bad}");
    }
    let m = fwd("<user@[IPv6:::1]>").unwrap();
    assert_eq!(m, ForwardPath::Mailbox(mbox("user", "[IPv6:::1]")));
}

#[test]
fn source_routes_are_dropped() {
    assert_eq!(
        fwd("<@a.example,@b.example:u@c.example>"),
        Ok(ForwardPath::Mailbox(mbox("u", "c.example")))
    );
    assert_eq!(
        rev("<@[1.2.3.4]:u@c>"),
        Ok(ReversePath::Mailbox(mbox("u", "c")))
    );
    assert!(fwd("<@a,b:u@c>").is_err());
    assert!(fwd("<@a u@c>").is_err());
}

#[test]
fn utf8_is_parsed_and_flagged() {
    let ForwardPath::Mailbox(m) = fwd("<用户@例子.广告>").unwrap() else {
        panic!()
    };
    assert!(m.is_utf8());
    assert_eq!(m.local_part, "用户");
    assert_eq!(m.domain_str(), "例子.广告");
    let ForwardPath::Mailbox(m) = fwd("<\"é x\"@example.com>").unwrap() else {
        panic!()
    };
    assert!(m.is_utf8());
    let ForwardPath::Mailbox(m) = fwd("<a@b>").unwrap() else {
        panic!()
    };
    assert!(!m.is_utf8());
}

#[test]
fn limits() {
    let local = "a".repeat(64);
    assert!(fwd(&format!("<{local}@b>")).is_ok());
    let local = "a".repeat(65);
    assert_eq!(
        fwd(&format!("<{local}@b>")),
        Err(AddressError::LocalPartTooLong)
    );
    // 64 + 1 + 189 + 2 = 256 is the limit; 10 more is over.
    let dom = ["abcdefghi"; 19].join(".");
    assert!(fwd(&format!("<{}@{dom}>", "a".repeat(64))).is_ok());
    let dom = ["abcdefghi"; 20].join(".");
    let path = format!("<{}@{dom}>", "a".repeat(64));
    assert_eq!(fwd(&path), Err(AddressError::PathTooLong));
}

#[test]
fn path_consumes_only_the_path() {
    let (p, n) = parse_reverse_path("<a@b> SIZE=10").unwrap();
    assert_eq!(n, 5);
    assert_eq!(p, ReversePath::Mailbox(mbox("a", "b")));
    assert!(parse_reverse_path("a@b").is_err());
    assert!(parse_reverse_path("<a@b").is_err());
}

#[test]
fn mailbox_from_str() {
    assert_eq!("a@b.c".parse::<Mailbox>(), Ok(mbox("a", "b.c")));
    assert!("a@b c".parse::<Mailbox>().is_err());
}

fn arb_local() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\\.[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,10}){0,2}",
        // Quoted: any printable ASCII incl. space, quote and backslash.
        "[ -~]{0,20}",
        "[a-zé用]{1,6}",
    ]
}

fn arb_domain() -> impl Strategy<Value = Domain> {
    let label = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?";
    prop_oneof![
        prop::collection::vec(label, 1..4).prop_map(|l| Domain::Name(l.join("."))),
        (any::<[u8; 4]>())
            .prop_map(|a| Domain::AddressLiteral(format!("[{}.{}.{}.{}]", a[0], a[1], a[2], a[3]))),
        any::<[u16; 8]>().prop_map(|a| Domain::AddressLiteral(format!(
            "[IPv6:{}]",
            core::net::Ipv6Addr::from(a)
        ))),
        "[a-z]{1,5}:[!-Z^-~]{1,10}".prop_map(|s| Domain::AddressLiteral(format!("[{s}]"))),
    ]
}

proptest! {
    #[test]
    fn mailbox_format_then_parse_round_trips(local in arb_local(), domain in arb_domain()) {
        let m = Mailbox { local_part: local, domain };
        let wire = format!("<{m}>");
        prop_assume!(wire.len() <= MAX_PATH);
        let local_wire_len = m.to_string().len() - m.domain_str().len() - 1;
        prop_assume!(local_wire_len <= MAX_LOCAL_PART);
        let (back, n) = parse_forward_path(&wire).map_err(|e| TestCaseError::fail(format!("{e} for {wire}")))?;
        prop_assert_eq!(n, wire.len());
        prop_assert_eq!(back, ForwardPath::Mailbox(m));
    }

    #[test]
    fn parsers_never_panic(s in "\\PC{0,40}") {
        let _ = parse_forward_path(&s);
        let _ = parse_reverse_path(&s);
        let _ = parse_domain(&s);
    }
}

#[test]
fn error_text_names_the_real_problem() {
    let stray = AddressError::Syntax("character not allowed in the address");
    assert_eq!(fwd("<a@b.test@c.test>"), Err(stray.clone()));
    assert_eq!(fwd("<a@b.test >"), Err(stray.clone()));
    assert_eq!(fwd("<a@b_c.test>"), Err(stray));
    assert_eq!(fwd("<a@b.test"), Err(AddressError::Syntax("missing '>'")));
}
