//! Signs one message the way the server will: the config's DKIM keys (found
//! and named, `tern::dkim::Signers::from_config`), the message read from
//! standard input, the `DKIM-Signature:` field(s) and then the message
//! written to standard output. For the integration tests, which verify the
//! result with an independent DKIM implementation (dkimpy).
//!
//! Usage: `dkim-sign CONFIG DOMAIN < message > signed`. Exits 1 with the
//! config's errors, or when DOMAIN has no key (nothing to test then).

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, domain] = args.as_slice() else {
        eprintln!("usage: dkim-sign CONFIG DOMAIN < message > signed");
        return ExitCode::from(2);
    };
    let signers = match tern::config::load(Path::new(config))
        .and_then(|runtime| tern::dkim::Signers::from_config(&runtime.dkim))
    {
        Ok(signers) => signers,
        Err(errors) => {
            for e in errors {
                eprintln!("dkim-sign: {config}: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if !signers.signs_for(domain) {
        eprintln!("dkim-sign: no DKIM key for {domain}");
        return ExitCode::FAILURE;
    }
    let mut message = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut message) {
        eprintln!("dkim-sign: cannot read the message: {e}");
        return ExitCode::FAILURE;
    }
    let fields = match signers.sign(domain, &message) {
        Ok(fields) => fields,
        Err(e) => {
            eprintln!("dkim-sign: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    match out
        .write_all(&fields)
        .and_then(|()| out.write_all(&message))
        .and_then(|()| out.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dkim-sign: cannot write: {e}");
            ExitCode::FAILURE
        }
    }
}
