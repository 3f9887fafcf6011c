use super::*;
use crate::auth::sasl::Mechanism;
use crate::auth::store::{Held, Users};
use crate::auth::testutil::{Fixture, add_app_password, settings, user, write_users};
use crate::auth::{HashParams, LoginLimits};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

fn attempt(ip: &str) -> Attempt {
    Attempt {
        client_ip: ip.parse().unwrap(),
        service: Service::Submission,
        mechanism: Mechanism::Plain,
    }
}

async fn login(f: &Fixture, name: &str, password: &str, ip: &str) -> LoginOutcome {
    f.accounts
        .verify_password(name, &Secret::new(password), &attempt(ip))
        .await
}

fn is_success(o: &LoginOutcome) -> bool {
    matches!(o, LoginOutcome::Success(_))
}

#[tokio::test]
async fn right_wrong_and_unknown_each_cost_one_hash() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    let ok = login(&f, "Alice", "correct horse", "192.0.2.1").await;
    let LoginOutcome::Success(u) = ok else {
        panic!("{ok:?}")
    };
    assert_eq!((u.name.as_str(), &u.via), ("alice", &Via::Password));
    assert_eq!(f.accounts.hashes_computed(), 1);
    f.advance_secs(61);
    assert_eq!(
        login(&f, "alice", "wrong horse", "198.51.100.1").await,
        LoginOutcome::Invalid
    );
    assert_eq!(f.accounts.hashes_computed(), 2);
    // An unknown user is checked against the decoy: same cost, same answer.
    assert_eq!(
        login(&f, "mallory", "correct horse", "198.51.100.1").await,
        LoginOutcome::Invalid
    );
    assert_eq!(f.accounts.hashes_computed(), 3);
}

#[tokio::test]
async fn cached_logins_cost_no_hash_until_expiry_or_change() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    for _ in 0..500 {
        assert!(is_success(
            &login(&f, "alice", "correct horse", "192.0.2.1").await
        ));
    }
    assert_eq!(f.accounts.hashes_computed(), 1, "500 logins, one hash");
    f.advance_secs(10 * 60 + 1);
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.1").await
    ));
    assert_eq!(f.accounts.hashes_computed(), 2, "expired after cache_ttl");
    // A new password: the cached pair is dead at once.
    write_users(&f.path, vec![user("alice", "new battery")]);
    f.reload();
    assert_eq!(
        login(&f, "alice", "correct horse", "192.0.2.1").await,
        LoginOutcome::Invalid
    );
    assert!(is_success(
        &login(&f, "alice", "new battery", "192.0.2.1").await
    ));
    assert_eq!(f.accounts.hashes_computed(), 4);
}

#[tokio::test]
async fn a_repeated_wrong_password_is_one_hash_and_one_failure() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    // The owner's stale phone, from a network that logged in before.
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.1").await
    ));
    for _ in 0..50 {
        assert_eq!(
            login(&f, "alice", "old password", "192.0.2.1").await,
            LoginOutcome::Invalid
        );
    }
    assert_eq!(f.accounts.hashes_computed(), 2);
    // One failure counted, not 50: the IP is not locked.
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.1").await
    ));
    // From strangers: once the slot is free, the repeat is answered from
    // the cache (no second hash) and frees the slot's waiters at once.
    assert_eq!(
        login(&f, "bob", "guess", "198.51.100.1").await,
        LoginOutcome::Invalid
    );
    f.advance_secs(61);
    assert_eq!(
        login(&f, "bob", "guess", "198.51.100.2").await,
        LoginOutcome::Invalid
    );
    assert_eq!(f.accounts.hashes_computed(), 3);
    let started = std::time::Instant::now();
    assert_eq!(
        login(&f, "bob", "other", "198.51.100.3").await,
        LoginOutcome::AccountThrottled
    );
    assert!(
        started.elapsed() < BUSY_ACCOUNT_WAIT / 2,
        "did not wait on a concluded attempt"
    );
}

#[tokio::test]
async fn limits_refuse_before_any_hash() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    // Five different wrong guesses from one IP on five accounts.
    for (i, name) in ["a1", "a2", "a3", "a4", "a5"].iter().enumerate() {
        assert_eq!(
            login(&f, name, &format!("guess{i}"), "192.0.2.66").await,
            LoginOutcome::Invalid
        );
    }
    assert_eq!(f.accounts.hashes_computed(), 5);
    let refused = login(&f, "alice", "correct horse", "192.0.2.66").await;
    assert_eq!(refused, LoginOutcome::ClientLocked);
    assert_eq!(refused.reply().code, 421);
    assert!(refused.reply().disconnect);
    assert_eq!(
        f.accounts.hashes_computed(),
        5,
        "no hash for a locked client"
    );
    // Neighbours in the /24 are not locked by one IP's five failures.
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.67").await
    ));
    f.advance_secs(15 * 60 + 1);
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.66").await
    ));
}

#[tokio::test]
async fn account_takes_one_attempt_per_minute_from_strangers() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    assert_eq!(
        login(&f, "alice", "guess1", "192.0.2.1").await,
        LoginOutcome::Invalid
    );
    let throttled = login(&f, "alice", "guess2", "198.51.100.1").await;
    assert_eq!(throttled, LoginOutcome::AccountThrottled);
    assert_eq!(
        (throttled.reply().code, throttled.reply().enhanced),
        (454, "4.7.0")
    );
    // Same for a right password from a stranger during that minute, and
    // for an invented user: throttling tells nothing about who exists.
    assert_eq!(
        login(&f, "alice", "correct horse", "203.0.113.1").await,
        LoginOutcome::AccountThrottled
    );
    assert_eq!(
        login(&f, "nobody", "guess1", "192.0.2.1").await,
        LoginOutcome::Invalid
    );
    assert_eq!(
        login(&f, "nobody", "guess2", "198.51.100.1").await,
        LoginOutcome::AccountThrottled
    );
    assert_eq!(f.accounts.hashes_computed(), 2);
    f.advance_secs(61);
    assert!(is_success(
        &login(&f, "alice", "correct horse", "203.0.113.1").await
    ));
}

#[tokio::test]
async fn parallel_first_logins_of_one_client_all_succeed() {
    // A mail client opening three connections at once from a new network:
    // the first holds the account's slot, the others wait for its verdict
    // and are then answered from the cache.
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    let (a, b, c) = tokio::join!(
        login(&f, "alice", "correct horse", "192.0.2.1"),
        login(&f, "alice", "correct horse", "192.0.2.2"),
        login(&f, "alice", "correct horse", "192.0.2.3"),
    );
    assert!(
        is_success(&a) && is_success(&b) && is_success(&c),
        "{a:?} {b:?} {c:?}"
    );
    assert_eq!(f.accounts.hashes_computed(), 1);
    // An attacker's parallel guesses: the first fails, the others are refused.
    f.advance_secs(61);
    let (a, b) = tokio::join!(
        login(&f, "alice", "guess1", "203.0.113.1"),
        login(&f, "alice", "guess2", "203.0.113.2"),
    );
    assert_eq!(
        (a, b),
        (LoginOutcome::Invalid, LoginOutcome::AccountThrottled)
    );
    assert_eq!(f.accounts.hashes_computed(), 2);
}

#[tokio::test]
async fn app_passwords_are_for_submission_only_and_revocable() {
    let mut alice = user("alice", "correct horse");
    let phone = add_app_password(&mut alice, "phone");
    let laptop = add_app_password(&mut alice, "laptop");
    add_app_password(&mut alice, "tablet");
    let f = Fixture::new(vec![alice]);
    let ok = login(&f, "alice", &phone, "192.0.2.1").await;
    let LoginOutcome::Success(u) = ok else {
        panic!("{ok:?}")
    };
    assert_eq!(u.via, Via::AppPassword("phone".into()));
    assert_eq!(
        f.accounts.hashes_computed(),
        1,
        "found by id: one hash, not one per app password"
    );
    let mailbox = Attempt {
        service: Service::Mailbox,
        ..attempt("192.0.2.1")
    };
    let secret = Secret::new(laptop.clone());
    assert_eq!(
        f.accounts.verify_password("alice", &secret, &mailbox).await,
        LoginOutcome::Invalid
    );
    // Cached for submission, still refused elsewhere.
    let secret = Secret::new(phone.clone());
    assert_eq!(
        f.accounts.verify_password("alice", &secret, &mailbox).await,
        LoginOutcome::Invalid
    );
    assert!(is_success(&login(&f, "alice", &laptop, "192.0.2.1").await));
    // Revoked: refused within a reload, cache or not.
    Users::edit(&f.path, |users| {
        let mut u = users.clone_user("alice").unwrap();
        u.app_passwords.retain(|a| a.label != "laptop");
        users.put(u);
        Ok(())
    })
    .unwrap()
    .unwrap();
    f.reload();
    assert_eq!(
        login(&f, "alice", &laptop, "192.0.2.1").await,
        LoginOutcome::Invalid
    );
    assert!(is_success(&login(&f, "alice", &phone, "192.0.2.1").await));
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.1").await
    ));
}

#[tokio::test]
async fn held_accounts_and_imported_hashes() {
    let mut alice = user("alice", "correct horse");
    alice.held = Some(Held {
        reason: "spam burst".into(),
        since: "2026-12-07T10:00:00Z".into(),
    });
    let mut bob = crate::auth::store::UserRecord::new("bob");
    bob.password = Some(
        StoredHash::parse("$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/").unwrap(),
    );
    let f = Fixture::new(vec![alice, bob]);
    let held = login(&f, "alice", "correct horse", "192.0.2.1").await;
    assert_eq!(held, LoginOutcome::Held);
    assert_eq!(held.reply().code, 454);
    // Only the right password learns about the hold.
    f.advance_secs(61);
    assert_eq!(
        login(&f, "alice", "wrong", "198.51.100.1").await,
        LoginOutcome::Invalid
    );
    // An imported SHA512-CRYPT hash works with PLAIN.
    assert!(is_success(&login(&f, "bob", "password", "192.0.2.1").await));
}

#[tokio::test]
async fn password_spraying_costs_at_most_one_hash_per_address_per_minute() {
    // 1,000 addresses (half real) x 36 passwords (6 a minute), every attempt from a new
    // IPv6 /64, 6 minutes: the attacker's best case against the counters.
    let real: Vec<_> = (0..500)
        .map(|i| user(&format!("user{i}"), "s3cret-pw"))
        .collect();
    let f = Fixture::new(real);
    let addresses: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
    let mut per_minute: HashMap<(usize, u64), u64> = HashMap::new();
    let mut client = 0u32;
    for minute in 0..6u64 {
        for round in 0..6 {
            for (a, name) in addresses.iter().enumerate() {
                client += 1;
                let ip = IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    (client >> 16) as u16,
                    client as u16,
                    0,
                    0,
                    0,
                    1,
                ));
                let before = f.accounts.hashes_computed();
                let outcome = f
                    .accounts
                    .verify_password(
                        name,
                        &Secret::new(format!("Summer2026!{minute}{round}")),
                        &Attempt {
                            client_ip: ip,
                            ..attempt("192.0.2.1")
                        },
                    )
                    .await;
                assert!(!is_success(&outcome));
                *per_minute.entry((a, minute)).or_default() +=
                    f.accounts.hashes_computed() - before;
            }
            f.advance_secs(10);
        }
    }
    let worst = per_minute.values().max().copied().unwrap_or(0);
    let total = f.accounts.hashes_computed();
    println!(
        "spraying: 36,000 attempts on 1,000 addresses over 6 minutes: {total} hashes, at most {worst} per address per minute"
    );
    assert!(worst <= 1, "{worst} hashes for one address in one minute");
    assert!(total <= 6 * 1000);
}

#[tokio::test]
async fn spraying_does_not_lock_the_owner_out() {
    let f = Fixture::new(vec![user("alice", "correct horse")]);
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.1").await
    ));
    // Ten strangers' guesses, a minute apart: the account locks.
    for i in 0..10u64 {
        f.advance_secs(61);
        let ip = format!("203.0.{i}.1");
        assert_eq!(
            login(&f, "alice", &format!("guess{i}"), &ip).await,
            LoginOutcome::Invalid
        );
    }
    f.advance_secs(61);
    // The account is locked for strangers, not for its owner's network.
    assert_eq!(
        login(&f, "alice", "correct horse", "203.0.200.1").await,
        LoginOutcome::AccountThrottled
    );
    assert!(is_success(
        &login(&f, "alice", "correct horse", "192.0.2.7").await
    ));
}

#[tokio::test]
async fn hashing_is_capped_and_survives_a_storm() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.hash_concurrency = 1;
    s.hash_params = HashParams {
        m_kib: 256,
        ..HashParams::CHEAPEST
    };
    s.limits = LoginLimits {
        max_failures_per_ip: 10_000,
        max_failures_per_network: 10_000,
        ..LoginLimits::default()
    };
    write_users(&s.users_file, vec![user("alice", "correct horse")]);
    let accounts = Arc::new(
        Accounts::build(
            &s,
            Arc::new(MemoryCounters::new(s.limits.clone())),
            Clock::System,
        )
        .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..40 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let a = Attempt {
                client_ip: format!("192.0.2.{i}").parse().unwrap(),
                ..attempt("192.0.2.1")
            };
            accounts
                .verify_password(&format!("u{i}"), &Secret::new("x"), &a)
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), LoginOutcome::Invalid);
    }
    assert_eq!(accounts.hashes_computed(), 40);
    assert_eq!(accounts.hash_slots.available_permits(), 1);
}

/// Numbers for the report (`cargo test -p tern --lib auth::guard::tests::measure -- --ignored --nocapture`;
/// in a debug build the hash crates are optimised, the rest is not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.hash_params = HashParams::DEFAULT;
    s.hash_concurrency = 2;
    let mut alice = crate::auth::store::UserRecord::new("alice");
    alice.password = Some(secret::hash_secret("correct horse", HashParams::DEFAULT).unwrap());
    write_users(&s.users_file, vec![alice]);
    let accounts = Arc::new(
        Accounts::build(
            &s,
            Arc::new(MemoryCounters::new(s.limits.clone())),
            Clock::System,
        )
        .unwrap(),
    );
    let hash = secret::hash_secret("x", HashParams::DEFAULT).unwrap();
    let t = Instant::now();
    for _ in 0..20 {
        assert!(hash.verify("x"));
    }
    println!(
        "argon2id m=19456 t=2 p=1 verify: {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0 / 20.0
    );
    let a = attempt("192.0.2.1");
    let t = Instant::now();
    let n = 20_000;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 2 {
                let o = accounts
                    .verify_password("alice", &Secret::new("correct horse"), &a)
                    .await;
                assert!(matches!(o, LoginOutcome::Success(_)));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "repeated logins of one client: {n} in {secs:.2} s = {:.0}/s on 2 workers, {} hash(es)",
        f64::from(n) / secs,
        accounts.hashes_computed()
    );
    // Logins that each need a hash (first logins, all different users).
    let before = accounts.hashes_computed();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let a = Attempt {
                client_ip: format!("192.0.{i}.1").parse().unwrap(),
                ..attempt("192.0.2.1")
            };
            accounts
                .verify_password(&format!("user{i}"), &Secret::new("x"), &a)
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), LoginOutcome::Invalid);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "uncached logins: {} hashes in {secs:.2} s = {:.0}/s with hash_concurrency 2",
        accounts.hashes_computed() - before,
        100.0 / secs
    );
}
