//! The `[metrics]` section: where the Prometheus endpoint listens. Off
//! unless `address` is set (the embedded default sets it, on loopback).

use super::Listener;
use super::schema::FileConfig;
use super::validate::Errors;
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:port` to serve `GET /metrics` on.
    pub address: Option<String>,
}

pub(super) fn check_metrics(
    file: &FileConfig,
    listeners: &[Listener],
    errors: &mut Errors,
) -> Option<SocketAddr> {
    let text = file.metrics.address.as_deref()?;
    let Ok(address) = text.parse::<SocketAddr>() else {
        errors.push(
            "metrics.address",
            format!("{text:?} is not an IP address and port (e.g. \"127.0.0.1:9525\")"),
        );
        return None;
    };
    // Port 0 is allowed (tests: the kernel picks one, the log says which).
    if address.port() != 0
        && let Some(i) = listeners.iter().position(|l| l.address == address)
    {
        errors.push(
            "metrics.address",
            format!("{address} is also the address of listener {}", i + 1),
        );
    }
    Some(address)
}
