//! Delivery agents. Only local Maildir delivery exists so far; LMTP and
//! remote SMTP come with the delivery issue, behind the same outcome type.

pub mod maildir;
pub mod worker;

/// What one delivery attempt did for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    Delivered(String),
    /// Try again later; the text goes into the queue and the logs.
    Temp(String),
    /// Never going to work; the message bounces for this recipient.
    Perm(String),
}
