//! Delivery agents: local Maildir delivery, and one outbound attempt over
//! SMTP or LMTP (`smtp`, not yet wired into the queue).

pub mod maildir;
pub mod smtp;
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
