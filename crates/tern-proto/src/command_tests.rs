//! Tests for `command`: verbs, arguments, ESMTP parameters, and a
//! format ∘ parse round trip for MAIL/RCPT with parameters.

use super::*;
use crate::address::{Domain, Mailbox};
use proptest::prelude::*;

fn p(s: &str) -> Result<Command, CommandError> {
    parse_command(s.as_bytes())
}

#[test]
fn verbs_are_case_insensitive() {
    assert_eq!(p("ehlo x.test"), Ok(Command::Ehlo("x.test".into())));
    assert_eq!(
        p("HeLo [127.0.0.1]"),
        Ok(Command::Helo("[127.0.0.1]".into()))
    );
    assert_eq!(p("quit"), Ok(Command::Quit));
    assert_eq!(p("DATA "), Ok(Command::Data));
    assert_eq!(p("RSET\t"), Ok(Command::Rset));
    assert_eq!(p("QUIT \t "), Ok(Command::Quit));
    assert_eq!(
        p("MAIL  FROM:<a@b.test>"),
        Ok(Command::Mail(
            ReversePath::Mailbox("a@b.test".parse().unwrap()),
            MailParams::default()
        ))
    );
    assert_eq!(p("NOOP anything"), Ok(Command::Noop));
    assert_eq!(p("help mail"), Ok(Command::Help(Some("mail".into()))));
    assert_eq!(
        p("bdat 10 last"),
        Ok(Command::Bdat {
            size: 10,
            last: true
        })
    );
    assert_eq!(
        p("BDAT 0"),
        Ok(Command::Bdat {
            size: 0,
            last: false
        })
    );
}

#[test]
fn helo_names_are_read_as_deployed_servers_read_them() {
    let ok = |s: &str, name: &str| assert_eq!(p(s), Ok(Command::Ehlo(name.into())), "{s}");
    ok("EHLO foo_bar.test", "foo_bar.test");
    ok("EHLO WIN_PC", "WIN_PC");
    ok("EHLO x.test.", "x.test.");
    ok("EHLO  x.test", "x.test");
    ok("EHLO jörg.test", "jörg.test");
    ok("EHLO [IPv6:::1]", "[IPv6:::1]");
    let refused = |s: &str| assert!(matches!(p(s), Err(CommandError::HeloSyntax(_))), "{s}");
    refused("EHLO");
    refused("EHLO  ");
    refused("EHLO x.test junk");
    refused("EHLO x..test");
    refused("EHLO .");
    refused("EHLO x.test..");
    refused("EHLO [1.2.3]");
    refused("EHLO [300.1.1.1]");
    refused("EHLO a(b)");
    refused("EHLO a<b>");
    refused(&format!("EHLO {}.test", "x".repeat(64)));
    refused(&format!("EHLO {}", ["abc"; 70].join(".")));
}

#[test]
fn argument_errors() {
    assert_eq!(p("EHLO"), Err(CommandError::HeloSyntax("EHLO domain")));
    assert_eq!(p("EHLO a b"), Err(CommandError::HeloSyntax("EHLO domain")));
    assert!(matches!(p("DATA x"), Err(CommandError::Syntax(_))));
    assert!(matches!(p("QUIT now"), Err(CommandError::Syntax(_))));
    assert!(matches!(p("VRFY"), Err(CommandError::Syntax(_))));
    assert!(matches!(p("BDAT"), Err(CommandError::Syntax(_))));
    assert!(matches!(p("BDAT x"), Err(CommandError::Syntax(_))));
    assert!(matches!(p("BDAT 1 FIRST"), Err(CommandError::Syntax(_))));
    assert!(matches!(
        p("BDAT 99999999999999999999"),
        Err(CommandError::Syntax(_))
    ));
    assert!(matches!(p("MAIL TO:<a@b>"), Err(CommandError::Syntax(_))));
    assert!(matches!(p("MAIL FROM:a@b"), Err(CommandError::Syntax(_))));
    assert!(matches!(
        p("MAIL FROM:  <a@b>"),
        Err(CommandError::Syntax(_))
    ));
    assert!(matches!(
        p("MAIL FROM:<a@b>x"),
        Err(CommandError::BadSender(_))
    ));
    assert_eq!(p("EHLO"), Err(CommandError::HeloSyntax("EHLO domain")));
    assert_eq!(p("EHLO x").map(|_| ()), Ok(()));
    assert!(p("EHLO").unwrap_err().reply().enhanced.is_none());
}

/// A forbidden octet gets 501 with the enhanced code of the part it spoils.
#[test]
fn forbidden_octets_are_501_with_the_code_of_their_place() {
    let code = |line: &[u8]| {
        let r = parse_command(line).unwrap_err().reply();
        let e = r.enhanced.unwrap();
        format!("{} {}.{}.{}", r.code, e.0, e.1, e.2)
    };
    assert_eq!(code(b"NOOP\0"), "501 5.5.2");
    assert_eq!(code(b"EH\rLO x"), "501 5.5.2");
    assert_eq!(code(b"EHLO a\0b"), "501 5.5.2");
    assert_eq!(code(b"MAIL FROM:<a\0@b>"), "501 5.1.7");
    assert_eq!(code(b"mail FROM:<a@b\r>"), "501 5.1.7");
    assert_eq!(code(b"RCPT TO:<a\0@b>"), "501 5.1.3");
    assert_eq!(code(b"RCPT TO:<\xff@b>"), "501 5.1.3");
    assert_eq!(code(b"RCPT TO:<a@b> NOTIFY=\0"), "501 5.5.4");
    assert_eq!(code(b"RC\0PT TO:<a@b>"), "501 5.5.2");
    // Junk glued to the path spoils the path, not the parameters.
    assert_eq!(code(b"RCPT TO:<a@b>>"), "501 5.1.3");
    assert_eq!(code(b"MAIL FROM:<a@b>x"), "501 5.1.7");
    let r = parse_command(b"RCPT TO:<a\0@b>").unwrap_err().reply();
    assert_eq!(r.lines, ["Error: NUL in recipient address"]);
}

#[test]
fn bad_lines() {
    let bad = |octet, place| Err(CommandError::ForbiddenOctet { octet, place });
    assert_eq!(p("NO\0OP"), bad(BadOctet::Nul, OctetPlace::Command));
    assert_eq!(
        parse_command(b"VRFY \xff"),
        bad(BadOctet::NotUtf8, OctetPlace::Command)
    );
    assert_eq!(p("XYZZY"), Err(CommandError::UnknownVerb));
    assert_eq!(p(""), Err(CommandError::UnknownVerb));
    assert_eq!(p("MAIL:FROM"), Err(CommandError::UnknownVerb));
    assert_eq!(p("EXPN list"), Err(CommandError::NotImplemented("EXPN")));
    for h in [
        "GET / HTTP/1.0",
        "POST /x HTTP/1.1",
        "CONNECT a:25 HTTP/1.1",
        "HEAD /",
        "PUT /",
    ] {
        let e = p(h).unwrap_err();
        assert_eq!(e, CommandError::CrossProtocol);
        assert!(e.closes_connection());
        assert_eq!(
            e.reply().to_string(),
            "554 5.5.1 Error: this is an SMTP server"
        );
    }
}

#[test]
fn mail_and_rcpt() {
    let Ok(Command::Mail(ReversePath::Null, params)) =
        p("MAIL FROM:<> SIZE=123 BODY=8bitmime SMTPUTF8 RET=FULL ENVID=a+2Bb")
    else {
        panic!()
    };
    assert_eq!(params.size, Some(123));
    assert_eq!(params.body, Some(BodyType::EightBitMime));
    assert!(params.smtputf8);
    assert_eq!(params.ret, Some(Ret::Full));
    assert_eq!(params.envid.as_deref(), Some("a+b"));
    // One space after the colon is tolerated; trailing space too.
    assert!(matches!(
        p("mail from: <a@b> "),
        Ok(Command::Mail(ReversePath::Mailbox(_), _))
    ));
    let Ok(Command::Rcpt(ForwardPath::Mailbox(m), params)) =
        p("RCPT TO:<a@b> NOTIFY=success,delay ORCPT=rfc822;a+40b")
    else {
        panic!()
    };
    assert_eq!(m.local_part, "a");
    assert_eq!(
        params.notify,
        Some(Notify {
            never: false,
            success: true,
            failure: false,
            delay: true
        })
    );
    assert_eq!(
        params.orcpt,
        Some(Orcpt {
            addr_type: "rfc822".into(),
            address: "a@b".into(),
            raw_utf8: false,
        })
    );
    assert_eq!(
        p("RCPT TO:<Postmaster>"),
        Ok(Command::Rcpt(
            ForwardPath::Postmaster,
            RcptParams::default()
        ))
    );
}

#[test]
fn starttls_and_auth() {
    assert_eq!(p("starttls"), Ok(Command::StartTls { parameters: false }));
    assert_eq!(p("STARTTLS "), Ok(Command::StartTls { parameters: false }));
    assert_eq!(p("STARTTLS x"), Ok(Command::StartTls { parameters: true }));
    let auth = |m: &str, i: Option<&str>| {
        Ok(Command::Auth {
            mechanism: m.into(),
            initial: i.map(|i| SaslData::new(i.as_bytes().to_vec())),
        })
    };
    assert_eq!(p("AUTH PLAIN"), auth("PLAIN", None));
    assert_eq!(
        p("auth scram-sha-256 biws"),
        auth("SCRAM-SHA-256", Some("biws"))
    );
    assert_eq!(p("AUTH  LOGIN  ="), auth("LOGIN", Some("=")));
    assert_eq!(p("AUTH X_Y-1 !!"), auth("X_Y-1", Some("!!")));
    let syntax = Err(CommandError::Syntax("AUTH mechanism [initial-response]"));
    for bad in [
        "AUTH",
        "AUTH PLAIN a b",
        "AUTH PL@IN",
        "AUTH ABCDEFGHIJKLMNOPQRSTU",
        "AUTH é",
    ] {
        assert_eq!(p(bad), syntax, "{bad}");
    }
    // The initial response never shows in Debug output.
    let dbg = format!("{:?}", p("AUTH PLAIN AHVzZXIAc2VjcmV0"));
    assert!(!dbg.contains("AHVzZXIAc2VjcmV0"), "{dbg}");
    assert!(dbg.contains("SaslData(<redacted>)"), "{dbg}");
}

#[test]
fn mail_auth_parameter_is_never_an_error() {
    let auth = |s: &str| match p(s) {
        Ok(Command::Mail(_, params)) => params.auth,
        other => panic!("{s}: {other:?}"),
    };
    assert_eq!(auth("MAIL FROM:<a@b>"), None);
    assert_eq!(auth("MAIL FROM:<a@b> AUTH=<>").as_deref(), Some("<>"));
    assert_eq!(
        auth("MAIL FROM:<a@b> auth=e+3Dmc2@example.com SIZE=10").as_deref(),
        Some("e=mc2@example.com")
    );
    // Malformed, empty, missing or repeated: "<>", and the rest still parses.
    for s in [
        "MAIL FROM:<a@b> AUTH=bad+zz",
        "MAIL FROM:<a@b> AUTH=",
        "MAIL FROM:<a@b> AUTH",
        "MAIL FROM:<a@b> AUTH=jörg@x",
        "MAIL FROM:<a@b> AUTH=+0A",
        "MAIL FROM:<a@b> AUTH=a@b AUTH=c@d",
    ] {
        assert_eq!(auth(s).as_deref(), Some("<>"), "{s}");
    }
    let Ok(Command::Mail(_, params)) = p("MAIL FROM:<a@b> AUTH=x SMTPUTF8") else {
        panic!()
    };
    assert!(params.smtputf8);
}

#[test]
fn parameter_errors() {
    let unknown = |s: &str| matches!(p(s), Err(CommandError::UnknownParameter(_)));
    let bad = |s: &str| matches!(p(s), Err(CommandError::BadParameter(_)));
    assert!(unknown("MAIL FROM:<a@b> FOO=1"));
    assert!(unknown("MAIL FROM:<a@b> BODY=BINARYMIME"));
    assert!(unknown("RCPT TO:<a@b> SIZE=1"));
    assert!(bad("MAIL FROM:<a@b> SIZE=1 size=2"));
    assert!(bad("MAIL FROM:<a@b> SIZE=x"));
    assert!(bad("MAIL FROM:<a@b> SIZE"));
    assert!(bad("MAIL FROM:<a@b> BODY=9BIT"));
    assert!(bad("MAIL FROM:<a@b> SMTPUTF8=yes"));
    assert!(bad("MAIL FROM:<a@b> RET=ALL"));
    assert!(bad(&format!("MAIL FROM:<a@b> ENVID={}", "x".repeat(101))));
    assert!(bad("MAIL FROM:<a@b> ENVID=a+2"));
    assert!(bad("MAIL FROM:<a@b> ENVID=a+2b"));
    assert!(bad("MAIL FROM:<a@b> =x"));
    assert!(bad("RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS"));
    assert!(bad("RCPT TO:<a@b> NOTIFY=SOMETIMES"));
    assert!(bad("RCPT TO:<a@b> ORCPT=rfc822"));
    assert!(bad("RCPT TO:<a@b> ORCPT=;a@b"));
    assert!(bad("RCPT TO:<a@b> ORCPT=rfc822;jörg@b"));
    // utf-8-addr-xtext escapes: only whole, valid code points.
    for value in [
        r"j\xF6rg@b",
        r"j\x{F6rg@b",
        r"j\x{}rg@b",
        r"j\x{F}rg@b",
        r"j\x{D800}rg@b",
        r"j\x{110000}rg@b",
        r"j\x{0000F6}rg@b",
        r"j\x{00F6}rg@b",
        r"j\x{0A}rg@b",
        r"j\rg@b",
    ] {
        assert!(
            bad(&format!("RCPT TO:<a@b> ORCPT=utf-8;{value}")),
            "{value}"
        );
    }
    assert!(bad("MAIL FROM:<a@b> ENVID=é"));
    assert!(bad("RCPT TO:<a@b> NOTIFY=NEVER NOTIFY=NEVER"));
    assert_eq!(
        p("MAIL FROM:<a@b> SIZE=99999999999999999999"),
        Ok(Command::Mail(
            ReversePath::Mailbox("a@b".parse().unwrap()),
            MailParams {
                size: Some(u64::MAX),
                ..MailParams::default()
            }
        ))
    );
    assert_eq!(
        CommandError::UnknownParameter("FOO".into())
            .reply()
            .to_string(),
        "555 5.5.4 Error: unsupported parameter FOO"
    );
}

#[test]
fn address_error_codes() {
    let e = p("MAIL FROM:<a@@b>").unwrap_err();
    assert_eq!(e.reply().code, 501);
    assert_eq!(
        e.reply().enhanced,
        Some(crate::reply::EnhancedCode(5, 1, 7))
    );
    // RFC 5321 §4.5.3.1.10: "501 Path too long".
    let e = p(&format!("RCPT TO:<{}@b>", "a".repeat(65))).unwrap_err();
    assert_eq!(e.reply().code, 501);
    assert_eq!(
        e.reply().enhanced,
        Some(crate::reply::EnhancedCode(5, 1, 3))
    );
}

fn arb_mailbox() -> impl Strategy<Value = Mailbox> {
    (
        "[a-z0-9.+_-]{0,12}",
        "[ -~]{0,10}",
        any::<bool>(),
        "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
    )
        .prop_map(|(dot, quoted, use_quoted, dom)| {
            let local = if use_quoted || dot.is_empty() {
                quoted
            } else {
                dot
            };
            Mailbox {
                local_part: local,
                domain: Domain::Name(dom),
            }
        })
}

fn arb_mail_params() -> impl Strategy<Value = MailParams> {
    (
        prop::option::of(any::<u64>()),
        prop::option::of(prop::sample::select(vec![
            BodyType::SevenBit,
            BodyType::EightBitMime,
        ])),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![Ret::Full, Ret::Hdrs])),
        prop::option::of("[ -~]{1,30}"),
    )
        .prop_map(|(size, body, smtputf8, ret, envid)| MailParams {
            size,
            body,
            smtputf8,
            ret,
            envid,
            auth: None,
        })
}

fn format_mail(from: &Mailbox, m: &MailParams) -> String {
    let mut s = format!("MAIL FROM:<{from}>");
    if let Some(n) = m.size {
        s += &format!(" SIZE={n}");
    }
    if let Some(b) = m.body {
        s += if b == BodyType::SevenBit {
            " BODY=7BIT"
        } else {
            " BODY=8BITMIME"
        };
    }
    if m.smtputf8 {
        s += " SMTPUTF8";
    }
    if let Some(r) = m.ret {
        s += if r == Ret::Full {
            " RET=FULL"
        } else {
            " RET=HDRS"
        };
    }
    if let Some(e) = &m.envid {
        s += &format!(" ENVID={}", xtext_encode(e));
    }
    s
}

proptest! {
    #[test]
    fn mail_format_then_parse_round_trips(from in arb_mailbox(), params in arb_mail_params()) {
        let line = format_mail(&from, &params);
        prop_assume!(params.envid.as_ref().is_none_or(|e| xtext_encode(e).len() <= 100));
        prop_assume!(from.to_string().len() - from.domain_str().len() - 1 <= 64);
        let cmd = parse_command(line.as_bytes());
        prop_assert_eq!(cmd, Ok(Command::Mail(ReversePath::Mailbox(from), params)), "{}", line);
    }

    #[test]
    fn rcpt_format_then_parse_round_trips(
        to in arb_mailbox(),
        notify in prop::option::of((any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())),
        orcpt in prop::option::of("[ -~]{1,40}"),
    ) {
        prop_assume!(to.to_string().len() - to.domain_str().len() - 1 <= 64);
        let notify = notify.map(|(n, s, f, d)| if n || !(s || f || d) {
            Notify { never: true, ..Notify::default() }
        } else {
            Notify { never: false, success: s, failure: f, delay: d }
        });
        let mut line = format!("RCPT TO:<{to}>");
        if let Some(n) = notify {
            let mut v = Vec::new();
            if n.never { v.push("NEVER") }
            if n.success { v.push("SUCCESS") }
            if n.failure { v.push("FAILURE") }
            if n.delay { v.push("DELAY") }
            line += &format!(" NOTIFY={}", v.join(","));
        }
        if let Some(o) = &orcpt {
            line += &format!(" ORCPT=rfc822;{}", xtext_encode(o));
        }
        let orcpt = orcpt.map(|address| Orcpt { addr_type: "rfc822".into(), address, raw_utf8: false });
        let cmd = parse_command(line.as_bytes());
        prop_assert_eq!(cmd, Ok(Command::Rcpt(ForwardPath::Mailbox(to), RcptParams { notify, orcpt })), "{}", line);
    }

    #[test]
    fn parse_command_never_panics(line in prop::collection::vec(any::<u8>(), 0..100)) {
        if let Err(e) = parse_command(&line) {
            let r = e.reply();
            prop_assert!(Reply::parse(&r.to_bytes()).is_ok());
        }
    }
}

/// RFC 6533 §3: the three spellings of one UTF-8 original recipient are
/// stored alike; only the raw one is marked as needing SMTPUTF8.
#[test]
fn utf8_orcpt_forms_decode_to_one_address() {
    let orcpt = |value: &str| match parse_command(format!("RCPT TO:<a@b> ORCPT={value}").as_bytes())
    {
        Ok(Command::Rcpt(_, params)) => params.orcpt.unwrap(),
        other => panic!("{value}: {other:?}"),
    };
    for (value, raw) in [
        ("utf-8;jörg@bücher.example", true),
        (r"utf-8;j\x{F6}rg@b\x{FC}cher.example", false),
        (r"UTF-8;j\x{f6}rg@b\x{fc}cher.example", false),
        ("utf-8;j\\x{F6}rg@bücher.example", true),
    ] {
        let o = orcpt(value);
        assert_eq!(o.address, "jörg@bücher.example", "{value}");
        assert_eq!(o.raw_utf8, raw, "{value}");
        assert_eq!(o.needs_smtputf8(), raw, "{value}");
    }
    // An emoji beyond the BMP, five hex digits.
    assert_eq!(orcpt(r"utf-8;\x{1F600}@b").address, "\u{1F600}@b");
    // xtext of another type that decodes to non-ASCII still needs SMTPUTF8.
    let o = orcpt("rfc822;j+C3+B6rg@b");
    assert_eq!(
        (o.address.as_str(), o.raw_utf8, o.needs_smtputf8()),
        ("jörg@b", false, true)
    );
}

#[test]
fn a_refused_bdat_line_still_announces_its_chunk_size() {
    assert_eq!(announced_chunk_size(b"BDAT 12 FOO"), Some(Some(12)));
    assert_eq!(announced_chunk_size(b"bdat  7 LAST x"), Some(Some(7)));
    assert_eq!(announced_chunk_size(b"BDAT 0"), Some(Some(0)));
    assert_eq!(announced_chunk_size(b"BDAT 5 \xff"), Some(Some(5)));
    assert_eq!(announced_chunk_size(b"BDAT"), Some(None));
    assert_eq!(announced_chunk_size(b"BDAT x"), Some(None));
    assert_eq!(announced_chunk_size(b"BDAT 5x"), Some(None));
    assert_eq!(announced_chunk_size(b"BDAT -5"), Some(None));
    assert_eq!(
        announced_chunk_size(b"BDAT 99999999999999999999999"),
        Some(None)
    );
    assert_eq!(announced_chunk_size(b"BDATX 5"), None);
    assert_eq!(announced_chunk_size(b"DATA"), None);
    assert_eq!(announced_chunk_size(b"BDA"), None);
}
