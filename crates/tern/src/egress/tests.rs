//! The limits and the breaker on a simulated clock (milliseconds).

use super::*;

const MIN: Millis = 60_000;
const HOUR: Millis = 60 * MIN;

fn egress(limits: EgressLimits) -> (Egress, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let e = Egress::new(
        limits,
        Box::new(MemoryCounters::default()),
        None,
        Some(tx),
        Vec::new(),
    );
    (e, rx)
}

fn small() -> EgressLimits {
    EgressLimits {
        max_messages_per_hour: 3,
        max_recipients_per_hour: 5,
        max_new_recipients_per_day: 4,
        breaker_factor: 3,
        breaker_remote_rejects: 4,
        ..EgressLimits::default()
    }
}

const NONE: UserLimits = UserLimits {
    max_messages_per_hour: None,
    max_recipients_per_hour: None,
    max_new_recipients_per_day: None,
};

fn send(e: &Egress, user: &str, rcpts: &[&str], now: Millis) -> Result<(), Reply> {
    e.mail(user, &NONE, now)?;
    let mut accepted = Vec::new();
    let mut new = 0;
    for r in rcpts {
        let v = e.rcpt(user, &NONE, r, accepted.len() as u32, new, now)?;
        new += u32::from(v.new);
        accepted.push(r.to_string());
    }
    e.committed(user, &accepted, now);
    Ok(())
}

#[test]
fn messages_per_hour_answer_451_and_recover_as_the_window_slides() {
    let (e, _rx) = egress(small());
    for i in 0..3 {
        send(&e, "alice", &["bob@remote.test"], i * MIN).unwrap();
    }
    let refused = e.mail("alice", &NONE, 10 * MIN).unwrap_err();
    assert_eq!(refused.code, 451);
    assert!(refused.to_string().contains("4.7.1"), "{refused:?}");
    // Another user is not affected.
    assert!(e.mail("carol", &NONE, 10 * MIN).is_ok());
    // An hour after the first message, one slot is free again.
    assert!(e.mail("alice", &NONE, HOUR + 2 * MIN).is_ok());
    assert!(!e.is_held("alice"));
}

#[test]
fn recipients_per_hour_count_the_transaction_in_progress() {
    let (e, _rx) = egress(small());
    e.mail("alice", &NONE, 0).unwrap();
    for i in 0..5u32 {
        e.rcpt("alice", &NONE, "bob@remote.test", i, 0, 0).unwrap();
    }
    let refused = e
        .rcpt("alice", &NONE, "bob@remote.test", 5, 0, 0)
        .unwrap_err();
    assert_eq!(refused.code, 451);
    assert!(refused.lines.join(" ").contains("recipients per hour"));
}

#[test]
fn known_recipients_are_not_new_and_new_ones_are_limited_per_day() {
    let (e, _rx) = egress(EgressLimits {
        max_messages_per_hour: 100,
        max_recipients_per_hour: 100,
        ..small()
    });
    send(
        &e,
        "alice",
        &["a@r.test", "b@r.test", "c@r.test", "d@r.test"],
        0,
    )
    .unwrap();
    // Writing again to the same four is fine.
    send(&e, "alice", &["A@r.test", "b@r.test"], MIN).unwrap();
    let refused = send(&e, "alice", &["e@r.test"], 2 * MIN).unwrap_err();
    assert!(refused.lines.join(" ").contains("new recipients per day"));
    // A day later the earlier ones are no longer counted as new today.
    send(&e, "alice", &["e@r.test"], 25 * HOUR).unwrap();
}

#[test]
fn mail_that_stays_local_never_counts() {
    let (e, _rx) = egress(small());
    for i in 0..100 {
        e.mail("alice", &NONE, i).unwrap();
        e.committed("alice", &[], i);
    }
    assert!(!e.is_held("alice"));
    send(&e, "alice", &["bob@remote.test"], 200).unwrap();
}

#[test]
fn per_user_overrides_replace_the_defaults() {
    let (e, _rx) = egress(small());
    let generous = UserLimits {
        max_messages_per_hour: Some(10),
        ..NONE
    };
    for i in 0..5 {
        e.mail("bulk", &generous, i).unwrap();
        e.committed("bulk", &["x@r.test".to_string()], i);
    }
    assert!(e.mail("bulk", &generous, 10).is_ok());
}

#[test]
fn hammering_past_the_factor_trips_the_breaker_once() {
    let (e, mut rx) = egress(small());
    for i in 0..3 {
        send(&e, "mallory", &["v@r.test"], i).unwrap();
    }
    // Refused attempts still count toward the breaker: 3 x 3 = 9.
    for i in 3..8 {
        assert_eq!(e.mail("mallory", &NONE, i).unwrap_err().code, 451);
        assert!(!e.is_held("mallory"));
    }
    let refused = e.mail("mallory", &NONE, 9).unwrap_err();
    assert!(refused.lines.join(" ").contains("held"), "{refused:?}");
    assert!(e.is_held("Mallory"));
    assert_eq!(rx.try_recv().ok().as_deref(), Some("mallory"));
    // Stays held however long one waits, and trips only once.
    assert!(e.mail("mallory", &NONE, 48 * HOUR).is_err());
    assert!(
        e.rcpt("mallory", &NONE, "v@r.test", 0, 0, 48 * HOUR)
            .is_err()
    );
    assert!(rx.try_recv().is_err());
    // Release: submissions work again with fresh counters.
    assert!(e.release("mallory"));
    assert!(send(&e, "mallory", &["v@r.test"], 48 * HOUR).is_ok());
}

#[test]
fn remote_rejects_trip_the_breaker() {
    let (e, mut rx) = egress(small());
    for i in 0..3 {
        e.remote_reject("spammer", i * MIN);
    }
    assert!(!e.is_held("spammer"));
    e.remote_reject("spammer", 4 * MIN);
    assert!(e.is_held("spammer"));
    assert_eq!(rx.try_recv().ok().as_deref(), Some("spammer"));
}

#[test]
fn remote_rejects_spread_over_hours_do_not_trip() {
    let (e, _rx) = egress(small());
    for i in 0..20 {
        e.remote_reject("alice", i * HOUR);
    }
    assert!(!e.is_held("alice"));
}

#[test]
fn users_held_at_start_stay_held() {
    let e = Egress::new(
        small(),
        Box::new(MemoryCounters::default()),
        None,
        None,
        vec!["Dave".to_string()],
    );
    assert!(e.is_held("dave"));
    assert_eq!(e.mail("dave", &NONE, 0).unwrap_err().code, 451);
}

#[test]
fn memory_stays_bounded() {
    let c = MemoryCounters::default();
    for i in 0..100_000 {
        c.add("u", Counter::Messages, 1, i * 1000, HOUR);
    }
    let buckets = c.with("u", |u| u.series[&Counter::Messages].0.len());
    assert!(buckets <= BUCKETS as usize + 2, "{buckets}");
    let n = c.count("u", Counter::Messages, 100_000 * 1000, HOUR);
    // Exact to one bucket (a sixtieth of the window).
    assert!((3540..=3660).contains(&n), "{n}");
    for i in 0..(MAX_KNOWN_RECIPIENTS as i64 + 10) {
        c.remember("u", &format!("r{i}@x.test"), i);
    }
    let known = c.with("u", |u| u.known.len());
    assert!(known <= MAX_KNOWN_RECIPIENTS, "{known}");
    assert!(c.knows("u", "r10009@x.test", 10_010, HOUR));
}

#[test]
fn config_defaults_are_the_constants_and_the_example_documents_them() {
    let example = include_str!("../../../../tern.example.toml");
    let rt = crate::config::parse(example, std::path::Path::new("/nonexistent")).unwrap();
    assert_eq!(rt.egress, EgressLimits::default());
    let rt = crate::config::parse("", std::path::Path::new("/nonexistent")).unwrap();
    assert_eq!(rt.egress, EgressLimits::default());
    let rt = crate::config::parse(
        "[submission]\nmax_messages_per_hour = 2\nrate_window = \"10s\"\n",
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();
    assert_eq!(rt.egress.max_messages_per_hour, 2);
    assert_eq!(rt.egress.rate_window, Duration::from_secs(10));
    let errors = crate::config::parse(
        "[submission]\nbreaker_factor = 1\nmax_recipients_per_hour = 0\n",
        std::path::Path::new("/nonexistent"),
    )
    .unwrap_err();
    let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "submission.max_recipients_per_hour",
            "submission.breaker_factor"
        ]
    );
}
