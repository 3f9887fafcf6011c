//! The command line of `sendmail`, as cron, PHP's `mail()`, `git
//! send-email`, `mailx` and logwatch write it: getopt-style single-letter
//! options (clustered, `-fADDR` or `-f ADDR`), the obsolete `-o` and `-b`
//! families, then recipients. clap cannot take these (`-oi`, `-bs` and
//! `-fADDR` are one option each, not clusters of flags), hence a parser of
//! our own, of options only: addresses are left to mail-parser.
//!
//! Errors: an unknown option, a missing argument or an unsupported mode is
//! a [`UsageError`] (exit status 64, EX_USAGE).

use std::path::PathBuf;

/// What the command is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `-bm` (the default): read a message from stdin and queue it.
    Deliver,
    /// `-bs`: speak SMTP on stdin and stdout.
    Smtp,
    /// `-bp` (`mailq`): list the queue.
    ListQueue,
    /// `--help`.
    Help,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// `-f` / `-r`: the envelope sender.
    pub sender: Option<String>,
    /// `-F`: the full name for a `From:` field we add.
    pub full_name: Option<String>,
    /// `-t`: recipients also from the `To:`, `Cc:` and `Bcc:` fields.
    pub extract_recipients: bool,
    /// False with `-i` / `-oi`: a line of a single dot is message text.
    pub dot_ends_message: bool,
    /// `-C`: the Tern config file.
    pub config: Option<PathBuf>,
    /// `-v`: the SMTP dialogue on stderr.
    pub verbose: bool,
    /// `-N`: DSN NOTIFY for every recipient (RFC 3461), as given.
    pub notify: Option<String>,
    /// `-B`: the BODY parameter (7BIT or 8BITMIME).
    pub body: Option<String>,
    /// `-R`: DSN RET (FULL or HDRS).
    pub ret: Option<String>,
    /// `-V`: DSN ENVID.
    pub envid: Option<String>,
    /// The operands: recipient addresses (each may be a comma list).
    pub recipients: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Deliver,
            sender: None,
            full_name: None,
            extract_recipients: false,
            dot_ends_message: true,
            config: None,
            verbose: false,
            notify: None,
            body: None,
            ret: None,
            envid: None,
            recipients: Vec::new(),
        }
    }
}

/// A command line that cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Options that take an argument, in Sendmail's getopt string (`-A`, `-d`,
/// `-h`, `-L`, `-M`, `-O`, `-p`, `-X` are taken and ignored).
const WITH_ARGUMENT: &str = "ABbCdFfhLMNOopRrVX";

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Options, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut opts = Options::default();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        if arg == "--" {
            opts.recipients.extend(args.by_ref());
            break;
        }
        if arg == "--help" {
            opts.mode = Mode::Help;
            continue;
        }
        // The first operand ends the options (POSIX getopt): a recipient
        // that happens to start with a dash must follow "--".
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            opts.recipients.push(arg);
            opts.recipients.extend(args.by_ref());
            break;
        };
        for (at, letter) in cluster.char_indices() {
            if !WITH_ARGUMENT.contains(letter) {
                flag(&mut opts, letter)?;
                continue;
            }
            let rest = &cluster[at + letter.len_utf8()..];
            let value = if rest.is_empty() {
                args.next()
                    .ok_or_else(|| UsageError(format!("option -{letter} needs an argument")))?
            } else {
                rest.to_string()
            };
            with_argument(&mut opts, letter, value)?;
            break;
        }
    }
    Ok(opts)
}

fn flag(opts: &mut Options, letter: char) -> Result<(), UsageError> {
    match letter {
        't' => opts.extract_recipients = true,
        'i' => opts.dot_ends_message = false,
        'v' => opts.verbose = true,
        // -G (gateway submission), -m (me too), -n (no aliasing), -U
        // (initial user submission): nothing here depends on them.
        'G' | 'm' | 'n' | 'U' => {}
        other => return Err(UsageError(format!("unknown option -{other}"))),
    }
    Ok(())
}

fn with_argument(opts: &mut Options, letter: char, value: String) -> Result<(), UsageError> {
    match letter {
        'f' | 'r' => opts.sender = Some(value),
        'F' => opts.full_name = Some(value),
        'C' => opts.config = Some(PathBuf::from(value)),
        'b' => opts.mode = mode(&value)?,
        'o' => obsolete_option(opts, &value)?,
        'N' => opts.notify = Some(notify(&value)?),
        'B' => opts.body = Some(one_of(&value, "-B", &["7BIT", "8BITMIME"])?),
        'R' => opts.ret = Some(one_of(&value, "-R", &["FULL", "HDRS"])?),
        'V' => opts.envid = Some(value),
        // -A (alias/submit config), -d (debug), -h (hop count), -L (log
        // tag), -M (macro), -O (option), -p (protocol), -X (traffic log).
        _ => {}
    }
    Ok(())
}

fn mode(value: &str) -> Result<Mode, UsageError> {
    match value {
        "m" => Ok(Mode::Deliver),
        "s" => Ok(Mode::Smtp),
        "p" => Ok(Mode::ListQueue),
        "i" => Err(UsageError(
            "-bi (newaliases) is not needed: aliases live in the Tern config, reloaded with it"
                .into(),
        )),
        other => Err(UsageError(format!(
            "-b{other} is not supported (-bm, -bs and -bp are)"
        ))),
    }
}

/// `-oX...`: Sendmail's obsolete option settings. Only `-oi` changes
/// anything; error modes (`-oe*`: errors are always on stderr and in the
/// exit status), delivery modes (`-od*`: the server always queues) and the
/// rest are accepted and ignored.
fn obsolete_option(opts: &mut Options, value: &str) -> Result<(), UsageError> {
    match value.chars().next() {
        Some('i') => opts.dot_ends_message = false,
        Some(_) => {}
        None => return Err(UsageError("option -o needs a letter (e.g. -oi)".into())),
    }
    Ok(())
}

/// `-N never` or a comma list of `success`, `failure`, `delay`.
fn notify(value: &str) -> Result<String, UsageError> {
    let words: Vec<String> = value.split(',').map(|w| w.trim().to_uppercase()).collect();
    let known = |w: &String| matches!(w.as_str(), "SUCCESS" | "FAILURE" | "DELAY");
    let valid = words == ["NEVER"] || words.iter().all(known);
    if !valid {
        return Err(UsageError(format!(
            "-N {value}: must be \"never\" or a list of success, failure, delay"
        )));
    }
    Ok(words.join(","))
}

fn one_of(value: &str, option: &str, known: &[&str]) -> Result<String, UsageError> {
    let upper = value.to_uppercase();
    if known.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(UsageError(format!(
            "{option} {value}: must be one of {}",
            known.join(", ")
        )))
    }
}

/// `--help`: the flags this command takes.
pub const HELP: &str = "\
Usage: tern sendmail [OPTIONS] [--] [RECIPIENT...]
       sendmail [OPTIONS] [--] [RECIPIENT...]   (the tern binary under that name)

Reads a message from stdin and hands it to the running Tern server over its
local submission socket ([sendmail] socket, default <data_dir>/public/submit.sock).
Exit status 0 means the message is in the server's queue, on disk.

  -t          also take recipients from To:, Cc: and Bcc: (Resent-To/Cc/Bcc
              when present); recipients on the command line are added to them
  -f ADDR     envelope sender (-fADDR too; -f '<>' for the null sender);
  -r ADDR     default: LOGIN@origin ([sendmail] origin)
  -F NAME     full name for the From: field added to a message without one
              (default: $NAME)
  -i, -oi     a line with a single dot does not end the message
  -C FILE     the Tern config file (default: $TERN_CONFIG, else
              /etc/tern/tern.toml, else the embedded default)
  -bm         read a message and queue it (the default)
  -bs         speak SMTP on stdin and stdout
  -bp         list the queue (as `tern queue list`)
  -v          print the SMTP dialogue on stderr
  -N DSN      DSN notify: never, or a list of success, failure, delay
  -R RET      DSN return: full or hdrs
  -V ENVID    DSN envelope ID
  -B TYPE     body type: 7bit or 8bitmime
  -oe*, -od*, -o*, -G, -m, -n, -U, -A X, -d X, -h N, -L X, -M X, -O X,
  -p X, -X FILE     accepted and ignored
  --help      this text

Unqualified addresses (\"root\"), as recipients and in the header's address
fields, get @origin. A missing From: is added
(\"NAME <sender>\"), the server adds a missing Date: and Message-ID:, and Bcc:
fields are removed. If the server refuses any recipient, nothing is sent.

Exit status (sysexits.h): 0 queued, 64 usage, 65 bad message or address,
67 unknown recipient, 69 refused, 71 system error, 74 I/O error,
75 server not running or temporary failure (try again), 76 a reply that is
not SMTP, 77 not permitted, 78 bad config.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Options, UsageError> {
        parse(args.iter().copied())
    }

    #[test]
    fn default_is_deliver_to_the_operands() {
        let o = p(&["alice", "bob@example.test"]).unwrap();
        assert_eq!(o.mode, Mode::Deliver);
        assert!(o.dot_ends_message && !o.extract_recipients);
        assert_eq!(o.recipients, ["alice", "bob@example.test"]);
    }

    #[test]
    fn sender_attached_or_separate_and_r_as_f() {
        assert_eq!(
            p(&["-fa@b.test"]).unwrap().sender.as_deref(),
            Some("a@b.test")
        );
        assert_eq!(
            p(&["-f", "a@b.test"]).unwrap().sender.as_deref(),
            Some("a@b.test")
        );
        assert_eq!(
            p(&["-r", "c@d.test"]).unwrap().sender.as_deref(),
            Some("c@d.test")
        );
        assert_eq!(p(&["-f", "<>"]).unwrap().sender.as_deref(), Some("<>"));
        assert_eq!(
            p(&["-F", "Cron Daemon", "root"])
                .unwrap()
                .full_name
                .as_deref(),
            Some("Cron Daemon")
        );
    }

    #[test]
    fn clusters_and_obsolete_options() {
        // What cron (-FCronDaemon -i -B8BITMIME -oem), git send-email (-i)
        // and PHP (-t -i) pass.
        let o = p(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]).unwrap();
        assert_eq!(o.full_name.as_deref(), Some("CronDaemon"));
        assert!(!o.dot_ends_message);
        assert_eq!(o.body.as_deref(), Some("8BITMIME"));
        assert_eq!(o.recipients, ["root"]);
        let o = p(&["-ti"]).unwrap();
        assert!(o.extract_recipients && !o.dot_ends_message);
        let o = p(&["-tif", "x@y.test"]).unwrap();
        assert!(o.extract_recipients && !o.dot_ends_message);
        assert_eq!(o.sender.as_deref(), Some("x@y.test"));
        for ignored in [
            "-oep", "-oee", "-oeq", "-odb", "-om", "-v", "-U", "-G", "-n",
        ] {
            let o = p(&[ignored]).unwrap();
            assert!(o.dot_ends_message, "{ignored}");
        }
        assert!(!p(&["-oi"]).unwrap().dot_ends_message);
        assert!(!p(&["-o", "i"]).unwrap().dot_ends_message);
        assert!(p(&["-v"]).unwrap().verbose);
        assert!(
            p(&["-X", "/tmp/log", "-L", "tag", "-h", "5"])
                .unwrap()
                .recipients
                .is_empty()
        );
    }

    #[test]
    fn modes() {
        assert_eq!(p(&["-bs"]).unwrap().mode, Mode::Smtp);
        assert_eq!(p(&["-bm"]).unwrap().mode, Mode::Deliver);
        assert_eq!(p(&["-b", "p"]).unwrap().mode, Mode::ListQueue);
        assert_eq!(p(&["--help"]).unwrap().mode, Mode::Help);
        assert!(p(&["-bi"]).is_err());
        assert!(p(&["-bd"]).is_err());
    }

    #[test]
    fn operands_end_the_options() {
        let o = p(&["-i", "--", "-odd@example.test"]).unwrap();
        assert_eq!(o.recipients, ["-odd@example.test"]);
        let o = p(&["alice", "-t"]).unwrap();
        assert!(!o.extract_recipients);
        assert_eq!(o.recipients, ["alice", "-t"]);
        assert_eq!(
            p(&["-C", "/etc/t.toml"]).unwrap().config,
            Some("/etc/t.toml".into())
        );
    }

    #[test]
    fn dsn_options_are_checked() {
        assert_eq!(
            p(&["-N", "success,Delay"]).unwrap().notify.as_deref(),
            Some("SUCCESS,DELAY")
        );
        assert_eq!(p(&["-Nnever"]).unwrap().notify.as_deref(), Some("NEVER"));
        assert!(p(&["-N", "never,success"]).is_err());
        assert!(p(&["-N", "sometimes"]).is_err());
        assert_eq!(p(&["-R", "hdrs"]).unwrap().ret.as_deref(), Some("HDRS"));
        assert!(p(&["-B", "binary"]).is_err());
    }

    #[test]
    fn unknown_options_and_missing_arguments_are_usage_errors() {
        assert_eq!(p(&["-Z"]).unwrap_err().0, "unknown option -Z");
        assert_eq!(p(&["-f"]).unwrap_err().0, "option -f needs an argument");
        assert!(p(&["-tZ"]).is_err());
        assert!(p(&["-q"]).is_err());
    }
}
