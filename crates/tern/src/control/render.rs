//! Text for people from the control channel's JSON, and that JSON built from
//! the spool for when the server is not running.
//!
//! # The JSON
//! `list` answers `{"messages": [M, ...]}`; `show` answers one M with
//! `client_ip`, `helo`, `smtputf8`, `body_type`, `ret` and `envid` added.
//! M is `{"id", "sender", "size", "received_at", "held", "recipients": [R]}`
//! and R is `{"index", "address", "original", "route" ("local"|"remote"),
//! "status" ("pending"|"deferred"|"delivered"|"failed"), "destination",
//! "attempts", "last_reply", "answered_by", "next_attempt_at", "expires_at",
//! "wait"}`, where `wait` is null or `{"reason", "until", "in_flight",
//! "window", "detail"}` (only `reason` required). `destinations` answers
//! `{"destinations": [D]}` with D as read by [`render_destinations`]; the
//! mutating commands answer `{"affected": n}`. Times are unix seconds.
//!
//! # Invariants
//! - Rendering never fails: a missing field, a field of the wrong type or an
//!   extra field is shown as unknown ("-") or ignored, so an older CLI reads
//!   a newer server.
//! - Every string taken from the JSON is passed through [`sanitize`] before
//!   it is put in the text: queue contents come from remote peers, and a
//!   terminal must not execute them.
//!
//! # Not done here
//! Colour, paging, and column widths beyond the destination name.

use crate::spool::{Envelope, MsgId, RcptStatus, Route};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::time::Duration;

#[cfg(test)]
mod tests;

/// `text` without control characters (C0, DEL, C1) and without the
/// bidirectional overrides that reorder what a terminal shows.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .filter(|&c| !c.is_control() && !is_bidi_control(c))
        .collect()
}

/// Like [`sanitize`] but keeps line feeds and tabs: for a message body.
pub fn sanitize_multiline(text: &str) -> String {
    text.chars()
        .filter(|&c| c == '\n' || c == '\t' || (!c.is_control() && !is_bidi_control(c)))
        .collect()
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// M for one message read from the spool: what the envelope knows, with no
/// destination and no wait (only the running server knows those). With
/// `details`, the fields `show` adds, and each recipient's `orcpt` and
/// `notify`.
pub fn message_json(id: MsgId, envelope: &Envelope, details: bool) -> Value {
    let recipients: Vec<Value> = envelope
        .recipients
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let (status, attempts, last_reply, next) = match &r.status {
                RcptStatus::Pending => ("pending", 0, None, None),
                RcptStatus::Deferred {
                    reply,
                    attempts,
                    next_attempt,
                    ..
                } => ("deferred", *attempts, Some(reply), Some(*next_attempt)),
                RcptStatus::Delivered { reply, .. } => ("delivered", 0, Some(reply), None),
                RcptStatus::Failed { reply, .. } => ("failed", 0, Some(reply), None),
            };
            let mut rcpt = json!({
                "index": index,
                "address": r.address,
                "original": r.original,
                "route": match r.route { Route::Local { .. } => "local", Route::Remote => "remote" },
                "status": status,
                "destination": null,
                "attempts": attempts,
                "last_reply": last_reply,
                "answered_by": null,
                "next_attempt_at": next,
                "expires_at": null,
                "wait": null,
            });
            if details {
                rcpt["orcpt"] = json!(r.orcpt);
                rcpt["notify"] = json!(r.notify);
            }
            rcpt
        })
        .collect();
    let mut m = json!({
        "id": id.to_string(),
        "sender": envelope.sender,
        "size": envelope.size,
        "received_at": envelope.received_at,
        "held": false,
        "recipients": recipients,
    });
    if details {
        m["client_ip"] = json!(envelope.client_ip);
        m["helo"] = json!(envelope.helo);
        m["smtputf8"] = json!(envelope.smtputf8);
        m["body_type"] = json!(envelope.body_type);
        m["ret"] = json!(envelope.ret);
        m["envid"] = json!(envelope.envid);
    }
    m
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(sanitize)
}

fn int(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

fn text_or_dash(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => sanitize(s),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "-".into(),
    }
}

/// "next in 4m 10s" for `at` 250 s from now; "next due now" once it has
/// passed (the server may not have got to it yet).
fn when(what: &str, at: i64, now: i64) -> String {
    if at <= now {
        format!("{what} due now")
    } else {
        let left = humantime::format_duration(Duration::from_secs((at - now) as u64));
        format!("{what} in {left}")
    }
}

/// "3m 2s ago", or "-" without a time.
fn ago(at: Option<i64>, now: i64) -> String {
    match at {
        Some(at) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now.saturating_sub(at).max(0) as u64))
        ),
        None => "-".into(),
    }
}

/// `tern queue list`: one block per message, or "queue is empty".
pub fn render_list(reply: &Value, now: i64) -> String {
    let messages = reply
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if messages.is_empty() {
        return "queue is empty\n".into();
    }
    messages.iter().map(|m| render_message(m, now)).collect()
}

/// One message: a header line, then a line per recipient.
pub fn render_message(m: &Value, now: i64) -> String {
    let mut out = String::new();
    let age = ago(int(m, "received_at"), now);
    let age = age.strip_suffix(" ago").unwrap_or(&age);
    let held = if m.get("held").and_then(Value::as_bool) == Some(true) {
        "  HELD"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "{}  age {age}  size {}  from <{}>{held}",
        text_or_dash(m, "id"),
        text_or_dash(m, "size"),
        text(m, "sender").unwrap_or_default(),
    );
    for r in recipients(m) {
        let _ = writeln!(
            out,
            "    <{}>  {}",
            text(r, "address").unwrap_or_default(),
            describe_recipient(r, now)
        );
    }
    out
}

fn recipients(m: &Value) -> &[Value] {
    m.get("recipients")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A recipient's state in one line, e.g. "deferred after 3 attempt(s) to
/// mx:example.org, next in 4m 10s (backoff) — last reply from
/// mx1.example.org[192.0.2.1]:25: 451 4.7.1 try later".
pub fn describe_recipient(r: &Value, now: i64) -> String {
    let status = text(r, "status").unwrap_or_default();
    let reply = text(r, "last_reply");
    let by = text(r, "answered_by");
    let reply_from = |reply: &str| match &by {
        Some(host) => format!("from {host}: {reply}"),
        None => reply.to_string(),
    };
    match status.as_str() {
        "delivered" => {
            return format!(
                "delivered ({})",
                reply_from(reply.as_deref().unwrap_or("-"))
            );
        }
        "failed" => return format!("failed: {}", reply_from(reply.as_deref().unwrap_or("-"))),
        _ => {}
    }
    let attempts = int(r, "attempts").unwrap_or(0);
    let remote = text(r, "route").as_deref() != Some("local");
    let mut out = if attempts > 0 {
        format!("deferred after {attempts} attempt(s)")
    } else if remote {
        "waiting for outbound delivery".into()
    } else {
        "pending".into()
    };
    if let Some(dest) = text(r, "destination") {
        let _ = write!(out, " to {dest}");
    }
    match r.get("wait").filter(|w| w.is_object()) {
        Some(wait) => {
            let _ = write!(out, ", {}", describe_wait(wait, now));
        }
        None => {
            if let Some(at) = int(r, "next_attempt_at") {
                let _ = write!(out, ", {}", when("next", at, now));
            }
        }
    }
    if let Some(reply) = &reply {
        let _ = write!(out, " — last reply {}", reply_from(reply));
    }
    out
}

/// Why a recipient waits, e.g. "next in 4m 10s (backoff)" or "waiting for a
/// slot (window full: 4 of 4 in flight)".
pub fn describe_wait(wait: &Value, now: i64) -> String {
    let reason = text(wait, "reason").unwrap_or_default();
    let label = match reason.as_str() {
        "due" => "due",
        "backoff" => "backoff",
        "window_full" => "window full",
        "throttled" => "destination throttled",
        "destination_dead" => "destination dead, waiting for its probe",
        "held" => "held",
        "in_flight" => "being delivered now",
        "busy" => "all delivery slots busy",
        "tls_required" => "TLS required but not offered",
        "unreachable" => "host unreachable",
        "" => "unknown reason",
        other => other,
    };
    let mut extras = String::new();
    match (int(wait, "in_flight"), int(wait, "window")) {
        (Some(n), Some(w)) => {
            let _ = write!(extras, ": {n} of {w} in flight");
        }
        (Some(n), None) => {
            let _ = write!(extras, ": {n} in flight");
        }
        _ => {}
    }
    if let Some(detail) = text(wait, "detail") {
        let _ = write!(extras, "; {detail}");
    }
    match (reason.as_str(), int(wait, "until")) {
        ("in_flight" | "held", _) => format!("{label}{extras}"),
        ("due", None) => format!("due now{extras}"),
        (_, Some(at)) => format!("{} ({label}{extras})", when("next", at, now)),
        (_, None) => format!("waiting ({label}{extras})"),
    }
}

/// `tern queue show`: the message block and its envelope details (not the
/// body: the caller prints that).
pub fn render_show(m: &Value, now: i64) -> String {
    let mut out = render_message(m, now);
    let _ = writeln!(
        out,
        "client: {} (HELO {})",
        text_or_dash(m, "client_ip"),
        text_or_dash(m, "helo")
    );
    let received = int(m, "received_at")
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|d| d.to_rfc2822())
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "received: {received}");
    let _ = writeln!(
        out,
        "smtputf8: {}  body: {}  ret: {}  envid: {}",
        text_or_dash(m, "smtputf8"),
        text_or_dash(m, "body_type"),
        text_or_dash(m, "ret"),
        text_or_dash(m, "envid")
    );
    for r in recipients(m) {
        let _ = write!(
            out,
            "recipient <{}>: rcpt-to <{}>  orcpt {}  notify {}",
            text(r, "address").unwrap_or_default(),
            text(r, "original").unwrap_or_default(),
            text_or_dash(r, "orcpt"),
            text_or_dash(r, "notify"),
        );
        if let Some(at) = int(r, "expires_at") {
            let _ = write!(out, "  {}", when("gives up", at, now));
        }
        out.push('\n');
    }
    out
}

/// `tern queue destinations`: a table, one row per destination.
pub fn render_destinations(reply: &Value, now: i64) -> String {
    let rows = reply
        .get("destinations")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if rows.is_empty() {
        return "no destinations with queued mail or remembered state\n".into();
    }
    let header = [
        "DESTINATION",
        "QUEUED",
        "IN FLIGHT",
        "RATE/MIN",
        "THROTTLED",
        "FAILURES",
        "NEXT",
        "LAST SUCCESS",
        "LAST ERROR",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for d in rows {
        let rate = match d.get("rate_per_minute").and_then(Value::as_f64) {
            Some(r) => format!("{r:.1}"),
            None => "-".into(),
        };
        let next = match (int(d, "next_probe"), int(d, "next_start")) {
            (Some(at), _) => when("probe", at, now),
            (None, Some(at)) if at > now => when("start", at, now),
            _ => "-".into(),
        };
        let last_error = match text(d, "last_error") {
            Some(e) => match int(d, "last_error_at") {
                Some(_) => format!("{} ({})", e, ago(int(d, "last_error_at"), now)),
                None => e,
            },
            None => "-".into(),
        };
        table.push(vec![
            text_or_dash(d, "destination"),
            text_or_dash(d, "queued"),
            format!(
                "{}/{}",
                text_or_dash(d, "in_flight"),
                text_or_dash(d, "window")
            ),
            rate,
            text_or_dash(d, "throttled"),
            text_or_dash(d, "consecutive_failures"),
            next,
            ago(int(d, "last_success_at"), now),
            last_error,
        ]);
    }
    let columns = header.len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The count in a mutating command's `{"affected": n}`.
pub fn affected(reply: &Value) -> Option<u64> {
    reply.get("affected").and_then(Value::as_u64)
}
