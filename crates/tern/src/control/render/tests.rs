use super::*;
use crate::spool::Recipient;

const NOW: i64 = 1_700_000_000;

fn deferred_message() -> Value {
    json!({
        "id": "00000000000000AB",
        "sender": "alice@example.com",
        "size": 1234,
        "received_at": NOW - 3600,
        "held": false,
        "recipients": [{
            "index": 0,
            "address": "bob@example.org",
            "original": "Bob@example.org",
            "route": "remote",
            "status": "deferred",
            "destination": "mx:example.org",
            "attempts": 3,
            "last_reply": "451 4.7.1 try later",
            "answered_by": "mx1.example.org[192.0.2.1]:25",
            "next_attempt_at": NOW + 250,
            "expires_at": NOW + 86400,
            "wait": {"reason": "backoff", "until": NOW + 250}
        }, {
            "index": 1,
            "address": "carol@example.net",
            "original": "carol@example.net",
            "route": "remote",
            "status": "pending",
            "destination": "mx:example.net",
            "attempts": 0,
            "last_reply": null,
            "answered_by": null,
            "next_attempt_at": null,
            "expires_at": null,
            "wait": {"reason": "window_full", "in_flight": 4, "window": 4}
        }]
    })
}

#[test]
fn list_shows_each_recipient_with_why_it_waits() {
    let out = render_list(&json!({"messages": [deferred_message()]}), NOW);
    assert_eq!(
        out,
        "00000000000000AB  age 1h  size 1234  from <alice@example.com>\n\
         \x20   <bob@example.org>  deferred after 3 attempt(s) to mx:example.org, next in 4m 10s (backoff) \
         — last reply from mx1.example.org[192.0.2.1]:25: 451 4.7.1 try later\n\
         \x20   <carol@example.net>  waiting for outbound delivery to mx:example.net, \
         waiting (window full: 4 of 4 in flight)\n"
    );
}

#[test]
fn empty_or_shapeless_list_is_an_empty_queue() {
    assert_eq!(
        render_list(&json!({"messages": []}), NOW),
        "queue is empty\n"
    );
    assert_eq!(render_list(&json!(42), NOW), "queue is empty\n");
}

#[test]
fn every_wait_reason_reads_as_text() {
    let cases = [
        (json!({"reason": "due"}), "due now"),
        (
            json!({"reason": "backoff", "until": NOW + 61}),
            "next in 1m 1s (backoff)",
        ),
        (
            json!({"reason": "throttled", "until": NOW + 5}),
            "next in 5s (destination throttled)",
        ),
        (
            json!({"reason": "destination_dead", "until": NOW + 120}),
            "next in 2m (destination dead, waiting for its probe)",
        ),
        (json!({"reason": "held"}), "held"),
        (json!({"reason": "in_flight"}), "being delivered now"),
        (
            json!({"reason": "busy", "in_flight": 100}),
            "waiting (all delivery slots busy: 100 in flight)",
        ),
        (
            json!({"reason": "tls_required", "until": NOW + 600, "detail": "mx1 offers no STARTTLS"}),
            "next in 10m (TLS required but not offered; mx1 offers no STARTTLS)",
        ),
        (
            json!({"reason": "unreachable", "until": NOW - 5}),
            "next due now (host unreachable)",
        ),
        (json!({"reason": "new_in_v9"}), "waiting (new_in_v9)"),
        (json!({}), "waiting (unknown reason)"),
    ];
    for (wait, expected) in cases {
        assert_eq!(describe_wait(&wait, NOW), expected, "{wait}");
    }
}

#[test]
fn final_states_name_the_reply_and_who_gave_it() {
    let r = json!({"status": "delivered", "last_reply": "250 2.0.0 ok",
                   "answered_by": "mx1.example.org[192.0.2.1]:25"});
    assert_eq!(
        describe_recipient(&r, NOW),
        "delivered (from mx1.example.org[192.0.2.1]:25: 250 2.0.0 ok)"
    );
    let r = json!({"status": "failed", "last_reply": "550 5.1.1 no such user"});
    assert_eq!(
        describe_recipient(&r, NOW),
        "failed: 550 5.1.1 no such user"
    );
    let r = json!({"status": "pending", "route": "local"});
    assert_eq!(describe_recipient(&r, NOW), "pending");
}

#[test]
fn held_messages_say_so() {
    let mut m = deferred_message();
    m["held"] = json!(true);
    let out = render_message(&m, NOW);
    assert!(out.lines().next().unwrap().ends_with("HELD"), "{out}");
}

#[test]
fn control_characters_from_the_queue_never_reach_the_terminal() {
    let mut m = deferred_message();
    m["sender"] = json!("evil\u{1b}]0;owned\u{7}@example.com");
    m["recipients"][0]["last_reply"] = json!("451 \u{1b}[2Jcleared\r\n\u{202e}gnp.exe");
    let out = render_list(&json!({"messages": [m]}), NOW);
    assert!(
        !out.chars()
            .any(|c| c != '\n' && (c.is_control() || c == '\u{202e}')),
        "{out:?}"
    );
    assert!(out.contains("from <evil]0;owned@example.com>"), "{out}");
    assert_eq!(sanitize_multiline("a\tb\r\nc\u{1b}"), "a\tb\nc");
}

#[test]
fn missing_and_mistyped_fields_render_as_unknown() {
    let out = render_show(&json!({"id": 7, "recipients": [{"address": ["x"]}]}), NOW);
    assert!(out.starts_with("7  age -  size -  from <>\n"), "{out}");
    assert!(out.contains("client: - (HELO -)"), "{out}");
    assert!(out.contains("received: -"), "{out}");
    assert!(
        out.contains("recipient <>: rcpt-to <>  orcpt -  notify -"),
        "{out}"
    );
}

#[test]
fn show_adds_the_envelope_details() {
    let mut m = deferred_message();
    m["client_ip"] = json!("192.0.2.9");
    m["helo"] = json!("client.example.com");
    m["smtputf8"] = json!(true);
    m["body_type"] = json!("8BITMIME");
    m["ret"] = json!(null);
    m["envid"] = json!("abc");
    let out = render_show(&m, NOW);
    assert!(
        out.contains("client: 192.0.2.9 (HELO client.example.com)\n"),
        "{out}"
    );
    assert!(
        out.contains("smtputf8: true  body: 8BITMIME  ret: -  envid: abc\n"),
        "{out}"
    );
    assert!(
        out.contains("recipient <bob@example.org>: rcpt-to <Bob@example.org>  orcpt -  notify -  gives up in 1day\n"),
        "{out}"
    );
}

#[test]
fn destinations_table_lines_up() {
    let reply = json!({"destinations": [{
        "destination": "mx:example.org", "queued": 12, "in_flight": 2, "window": 4,
        "rate_per_minute": null, "next_start": null, "consecutive_failures": 0,
        "next_probe": null, "throttled": 0, "last_error": null, "last_error_at": null,
        "last_success_at": NOW - 30
    }, {
        "destination": "relay:[10.0.0.1]:25", "queued": 3, "in_flight": 0, "window": 1,
        "rate_per_minute": 30.0, "next_start": NOW + 2, "consecutive_failures": 5,
        "next_probe": NOW + 90, "throttled": 1, "last_error": "connect: refused",
        "last_error_at": NOW - 60, "last_success_at": null, "future_field": [1]
    }]});
    let out = render_destinations(&reply, NOW);
    assert_eq!(
        out,
        "DESTINATION          QUEUED  IN FLIGHT  RATE/MIN  THROTTLED  FAILURES  NEXT             LAST SUCCESS  LAST ERROR\n\
         mx:example.org       12      2/4        -         0          0         -                30s ago       -\n\
         relay:[10.0.0.1]:25  3       0/1        30.0      1          5         probe in 1m 30s  -             connect: refused (1m ago)\n"
    );
    assert_eq!(
        render_destinations(&json!({"destinations": []}), NOW),
        "no destinations with queued mail or remembered state\n"
    );
}

#[test]
fn mutating_replies_carry_a_count() {
    assert_eq!(affected(&json!({"affected": 2})), Some(2));
    assert_eq!(affected(&json!({"affected": "x"})), None);
}

#[test]
fn spool_view_has_the_server_shape_without_live_state() {
    let envelope = Envelope {
        sender: String::new(),
        recipients: vec![
            Recipient {
                address: "far@remote.test".into(),
                original: "far@remote.test".into(),
                orcpt: None,
                notify: Some("NEVER".into()),
                route: Route::Remote,
                status: RcptStatus::Deferred {
                    reply: "451 later".into(),
                    attempts: 2,
                    next_attempt: NOW + 10,
                    delay_notified: false,
                },
            },
            Recipient {
                address: "me@localhost".into(),
                original: "me@localhost".into(),
                orcpt: None,
                notify: None,
                route: Route::Local {
                    mailbox: "me".into(),
                },
                status: RcptStatus::Pending,
            },
        ],
        received_at: NOW - 5,
        size: 99,
        smtputf8: false,
        body_type: None,
        ret: Some("HDRS".into()),
        envid: None,
        client_ip: "127.0.0.1".into(),
        helo: "me".into(),
        auth_user: None,
    };
    let m = message_json(MsgId(0xab), &envelope, false);
    assert_eq!(m["id"], "00000000000000AB");
    assert_eq!(m["held"], false);
    assert!(m.get("helo").is_none());
    let r = &m["recipients"][0];
    assert_eq!(
        (
            &r["status"],
            &r["attempts"],
            &r["next_attempt_at"],
            &r["route"],
            &r["wait"]
        ),
        (
            &json!("deferred"),
            &json!(2),
            &json!(NOW + 10),
            &json!("remote"),
            &Value::Null
        )
    );
    assert_eq!(m["recipients"][1]["route"], "local");
    assert_eq!(
        describe_recipient(r, NOW),
        "deferred after 2 attempt(s), next in 10s — last reply 451 later"
    );
    let m = message_json(MsgId(0xab), &envelope, true);
    assert_eq!((&m["ret"], &m["helo"]), (&json!("HDRS"), &json!("me")));
    assert_eq!(m["recipients"][0]["notify"], "NEVER");
}
