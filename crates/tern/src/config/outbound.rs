//! Validation of the outbound keys (`[dns]`, `[route]`, `[outbound]`) into
//! [`OutboundSettings`]: what the router, the scheduler and the SMTP driver
//! are built from.
//!
//! Invariants: every route parsed (a route that cannot work is an error
//! under its key, never a message stuck at run time); relay credentials are
//! complete (a user name without a password is an error) and read from the
//! password file here, so a missing file shows at `check-config`.
//!
//! Errors: every problem goes into the caller's error list under its key.

use super::schema::FileConfig;
use super::validate::{DAY, Errors, SECOND, absolute, at_most, duration};
use crate::deliver::smtp::TlsMode;
use crate::dns::DnsSettings;
use crate::route::{AddressFamilies, Routes};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_proto::client::Credentials;

/// The validated outbound configuration.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    pub dns: DnsSettings,
    pub routes: Routes,
    pub families: AddressFamilies,
    /// The port MX hosts are reached on (25; tests use others).
    pub mx_port: u16,
    /// TLS policy for MX deliveries and per-domain transports.
    pub tls: TlsMode,
    /// TLS policy for the relay host and the fallback relay.
    pub relay_tls: TlsMode,
    /// Extra trust anchors for `verify` (a private CA), PEM.
    pub tls_ca_file: Option<PathBuf>,
    pub relay_credentials: Option<Credentials>,
    /// Send the relay credentials without TLS (a relay on this host).
    pub relay_auth_without_tls: bool,
    /// Delivery jobs in flight at once, all destinations together.
    pub max_connections: usize,
    pub window_initial: u32,
    pub window_max: u32,
    pub max_recipients_per_job: usize,
    pub max_messages_per_connection: usize,
    pub connect_timeout: Duration,
    /// Consecutive connection failures after which a destination is dead.
    pub dead_after: u32,
}

/// A TLS policy as written in the file (the names `TlsMode` displays).
fn tls_mode(errors: &mut Errors, key: &str, text: &str) -> TlsMode {
    let modes = [
        TlsMode::None,
        TlsMode::Opportunistic,
        TlsMode::Require,
        TlsMode::Verify,
    ];
    modes
        .into_iter()
        .find(|mode| mode.to_string() == text)
        .unwrap_or_else(|| {
            errors.push(
                key,
                format!(
                    "{text:?} is not a TLS policy (expected \"none\", \"opportunistic\", \
                     \"require\" or \"verify\")"
                ),
            );
            TlsMode::Opportunistic
        })
}

pub(super) fn check_outbound(
    file: &FileConfig,
    base: &Path,
    errors: &mut Errors,
) -> OutboundSettings {
    let (d, r, o) = (&file.dns, &file.route, &file.outbound);
    let dns =
        DnsSettings::from_config(&d.nameservers, &d.timeout, d.attempts).unwrap_or_else(|e| {
            errors.0.extend(e);
            DnsSettings::default()
        });
    let routes = Routes::from_config(
        r.relay.as_deref(),
        &r.transports,
        r.fallback_relay.as_deref(),
    )
    .unwrap_or_else(|e| {
        errors.0.extend(e);
        Routes::default()
    });
    let families = r.address_families.parse().unwrap_or_else(|e: String| {
        errors.push("route.address_families", e);
        AddressFamilies::default()
    });
    if r.mx_port == 0 {
        errors.push("route.mx_port", "must be a port number (1-65535)");
    }
    let tls = tls_mode(errors, "outbound.tls", &o.tls);
    let relay_tls = match &r.relay_tls {
        Some(text) => tls_mode(errors, "route.relay_tls", text),
        None => tls,
    };
    let tls_ca_file = o.tls_ca_file.as_deref().map(|p| absolute(base, p));
    if let Some(path) = &tls_ca_file
        && let Err(e) = std::fs::metadata(path)
    {
        errors.push(
            "outbound.tls_ca_file",
            format!("cannot read {}: {e}", path.display()),
        );
    }
    let relay_credentials = relay_credentials(file, base, errors);
    if relay_credentials.is_some() && r.relay.is_none() && r.fallback_relay.is_none() {
        errors.push(
            "route.relay_username",
            "credentials without route.relay or route.fallback_relay go nowhere",
        );
    }
    if o.max_connections < 1 {
        errors.push("outbound.max_connections", "must be at least 1");
    }
    at_most(
        errors,
        "outbound.max_connections",
        o.max_connections as u64,
        10_000,
    );
    if o.window_initial < 1 {
        errors.push("outbound.window_initial", "must be at least 1");
    }
    if o.window_max < o.window_initial {
        errors.push(
            "outbound.window_max",
            "must not be less than outbound.window_initial",
        );
    }
    at_most(
        errors,
        "outbound.window_max",
        u64::from(o.window_max),
        1_000,
    );
    if o.max_recipients_per_job < 1 {
        errors.push("outbound.max_recipients_per_job", "must be at least 1");
    }
    at_most(
        errors,
        "outbound.max_recipients_per_job",
        o.max_recipients_per_job as u64,
        1_000,
    );
    if o.max_messages_per_connection < 1 {
        errors.push("outbound.max_messages_per_connection", "must be at least 1");
    }
    let connect_timeout = duration(
        errors,
        "outbound.connect_timeout",
        &o.connect_timeout,
        Duration::from_millis(100),
        Duration::from_secs(600),
    );
    if o.dead_after < 1 {
        errors.push("outbound.dead_after", "must be at least 1");
    }
    OutboundSettings {
        dns,
        routes,
        families,
        mx_port: r.mx_port,
        tls,
        relay_tls,
        tls_ca_file,
        relay_credentials,
        relay_auth_without_tls: r.relay_auth_without_tls,
        max_connections: o.max_connections,
        window_initial: o.window_initial,
        window_max: o.window_max,
        max_recipients_per_job: o.max_recipients_per_job,
        max_messages_per_connection: o.max_messages_per_connection,
        connect_timeout,
        dead_after: o.dead_after,
    }
}

/// The relay's AUTH credentials: both parts or neither; the password
/// inline or (better: the config file stays shareable) from a file.
fn relay_credentials(file: &FileConfig, base: &Path, errors: &mut Errors) -> Option<Credentials> {
    let r = &file.route;
    let password = match (&r.relay_password, &r.relay_password_file) {
        (Some(_), Some(_)) => {
            errors.push(
                "route.relay_password_file",
                "give route.relay_password or route.relay_password_file, not both",
            );
            None
        }
        (Some(p), None) => Some(p.clone()),
        (None, Some(path)) => {
            let path = absolute(base, path);
            match std::fs::read_to_string(&path) {
                // One line; the newline an editor adds is not part of it.
                Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_string()),
                Err(e) => {
                    errors.push(
                        "route.relay_password_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    None
                }
            }
        }
        (None, None) => None,
    };
    match (&r.relay_username, password) {
        (Some(username), Some(password)) if !username.is_empty() => Some(Credentials {
            username: username.clone(),
            password,
        }),
        (Some(_), Some(_)) => {
            errors.push("route.relay_username", "must not be empty");
            None
        }
        (Some(_), None) if r.relay_password.is_none() && r.relay_password_file.is_none() => {
            errors.push(
                "route.relay_username",
                "needs route.relay_password or route.relay_password_file",
            );
            None
        }
        (None, Some(_)) => {
            errors.push(
                "route.relay_password",
                "a password needs route.relay_username",
            );
            None
        }
        _ => None,
    }
}

/// Validated `delivery.give_up` and `delivery.delay_notice` ("0s" turns
/// delay notices off).
pub(super) fn check_lifetimes(
    file: &FileConfig,
    errors: &mut Errors,
) -> (Duration, Option<Duration>) {
    let d = &file.delivery;
    let give_up = duration(errors, "delivery.give_up", &d.give_up, SECOND, 90 * DAY);
    let delay_notice = duration(
        errors,
        "delivery.delay_notice",
        &d.delay_notice,
        Duration::ZERO,
        90 * DAY,
    );
    let delay_notice = (!delay_notice.is_zero()).then_some(delay_notice);
    if delay_notice.is_some_and(|n| n >= give_up) {
        errors.push(
            "delivery.delay_notice",
            "must be shorter than delivery.give_up (or \"0s\" for none)",
        );
    }
    (give_up, delay_notice)
}
