//! Envelope types stored in MSG records (as JSON) and returned by the index.
//!
//! Invariants: `Recipient` order never changes once committed: STATE records
//! address recipients by index into `Envelope::recipients`.
//! Does not validate addresses (the protocol engine did, RFC 5321 §4.1.2).
//! Errors: none (plain data).

use serde::{Deserialize, Serialize};

/// Sender, recipients and per-recipient state of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Envelope {
    /// Reverse-path; "" for the null reverse-path `<>` (RFC 5321 §4.5.5).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Unix seconds when the message was accepted.
    pub received_at: i64,
    /// Body size in bytes; set by [`crate::spool::Spool::commit`].
    pub size: u64,
    /// SMTPUTF8 was given at MAIL (RFC 6531 §3.4).
    pub smtputf8: bool,
    /// BODY= parameter: "7BIT" | "8BITMIME" (RFC 6152 §2).
    pub body_type: Option<String>,
    /// DSN RET: "FULL" | "HDRS" (RFC 3461 §4.3).
    pub ret: Option<String>,
    /// DSN ENVID, xtext-decoded (RFC 3461 §4.4).
    pub envid: Option<String>,
    pub client_ip: String,
    pub helo: String,
    /// The SMTP AUTH user who submitted it: the circuit breaker holds a
    /// user's queued mail by it. Absent in records written before it
    /// existed and for mail not submitted by a user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
}

impl Envelope {
    /// Every recipient delivered or failed: the message may leave the spool.
    pub fn all_final(&self) -> bool {
        self.recipients.iter().all(|r| r.status.is_final())
    }
}

/// The domain of a stored address (`local@domain`; the local part may hold
/// a quoted `@`, the domain never does).
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

/// One recipient of a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// Final destination address (after alias expansion).
    pub address: String,
    /// The address as given at RCPT TO.
    pub original: String,
    /// DSN ORCPT "type;addr" (RFC 3461 §4.2).
    pub orcpt: Option<String>,
    /// DSN NOTIFY as given, e.g. "SUCCESS,FAILURE" or "NEVER" (RFC 3461 §4.1).
    pub notify: Option<String>,
    pub route: Route,
    pub status: RcptStatus,
}

/// Where a recipient goes, decided at RCPT time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// Local delivery to the mailbox of this local user name.
    Local { mailbox: String },
    /// Relay by MX / smarthost.
    Remote,
}

/// Delivery state of one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptStatus {
    Pending,
    Delivered {
        reply: String,
        at: i64,
    },
    Deferred {
        reply: String,
        attempts: u32,
        next_attempt: i64,
        /// The sender was told of the delay (RFC 3464 `Action: delayed`);
        /// one notice per recipient.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        delay_notified: bool,
    },
    Failed {
        reply: String,
        at: i64,
    },
}

impl RcptStatus {
    /// Delivered or Failed: no further attempt will be made.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RcptStatus::Delivered { .. } | RcptStatus::Failed { .. }
        )
    }
}
