//! Fuzz target: `parse_command` over arbitrary bytes.
//!
//! Invariants checked: no panic; every error maps to a well-formed reply;
//! a parsed MAIL/RCPT path formats back to text that parses to the same
//! path (format ∘ parse is stable); an AUTH mechanism has the SASL name
//! syntax, and an initial response that decodes as base64 encodes back to
//! base64 that decodes to the same octets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::command::{Command, parse_command};
use tern_proto::{Reply, base64, parse_forward_path, parse_reverse_path};

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
        Ok(Command::Auth { mechanism, initial }) => {
            assert!((1..=20).contains(&mechanism.len()), "{mechanism}");
            assert!(
                (mechanism.bytes()).all(|b| b.is_ascii_uppercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_'),
                "{mechanism}"
            );
            if let Some(octets) = initial.and_then(|r| base64::decode(r.as_bytes())) {
                let again = base64::encode(&octets);
                assert_eq!(base64::decode(again.as_bytes()), Some(octets));
            }
        }
        Ok(_) => {}
    }
});
