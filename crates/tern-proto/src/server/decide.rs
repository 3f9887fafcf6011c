//! Applying the driver's [`Decision`] to the outstanding query.
//!
//! Invariants: a decision with no outstanding query is ignored; `Reject`
//! leaves the state as RFC 5321 says (a refused MAIL starts no transaction, a
//! refused RCPT is not added, a refused DATA/BDAT ends the transaction);
//! `Disconnect` always ends in Close; `Queued` outside `EndOfData` means
//! `Accept`; `AuthChallenge` outside `Auth`/`AuthResponse` means a 451
//! refusal, never acceptance.
//!
//! Not done: validating that a driver's custom reply has a sensible code
//! (it is written as given, and counted as an error when 4xx/5xx).
//!
//! Errors: none.

use super::{Decision, Mode, Pending, Session};
use crate::data::ContentDecoder;
use crate::reply::{EnhancedCode, Reply};

impl Session {
    /// Answers the outstanding query (see [`Decision`]).
    pub fn decide(&mut self, decision: Decision) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let custom = match decision {
            Decision::Disconnect(r) => {
                // Nothing after EndOfData was streamed to the driver yet
                // that it does not already own.
                self.close_with(r);
                return;
            }
            Decision::Reject(r) => {
                self.reject(pending, r);
                return;
            }
            Decision::Accept => None,
            Decision::AcceptWith(r) => Some(r),
            Decision::AuthChallenge(challenge) => {
                match pending {
                    Pending::Auth => self.auth_challenge(&challenge),
                    // A driver bug must not pass for a yes.
                    other => self.reject(
                        other,
                        Reply::enhanced(451, (4, 3, 0), "Error: internal server error"),
                    ),
                }
                return;
            }
            Decision::Queued { queue_id } => match pending {
                Pending::EndOfData => Some(Reply::new(
                    250,
                    Some(EnhancedCode(2, 0, 0)),
                    format!("Ok: queued as {queue_id}"),
                )),
                _ => None,
            },
        };
        self.accept(pending, custom);
    }

    fn accept(&mut self, pending: Pending, custom: Option<Reply>) {
        match pending {
            Pending::Connect => {
                if !self.input.is_empty() {
                    // §4.3.1: the client must wait for the greeting.
                    let text = format!("{} Error: input before greeting", self.config.hostname);
                    self.close_with(Reply::enhanced(554, (5, 5, 1), &text));
                    return;
                }
                let text = format!("{} {}", self.config.hostname, self.config.greeting_text);
                self.reply(custom.unwrap_or_else(|| Reply::new(220, None, text)));
            }
            Pending::Helo { domain, extended } => {
                // What EHLO offers depends on the state (TLS, AUTH).
                let standard = if extended {
                    self.ehlo_reply(&domain)
                } else {
                    Reply::new(250, None, self.config.hostname.clone())
                };
                self.helo = Some(domain);
                self.esmtp = extended;
                self.reply(custom.unwrap_or(standard));
            }
            Pending::Mail(from, params) => {
                self.start_transaction(from, params);
                self.reply(custom.unwrap_or_else(|| Reply::enhanced(250, (2, 1, 0), "Ok")));
            }
            Pending::Rcpt(to, params) => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.rcpts.push((to, params));
                }
                self.reply(custom.unwrap_or_else(|| Reply::enhanced(250, (2, 1, 5), "Ok")));
            }
            Pending::Data => {
                if !self.input.is_empty() {
                    // Content arrived before our 354 could have been seen.
                    self.pipelining_violation();
                    return;
                }
                self.msg = Some(ContentDecoder::dot(self.limits()));
                self.mode = Mode::Data;
                self.reply(
                    custom.unwrap_or_else(|| {
                        Reply::new(354, None, "End data with <CR><LF>.<CR><LF>")
                    }),
                );
            }
            Pending::BdatData { size, last } => {
                // The reply comes after the chunk (RFC 3030 §2); a custom
                // positive reply has no place to go.
                self.msg = Some(ContentDecoder::chunked(self.limits()));
                self.mode = Mode::Chunk {
                    remaining: size,
                    size,
                    last,
                };
            }
            Pending::EndOfData => {
                // The driver owns the content now: no MessageAborted.
                self.msg = None;
                self.tx = None;
                // The error limit is for clients that get nowhere (Postfix:
                // "errors without delivering mail"): a list server that meets
                // a few stale addresses in every message must not be cut off.
                self.errors = 0;
                self.junk_commands = 0;
                self.reply(custom.unwrap_or_else(|| Reply::enhanced(250, (2, 0, 0), "Ok")));
            }
            Pending::Auth => self.auth_succeeded(custom),
        }
    }

    fn reject(&mut self, pending: Pending, r: Reply) {
        match pending {
            Pending::Connect => self.close_with(r),
            Pending::Helo { .. } | Pending::Mail(..) => self.reply(r),
            Pending::Rcpt(..) => {
                self.reply(r);
                self.rejected_recipients += 1;
                let max = self.config.max_rejected_recipients;
                if max != 0 && self.rejected_recipients >= max {
                    let text = format!(
                        "{} Error: too many rejected recipients",
                        self.config.hostname
                    );
                    self.close_with(Reply::new(421, Some(EnhancedCode(4, 7, 0)), text));
                }
            }
            Pending::Data => {
                self.reset_transaction();
                self.reply(r);
            }
            Pending::BdatData { size, .. } => {
                // Swallow the chunk, then reply and reset.
                self.mode = Mode::Discard {
                    remaining: size,
                    reply: r,
                };
            }
            Pending::EndOfData => {
                self.msg = None;
                self.tx = None;
                self.reply(r);
            }
            // The exchange is over; the reply counts as an error.
            Pending::Auth => self.reply(r),
        }
    }
}
