//! Tern: a durable SMTP mail server. This crate is the daemon around the
//! sans-IO protocol engine in `tern-proto`.

pub mod spool;
