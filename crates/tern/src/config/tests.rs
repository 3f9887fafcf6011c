use super::*;

const BASE: &str = r#"
hostname = "mx.example.test"
data_dir = "/var/lib/tern"
[[listener]]
address = "127.0.0.1:0"
[local]
domains = ["example.test", "Other.Test"]
postmaster = "alice"
catch_all = { "other.test" = "bob" }
[[user]]
name = "alice"
addresses = ["alice@example.test", "Alice.Smith@example.test"]
[[user]]
name = "bob"
addresses = ["bob@example.test"]
[aliases]
"team@example.test" = ["alice", "bob@example.test", "carol@remote.test", "alice@example.test"]
"keep@example.test" = ["bob@example.test"]
"bob@example.test" = ["bob@example.test", "bob@elsewhere.test"]
"#;

fn rt() -> Runtime {
    parse(BASE, Path::new("/etc/tern")).expect("valid config")
}

fn local(address: &str, mailbox: &str) -> Destination {
    Destination {
        address: address.into(),
        mailbox: Some(mailbox.into()),
    }
}

#[test]
fn embedded_default_is_valid() {
    let rt = embedded_default().expect("embedded default validates");
    assert_eq!(rt.listeners.len(), 3);
    assert!(rt.listeners.iter().all(|l| l.address.ip().is_loopback()));
    assert!(
        rt.trusted_networks.is_empty(),
        "loopback must not be trusted by default"
    );
    assert_eq!(
        rt.resolve("me", "localhost"),
        Resolution::Local(vec![local("me@localhost", "me")])
    );
}

#[test]
fn users_aliases_subaddress_postmaster_catch_all() {
    let rt = rt();
    // The copy names the address as given: the local part's case and its
    // tag kept, the domain lower-cased (Postfix's Delivered-To).
    assert_eq!(
        rt.resolve("ALICE", "Example.Test"),
        Resolution::Local(vec![local("ALICE@example.test", "alice")])
    );
    assert_eq!(
        rt.resolve("alice+news", "example.test"),
        Resolution::Local(vec![local("alice+news@example.test", "alice")])
    );
    assert_eq!(
        rt.resolve("Alice.Smith+Lists", "example.test"),
        Resolution::Local(vec![local("Alice.Smith+Lists@example.test", "alice")])
    );
    assert_eq!(rt.resolve("nobody", "example.test"), Resolution::Unknown);
    assert_eq!(rt.resolve("x", "remote.test"), Resolution::Relay);
    assert_eq!(
        rt.resolve("PostMaster", "example.test"),
        Resolution::Local(vec![local("alice@example.test", "alice")])
    );
    assert_eq!(
        rt.resolve_postmaster(),
        Resolution::Local(vec![local("alice@example.test", "alice")])
    );
    // A catch-all reaches its user by name: the name at that domain.
    assert_eq!(
        rt.resolve("anything", "other.test"),
        Resolution::Local(vec![local("bob@other.test", "bob")])
    );
    // An alias names its target as written; a bare user name is qualified
    // with the alias's domain (Postfix: with $myorigin).
    assert_eq!(
        rt.resolve("Keep+x", "example.test"),
        Resolution::Local(vec![
            local("bob@example.test", "bob"),
            Destination {
                address: "bob@elsewhere.test".into(),
                mailbox: None
            },
        ])
    );
    let text = BASE.to_string() + "\"sales@other.test\" = [\"alice\"]\n";
    let rt2 = parse(&text, Path::new("/")).expect("valid");
    assert_eq!(
        rt2.resolve("Sales", "other.test"),
        Resolution::Local(vec![local("alice@other.test", "alice")])
    );
    // one alias, many targets; alice named twice collapses to one copy.
    assert_eq!(
        rt.resolve("team", "example.test"),
        Resolution::Local(vec![
            local("alice@example.test", "alice"),
            local("bob@example.test", "bob"),
            Destination {
                address: "bob@elsewhere.test".into(),
                mailbox: None
            },
            Destination {
                address: "carol@remote.test".into(),
                mailbox: None
            },
        ])
    );
}

#[test]
fn alias_targets_that_reach_no_mailbox_are_config_errors() {
    let text = BASE.to_string()
        + r#""loop1@example.test" = ["loop2@example.test"]
"loop2@example.test" = ["loop1@example.test"]
"self@example.test" = ["self@example.test"]
"ghost@example.test" = ["alice", "nobody@example.test"]
"#;
    let errors = parse(&text, Path::new("/")).expect_err("dead aliases");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "aliases.\"ghost@example.test\"",
            "aliases.\"loop1@example.test\"",
            "aliases.\"loop2@example.test\"",
            "aliases.\"self@example.test\""
        ],
        "{errors:?}"
    );
    assert!(
        errors[0].message.contains("\"nobody@example.test\""),
        "{errors:?}"
    );
}

#[test]
fn every_error_names_its_key() {
    let bad = r#"
hostname = "bad host"
[[listener]]
address = "nowhere"
role = "bogus"
[local]
domains = ["bad_domain!"]
subaddress_separator = "ab"
[relay]
trusted_networks = ["10.0.0.0/33"]
[limits]
max_command_line = 100
command_timeout = "soon"
bare_lf = "maybe"
"#;
    let errors = parse(bad, Path::new("/")).expect_err("invalid");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "hostname",
        "listener[0].address",
        "listener[0].role",
        "local.domains[0]",
        "local.subaddress_separator",
        "relay.trusted_networks[0]",
        "limits.max_command_line",
        "limits.command_timeout",
        "limits.bare_lf",
    ] {
        assert!(keys.contains(&key), "missing error for {key}: {errors:?}");
    }
}

#[test]
fn unknown_keys_are_errors() {
    let errors =
        parse("[limits]\nmax_recipient = 5\n", Path::new("/")).expect_err("typo must fail");
    assert!(errors[0].message.contains("max_recipient"), "{errors:?}");
}

#[test]
fn trusted_networks_match_mapped_addresses() {
    let text = BASE.replace(
        "[aliases]",
        "[relay]\ntrusted_networks = [\"192.0.2.0/24\", \"::1\"]\n[aliases]",
    );
    let rt = parse(&text, Path::new("/")).expect("valid");
    assert!(rt.is_trusted("192.0.2.7".parse().unwrap()));
    assert!(rt.is_trusted("::ffff:192.0.2.7".parse().unwrap()));
    assert!(rt.is_trusted("::1".parse().unwrap()));
    assert!(!rt.is_trusted("127.0.0.1".parse().unwrap()));
}

#[test]
fn example_config_is_valid_and_complete() {
    let text = include_str!("../../../../tern.example.toml");
    let rt = parse(text, Path::new("/etc/tern")).expect("tern.example.toml validates");
    assert_eq!(rt.data_dir, Path::new("/etc/tern/tern-data"));
    assert_eq!(
        rt.resolve("robert", "example.test"),
        Resolution::Local(vec![local("robert@example.test", "bob")])
    );
    // Every key of the schema appears in the example, commented or not.
    for key in [
        "hostname",
        "data_dir",
        "address",
        "role",
        "domains",
        "subaddress_separator",
        "postmaster",
        "catch_all",
        "name",
        "addresses",
        "maildir",
        "trusted_networks",
        "max_command_line",
        "max_text_line",
        "max_message_size",
        "max_recipients",
        "max_errors",
        "max_rejected_recipients",
        "max_received_headers",
        "command_timeout",
        "data_timeout",
        "greeting_delay",
        "max_connections",
        "max_connections_per_ip",
        "min_free_space",
        "bare_lf",
        "dir",
        "segment_size",
        "draft_memory_limit",
        "commit_wait",
        "batch_size",
        "retry_initial",
        "retry_max",
        "give_up",
        "delay_notice",
        "nameservers",
        "timeout",
        "attempts",
        "relay",
        "relay_tls",
        "relay_username",
        "relay_password_file",
        "relay_auth_without_tls",
        "fallback_relay",
        "address_families",
        "mx_port",
        "tls",
        "tls_ca_file",
        "window_initial",
        "window_max",
        "max_recipients_per_job",
        "max_messages_per_connection",
        "connect_timeout",
        "dead_after",
        "discover",
        "signature_lifetime",
        "domain",
        "selector",
        "algorithm",
        "file",
        "level",
        "format",
        "certificates",
        "commit_wait",
        "plaintext_on_loopback",
        "received_client_address",
        "user",
        "group",
        "owner",
        "file_mode",
        "dir_mode",
    ] {
        assert!(
            text.contains(&format!("{key} =")),
            "tern.example.toml does not document {key}"
        );
    }
}

#[test]
fn type_errors_name_the_dotted_key() {
    let errors = parse(
        "hostname = \"h.test\"\n[limits]\nmax_errors = 3\nmax_message_size = \"big\"\n",
        Path::new("/"),
    )
    .expect_err("a string is not a size");
    assert_eq!(errors[0].key, "limits.max_message_size", "{errors:?}");
}

#[test]
fn empty_file_is_the_embedded_default() {
    let rt = parse("", Path::new("/srv")).expect("every key is optional");
    let listeners: Vec<(String, String)> = rt
        .listeners
        .iter()
        .map(|l| (l.address.to_string(), l.role.to_string()))
        .collect();
    assert_eq!(
        listeners,
        [
            ("127.0.0.1:2525", "mx"),
            ("127.0.0.1:5587", "submission"),
            ("127.0.0.1:5465", "smtps")
        ]
        .map(|(a, r)| (a.to_string(), r.to_string()))
    );
    assert_eq!(rt.data_dir, Path::new("/srv/tern-data"));
    assert_eq!(
        rt.resolve("me", "localhost"),
        Resolution::Local(vec![local("me@localhost", "me")])
    );
    assert_eq!(
        rt.resolve_postmaster(),
        Resolution::Local(vec![local("me@localhost", "me")])
    );
}

#[test]
fn sizes_and_durations_are_bounded() {
    let text = "[limits]\nmax_message_size = 0\ncommand_timeout = \"500000000000y\"\ngreeting_delay = \"1m\"\n\
[delivery]\nretry_max = \"30d\"\n";
    let errors = parse(text, Path::new("/")).expect_err("out of range");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "limits.max_message_size",
        "limits.command_timeout",
        "limits.greeting_delay",
        "delivery.retry_max",
    ] {
        assert!(keys.contains(&key), "missing {key}: {errors:?}");
    }
}

#[test]
fn session_limits_must_allow_at_least_one() {
    let errors = parse(
        "[limits]\nmax_errors = 0\nmax_rejected_recipients = 0\n",
        Path::new("/"),
    )
    .expect_err("a limit of 0 would close every session at its first error");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"limits.max_errors"), "{errors:?}");
    assert!(
        keys.contains(&"limits.max_rejected_recipients"),
        "{errors:?}"
    );
    let rt = parse("[limits]\nmax_rejected_recipients = 7\n", Path::new("/")).expect("valid");
    assert_eq!(rt.server_config().max_rejected_recipients, 7);
}

#[test]
fn a_log_level_that_would_silence_every_log_is_refused() {
    for bad in ["warning", "debg", "", "tern=verbose", "=info", "info,loud"] {
        let text = format!("[log]\nlevel = {bad:?}\n");
        let errors = parse(&text, Path::new("/")).expect_err(bad);
        assert!(
            errors.iter().any(|e| e.key == "log.level"),
            "{bad}: {errors:?}"
        );
    }
    for good in [
        "info",
        "WARN",
        "tern=debug",
        "warn,tern::queue=trace",
        "off",
    ] {
        let text = format!("[log]\nlevel = {good:?}\n");
        parse(&text, Path::new("/")).unwrap_or_else(|e| panic!("{good}: {e:?}"));
    }
}

#[test]
fn text_lines_are_unlimited_by_default_and_a_limit_is_at_least_1000() {
    assert_eq!(rt().limits.max_text_line, 0);
    assert_eq!(rt().server_config().max_text_line, 0);
    let set = parse("[limits]\nmax_text_line = 1000\n", Path::new("/")).expect("valid");
    assert_eq!(set.limits.max_text_line, 1000);
    assert_eq!(set.server_config().max_text_line, 1000);
    parse("[limits]\nmax_text_line = 0\n", Path::new("/")).expect("0 = no limit");
    let errors = parse("[limits]\nmax_text_line = 999\n", Path::new("/")).expect_err("too small");
    assert_eq!(errors[0].key, "limits.max_text_line", "{errors:?}");
    assert!(errors[0].message.contains("0 (no limit)"), "{errors:?}");
}

#[test]
fn numbers_far_past_anything_useful_are_refused_with_their_key() {
    let text = "[limits]\nmax_connections = 18446744073709551615\nmax_text_line = 18446744073709551615\n\
                max_received_headers = 0\n[spool]\nsegment_size = 1099511627776\n[delivery]\nbatch_size = 100000000\n";
    let errors = parse(text, Path::new("/")).expect_err("absurd values");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "limits.max_connections",
        "limits.max_text_line",
        "limits.max_received_headers",
        "spool.segment_size",
        "delivery.batch_size",
    ] {
        assert!(keys.contains(&key), "{key} not reported: {errors:?}");
    }
}

#[test]
fn outbound_keys_validate_with_their_key_named() {
    let rt = rt();
    assert_eq!(rt.delivery.give_up, Duration::from_secs(5 * 86400));
    assert_eq!(
        rt.delivery.delay_notice,
        Some(Duration::from_secs(4 * 3600))
    );
    assert_eq!(
        rt.outbound.tls,
        crate::deliver::smtp::TlsMode::Opportunistic
    );
    assert_eq!(
        rt.outbound.relay_tls,
        crate::deliver::smtp::TlsMode::Opportunistic
    );
    assert!(rt.outbound.routes.relay.is_none());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let text = format!(
        "{BASE}[route]\nrelay = \"[smtp.example.net]:587\"\nrelay_tls = \"verify\"\n\
         relay_username = \"u\"\nrelay_password_file = \"pw\"\n\
         [route.transports]\n\"example.test\" = \"lmtp:unix:/run/dovecot/lmtp\"\n\
         [delivery]\ndelay_notice = \"0s\"\n"
    );
    let rt = parse(&text, dir.path()).expect("valid");
    assert_eq!(rt.outbound.relay_tls, crate::deliver::smtp::TlsMode::Verify);
    let credentials = rt.outbound.relay_credentials.expect("credentials");
    assert_eq!(
        (credentials.username.as_str(), credentials.password.as_str()),
        ("u", "s3cret")
    );
    assert!(rt.outbound.routes.transport("example.test").is_some());
    assert_eq!(rt.delivery.delay_notice, None);

    let bad = format!(
        "{BASE}[dns]\nnameservers = [\"nowhere\"]\n[route]\nrelay = \"bogus:thing\"\n\
         relay_username = \"u\"\naddress_families = \"ipv5\"\n\
         [route.transports]\n\"-bad-\" = \"smtp.example.net\"\n\
         [outbound]\ntls = \"always\"\nwindow_initial = 9\nwindow_max = 3\n\
         [delivery]\ngive_up = \"1h\"\n"
    );
    let errors = parse(&bad, dir.path()).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "dns.nameservers[0]",
        "route.relay",
        "route.relay_username",
        "route.address_families",
        "route.transports.\"-bad-\"",
        "outbound.tls",
        "outbound.window_max",
        "delivery.delay_notice",
    ] {
        assert!(keys.contains(&key), "no error for {key}: {errors:?}");
    }
}

#[test]
fn metrics_are_off_by_default_and_on_loopback_in_the_embedded_default() {
    assert_eq!(rt().metrics, None);
    assert_eq!(parse("", Path::new("/srv")).unwrap().metrics, None);
    let embedded = embedded_default().expect("embedded default validates");
    let address = embedded.metrics.expect("embedded default serves metrics");
    assert!(address.ip().is_loopback());
    assert!(embedded.listeners.iter().all(|l| l.address != address));
    let on = parse(
        &format!("{BASE}\n[metrics]\naddress = \"[::1]:9100\"\n"),
        Path::new("/"),
    )
    .expect("valid");
    assert_eq!(on.metrics, Some("[::1]:9100".parse().unwrap()));
    let example = include_str!("../../../../tern.example.toml");
    assert!(example.contains("[metrics]\n") && example.contains("# address = \"127.0.0.1:"));
}

#[test]
fn a_bad_metrics_address_is_an_error_naming_the_key() {
    for (address, says) in [
        ("localhost:9100", "not an IP address and port"),
        ("127.0.0.1", "not an IP address and port"),
        ("127.0.0.1:2525", "also the address of listener 1"),
    ] {
        let text = format!(
            "{}\n[metrics]\naddress = \"{address}\"\n",
            BASE.replace("127.0.0.1:0", "127.0.0.1:2525")
        );
        let errors = parse(&text, Path::new("/")).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "metrics.address", "{errors:?}");
        assert!(errors[0].message.contains(says), "{errors:?}");
    }
    let errors = parse(
        &format!("{BASE}\n[metrics]\nadress = \"127.0.0.1:9100\"\n"),
        Path::new("/"),
    )
    .unwrap_err();
    assert!(errors[0].message.contains("adress"), "{errors:?}");
}

#[test]
fn accounts_that_do_not_exist_are_errors_naming_their_key() {
    let text = format!(
        "{BASE}[server]\nuser = \"no-such-user-tern\"\n[mailbox]\nowner = \"no-such-owner-tern\"\n\
         group = \"no-such-group-tern\"\n"
    )
    .replace(
        "name = \"bob\"",
        "name = \"bob\"\nowner = \"no-such-bob-tern\"",
    );
    let errors = parse(&text, Path::new("/etc/tern")).unwrap_err();
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for expected in [
        "server.user: no such user \"no-such-user-tern\"",
        "mailbox.owner: no such user \"no-such-owner-tern\"",
        "mailbox.group: no such group \"no-such-group-tern\"",
        "user[1].owner: no such user \"no-such-bob-tern\"",
    ] {
        // Each also names its line: "KEY: MESSAGE (line N)".
        assert!(
            shown
                .iter()
                .any(|e| e.starts_with(&format!("{expected} (line "))),
            "{expected} not in {shown:?}"
        );
    }
}

#[test]
fn server_user_and_mailbox_owners_resolve() {
    let text = format!(
        "{BASE}[server]\nuser = \"root\"\n[mailbox]\nowner = \"4000000\"\ngroup = \"0\"\n\
         file_mode = 0o640\ndir_mode = 0o750\n"
    )
    .replace("name = \"bob\"", "name = \"bob\"\nowner = \"root\"");
    let got = parse(&text, Path::new("/etc/tern")).expect("valid");
    let run_as = got.run_as.expect("server.user");
    assert_eq!((run_as.uid, run_as.gid), (0, 0));
    assert_eq!(run_as.groups.first(), Some(&0));
    let alice = got.users["alice"].access;
    assert_eq!(
        alice,
        MailboxAccess {
            owner: Some(4_000_000),
            group: Some(0),
            file_mode: 0o640,
            dir_mode: 0o750
        }
    );
    // bob's owner brings its own primary group; the modes stay [mailbox]'s.
    assert_eq!(got.users["bob"].access.owner, Some(0));
    assert_eq!(got.users["bob"].access.group, Some(0));
    assert_eq!(got.users["bob"].access.file_mode, 0o640);
    // Nothing configured: nothing changes hands.
    assert_eq!(rt().users["alice"].access, MailboxAccess::default());
    assert!(rt().run_as.is_none());
}

#[test]
fn mailbox_modes_and_lone_ids_are_checked() {
    let text = format!(
        "{BASE}[server]\ngroup = \"root\"\n[mailbox]\nowner = \"4000000\"\nfile_mode = 640\n\
         dir_mode = 0o600\n"
    );
    let errors = parse(&text, Path::new("/etc/tern")).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "server.group",
            "mailbox.file_mode",
            "mailbox.dir_mode",
            "mailbox.group"
        ],
        "{errors:?}"
    );
    assert!(errors[1].message.contains("0o1200"), "{}", errors[1]);
}
