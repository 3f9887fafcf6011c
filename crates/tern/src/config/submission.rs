//! The `[submission]` section: per-user egress limits and the circuit
//! breaker, validated into [`EgressLimits`] (whose constants are the
//! defaults, here and in `tern.example.toml`).

use super::schema::FileConfig;
use super::validate::{DAY, Errors, SECOND, duration};
use crate::egress::EgressLimits;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    pub max_messages_per_hour: u32,
    pub max_recipients_per_hour: u32,
    pub max_new_recipients_per_day: u32,
    pub breaker_factor: u32,
    pub breaker_remote_rejects: u32,
    pub rate_window: String,
    pub new_recipients_window: String,
    pub received_client_address: bool,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        let d = EgressLimits::default();
        let text = |d: Duration| humantime::format_duration(d).to_string();
        SubmissionConfig {
            max_messages_per_hour: d.max_messages_per_hour,
            max_recipients_per_hour: d.max_recipients_per_hour,
            max_new_recipients_per_day: d.max_new_recipients_per_day,
            breaker_factor: d.breaker_factor,
            breaker_remote_rejects: d.breaker_remote_rejects,
            rate_window: text(d.rate_window),
            new_recipients_window: text(d.new_recipients_window),
            received_client_address: true,
        }
    }
}

pub(super) fn check_submission(file: &FileConfig, errors: &mut Errors) -> EgressLimits {
    let s = &file.submission;
    let mut count = |key: &str, value: u32| {
        if !(1..=1_000_000).contains(&value) {
            errors.push(format!("submission.{key}"), "must be between 1 and 1000000");
        }
        value
    };
    let max_messages_per_hour = count("max_messages_per_hour", s.max_messages_per_hour);
    let max_recipients_per_hour = count("max_recipients_per_hour", s.max_recipients_per_hour);
    let max_new_recipients_per_day =
        count("max_new_recipients_per_day", s.max_new_recipients_per_day);
    let breaker_remote_rejects = count("breaker_remote_rejects", s.breaker_remote_rejects);
    if !(2..=1000).contains(&s.breaker_factor) {
        errors.push(
            "submission.breaker_factor",
            "must be between 2 and 1000 (1 would hold every user who reaches a limit)",
        );
    }
    EgressLimits {
        max_messages_per_hour,
        max_recipients_per_hour,
        max_new_recipients_per_day,
        breaker_factor: s.breaker_factor,
        breaker_remote_rejects,
        rate_window: duration(
            errors,
            "submission.rate_window",
            &s.rate_window,
            SECOND,
            DAY,
        ),
        new_recipients_window: duration(
            errors,
            "submission.new_recipients_window",
            &s.new_recipients_window,
            SECOND,
            DAY * 30,
        ),
    }
}
