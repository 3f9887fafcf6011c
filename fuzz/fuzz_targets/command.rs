//! Fuzz target: `parse_command` over arbitrary bytes.
//!
//! Invariants checked: no panic; every error maps to a well-formed reply;
//! a parsed MAIL/RCPT path formats back to text that parses to the same
//! path (format ∘ parse is stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::command::{Command, parse_command};
use tern_proto::{Reply, parse_forward_path, parse_reverse_path};

fuzz_target!(|data: &[u8]| {
    match parse_command(data) {
        Err(e) => {
            let r = e.reply();
            let bytes = r.to_bytes();
            let (back, n) = Reply::parse(&bytes).expect("error reply must parse");
            assert_eq!((back.code, n), (r.code, bytes.len()));
        }
        Ok(Command::Mail(path, _)) => {
            let text = path.to_string();
            let (back, n) = parse_reverse_path(&text).expect("formatted path must parse");
            assert_eq!((back, n), (path, text.len()));
        }
        Ok(Command::Rcpt(path, _)) => {
            let text = path.to_string();
            let (back, n) = parse_forward_path(&text).expect("formatted path must parse");
            assert_eq!((back, n), (path, text.len()));
        }
        Ok(_) => {}
    }
});
