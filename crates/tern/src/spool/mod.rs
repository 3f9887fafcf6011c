//! The durable queue (see spool.md).
