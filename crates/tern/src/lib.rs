//! Tern: a durable SMTP mail server. This crate is the daemon around the
//! sans-IO protocol engine in `tern-proto`.

pub mod auth;
pub mod bounce;
pub mod config;
pub mod conn;
pub mod control;
pub mod deliver;
pub mod dkim;
pub mod dns;
pub mod egress;
pub mod fsutil;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod privileges;
pub mod queue;
pub mod reload;
pub mod route;
pub mod scheduler;
pub mod sendmail;
pub mod server;
pub mod service;
pub mod session;
pub mod spool;
pub mod submission;
pub mod tls;
