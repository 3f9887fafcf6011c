//! Scheduler tests: examples with a simulated clock, real-world replies for
//! `classify`, and property tests that drive the scheduler with random
//! results, holds, deletions and flushes.
use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

const SEC: Millis = 1000;
const MIN: Millis = 60 * SEC;
const T0: Millis = 1_800_000_000_000;

fn rcpt(i: usize, dest: &str, due: Millis) -> NewRecipient {
    NewRecipient {
        rcpt: i,
        destination: Destination::from(dest),
        attempts: 0,
        due,
        last_reply: None,
    }
}

fn dest<'a>(s: &'a Scheduler, name: &str) -> &'a Dest {
    &s.dests[s.dest_ids[&Destination::from(name)]]
}

fn report(job: &Job, result: RcptResult) -> JobReport {
    JobReport {
        connection: Connection::Established,
        recipients: job
            .recipients
            .iter()
            .map(|&i| (i, result.clone()))
            .collect(),
    }
}

fn delivered(job: &Job) -> JobReport {
    report(job, RcptResult::Delivered)
}

fn deferred(job: &Job, class: ReplyClass) -> JobReport {
    let reply = match class {
        ReplyClass::Throttled => "451 4.7.650 temporarily rate limited",
        _ => "450 4.2.0 mailbox busy",
    };
    report(
        job,
        RcptResult::Deferred {
            class,
            reply: reply.into(),
        },
    )
}

fn connect_failed() -> JobReport {
    JobReport {
        connection: Connection::Failed {
            reason: "connection refused".into(),
        },
        recipients: Vec::new(),
    }
}

/// `n` single-recipient messages to `to`, ids starting at `first`.
fn add_many(s: &mut Scheduler, first: u64, n: u64, to: &str, now: Millis) {
    for id in first..first + n {
        s.add(MsgId(id), now, [rcpt(0, to, now)], now);
    }
}

// ---------------------------------------------------------------- classify

#[test]
fn classify_real_world_replies() {
    use ReplyClass::*;
    let cases: &[(u16, &str, &str, ReplyClass)] = &[
        (
            421,
            "4.7.28",
            "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail \
             originating from your IP address. To protect our users from spam, mail sent from \
             your IP address has been temporarily rate limited.",
            Throttled,
        ),
        (
            421,
            "4.7.0",
            "Try again later, closing connection. (EHLO) d2e1a72fcca58-7a2b1b0f2c4si123456b3a.64 - gsmtp",
            Throttled,
        ),
        (
            450,
            "4.7.0",
            "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail. \
             Please try again later.",
            Throttled,
        ),
        (
            451,
            "4.7.650",
            "The mail server [192.0.2.1] has been temporarily rate limited due to IP \
             reputation. For e-mail delivery information, see https://postmaster.live.com (S775)",
            Throttled,
        ),
        (
            451,
            "4.7.500",
            "Server busy. Please try again later from [192.0.2.1]. (S77714)",
            Throttled,
        ),
        (
            421,
            "4.7.0",
            "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or \
             user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
            Throttled,
        ),
        (
            450,
            "4.2.1",
            "The user you are trying to contact is receiving mail at a rate that prevents \
             additional messages from being delivered. Please resend your message at a later time.",
            Throttled,
        ),
        (450, "4.2.1", "rate limited, slow down", Throttled),
        (
            451,
            "4.3.2",
            "Too many connections from your IP, try later",
            Throttled,
        ),
        (452, "4.5.3", "Too many recipients", TempFail),
        (
            452,
            "4.5.3",
            "Error: too many recipients, try again later",
            TempFail,
        ),
        (
            451,
            "4.7.1",
            "Greylisted, see http://postgrey.schweikert.ch/help/example.com.html, try again later",
            TempFail,
        ),
        (
            454,
            "4.7.0",
            "TLS not available due to local problem",
            TempFail,
        ),
        (
            452,
            "4.2.2",
            "The email account that you tried to reach is over quota.",
            TempFail,
        ),
        (451, "4.3.0", "Temporary lookup failure", TempFail),
        (
            550,
            "5.1.1",
            "The email account that you tried to reach does not exist.",
            PermFail,
        ),
        (
            550,
            "5.7.1",
            "Service unavailable, Client host blocked using Spamhaus; rate limited",
            PermFail,
        ),
        (250, "2.0.0", "OK 1733400000 d2e1a72fcca58 - gsmtp", Success),
        (354, "", "Go ahead", Success),
        (
            421,
            "",
            "mx.example.com Service not available, closing transmission channel",
            Throttled,
        ),
        (999, "", "garbage", TempFail),
        (0, "", "", TempFail),
    ];
    for (code, enhanced, text, want) in cases {
        let got = classify(*code, EnhancedCode::parse(enhanced), text);
        assert_eq!(got, *want, "{code} {enhanced} {text}");
    }
}

// ----------------------------------------------------------------- backoff

#[test]
fn backoff_doubles_and_caps() {
    let min = Duration::from_secs(300);
    let max = Duration::from_secs(4000);
    assert_eq!(backoff(min, max, 1, 0.0), min);
    assert_eq!(backoff(min, max, 2, 0.0), Duration::from_secs(600));
    assert_eq!(backoff(min, max, 4, 0.0), Duration::from_secs(2400));
    assert_eq!(backoff(min, max, 9, 0.0), max);
    assert_eq!(backoff(min, max, 99, 0.0), max);
    assert_eq!(backoff(min, max, 1, 1.0), Duration::from_secs(270));
    assert!(backoff(min, max, 99, 0.5) < max);
}

proptest! {
    #[test]
    fn backoff_is_monotone_and_capped(
        first in 1u64..10_000,
        extra in 0u64..100_000,
        attempts in 0u32..200,
        jitter in 0.0f64..=1.0,
    ) {
        let policy = RetryPolicy {
            first_retry: Duration::from_millis(first),
            max_retry: Duration::from_millis(first + extra),
            give_up: Duration::from_secs(5 * 86_400),
        };
        let now = policy.delay(attempts, 0.0);
        let next = policy.delay(attempts + 1, 0.0);
        prop_assert!(next >= now);
        prop_assert!(now <= policy.max_retry);
        let jittered = policy.delay(attempts, jitter);
        prop_assert!(jittered <= now);
        prop_assert!(jittered >= now.mul_f64(0.9) - Duration::from_nanos(1));
    }
}

#[test]
fn the_scheduler_can_move_into_a_task() {
    fn send<T: Send + 'static>() {}
    send::<Scheduler>();
}

// ----------------------------------------------------------------- batching

#[test]
fn one_job_carries_every_due_recipient_of_a_message_for_one_destination() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    let recipients = [
        rcpt(0, "mx:a.example", T0),
        rcpt(1, "mx:b.example", T0),
        rcpt(2, "mx:a.example", T0),
        rcpt(3, "mx:a.example", T0 + MIN),
    ];
    s.add(MsgId(7), T0, recipients, T0);
    let poll = s.poll(T0);
    let mut jobs: Vec<(String, Vec<usize>)> = poll
        .jobs
        .iter()
        .map(|j| (j.destination.to_string(), j.recipients.clone()))
        .collect();
    jobs.sort();
    assert_eq!(
        jobs,
        vec![
            ("mx:a.example".to_string(), vec![0, 2]),
            ("mx:b.example".to_string(), vec![1]),
        ]
    );
    // The recipient due later goes in a job of its own, then.
    assert!(s.poll(T0 + MIN - 1).jobs.is_empty());
    let later = s.poll(T0 + MIN);
    assert_eq!(later.jobs.len(), 1);
    assert_eq!(later.jobs[0].recipients, vec![3]);
    s.check_invariants();
}

#[test]
fn a_job_carries_at_most_the_recipient_limit() {
    let cfg = SchedulerConfig {
        max_recipients_per_job: 3,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    s.add(MsgId(1), T0, (0..8).map(|i| rcpt(i, "d", T0)), T0);
    let jobs = s.poll(T0).jobs;
    let sizes: Vec<usize> = jobs.iter().map(|j| j.recipients.len()).collect();
    assert_eq!(sizes, vec![3, 3, 2]);
    let all: BTreeSet<usize> = jobs.iter().flat_map(|j| j.recipients.clone()).collect();
    assert_eq!(all, (0..8).collect());
}

// ---------------------------------------------------------- windows, limits

#[test]
fn jobs_stay_within_the_window_and_the_global_limit() {
    let cfg = SchedulerConfig {
        max_in_flight: 7,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    add_many(&mut s, 1, 20, "a", T0);
    add_many(&mut s, 100, 20, "b", T0);
    let jobs = s.poll(T0).jobs;
    assert_eq!(jobs.len(), 7);
    let to_a = jobs
        .iter()
        .filter(|j| j.destination.as_str() == "a")
        .count();
    assert_eq!((to_a, 7 - to_a), (4, 3), "round-robin between a and b");
    assert!(s.poll(T0).jobs.is_empty());
    // A free slot goes to the next destination in the ring, within windows.
    s.complete(jobs[0].id, &delivered(&jobs[0]), T0).unwrap();
    let next = s.poll(T0).jobs;
    assert_eq!(next.len(), 1);
    for name in ["a", "b"] {
        assert!(dest(&s, name).in_flight <= dest(&s, name).window);
    }
    let explained = s.explain(T0);
    assert!(explained.iter().any(|e| matches!(
        e.wait,
        Wait::Busy {
            in_flight: 7,
            limit: 7
        }
    )));
    s.check_invariants();

    // With the global limit out of the way the window (5) binds.
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    add_many(&mut s, 1, 20, "a", T0);
    let jobs = s.poll(T0).jobs;
    assert_eq!(jobs.len(), 5);
    let waits: Vec<Wait> = s.explain(T0).into_iter().map(|e| e.wait).collect();
    assert_eq!(waits.iter().filter(|w| **w == Wait::InFlight).count(), 5);
    assert!(waits.contains(&Wait::WindowFull {
        in_flight: 5,
        window: 5
    }));
}

#[test]
fn a_busy_destination_does_not_delay_a_quiet_one_by_more_than_one_round() {
    for limit in [1, 2, 10] {
        let cfg = SchedulerConfig {
            max_in_flight: limit,
            window: WindowPolicy {
                initial: 50,
                max: 50,
            },
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(cfg, 1);
        add_many(&mut s, 1, 10_000, "busy", T0);
        // Let the busy destination run for a while first.
        for _ in 0..100 {
            for job in s.poll(T0).jobs {
                s.complete(job.id, &delivered(&job), T0).unwrap();
            }
        }
        s.add(MsgId(99_999), T0, [rcpt(0, "quiet", T0)], T0);
        let mut order = Vec::new();
        while order.len() < 3 {
            let jobs = s.poll(T0).jobs;
            for job in &jobs {
                order.push(job.destination.to_string());
                s.complete(job.id, &delivered(job), T0).unwrap();
            }
        }
        let quiet = order.iter().position(|d| d == "quiet");
        assert!(quiet.is_some_and(|p| p <= 1), "limit {limit}: {order:?}");
    }
}

#[test]
fn a_connection_is_reused_only_while_no_other_destination_waits() {
    let cfg = SchedulerConfig {
        max_in_flight: 3,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    add_many(&mut s, 1, 10, "busy", T0);
    let busy = Destination::from("busy");
    let jobs = s.poll(T0).jobs;
    assert_eq!(jobs.len(), 3);
    // Nothing else waits: the connection takes the next message at once.
    s.complete(jobs[0].id, &delivered(&jobs[0]), T0).unwrap();
    let reused = s.next_job_for(&busy, T0).expect("reuse");
    assert_eq!(reused.destination, busy);
    assert!(s.next_job_for(&busy, T0).is_none(), "global limit");
    // A quiet destination becomes ready: reuse yields to it.
    s.add(MsgId(100), T0 + 1, [rcpt(0, "quiet", T0 + 1)], T0 + 1);
    s.complete(jobs[1].id, &delivered(&jobs[1]), T0 + 1)
        .unwrap();
    assert!(
        s.next_job_for(&busy, T0 + 1).is_none(),
        "quiet waits for a slot"
    );
    // The ring is served in order (busy has been waiting for a slot since
    // T0), so quiet gets the slot after that one, never a reused connection.
    let next = s.poll(T0 + 1).jobs;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].destination, busy);
    s.complete(jobs[2].id, &delivered(&jobs[2]), T0 + 1)
        .unwrap();
    assert!(
        s.next_job_for(&busy, T0 + 1).is_none(),
        "quiet waits for a slot"
    );
    let next = s.poll(T0 + 1).jobs;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].destination.as_str(), "quiet");
    // Unknown destinations, and windows, are respected too.
    assert!(s.next_job_for(&"nowhere".into(), T0 + 1).is_none());
    s.check_invariants();
}

#[test]
fn idle_destinations_and_finished_messages_leave_nothing_behind() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    for round in 0..10u64 {
        for id in 0..100 {
            let to = format!("mx:d{}.example", round * 100 + id);
            s.add(MsgId(round * 100 + id), T0, [rcpt(0, &to, T0)], T0);
        }
        while s.pending() > 0 {
            for job in s.poll(T0).jobs {
                s.complete(job.id, &delivered(&job), T0).unwrap();
            }
        }
    }
    assert!(s.dests.len() <= 100, "{} destination slots", s.dests.len());
    assert!(s.dest_ids.is_empty());
    assert!(s.expiries.is_empty());
    assert!(s.msgs.is_empty());
    // A destination that throttled us is remembered while empty.
    s.add(MsgId(5000), T0, [rcpt(0, "slow", T0)], T0);
    let job = s.poll(T0).jobs.remove(0);
    s.complete(job.id, &deferred(&job, ReplyClass::Throttled), T0)
        .unwrap();
    s.delete(MsgId(5000));
    assert!(
        s.destination(&"slow".into(), T0)
            .is_some_and(|d| d.rate_per_minute.is_some())
    );
    s.check_invariants();
}

// --------------------------------------------------------- retries, expiry

#[test]
fn a_deferred_recipient_is_retried_after_its_backoff() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 3);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0)], T0);
    let job = s.poll(T0).jobs.remove(0);
    let settled = s
        .complete(job.id, &deferred(&job, ReplyClass::TempFail), T0)
        .unwrap();
    let Fate::Retry { at, attempts } = settled[0].fate else {
        panic!("{settled:?}");
    };
    assert_eq!(attempts, 1);
    assert!(
        (T0 + 270 * SEC..=T0 + 300 * SEC).contains(&at),
        "{}",
        at - T0
    );
    assert!(s.poll(at - 1).jobs.is_empty());
    let explained = s.explain_message(MsgId(1), at - 1);
    assert_eq!(explained[0].wait, Wait::Backoff { until: at });
    assert_eq!(explained[0].attempts, 1);
    assert_eq!(
        explained[0].last_reply.as_deref(),
        Some("450 4.2.0 mailbox busy")
    );
    assert_eq!(s.next_wakeup(), Some(at));
    let again = s.poll(at).jobs;
    assert_eq!(again.len(), 1);
    let settled = s.complete(again[0].id, &delivered(&again[0]), at).unwrap();
    assert_eq!(settled[0].fate, Fate::Delivered);
    assert_eq!(s.pending(), 0);
    assert!(!s.contains(MsgId(1)));
}

#[test]
fn a_recipient_that_keeps_failing_expires_at_the_give_up_age() {
    let policy = RetryPolicy::default();
    let give_up = millis(policy.give_up);
    let mut s = Scheduler::new(SchedulerConfig::default(), 5);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0)], T0);
    let mut now = T0;
    let mut starts = Vec::new();
    let fate = loop {
        let poll = s.poll(now);
        assert!(poll.expired.is_empty());
        if let Some(job) = poll.jobs.first() {
            starts.push(now);
            let settled = s
                .complete(job.id, &deferred(job, ReplyClass::TempFail), now)
                .unwrap();
            if let Fate::Expired { .. } = settled[0].fate {
                break settled[0].fate.clone();
            }
        }
        now = s.next_wakeup().expect("a retry is scheduled");
    };
    assert!(matches!(fate, Fate::Expired { attempts } if attempts as usize == starts.len()));
    let last = *starts.last().unwrap();
    assert!(last <= T0 + give_up, "no attempt after the give-up time");
    assert!(
        last > T0 + give_up - millis(policy.max_retry),
        "expired early"
    );
    // Intervals grow, then stay at the cap.
    let gaps: Vec<Millis> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|&g| g <= millis(policy.max_retry)));
    assert!(gaps[..4].windows(2).all(|w| w[1] > w[0]));
    assert_eq!(s.pending(), 0);
}

#[test]
fn recipients_waiting_at_their_give_up_time_expire_in_poll() {
    let cfg = SchedulerConfig {
        dead_after: 1,
        ..SchedulerConfig::default()
    };
    let give_up = millis(cfg.retry.give_up);
    let mut s = Scheduler::new(cfg, 1);
    // A message received long ago, loaded from the spool, already past it.
    s.add(MsgId(1), T0 - give_up - 1, [rcpt(0, "d", T0)], T0);
    let poll = s.poll(T0);
    assert!(poll.jobs.is_empty());
    assert_eq!(poll.expired.len(), 1);
    assert_eq!(
        poll.expired[0].key,
        RcptKey {
            msg: MsgId(1),
            rcpt: 0
        }
    );
    // Others waiting behind a dead destination expire on time too.
    s.add(MsgId(2), T0, [rcpt(0, "d", T0)], T0);
    let job = s.poll(T0).jobs.remove(0);
    s.complete(job.id, &connect_failed(), T0).unwrap();
    s.add(
        MsgId(3),
        T0,
        [rcpt(0, "d", T0), rcpt(1, "e", T0 + give_up + MIN)],
        T0,
    );
    assert!(dest(&s, "d").dead.is_some());
    // Until the give-up time only probes go to d (each a connection
    // failure); whatever waits behind them expires then, in poll or at its
    // last deferral, and the recipient never due before it expires in poll.
    let mut in_poll = Vec::new();
    let mut at_deferral = Vec::new();
    let mut now = T0;
    while now <= T0 + give_up {
        let poll = s.poll(now);
        for job in poll.jobs {
            assert!(job.started_at <= T0 + give_up);
            assert!(job.probe && job.destination.as_str() == "d", "{job:?}");
            for st in s.complete(job.id, &connect_failed(), now).unwrap() {
                if let Fate::Expired { .. } = st.fate {
                    at_deferral.push(st.key);
                }
            }
        }
        in_poll.extend(poll.expired.into_iter().map(|e| e.key));
        now = s.next_wakeup().unwrap_or(now + MIN).max(now + 1);
    }
    let key = |msg, rcpt| RcptKey {
        msg: MsgId(msg),
        rcpt,
    };
    assert!(in_poll.contains(&key(3, 1)));
    let mut all: Vec<RcptKey> = in_poll.into_iter().chain(at_deferral).collect();
    all.sort();
    assert_eq!(all, vec![key(2, 0), key(3, 0), key(3, 1)]);
    assert_eq!(s.pending(), 0);
    s.check_invariants();
}

// ------------------------------------------------ hold, release, delete, flush

#[test]
fn held_messages_are_not_dispatched_until_released() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0), rcpt(1, "e", T0)], T0);
    s.add(MsgId(2), T0, [rcpt(0, "d", T0)], T0);
    assert!(s.hold(MsgId(1)));
    assert!(!s.hold(MsgId(3)));
    let jobs = s.poll(T0).jobs;
    assert_eq!(
        jobs.iter().map(|j| j.msg).collect::<Vec<_>>(),
        vec![MsgId(2)]
    );
    assert!(
        s.explain_message(MsgId(1), T0)
            .iter()
            .all(|e| e.wait == Wait::Held)
    );
    s.flush(T0);
    assert!(s.poll(T0 + HOUR).jobs.is_empty());
    assert!(s.release(MsgId(1), T0 + HOUR));
    assert_eq!(s.poll(T0 + HOUR).jobs.len(), 2);
    s.check_invariants();
}

const HOUR: Millis = 60 * MIN;

#[test]
fn a_held_message_does_not_expire_until_released() {
    let give_up = millis(RetryPolicy::default().give_up);
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0 + MIN)], T0);
    s.hold(MsgId(1));
    let late = T0 + give_up + HOUR;
    // A recipient added to it meanwhile (a re-route) does not expire either.
    s.add(MsgId(1), T0, [rcpt(1, "e", late)], late);
    let poll = s.poll(late);
    assert!(poll.jobs.is_empty() && poll.expired.is_empty());
    s.check_invariants();
    s.release(MsgId(1), late);
    let mut expired: Vec<usize> = s.poll(late).expired.iter().map(|e| e.key.rcpt).collect();
    expired.sort();
    assert_eq!(expired, vec![0, 1]);
    assert_eq!(s.pending(), 0);
    s.check_invariants();
}

#[test]
fn a_flush_lets_a_dead_destination_probe_at_once() {
    let cfg = SchedulerConfig {
        dead_after: 1,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    add_many(&mut s, 1, 3, "d", T0);
    let jobs = s.poll(T0).jobs;
    for job in &jobs {
        s.complete(job.id, &connect_failed(), T0).unwrap();
    }
    assert!(dest(&s, "d").dead.is_some_and(|p| p > T0 + MIN));
    s.flush(T0 + MIN);
    let jobs = s.poll(T0 + 2 * MIN).jobs;
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].probe);
    s.check_invariants();
}

#[test]
fn a_message_held_during_its_attempt_waits_after_a_deferral() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0)], T0);
    let job = s.poll(T0).jobs.remove(0);
    s.hold(MsgId(1));
    assert_eq!(s.explain_message(MsgId(1), T0)[0].wait, Wait::InFlight);
    s.complete(job.id, &deferred(&job, ReplyClass::TempFail), T0)
        .unwrap();
    assert!(s.poll(T0 + HOUR).jobs.is_empty());
    assert_eq!(s.explain_message(MsgId(1), T0 + HOUR)[0].wait, Wait::Held);
    s.check_invariants();
}

#[test]
fn a_deleted_message_is_forgotten_even_with_an_attempt_in_flight() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0), rcpt(1, "d", T0)], T0);
    s.add(MsgId(2), T0, [rcpt(0, "d", T0 + MIN)], T0);
    s.add(MsgId(3), T0, [rcpt(0, "d", T0 + 2 * HOUR)], T0);
    let job = s.poll(T0).jobs.remove(0);
    assert!(s.delete(MsgId(1)));
    assert!(s.delete(MsgId(2)));
    assert!(!s.delete(MsgId(2)));
    assert_eq!(s.complete(job.id, &delivered(&job), T0).unwrap(), vec![]);
    assert_eq!(
        s.complete(job.id, &delivered(&job), T0),
        Err(SchedulerError::UnknownJob(job.id))
    );
    assert!(s.poll(T0 + HOUR).jobs.is_empty());
    assert_eq!(s.pending(), 1);
    // The destination still learned from the attempt.
    assert_eq!(dest(&s, "d").last_success, Some(T0));
    s.check_invariants();
}

#[test]
fn a_flush_spreads_the_retries_it_makes_due() {
    let cfg = SchedulerConfig {
        max_in_flight: 1,
        ..SchedulerConfig::default()
    };
    let spread = millis(cfg.flush_spread);
    let mut s = Scheduler::new(cfg, 9);
    for id in 0..1000 {
        let mut r = rcpt(0, &format!("d{}", id % 10), T0 + 2 * HOUR);
        r.attempts = 3;
        s.add(MsgId(id), T0, [r], T0);
    }
    s.flush(T0);
    let dues: Vec<Millis> = s.explain(T0).iter().map(|e| e.due).collect();
    assert!(dues.iter().all(|&d| (T0..=T0 + spread).contains(&d)));
    let distinct: HashSet<Millis> = dues.iter().copied().collect();
    assert!(
        distinct.len() > 900,
        "{} distinct due times",
        distinct.len()
    );
    let early = dues.iter().filter(|&&d| d < T0 + spread / 2).count();
    assert!((400..600).contains(&early), "{early} in the first half");
    // Flushing one message makes it due now, exactly.
    assert!(s.flush_message(MsgId(5), T0));
    assert_eq!(s.explain_message(MsgId(5), T0)[0].due, T0);
    s.check_invariants();
}

// ------------------------------------------------------- dead destinations

#[test]
fn a_dead_destination_gets_only_probes_until_one_connects() {
    let cfg = SchedulerConfig {
        dead_after: 3,
        ..SchedulerConfig::default()
    };
    let first_retry = millis(cfg.retry.first_retry);
    let mut s = Scheduler::new(cfg, 1);
    add_many(&mut s, 1, 30, "down", T0);
    add_many(&mut s, 100, 3, "up", T0);
    let jobs: Vec<Job> = s.poll(T0).jobs;
    let (down, up): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| j.destination.as_str() == "down");
    assert_eq!((down.len(), up.len()), (5, 3));
    for job in &up {
        s.complete(job.id, &delivered(job), T0).unwrap();
    }
    for job in &down[..3] {
        s.complete(job.id, &connect_failed(), T0).unwrap();
    }
    let probe_at = dest(&s, "down").dead.expect("dead after 3 failures");
    assert!((T0 + first_retry * 9 / 10..=T0 + first_retry).contains(&probe_at));
    // Jobs started before it died do not change the probe time.
    for job in &down[3..] {
        s.complete(job.id, &connect_failed(), T0 + 1).unwrap();
    }
    assert_eq!(dest(&s, "down").dead, Some(probe_at));
    assert!(s.poll(T0 + 1).jobs.is_empty(), "no job while dead");
    let waits = s.explain(T0 + 1);
    assert!(waits.iter().any(|e| e.wait
        == Wait::DestinationDead {
            next_probe: probe_at
        }));
    let summary = s.destination(&"down".into(), T0 + 1).unwrap();
    assert_eq!(summary.consecutive_failures, 5);
    assert_eq!(summary.last_error.as_deref(), Some("connection refused"));
    // One probe at a time.
    let probe = s.poll(probe_at).jobs;
    assert_eq!(probe.len(), 1);
    assert!(probe[0].probe);
    assert!(s.poll(probe_at + HOUR).jobs.is_empty());
    s.complete(probe[0].id, &connect_failed(), probe_at + 1)
        .unwrap();
    let next_probe = dest(&s, "down").dead.unwrap();
    assert!(
        next_probe >= probe_at + 2 * first_retry * 9 / 10,
        "probes back off"
    );
    let probe = s.poll(next_probe).jobs;
    assert_eq!(probe.len(), 1);
    // A session revives it: everything due goes out again, within the window.
    s.complete(probe[0].id, &delivered(&probe[0]), next_probe)
        .unwrap();
    assert!(dest(&s, "down").dead.is_none());
    let jobs = s.poll(next_probe).jobs;
    assert_eq!(jobs.len(), 5);
    assert!(jobs.iter().all(|j| !j.probe));
    s.check_invariants();
}

// ------------------------------------------------------------------- AIMD

#[test]
fn throttling_halves_the_window_once_and_sets_a_rate() {
    let cfg = SchedulerConfig {
        window: WindowPolicy {
            initial: 8,
            max: 20,
        },
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    // Starts a second apart: the destination was sent 60 jobs a minute.
    let mut jobs = Vec::new();
    for k in 0..8 {
        add_many(&mut s, k as u64 + 1, 1, "d", T0 + k * SEC);
        jobs.extend(s.poll(T0 + k * SEC).jobs);
    }
    add_many(&mut s, 100, 100, "d", T0 + 8 * SEC);
    assert_eq!(jobs.len(), 8);
    let now = T0 + 10 * SEC;
    s.complete(jobs[0].id, &deferred(&jobs[0], ReplyClass::Throttled), now)
        .unwrap();
    let d = dest(&s, "d");
    assert_eq!(d.window, 4);
    let rate = d.rate.expect("limited");
    assert!((25.0..=35.0).contains(&rate), "{rate}");
    // The other jobs started before the decrease: their throttles are old news.
    let throttle = JobReport {
        connection: Connection::Throttled {
            reply: "421 4.7.0 Try again later, closing connection".into(),
        },
        recipients: Vec::new(),
    };
    s.complete(jobs[1].id, &throttle, now).unwrap();
    assert_eq!(dest(&s, "d").window, 4);
    assert_eq!(dest(&s, "d").throttled, 1);
    assert_eq!(
        dest(&s, "d").last_error.as_ref().map(|e| e.1.as_str()),
        Some("421 4.7.0 Try again later, closing connection")
    );
    // Six in flight, window 4: nothing starts; then the rate spaces the starts.
    assert!(s.poll(now).jobs.is_empty());
    for job in &jobs[2..] {
        s.complete(job.id, &delivered(job), now).unwrap();
    }
    let interval = start_interval(dest(&s, "d").rate.unwrap());
    let until = dest(&s, "d").next_start;
    assert!(until >= now + interval - 1000 && until > now);
    let waits: Vec<Wait> = s.explain(now).into_iter().map(|e| e.wait).collect();
    assert!(waits.contains(&Wait::Throttled { until }));
    assert!(s.poll(until - 1).jobs.is_empty());
    let next = s.poll(until).jobs;
    assert_eq!(next.len(), 1, "one job per interval");
    // A throttle reply to a job started after the decrease halves again.
    s.complete(
        next[0].id,
        &deferred(&next[0], ReplyClass::Throttled),
        until,
    )
    .unwrap();
    assert!(dest(&s, "d").window <= 2);
    assert_eq!(dest(&s, "d").throttled, 2);
    s.check_invariants();
}

#[test]
fn successes_grow_the_window_to_its_max_and_lift_the_rate() {
    let cfg = SchedulerConfig {
        window: WindowPolicy { initial: 2, max: 6 },
        rate: RatePolicy {
            min_per_minute: 1.0,
            increase_per_success: 10.0,
            unlimited_above: 100.0,
        },
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg.clone(), 1);
    add_many(&mut s, 1, 2000, "d", T0);
    let mut now = T0;
    let mut windows = Vec::new();
    for job in s.poll(now).jobs {
        s.complete(job.id, &deferred(&job, ReplyClass::Throttled), now)
            .unwrap();
    }
    assert_eq!(dest(&s, "d").window, 1);
    assert!(dest(&s, "d").rate.is_some());
    while dest(&s, "d").rate.is_some() || dest(&s, "d").window < 6 {
        for job in s.poll(now).jobs {
            s.complete(job.id, &delivered(&job), now).unwrap();
        }
        windows.push(dest(&s, "d").window);
        now = s.next_wakeup().unwrap().max(now);
        assert!(now < T0 + HOUR, "recovers within an hour");
    }
    assert!(windows.windows(2).all(|w| w[1] >= w[0] && w[1] <= w[0] + 1));
    assert_eq!(*windows.last().unwrap(), 6);
    for job in s.poll(now).jobs {
        s.complete(job.id, &delivered(&job), now).unwrap();
    }
    assert_eq!(dest(&s, "d").window, 6, "never above max");
}

#[test]
fn the_rate_halves_down_to_its_floor_and_grows_back() {
    let rate = RatePolicy {
        min_per_minute: 2.0,
        increase_per_success: 1.0,
        unlimited_above: 100.0,
    };
    let window = WindowPolicy {
        initial: 5,
        max: 20,
    };
    let mut d = Dest::new("d".into(), 5);
    d.interval = Some(1000.0);
    let mut rates = Vec::new();
    for _ in 0..8 {
        d.starts += 1;
        let start = d.starts;
        d.throttle(start, &rate, T0);
        rates.push(d.rate.unwrap());
    }
    assert_eq!(rates, vec![30.0, 15.0, 7.5, 3.75, 2.0, 2.0, 2.0, 2.0]);
    assert_eq!(d.window, 1);
    for n in 1..=97 {
        d.succeed(&window, &rate);
        assert_eq!(d.rate, Some(2.0 + n as f64));
    }
    d.succeed(&window, &rate);
    assert_eq!(d.rate, None, "lifted at 100 a minute");
    // A throttle before anything is known halves from the ceiling.
    let mut d = Dest::new("d".into(), 5);
    d.starts = 1;
    d.throttle(1, &rate, T0);
    assert_eq!(d.rate, Some(50.0));
}

// ------------------------------------------------------------------ explain

#[test]
fn explain_and_destinations_serialize_for_json() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    s.add(MsgId(0xABC), T0, [rcpt(0, "mx:example.com", T0 + MIN)], T0);
    let json = serde_json::to_value(s.explain(T0)).unwrap();
    assert_eq!(json[0]["wait"]["reason"], "backoff");
    assert_eq!(json[0]["wait"]["until"], T0 + MIN);
    assert_eq!(json[0]["destination"], "mx:example.com");
    let json = serde_json::to_value(s.destinations(T0)).unwrap();
    assert_eq!(json[0]["queued"], 1);
    assert_eq!(json[0]["window"], 5);
    assert_eq!(json[0]["rate_per_minute"], serde_json::Value::Null);
}

#[test]
fn a_recipient_added_again_moves_to_its_new_destination() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 1);
    s.add(MsgId(1), T0, [rcpt(0, "old", T0 + MIN)], T0);
    s.add(MsgId(1), T0, [rcpt(0, "new", T0)], T0);
    let jobs = s.poll(T0).jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].destination.as_str(), "new");
    assert_eq!(s.destinations(T0).len(), 1);
    s.check_invariants();
}

#[test]
fn config_out_of_range_is_brought_into_range() {
    let cfg = SchedulerConfig {
        window: WindowPolicy { initial: 0, max: 0 },
        max_in_flight: 0,
        max_recipients_per_job: 0,
        dead_after: 0,
        retry: RetryPolicy {
            first_retry: Duration::ZERO,
            max_retry: Duration::ZERO,
            give_up: Duration::from_secs(60),
        },
        rate: RatePolicy {
            min_per_minute: f64::NAN,
            increase_per_success: -1.0,
            unlimited_above: 0.0,
        },
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    assert_eq!(s.config().window.initial, 1);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0), rcpt(1, "d", T0)], T0);
    let job = s.poll(T0).jobs.remove(0);
    assert_eq!(job.recipients.len(), 1);
    let settled = s
        .complete(job.id, &deferred(&job, ReplyClass::TempFail), T0)
        .unwrap();
    assert!(matches!(settled[0].fate, Fate::Retry { at, .. } if at > T0));
    s.check_invariants();
}

// ----------------------------------------------------------------- scale

/// 100,000 recipients across 1,000 destinations, every one dispatched and
/// delivered. Correctness at scale; timing is the ignored test below.
fn run_at_scale(msgs: u64, dests: u64) -> usize {
    let cfg = SchedulerConfig {
        max_in_flight: 500,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg, 1);
    for id in 0..msgs {
        s.add(
            MsgId(id),
            T0,
            [rcpt(0, &format!("mx:d{}.example", id % dests), T0)],
            T0,
        );
    }
    let mut done = 0;
    let mut rounds = 0;
    while s.pending() > 0 {
        let poll = s.poll(T0);
        assert!(
            !poll.jobs.is_empty(),
            "stalled with {} pending",
            s.pending()
        );
        for job in poll.jobs {
            done += s.complete(job.id, &delivered(&job), T0).unwrap().len();
        }
        rounds += 1;
    }
    assert_eq!(done as u64, msgs);
    rounds
}

#[test]
fn a_hundred_thousand_recipients_are_all_dispatched() {
    let rounds = run_at_scale(100_000, 1000);
    assert_eq!(rounds, 200, "500 jobs a round");
}

#[test]
#[ignore = "micro-benchmark: cargo test -p tern --release -- --ignored scheduler_speed --nocapture"]
fn scheduler_speed() {
    let start = std::time::Instant::now();
    run_at_scale(1_000_000, 10_000);
    let elapsed = start.elapsed();
    println!(
        "1,000,000 recipients over 10,000 destinations added, polled and completed in {elapsed:?} \
         ({:.0} ns per recipient)",
        elapsed.as_nanos() as f64 / 1e6
    );
}

// ------------------------------------------------------------- properties

#[derive(Clone, Debug)]
enum Op {
    /// A message with recipients to these destinations.
    Add(Vec<u8>),
    Poll,
    /// Complete the in-flight job at this position with this result.
    Complete(usize, u8),
    Advance(Millis),
    Hold(usize),
    Release(usize),
    Delete(usize),
    Flush,
    FlushMessage(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::vec(0u8..5, 1..5).prop_map(Op::Add),
        4 => Just(Op::Poll),
        6 => (any::<usize>(), 0u8..8).prop_map(|(i, r)| Op::Complete(i, r)),
        3 => (1i64..20 * MIN).prop_map(Op::Advance),
        1 => (HOUR..4 * HOUR).prop_map(Op::Advance),
        1 => any::<usize>().prop_map(Op::Hold),
        1 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Flush),
        1 => any::<usize>().prop_map(Op::FlushMessage),
    ]
}

fn sim_config(limit: usize, dead_after: u32) -> SchedulerConfig {
    SchedulerConfig {
        retry: RetryPolicy {
            first_retry: Duration::from_secs(60),
            max_retry: Duration::from_secs(600),
            give_up: Duration::from_secs(6 * 3600),
        },
        window: WindowPolicy { initial: 2, max: 4 },
        rate: RatePolicy {
            min_per_minute: 6.0,
            increase_per_success: 3.0,
            unlimited_above: 60.0,
        },
        max_in_flight: limit,
        max_recipients_per_job: 2,
        dead_after,
        flush_spread: Duration::from_secs(30),
    }
}

/// What a job's driver reports, by result code `r`.
fn sim_report(job: &Job, r: u8) -> JobReport {
    match r {
        0 | 1 => delivered(job),
        2 => deferred(job, ReplyClass::TempFail),
        3 => deferred(job, ReplyClass::Throttled),
        4 => report(
            job,
            RcptResult::Failed {
                reply: "550 5.1.1 no such user".into(),
            },
        ),
        5 => connect_failed(),
        6 => JobReport {
            connection: Connection::Throttled {
                reply: "421 4.7.0 try later".into(),
            },
            recipients: Vec::new(),
        },
        _ => JobReport {
            connection: Connection::Established,
            recipients: job
                .recipients
                .iter()
                .map(|&i| {
                    let r = if i % 2 == 0 {
                        RcptResult::Delivered
                    } else {
                        RcptResult::Deferred {
                            class: ReplyClass::TempFail,
                            reply: "452 4.5.3 too many recipients".into(),
                        }
                    };
                    (i, r)
                })
                .collect(),
        },
    }
}

struct Sim {
    s: Scheduler,
    now: Millis,
    next_id: u64,
    /// Messages added: received_at.
    received: BTreeMap<MsgId, Millis>,
    held: BTreeSet<MsgId>,
    deleted: BTreeSet<MsgId>,
    jobs: Vec<Job>,
    /// Final fates by recipient (each at most once).
    finals: BTreeMap<RcptKey, &'static str>,
    added: BTreeSet<RcptKey>,
    /// A destination every attempt to which fails to connect (until drain).
    down: Option<Destination>,
    probes: usize,
}

impl Sim {
    fn new(cfg: SchedulerConfig, seed: u64) -> Sim {
        Sim {
            s: Scheduler::new(cfg, seed),
            now: T0,
            next_id: 1,
            received: BTreeMap::new(),
            held: BTreeSet::new(),
            deleted: BTreeSet::new(),
            jobs: Vec::new(),
            finals: BTreeMap::new(),
            added: BTreeSet::new(),
            down: None,
            probes: 0,
        }
    }

    fn pick(&self, i: usize) -> Option<MsgId> {
        let ids: Vec<&MsgId> = self.received.keys().collect();
        (!ids.is_empty()).then(|| *ids[i % ids.len()])
    }

    fn settle(&mut self, key: RcptKey, fate: &'static str) {
        assert!(self.added.contains(&key), "{key:?} never added");
        assert!(
            !self.deleted.contains(&key.msg),
            "{key:?} settled after delete"
        );
        let old = self.finals.insert(key, fate);
        assert!(old.is_none(), "{key:?} settled twice: {old:?} then {fate}");
    }

    fn poll(&mut self) {
        let before: Vec<(Option<Millis>, bool)> =
            self.s.dests.iter().map(|d| (d.dead, d.probing)).collect();
        let poll = self.s.poll(self.now);
        for e in poll.expired {
            let received = self.received[&e.key.msg];
            assert!(self.now >= received + millis(self.s.cfg.retry.give_up));
            self.settle(e.key, "expired");
        }
        let mut started = vec![0u32; self.s.dests.len()];
        for job in &poll.jobs {
            let d = self.s.dest_ids[&job.destination];
            started[d] += 1;
            assert!(!self.held.contains(&job.msg), "held {} dispatched", job.msg);
            assert!(!self.deleted.contains(&job.msg));
            assert!(!job.recipients.is_empty());
            assert!(job.recipients.len() <= self.s.cfg.max_recipients_per_job);
            let received = self.received[&job.msg];
            assert!(job.started_at <= received + millis(self.s.cfg.retry.give_up));
            match before[d] {
                (Some(probe_at), probing) => {
                    assert!(job.probe, "a dead destination gets only probes");
                    assert!(!probing && probe_at <= self.now);
                }
                (None, _) => assert!(!job.probe),
            }
        }
        for (d, &n) in started.iter().enumerate() {
            let dest = &self.s.dests[d];
            if n > 0 {
                assert!(
                    dest.in_flight <= dest.window,
                    "{} over its window",
                    dest.name
                );
            }
            if before[d].0.is_some() {
                assert!(n <= 1, "{} got {n} probes", dest.name);
            }
        }
        assert!(self.s.in_flight() <= self.s.cfg.max_in_flight);
        self.jobs.extend(poll.jobs);
    }

    /// Reuses the connection of a job just completed, as the driver does.
    fn reuse(&mut self, destination: &Destination) {
        let ready_elsewhere = self
            .s
            .ring
            .iter()
            .any(|&d| self.s.dests[d].name != *destination);
        let full = self.s.in_flight() >= self.s.cfg.max_in_flight;
        if let Some(job) = self.s.next_job_for(destination, self.now) {
            assert!(!full);
            assert_eq!(&job.destination, destination);
            assert!(!self.held.contains(&job.msg) && !self.deleted.contains(&job.msg));
            let dest = &self.s.dests[self.s.dest_ids[destination]];
            assert!(dest.in_flight <= dest.window);
            assert!(!ready_elsewhere || self.s.in_flight() < self.s.cfg.max_in_flight);
            assert!(!job.probe);
            self.jobs.push(job);
        }
    }

    fn complete(&mut self, i: usize, r: u8) {
        if self.jobs.is_empty() {
            return;
        }
        let job = self.jobs.swap_remove(i % self.jobs.len());
        // The destination that is down never answers, while it is down.
        let r = match self.down.as_ref() == Some(&job.destination) {
            true => 5,
            false => r,
        };
        self.probes += usize::from(job.probe);
        let d = self.s.dest_ids[&job.destination];
        let (window, was_dead) = (self.s.dests[d].window, self.s.dests[d].dead.is_some());
        let settled = self
            .s
            .complete(job.id, &sim_report(&job, r), self.now)
            .unwrap();
        let after = self.s.dests[d].window;
        // A session to a dead destination revives it at no more than the
        // initial window; then the result applies.
        let base = match was_dead && r != 5 {
            true => window.min(self.s.cfg.window.initial),
            false => window,
        };
        let grown = (base + 1).min(self.s.cfg.window.max);
        let ok = match r {
            0 | 1 | 4 | 7 => after == base || after == grown,
            3 | 6 => after == base || after == (base / 2).max(1),
            2 => after == base,
            _ => after == window,
        };
        assert!(ok, "result {r}: window {window} -> {after}");
        for st in settled {
            assert_eq!(st.key.msg, job.msg);
            assert!(job.recipients.contains(&st.key.rcpt));
            match st.fate {
                Fate::Delivered => self.settle(st.key, "delivered"),
                Fate::Failed => self.settle(st.key, "failed"),
                Fate::Expired { .. } => self.settle(st.key, "expired"),
                Fate::Retry { at, attempts } => {
                    assert!(at > self.now && attempts >= 1);
                    assert!(at <= self.received[&job.msg] + millis(self.s.cfg.retry.give_up));
                }
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Add(dests) => {
                let id = MsgId(self.next_id);
                self.next_id += 1;
                let now = self.now;
                self.received.insert(id, now);
                let rcpts: Vec<NewRecipient> = dests
                    .iter()
                    .enumerate()
                    .map(|(i, d)| rcpt(i, &format!("d{d}"), now))
                    .collect();
                for r in &rcpts {
                    self.added.insert(RcptKey {
                        msg: id,
                        rcpt: r.rcpt,
                    });
                }
                self.s.add(id, now, rcpts, now);
            }
            Op::Poll => self.poll(),
            Op::Complete(i, r) => {
                let destination = self
                    .jobs
                    .get(i % self.jobs.len().max(1))
                    .map(|j| j.destination.clone());
                self.complete(i, r);
                if let Some(destination) = destination.filter(|_| r == 1) {
                    self.reuse(&destination);
                }
            }
            Op::Advance(ms) => self.now += ms,
            Op::Hold(i) => {
                if let Some(id) = self.pick(i)
                    && self.s.hold(id)
                {
                    self.held.insert(id);
                }
            }
            Op::Release(i) => {
                if let Some(id) = self.pick(i) {
                    self.s.release(id, self.now);
                    self.held.remove(&id);
                }
            }
            Op::Delete(i) => {
                if let Some(id) = self.pick(i)
                    && self.s.delete(id)
                {
                    self.deleted.insert(id);
                }
            }
            Op::Flush => self.s.flush(self.now),
            Op::FlushMessage(i) => {
                if let Some(id) = self.pick(i) {
                    self.s.flush_message(id, self.now);
                }
            }
        }
        self.s.check_invariants();
    }

    /// Releases everything and delivers successfully until nothing is left:
    /// every recipient added and not deleted must end delivered, failed or
    /// expired.
    fn drain(&mut self) {
        self.down = None;
        for id in std::mem::take(&mut self.held) {
            self.s.release(id, self.now);
        }
        for _ in 0..100_000 {
            self.poll();
            while !self.jobs.is_empty() {
                self.complete(0, 0);
            }
            self.s.check_invariants();
            if self.s.pending() == 0 {
                break;
            }
            self.poll();
            if self.jobs.is_empty() {
                let next = self.s.next_wakeup().expect("pending work has a wake-up");
                self.now = self.now.max(next);
            }
        }
        assert_eq!(self.s.pending(), 0, "drained");
        for key in &self.added {
            if !self.deleted.contains(&key.msg) {
                assert!(self.finals.contains_key(key), "{key:?} never settled");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_scheduler_keeps_its_promises(
        ops in prop::collection::vec(op(), 1..150),
        limit in 1usize..8,
        dead_after in 1u32..4,
        seed in any::<u64>(),
        down in prop::option::of(0u8..5),
    ) {
        let mut sim = Sim::new(sim_config(limit, dead_after), seed);
        sim.down = down.map(|d| Destination::new(format!("d{d}")));
        for op in ops {
            sim.apply(op);
        }
        sim.drain();
    }

    /// Windows stay within `1..=max` under any sequence of results, and each
    /// result moves the window the way AIMD says.
    #[test]
    fn windows_stay_within_bounds(results in prop::collection::vec(0u8..8, 1..300)) {
        let cfg = sim_config(100, 3);
        let mut sim = Sim::new(cfg, 1);
        for id in 0..50 {
            sim.apply(Op::Add(vec![(id % 2) as u8]));
        }
        for r in results {
            sim.poll();
            sim.complete(0, r);
            sim.now += 10 * SEC;
            for d in &sim.s.dests {
                prop_assert!((1..=sim.s.cfg.window.max).contains(&d.window));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// However large the other destinations' backlogs, a destination that
    /// becomes ready gets a job before any other destination gets two.
    #[test]
    fn a_newly_ready_destination_waits_at_most_one_round(
        backlogs in prop::collection::vec(1u64..300, 1..12),
        limit in 1usize..20,
        warmup in 0usize..50,
    ) {
        let cfg = SchedulerConfig {
            max_in_flight: limit,
            window: WindowPolicy { initial: 20, max: 20 },
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(cfg, 1);
        let mut id = 0;
        for (d, &n) in backlogs.iter().enumerate() {
            add_many(&mut s, id, n, &format!("busy{d}"), T0);
            id += n;
        }
        let mut in_flight: VecDeque<Job> = s.poll(T0).jobs.into();
        for _ in 0..warmup {
            if let Some(job) = in_flight.pop_front() {
                s.complete(job.id, &delivered(&job), T0).unwrap();
            }
            in_flight.extend(s.poll(T0).jobs);
        }
        s.add(MsgId(1 << 40), T0, [rcpt(0, "quiet", T0)], T0);
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        loop {
            let jobs = s.poll(T0).jobs;
            if let Some(q) = jobs.iter().position(|j| j.destination.as_str() == "quiet") {
                for j in &jobs[..q] {
                    *served.entry(j.destination.to_string()).or_default() += 1;
                }
                break;
            }
            for j in &jobs {
                *served.entry(j.destination.to_string()).or_default() += 1;
            }
            in_flight.extend(jobs);
            let job = in_flight.pop_front().expect("something in flight");
            s.complete(job.id, &delivered(&job), T0).unwrap();
        }
        prop_assert!(served.values().all(|&n| n <= 1), "{served:?}");
    }
}

#[test]
fn the_same_inputs_and_seed_give_the_same_decisions() {
    let run = |seed: u64| {
        let mut sim = Sim::new(sim_config(3, 2), seed);
        let mut log = Vec::new();
        for k in 0..200u64 {
            sim.apply(Op::Add(vec![(k % 5) as u8, ((k / 5) % 5) as u8]));
            sim.apply(Op::Poll);
            sim.apply(Op::Complete(k as usize, (k % 8) as u8));
            sim.apply(Op::Advance(37 * SEC));
            if k % 50 == 0 {
                sim.apply(Op::Flush);
            }
        }
        for e in sim.s.explain(sim.now) {
            log.push(format!("{:?} {} {:?}", e.key, e.due, e.wait));
        }
        log
    };
    let first = run(7);
    assert!(first.len() > 100);
    assert!(first == run(7), "the same seed replays the same run");
    assert!(first != run(8), "the seed feeds the jitter");
}

#[test]
fn a_reloaded_config_keeps_what_was_learned_within_its_new_bounds() {
    let cfg = SchedulerConfig {
        window: WindowPolicy { initial: 2, max: 6 },
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(cfg.clone(), 1);
    add_many(&mut s, 1, 200, "d", T0);
    let mut now = T0;
    while dest(&s, "d").window < 6 {
        for job in s.poll(now).jobs {
            s.complete(job.id, &delivered(&job), now).unwrap();
        }
        now += SEC;
    }
    let queued = s.pending();
    s.set_config(SchedulerConfig {
        window: WindowPolicy { initial: 1, max: 3 },
        max_in_flight: 2,
        ..cfg
    });
    assert_eq!(dest(&s, "d").window, 3, "clamped to the new maximum");
    assert_eq!(s.pending(), queued, "the queue is kept");
    let jobs = s.poll(now).jobs;
    assert_eq!(jobs.len(), 2, "the new global limit");
    s.check_invariants();
}

#[test]
fn counts_give_each_pending_recipient_one_state() {
    let mut s = Scheduler::new(SchedulerConfig::default(), 5);
    s.add(MsgId(1), T0, [rcpt(0, "d", T0)], T0);
    s.add(MsgId(2), T0, [rcpt(0, "e", T0), rcpt(1, "e", T0)], T0);
    s.add(MsgId(3), T0, [rcpt(0, "f", T0 + HOUR)], T0);
    s.hold(MsgId(3));
    let counts = |s: &Scheduler| {
        let c = s.counts();
        (c.queued, c.deferred, c.held, c.in_flight)
    };
    assert_eq!(counts(&s), (3, 0, 1, 0));
    let jobs = s.poll(T0).jobs;
    assert_eq!(counts(&s), (0, 0, 1, 3));
    let job = jobs.iter().find(|j| j.msg == MsgId(1)).unwrap();
    s.complete(job.id, &deferred(job, ReplyClass::TempFail), T0)
        .unwrap();
    assert_eq!(counts(&s), (0, 1, 1, 2));
    let c = s.counts();
    assert_eq!(c.queued + c.deferred + c.held + c.in_flight, s.pending());
}
