//! tern-proto: Tern's sans-IO SMTP protocol engine (RFC 5321 and the
//! extensions we advertise: PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
//! ENHANCEDSTATUSCODES, CHUNKING, DSN, and where configured STARTTLS and
//! AUTH).
//!
//! Everything here is pure code over bytes: no tokio, no sockets, no files.
//! The daemon (`tern`) feeds bytes and decisions into [`Session`] and writes
//! the replies it emits.
//!
//! Modules: [`address`] (paths and mailboxes), [`command`] (command lines and
//! ESMTP parameters), [`reply`] (reply codec), [`base64`] (for AUTH),
//! [`data`] (DATA/BDAT content framing and checks), [`ehlo`] (capabilities),
//! [`headers`] (header-section filtering: forged `Authentication-Results:`),
//! [`server`] (the session state machine: commands, STARTTLS, AUTH),
//! [`client`] (the SMTP/LMTP client state machine and the outgoing content
//! encoder).
//!
//! Errors: each parser returns a small error enum that maps one-to-one to
//! the SMTP reply the session sends for it.

pub mod address;
pub mod base64;
pub mod client;
pub mod command;
pub mod data;
pub mod ehlo;
pub mod headers;
pub mod reply;
pub mod server;

pub use address::*;
pub use command::{BodyType, MailParams, Notify, Orcpt, RcptParams, Ret, SaslData};
pub use reply::*;
pub use server::*;
