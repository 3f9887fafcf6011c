use super::*;

const SHA512_PASSWORD: &str = "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/";
const SHA256_PASSWORD: &str = "$5$saltsalt$gOjOtoMpVhru2uyjeJSEc/JaLQWOXMNmlOnj6T4AtC.";
const SHA512_PENCIL_ROUNDS: &str = "$6$rounds=5000$saltsalt$rD9fW1BwIrjB90WCgCTdIQc3phTBhf04I6Iw/XlgKD9E9aEbzqGZipjiFxGo/4wWXDA6jV6/vZO.kKdDSfUJb0";

#[test]
fn argon2id_hash_verifies_and_carries_its_parameters() {
    let hash = hash_secret("correct horse", HashParams::CHEAPEST).unwrap();
    assert!(
        hash.as_str().starts_with("$argon2id$v=19$m=8,t=1,p=1$"),
        "{}",
        hash.as_str()
    );
    assert!(hash.verify("correct horse"));
    assert!(!hash.verify("correct horse "));
    assert_eq!(StoredHash::parse(hash.as_str()).unwrap(), hash);
    // Verification honours the parameters in the string, not the defaults.
    let other = hash_secret(
        "pw",
        HashParams {
            m_kib: 64,
            t_cost: 2,
            ..HashParams::CHEAPEST
        },
    )
    .unwrap();
    assert!(other.as_str().contains("m=64,t=2,p=1"));
    assert!(other.verify("pw"));
    // Debug shows no hash.
    assert!(!format!("{hash:?}").contains("argon2id$"));
}

#[test]
fn sha_crypt_hashes_from_dovecot_verify() {
    // Made with `openssl passwd -6 -salt saltsalt password` (and -5).
    for text in [SHA512_PASSWORD, SHA256_PASSWORD] {
        let hash = StoredHash::parse(text).unwrap();
        assert_eq!(hash.scheme(), Scheme::ShaCrypt);
        assert!(hash.verify("password"), "{text}");
        assert!(!hash.verify("Password"), "{text}");
    }
    let hash = StoredHash::parse(SHA512_PENCIL_ROUNDS).unwrap();
    assert!(hash.verify("pencil"));
}

#[test]
fn stored_hashes_are_bounded_and_recognised() {
    for bad in [
        "plaintext",
        "{SHA512-CRYPT}$6$x$y",
        "$1$saltsalt$abcdefghijklmnopqrstuv",
        "$argon2id$v=19$m=2000000,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=8,t=100,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=8,t=1,p=1",
        "$6$rounds=2000000$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/",
        "$6$saltsalt",
        "$6$salt$short",
    ] {
        assert!(StoredHash::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn scram_keys_follow_saslprep() {
    let salt = ScramSalt::random(MIN_SCRAM_ITERATIONS);
    // RFC 4013: soft hyphen maps to nothing, so both spellings give one key.
    assert_eq!(scram_keys("I\u{00AD}X", &salt), scram_keys("IX", &salt));
    assert_ne!(scram_keys("IX", &salt), scram_keys("IY", &salt));
    // Prohibited (a control character): no SCRAM keys for that secret.
    assert_eq!(scram_keys("bell\u{0007}", &salt), None);
    assert!(check_scram_iterations(4095).is_err());
    assert!(check_scram_iterations(4096).is_ok());
}

#[test]
fn app_passwords_have_an_id_and_80_random_bits() {
    let a = generate_app_password();
    let b = generate_app_password();
    assert_ne!(a, b);
    assert_eq!(a.len(), 24, "{a}");
    assert_eq!(app_password_id(&a), Some(&a[..4]));
    assert!(a.bytes().all(|c| c == b'-' || APP_ALPHABET.contains(&c)));
    assert_eq!(app_password_id("abcd-efgh-ijkm-npqr-stuv"), Some("abcd"));
    assert_eq!(app_password_id("my long password"), None);
    assert_eq!(app_password_id("abcd-efgh-ijkm-npqr-stu0"), None);
    assert_eq!(app_password_id("abcd-efgh-ijkm-npqr"), None);
}

#[test]
fn secret_debug_is_masked() {
    assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
}
