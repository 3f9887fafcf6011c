//! Local injection: `tern sendmail` (also the `tern` binary run under the
//! name `sendmail`), the command cron, PHP's `mail()`, `git send-email`,
//! `mailx` and logwatch hand their mail to, and the server's end of it, a
//! Unix socket served by the same SMTP session engine as the TCP
//! listeners.
//!
//! Invariants:
//! - The command never writes the spool itself (it runs as any user): it
//!   speaks SMTP to the running server over `[sendmail] socket`, and exits
//!   0 only after the server's `250` to the end of data, which comes after
//!   the spool commit.
//! - The server knows the client by the kernel's peer credentials (uid,
//!   pid), never by what the client says: they name it in the log and in
//!   the `Received:` field, and decide the sender rule.
//! - Failures are one line (or one per refused recipient) on stderr and a
//!   sysexits.h status ([`exit`]).
//!
//! Not here: the SMTP rules (the session engine's), relay and recipient
//! policy (`policy.rs`: a local client may relay, as Postfix's local
//! submission may).

mod args;
mod client;
mod listen;
mod message;

pub use args::{Mode, Options, UsageError, parse};
pub use listen::{Listener, bind};

use crate::config::SendmailSettings;
use client::{Client, Failure, Submission};
use std::ffi::CStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// sysexits.h.
pub mod exit {
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const OSERR: u8 = 71;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const PROTOCOL: u8 = 76;
    pub const NOPERM: u8 = 77;
    pub const CONFIG: u8 = 78;
}

/// The config file `tern sendmail` reads when `-C` names none and
/// `$TERN_CONFIG` is unset, if it exists (otherwise the embedded default).
pub const DEFAULT_CONFIG: &str = "/etc/tern/tern.toml";

/// The program on the other end of the local socket, as the kernel
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalClient {
    pub uid: u32,
    pub pid: Option<i32>,
    /// The uid's login name, when the password database has one.
    pub login: Option<String>,
}

/// What `main` should do after parsing: run the sendmail command, or list
/// the queue (`-bp`) with the config it found.
pub enum Action {
    Done(ExitCode),
    ListQueue(Option<PathBuf>),
}

/// Runs `sendmail` with the arguments after the program name.
pub fn run(arguments: Vec<String>) -> Action {
    let opts = match parse(arguments) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e} (see tern sendmail --help)");
            return Action::Done(ExitCode::from(exit::USAGE));
        }
    };
    if opts.mode == Mode::Help {
        print!("{}", args::HELP);
        return Action::Done(ExitCode::SUCCESS);
    }
    let config = config_path(opts.config.clone());
    if opts.mode == Mode::ListQueue {
        return Action::ListQueue(config);
    }
    let settings = match crate::config::sendmail_settings_of(config.as_deref()) {
        Ok(s) => s,
        Err(errors) => {
            let file = config
                .as_deref()
                .map_or("(embedded default)".into(), |p| p.display().to_string());
            for e in errors {
                eprintln!("sendmail: {file}: {e}");
            }
            return Action::Done(ExitCode::from(exit::CONFIG));
        }
    };
    let outcome = match opts.mode {
        Mode::Smtp => client::connect(&settings.socket).and_then(client::relay_stdio),
        _ => deliver(&opts, &settings),
    };
    Action::Done(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            for line in f.message.lines() {
                eprintln!("sendmail: {line}");
            }
            ExitCode::from(f.status)
        }
    })
}

/// `-C FILE`, else `$TERN_CONFIG`, else [`DEFAULT_CONFIG`] if it exists;
/// None: the embedded default.
fn config_path(given: Option<PathBuf>) -> Option<PathBuf> {
    given
        .or_else(|| std::env::var_os("TERN_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let default = Path::new(DEFAULT_CONFIG);
            default.exists().then(|| default.to_path_buf())
        })
}

/// `-bm`: reads the message, readies it and hands it over.
fn deliver(opts: &Options, settings: &SendmailSettings) -> Result<(), Failure> {
    let sender = envelope_sender(opts, &settings.origin)?;
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut input)
        .map_err(|e| {
            Failure::new(
                exit::IOERR,
                format!("cannot read the message from stdin: {e}"),
            )
        })?;
    let normalized = message::normalize(&input, opts.dot_ends_message);
    drop(input);
    let full_name = opts
        .full_name
        .clone()
        .or_else(|| std::env::var("NAME").ok());
    let author = if sender.is_empty() {
        format!("MAILER-DAEMON@{}", settings.origin)
    } else {
        sender.clone()
    };
    let prepared = message::prepare(
        &normalized,
        opts.extract_recipients,
        (&author, full_name.as_deref().filter(|n| !n.is_empty())),
        &settings.origin,
    );
    let recipients = recipients(opts, &prepared.extracted, &settings.origin);
    if recipients.is_empty() {
        let why = if opts.extract_recipients {
            "no recipients: none given and none in To:, Cc: or Bcc:"
        } else {
            "no recipients given (or use -t to take them from the message)"
        };
        return Err(Failure::new(exit::USAGE, why));
    }
    let mut mail_params = vec![format!("SIZE={}", prepared.content.len())];
    match opts.body.as_deref() {
        Some(body) => mail_params.push(format!("BODY={body}")),
        None if !prepared.content.is_ascii() => mail_params.push("BODY=8BITMIME".into()),
        None => {}
    }
    if !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()) {
        mail_params.push("SMTPUTF8".into());
    }
    if let Some(ret) = &opts.ret {
        mail_params.push(format!("RET={ret}"));
    }
    if let Some(envid) = &opts.envid {
        mail_params.push(format!("ENVID={}", xtext(envid)));
    }
    let rcpt_params = opts
        .notify
        .as_ref()
        .map(|n| vec![format!("NOTIFY={n}")])
        .unwrap_or_default();
    let stream = client::connect(&settings.socket)?;
    let mut client = Client::new(stream, opts.verbose)?;
    client.submit(&Submission {
        sender: &sender,
        recipients: &recipients,
        mail_params,
        rcpt_params,
        content: &prepared.content,
    })?;
    Ok(())
}

/// The envelope sender: `-f`/`-r` (qualified; `<>` or empty: the null
/// sender), else the invoking user's login at the origin domain.
fn envelope_sender(opts: &Options, origin: &str) -> Result<String, Failure> {
    if let Some(given) = &opts.sender {
        let trimmed = given.trim();
        let bare = trimmed
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(trimmed);
        if bare.is_empty() {
            return Ok(String::new());
        }
        return match message::argument_addresses(trimmed).as_slice() {
            [one] => Ok(message::qualify(one, origin)),
            _ => Err(Failure::new(
                exit::USAGE,
                format!("-f {given:?} is not one address"),
            )),
        };
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    match login_of(uid) {
        Some(login) => Ok(format!("{login}@{origin}")),
        None => Err(Failure::new(
            exit::OSERR,
            format!("uid {uid} has no user name in the password database; give a sender with -f"),
        )),
    }
}

/// The operands and, with `-t`, the header's recipients (Postfix adds
/// both, and so do we); qualified, each once.
fn recipients(opts: &Options, extracted: &[String], origin: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let given = opts
        .recipients
        .iter()
        .flat_map(|a| message::argument_addresses(a));
    for address in extracted.iter().cloned().chain(given) {
        let address = message::qualify(&address, origin);
        if !out.iter().any(|a| a.eq_ignore_ascii_case(&address)) {
            out.push(address);
        }
    }
    out
}

/// RFC 3461 §4: xtext for ENVID.
fn xtext(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'!'..=b'~' if b != b'+' && b != b'=' => (b as char).to_string(),
            _ => format!("+{b:02X}"),
        })
        .collect()
}

/// The login name of `uid` from the password database (getpwuid_r: NSS
/// modules included).
pub fn login_of(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain data; zeroed is a valid (empty) value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to memory we own, of the length given;
        // the strings written into `buf` live as long as `buf`.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: getpwuid_r succeeded: pw_name is a NUL-terminated string in `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return name
            .to_str()
            .ok()
            .map(str::to_string)
            .filter(|n| !n.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_qualified_and_listed_once() {
        let opts = parse(["-t", "root", "Alice@Example.test, bob"]).unwrap();
        let got = recipients(
            &opts,
            &["alice@example.test".into(), "carol".into()],
            "example.test",
        );
        assert_eq!(
            got,
            [
                "alice@example.test",
                "carol@example.test",
                "root@example.test",
                "bob@example.test"
            ]
        );
    }

    #[test]
    fn sender_from_f_is_qualified_and_may_be_null() {
        let s =
            |args: &[&str]| envelope_sender(&parse(args.iter().copied()).unwrap(), "example.test");
        assert_eq!(s(&["-f", "cron"]).unwrap(), "cron@example.test");
        assert_eq!(s(&["-f", "<a@b.test>"]).unwrap(), "a@b.test");
        assert_eq!(s(&["-f", "<>"]).unwrap(), "");
        assert!(s(&["-f", "a@b.test, c@d.test"]).is_err());
        // Without -f: whoever runs the tests, at the origin.
        assert!(s(&[]).unwrap().ends_with("@example.test"));
    }

    #[test]
    fn envid_is_xtext() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }

    #[test]
    fn root_has_a_login() {
        assert_eq!(login_of(0).as_deref(), Some("root"));
    }
}
