//! Keys, key finding through the config, and the two commands.

use super::cli::{self, AlgorithmChoice};
use super::keys::{self, Algorithm, KeyError, KeyFile};
use super::testutil::{pem, runtime_with_keys, tags, txt_of};
use chrono::TimeZone;

#[test]
fn generated_keys_read_back_as_their_algorithm() {
    for algorithm in Algorithm::ALL {
        let text = pem(algorithm);
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(text.lines().all(|l| l.len() <= 64));
        let key = KeyFile::from_pem(text.as_bytes()).unwrap();
        assert_eq!(key.algorithm, algorithm);
        key.signing_key().unwrap();
        let txt = txt_of(text);
        let t = tags(txt.as_bytes());
        assert_eq!(t["v"], "DKIM1");
        assert_eq!(t["k"], algorithm.key_type());
        let public = mail_parser::decoders::base64::base64_decode(t["p"].as_bytes()).unwrap();
        match algorithm {
            // SubjectPublicKeyInfo of a 2048-bit key.
            Algorithm::RsaSha256 => {
                assert_eq!(public.len(), 294);
                assert!(
                    txt.starts_with(
                        "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"
                    )
                );
            }
            Algorithm::Ed25519Sha256 => assert_eq!(public.len(), 32),
        }
    }
    // The Debug form never shows the key.
    let key = KeyFile::from_pem(pem(Algorithm::RsaSha256).as_bytes()).unwrap();
    assert!(!format!("{key:?}").contains("MII"));
}

#[test]
fn pkcs1_rsa_keys_are_read_and_other_files_are_named_for_what_they_are() {
    // The generated PKCS#8 key rewritten as PKCS#1 ("BEGIN RSA PRIVATE
    // KEY", what `openssl genrsa -traditional` writes): PKCS#8 wraps the
    // PKCS#1 structure in an OCTET STRING after the algorithm identifier.
    let pkcs8 =
        rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem(Algorithm::RsaSha256).as_bytes())
            .unwrap();
    let der = pkcs8.secret_pkcs8_der();
    let inner = der
        .windows(4)
        .position(|w| w[0] == 0x04 && w[1] == 0x82)
        .map(|at| &der[at + 4..])
        .unwrap();
    let pkcs1 = keys::pem("RSA PRIVATE KEY", inner);
    let key = KeyFile::from_pem(pkcs1.as_bytes()).unwrap();
    assert_eq!(key.algorithm, Algorithm::RsaSha256);
    key.signing_key().unwrap();
    assert_eq!(
        key.dns_txt().unwrap(),
        txt_of(pem(Algorithm::RsaSha256)),
        "the same public key either way"
    );

    assert!(matches!(
        KeyFile::from_pem(b"hello"),
        Err(KeyError::NotPem(_))
    ));
    let cert = keys::pem("CERTIFICATE", b"whatever");
    assert!(matches!(
        KeyFile::from_pem(cert.as_bytes()),
        Err(KeyError::NotPem(_))
    ));
    let garbage = keys::pem("PRIVATE KEY", b"not DER at all");
    assert!(matches!(
        KeyFile::from_pem(garbage.as_bytes()),
        Err(KeyError::UnknownPkcs8)
    ));
    let ec = keys::pem("EC PRIVATE KEY", b"x");
    assert_eq!(
        KeyFile::from_pem(ec.as_bytes()).unwrap_err(),
        KeyError::EcKey
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.key");
    assert!(matches!(
        KeyFile::read(&missing),
        Err(KeyError::Unreadable(_))
    ));
    let file = dir.path().join("ed.key");
    std::fs::write(&file, pem(Algorithm::Ed25519Sha256)).unwrap();
    assert_eq!(
        KeyFile::read_as(&file, Some(Algorithm::RsaSha256)).unwrap_err(),
        KeyError::WrongAlgorithm {
            found: Algorithm::Ed25519Sha256,
            configured: Algorithm::RsaSha256
        }
    );
}

use rustls_pki_types::pem::PemObject as _;

#[test]
fn txt_strings_split_at_255_octets() {
    let short = keys::txt_strings("v=DKIM1; k=ed25519; p=abc");
    assert_eq!(short, "\"v=DKIM1; k=ed25519; p=abc\"");
    let long = "x".repeat(600);
    let split = keys::txt_strings(&long);
    let parts: Vec<&str> = split.split(' ').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0].len(), 257);
    assert_eq!(parts[1].len(), 257);
    assert_eq!(parts[2].len(), 92);
    assert_eq!(split.replace(['"', ' '], ""), long);
}

#[test]
fn selectors_default_to_the_month_with_an_algorithm_suffix() {
    let now = chrono::Utc.with_ymd_and_hms(2026, 3, 9, 12, 0, 0).unwrap();
    let names = |s: Option<&str>, c| {
        cli::selectors(s, c, now)
            .into_iter()
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(None, AlgorithmChoice::Both),
        ["tern202603-rsa", "tern202603-ed25519"]
    );
    assert_eq!(
        names(None, AlgorithmChoice::Ed25519),
        ["tern202603-ed25519"]
    );
    assert_eq!(names(Some("s1"), AlgorithmChoice::Rsa), ["s1"]);
    assert_eq!(
        names(Some("s1"), AlgorithmChoice::Both),
        ["s1-rsa", "s1-ed25519"]
    );
    for good in ["s1", "tern202603-rsa", "a.b", "2026"] {
        assert!(keys::valid_selector(good), "{good}");
    }
    for bad in ["", ".hidden", "a/b", "../x", "a..b", "-a", "sp ace", "ünï"] {
        assert!(!keys::valid_selector(bad), "{bad}");
    }
}

#[test]
fn keys_are_found_for_local_domains_and_named_keys_take_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = pem(Algorithm::RsaSha256);
    let ed = pem(Algorithm::Ed25519Sha256);
    // Not keys: another extension, a hidden temporary file, a domain that
    // is not local.
    let data = dir.path();
    for (path, text) in [
        ("dkim/example.test/old.key.old", "junk"),
        ("dkim/example.test/.new.key.tmp", "junk"),
        ("dkim/example.test/README", "junk"),
        ("dkim/elsewhere.test/s1.key", "junk"),
    ] {
        let path = data.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let outside = data.join("outside.pem");
    std::fs::write(&outside, ed).unwrap();
    let named = format!(
        "[[dkim.key]]\ndomain = \"Example.Test\"\nselector = \"b\"\nalgorithm = \"ed25519-sha256\"\nfile = {:?}\n\
         [[dkim.key]]\ndomain = \"partner.example\"\nselector = \"p\"\nfile = {:?}\n",
        outside.display().to_string(),
        outside.display().to_string()
    );
    let runtime = runtime_with_keys(
        data,
        &[
            ("example.test", "a", rsa),
            ("example.test", "b", rsa),
            ("other.test", "c", ed),
        ],
        &named,
    )
    .expect("valid");
    let found: Vec<(&str, &str, Algorithm, &str)> = runtime
        .dkim
        .keys
        .iter()
        .map(|k| {
            (
                k.domain.as_str(),
                k.selector.as_str(),
                k.algorithm,
                k.config_key.as_str(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("example.test", "b", Algorithm::Ed25519Sha256, "dkim.key[0]"),
            (
                "partner.example",
                "p",
                Algorithm::Ed25519Sha256,
                "dkim.key[1]"
            ),
            ("example.test", "a", Algorithm::RsaSha256, "dkim.dir"),
            ("other.test", "c", Algorithm::Ed25519Sha256, "dkim.dir"),
        ]
    );
    assert_eq!(runtime.dkim.keys_for("EXAMPLE.test").count(), 2);
    assert_eq!(runtime.dkim.dir, data.join("dkim"));
    assert_eq!(runtime.dkim.signature_lifetime, None);

    // discover = false: only the named keys.
    let off = runtime_with_keys(data, &[], &format!("[dkim]\ndiscover = false\n{named}")).unwrap();
    assert_eq!(off.dkim.keys.len(), 2);
}

#[test]
fn config_errors_name_the_key_its_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let rsa_file = data.join("rsa.pem");
    std::fs::write(&rsa_file, pem(Algorithm::RsaSha256)).unwrap();
    let named = format!(
        "[dkim]\nsignature_lifetime = \"1h\"\n\
         [[dkim.key]]\ndomain = \"example.test\"\nselector = \"x\"\nalgorithm = \"ed25519-sha256\"\nfile = {:?}\n\
         [[dkim.key]]\ndomain = \"example.test\"\nselector = \"gone\"\n\
         [[dkim.key]]\ndomain = \"not a domain\"\nselector = \"y\"\n\
         [[dkim.key]]\ndomain = \"example.test\"\nselector = \"../y\"\n\
         [[dkim.key]]\ndomain = \"example.test\"\nselector = \"z\"\nalgorithm = \"rsa\"\n",
        rsa_file.display().to_string()
    );
    let errors = runtime_with_keys(
        data,
        &[
            (
                "example.test",
                "bad",
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ),
            ("example.test", "bad name", "x"),
        ],
        &named,
    )
    .unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let has = |key: &str, parts: &[&str]| {
        assert!(
            text.iter()
                .any(|t| t.starts_with(&format!("{key}: ")) && parts.iter().all(|p| t.contains(p))),
            "no {key} error with {parts:?} in {text:#?}"
        )
    };
    has("dkim.signature_lifetime", &["at least 1 day"]);
    has(
        "dkim.key[0].file",
        &[
            "DKIM key x for example.test",
            "rsa.pem",
            "holds an rsa-sha256 key",
            "configured as ed25519-sha256",
        ],
    );
    has(
        "dkim.key[1].file",
        &[
            "DKIM key gone for example.test",
            "dkim/example.test/gone.key",
            "cannot read",
        ],
    );
    has("dkim.key[2].domain", &["not a domain"]);
    has("dkim.key[3].selector", &["../y"]);
    has("dkim.key[4].algorithm", &["\"rsa\""]);
    has(
        "dkim.dir",
        &[
            "DKIM key bad for example.test",
            "bad.key",
            "neither RSA nor Ed25519",
        ],
    );
    has("dkim.dir", &["bad name.key", "not a selector name"]);
    assert_eq!(text.len(), 8, "{text:#?}");
}

#[test]
fn generate_writes_private_files_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_with_keys(dir.path(), &[], "").unwrap();
    let now = chrono::Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap();
    let made = cli::generate(
        &runtime,
        "Example.Test.",
        None,
        AlgorithmChoice::Both,
        false,
        now,
    )
    .unwrap();
    assert_eq!(made.files.len(), 2);
    let folder = dir.path().join("dkim/example.test");
    for path in &made.files {
        assert_eq!(path.parent().unwrap(), folder);
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    for folder in [dir.path().join("dkim"), folder.clone()] {
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", folder.display());
    }
    let lines: Vec<&str> = made
        .records
        .lines()
        .filter(|l| !l.starts_with(';'))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].starts_with("tern202612-rsa._domainkey.example.test. IN TXT \"v=DKIM1; k=rsa; p="),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[0].matches('"').count(),
        4,
        "two strings: {}",
        lines[0]
    );
    assert!(lines[1].starts_with(
        "tern202612-ed25519._domainkey.example.test. IN TXT \"v=DKIM1; k=ed25519; p="
    ));
    assert!(
        !folder.read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );

    // The next start finds them: the config now has both keys.
    let again = runtime_with_keys(dir.path(), &[], "").unwrap();
    assert_eq!(again.dkim.keys_for("example.test").count(), 2);
    // The record printed is the one of the key on disk.
    let rsa = again
        .dkim
        .keys_for("example.test")
        .find(|k| k.algorithm == Algorithm::RsaSha256)
        .unwrap();
    let on_disk = KeyFile::read(&rsa.path).unwrap();
    assert!(
        lines[0]
            .replace("\" \"", "")
            .contains(&on_disk.public_key_base64().unwrap())
    );

    // No overwrite without --force, and nothing written when refused.
    let before = std::fs::read(&made.files[0]).unwrap();
    let refused = cli::generate(
        &again,
        "example.test",
        None,
        AlgorithmChoice::Both,
        false,
        now,
    )
    .unwrap_err();
    assert!(refused.contains("tern202612-rsa.key exists"), "{refused}");
    assert_eq!(std::fs::read(&made.files[0]).unwrap(), before);
    let forced = cli::generate(
        &again,
        "example.test",
        None,
        AlgorithmChoice::Rsa,
        true,
        now,
    )
    .unwrap();
    assert_eq!(forced.files, [made.files[0].clone()]);
    assert_ne!(std::fs::read(&made.files[0]).unwrap(), before);
    let mode = std::fs::metadata(&made.files[0])
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // A non-local domain: written, with a note that it is not used yet.
    let remote = cli::generate(
        &again,
        "partner.example",
        Some("p1"),
        AlgorithmChoice::Ed25519,
        false,
        now,
    )
    .unwrap();
    assert!(
        remote
            .notes
            .iter()
            .any(|n| n.contains("not one of local.domains")),
        "{:?}",
        remote.notes
    );
    assert!(
        cli::generate(
            &again,
            "bad domain",
            None,
            AlgorithmChoice::Both,
            false,
            now
        )
        .is_err()
    );
    assert!(
        cli::generate(
            &again,
            "example.test",
            Some("a/b"),
            AlgorithmChoice::Rsa,
            false,
            now
        )
        .is_err()
    );
}

#[test]
fn dns_records_lists_every_record_with_the_dkim_keys_found() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_with_keys(
        dir.path(),
        &[
            ("example.test", "r1", pem(Algorithm::RsaSha256)),
            ("example.test", "e1", pem(Algorithm::Ed25519Sha256)),
        ],
        "",
    )
    .unwrap();
    let now = chrono::Utc.with_ymd_and_hms(2026, 12, 6, 1, 2, 3).unwrap();
    let (text, notes) = cli::dns_records(&runtime, "example.test", now).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    let records: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.is_empty())
        .collect();
    assert_eq!(
        records
            .iter()
            .map(|r| r.split(" IN ").next().unwrap())
            .collect::<Vec<_>>(),
        [
            "example.test.",
            "example.test.",
            "e1._domainkey.example.test.",
            "r1._domainkey.example.test.",
            "_dmarc.example.test.",
            "_mta-sts.example.test.",
            "_smtp._tls.example.test.",
        ]
    );
    assert_eq!(records[0], "example.test. IN MX 10 mx.example.test.");
    assert_eq!(records[1], "example.test. IN TXT \"v=spf1 mx -all\"");
    assert!(records[2].contains(&txt_of(pem(Algorithm::Ed25519Sha256))));
    assert!(records[4].contains("v=DMARC1; p=none; rua=mailto:"));
    assert_eq!(
        records[5],
        "_mta-sts.example.test. IN TXT \"v=STSv1; id=20261206010203\""
    );
    assert!(records[6].contains("v=TLSRPTv1; rua=mailto:"));
    assert_eq!(text.matches("; PLACEHOLDER").count(), 3);
    assert!(text.contains(";   mx: mx.example.test"));

    let (text, notes) = cli::dns_records(&runtime, "unknown.example", now).unwrap();
    assert!(text.contains("tern dkim generate unknown.example"));
    assert!(notes.iter().any(|n| n.contains("not one of local.domains")));
}

#[test]
fn generate_run_as_root_gives_the_keys_to_the_owner_of_the_data_folder() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return; // only root can hand files to another user
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let nobody = 65534;
    std::os::unix::fs::chown(&data, Some(nobody), Some(nobody)).unwrap();
    let runtime = runtime_with_keys(&data, &[], "").unwrap();
    let now = chrono::Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap();
    let made = cli::generate(
        &runtime,
        "example.test",
        None,
        AlgorithmChoice::Ed25519,
        false,
        now,
    )
    .unwrap();
    for path in [
        data.join("dkim"),
        data.join("dkim/example.test"),
        made.files[0].clone(),
    ] {
        assert_eq!(
            std::fs::metadata(&path).unwrap().uid(),
            nobody,
            "{}",
            path.display()
        );
    }
}
