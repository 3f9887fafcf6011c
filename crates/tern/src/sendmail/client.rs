//! The client end of the local submission socket: one SMTP transaction
//! (blocking: a command-line tool sending one message), and the relay of
//! stdin and stdout for `-bs`.
//!
//! Invariants:
//! - All or nothing: when the server refuses any recipient the transaction
//!   is reset and nothing is sent, so a caller that retries after a failure
//!   never sends a second copy to the others.
//! - Exit status 0 only after the server's `250` to the end of data, which
//!   it gives after the message is on disk.
//!
//! Errors: each failure becomes a [`Failure`]: the text for stderr and the
//! sysexits.h status.

use super::exit;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A failure to report: the message for stderr and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub status: u8,
    pub message: String,
}

impl Failure {
    pub fn new(status: u8, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

/// How long a reply may take. The server's own limits are 5 minutes per
/// command and 10 for the end of data (RFC 5321 §4.5.3.2), and a reply is
/// owed within them.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Connects to the server's socket at `path`.
pub fn connect(path: &Path) -> Result<UnixStream, Failure> {
    match UnixStream::connect(path) {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(Failure::new(
                exit::TEMPFAIL,
                format!(
                    "tern is not running (nothing listens on {}; if it runs, its log says why it has no sendmail socket); the message was not sent",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Failure::new(
            exit::NOPERM,
            format!("cannot connect to {}: {e}", path.display()),
        )),
        Err(e) => Err(Failure::new(
            exit::TEMPFAIL,
            format!("cannot connect to {}: {e}", path.display()),
        )),
    }
}

/// One SMTP reply: its code and text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }

    /// The enhanced status code (RFC 3463) of the first line, as
    /// (class, subject, detail).
    fn enhanced(&self) -> Option<(u16, u16, u16)> {
        let first = self.lines.first()?.split(' ').next()?;
        let mut parts = first.split('.').map(|p| p.parse::<u16>().ok());
        match (parts.next()??, parts.next()??, parts.next()??) {
            (class, subject, detail) if parts.next().is_none() => Some((class, subject, detail)),
            _ => None,
        }
    }
}

/// The exit status for a refusal of `stage` (RCPT refusals name the
/// recipient; the others the message or the sender).
pub fn status_for(reply: &Reply, stage: Stage) -> u8 {
    if reply.code < 500 {
        return exit::TEMPFAIL;
    }
    match (reply.enhanced(), stage) {
        (Some((_, 1, 3)), _) => exit::DATAERR,
        (Some((_, 1, _)), Stage::Rcpt) => exit::NOUSER,
        (None, Stage::Rcpt) if reply.code == 550 || reply.code == 551 => exit::NOUSER,
        (Some((_, 7, _)), _) => exit::NOPERM,
        (Some((_, 3, 4)) | Some((_, 6, _)), _) => exit::DATAERR,
        (Some((_, 5, _)), _) => exit::DATAERR,
        _ if reply.code == 552 => exit::DATAERR,
        _ => exit::UNAVAILABLE,
    }
}

/// Which command a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    EndOfData,
}

/// The envelope and the message to send.
pub struct Submission<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// ESMTP parameters of MAIL (`BODY=8BITMIME`, `SMTPUTF8`...).
    pub mail_params: Vec<String>,
    /// ESMTP parameters of every RCPT (`NOTIFY=...`).
    pub rcpt_params: Vec<String>,
    /// CRLF lines, not dot-stuffed.
    pub content: &'a [u8],
}

/// An SMTP session over the socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    verbose: bool,
}

impl Client {
    pub fn new(stream: UnixStream, verbose: bool) -> Result<Client, Failure> {
        let io = |e: io::Error| Failure::new(exit::OSERR, format!("cannot set up the socket: {e}"));
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            verbose,
        })
    }

    fn send(&mut self, line: &str) -> Result<(), Failure> {
        if self.verbose {
            eprintln!(">>> {line}");
        }
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(lost)
    }

    fn reply(&mut self) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line).map_err(lost)?;
            if n == 0 {
                return Err(Failure::new(
                    exit::TEMPFAIL,
                    "tern closed the connection without a reply",
                ));
            }
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if self.verbose {
                eprintln!("<<< {line}");
            }
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            let Some(code) = code else {
                return Err(Failure::new(
                    exit::PROTOCOL,
                    format!("tern sent a reply that is not SMTP: {line:?}"),
                ));
            };
            lines.push(line.get(4..).unwrap_or("").to_string());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends `line` (if any) and expects a reply of class `ok_class`.
    fn command(
        &mut self,
        line: Option<&str>,
        stage: Stage,
        ok_class: u16,
    ) -> Result<Reply, Failure> {
        if let Some(line) = line {
            self.send(line)?;
        }
        let reply = self.reply()?;
        if reply.code / 100 == ok_class {
            return Ok(reply);
        }
        Err(Failure::new(
            status_for(&reply, stage),
            format!("tern refused {}: {}", describe(stage, line), reply.text()),
        ))
    }

    /// Runs the transaction; Ok with the server's final reply.
    pub fn submit(&mut self, s: &Submission) -> Result<Reply, Failure> {
        self.command(None, Stage::Greeting, 2)?;
        self.command(Some("EHLO localhost"), Stage::Ehlo, 2)?;
        let mut mail = format!("MAIL FROM:<{}>", s.sender);
        for p in &s.mail_params {
            mail.push(' ');
            mail.push_str(p);
        }
        self.command(Some(&mail), Stage::Mail, 2)?;
        let mut refused = Vec::new();
        for rcpt in s.recipients {
            let mut line = format!("RCPT TO:<{rcpt}>");
            for p in &s.rcpt_params {
                line.push(' ');
                line.push_str(p);
            }
            if let Err(f) = self.command(Some(&line), Stage::Rcpt, 2) {
                refused.push(f);
            }
        }
        if !refused.is_empty() {
            let _ = self.command(Some("RSET"), Stage::Mail, 2);
            self.quit();
            // A temporary refusal wins: trying again later may then work
            // for all; the messages say which recipients failed and why.
            let status = refused
                .iter()
                .map(|f| f.status)
                .find(|s| *s == exit::TEMPFAIL)
                .unwrap_or(refused[0].status);
            let mut message: Vec<String> = refused.into_iter().map(|f| f.message).collect();
            message.push("nothing was sent".into());
            return Err(Failure::new(status, message.join("\n")));
        }
        self.command(Some("DATA"), Stage::Data, 3)?;
        let mut data = dot_stuff(s.content);
        data.extend_from_slice(b".\r\n");
        if self.verbose {
            eprintln!(">>> ({} octets of message)", data.len());
        }
        self.writer.write_all(&data).map_err(lost)?;
        let done = self.command(None, Stage::EndOfData, 2)?;
        self.quit();
        Ok(done)
    }

    fn quit(&mut self) {
        if self.send("QUIT").is_ok() {
            let _ = self.reply();
        }
    }
}

fn describe(stage: Stage, line: Option<&str>) -> String {
    match (stage, line) {
        (Stage::Greeting, _) => "the connection".into(),
        (Stage::EndOfData, _) => "the message".into(),
        (_, Some(line)) => line.to_string(),
        (_, None) => "the session".into(),
    }
}

/// A broken connection mid-session: the server did not take the message.
fn lost(e: io::Error) -> Failure {
    let status = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => exit::TEMPFAIL,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => exit::TEMPFAIL,
        _ => exit::IOERR,
    };
    Failure::new(status, format!("lost the connection to tern: {e}"))
}

/// RFC 5321 §4.5.2: a line that starts with a dot gets another.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16);
    let mut line_start = true;
    for &b in content {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// Bare LF line ends as CRLF: scripts that speak SMTP to `sendmail -bs`
/// through a pipe write LF, which Sendmail and Postfix take, and the
/// session engine refuses from network clients. `after_cr`: the previous
/// piece ended in CR; the second value says whether this one does.
fn lf_to_crlf(piece: &[u8], mut after_cr: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(piece.len() + piece.len() / 16);
    for &b in piece {
        if b == b'\n' && !after_cr {
            out.push(b'\r');
        }
        out.push(b);
        after_cr = b == b'\r';
    }
    (out, after_cr)
}

/// `-bs`: relays stdin to the server and its replies to stdout until
/// either side closes.
pub fn relay_stdio(stream: UnixStream) -> Result<(), Failure> {
    let mut to_server = stream
        .try_clone()
        .map_err(|e| Failure::new(exit::OSERR, format!("cannot set up the socket: {e}")))?;
    // Not joined: when the server ends the session (QUIT), the client may
    // still hold stdin open, and the reply is all that matters.
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = [0u8; 16 * 1024];
        let mut after_cr = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let (crlf, cr) = lf_to_crlf(&buf[..n], after_cr);
            after_cr = cr;
            if to_server.write_all(&crlf).is_err() {
                break;
            }
        }
        let _ = to_server.shutdown(std::net::Shutdown::Write);
    });
    let mut from_server = stream;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from_server.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(lost(e)),
        };
        // stdout flushed per read: the SMTP client waits for each reply.
        out.write_all(&buf[..n])
            .and_then(|()| out.flush())
            .map_err(|e| Failure::new(exit::IOERR, format!("cannot write to stdout: {e}")))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_only() {
        assert_eq!(dot_stuff(b".\r\na.b\r\n..x\r\n"), b"..\r\na.b\r\n...x\r\n");
        assert_eq!(dot_stuff(b""), b"");
    }

    #[test]
    fn bare_lf_becomes_crlf_across_pieces() {
        assert_eq!(
            lf_to_crlf(b"EHLO x\nQUIT\r\n", false),
            (b"EHLO x\r\nQUIT\r\n".to_vec(), false)
        );
        let (first, cr) = lf_to_crlf(b"NOOP\r", false);
        assert_eq!((first.as_slice(), cr), (&b"NOOP\r"[..], true));
        assert_eq!(lf_to_crlf(b"\nX\n", cr).0, b"\nX\r\n");
    }

    #[test]
    fn refusals_map_to_sysexits() {
        let unknown = reply(
            550,
            "5.1.1 <x@example.test>: Recipient address rejected: User unknown",
        );
        assert_eq!(status_for(&unknown, Stage::Rcpt), exit::NOUSER);
        assert_eq!(
            status_for(&reply(451, "4.3.0 try later"), Stage::Rcpt),
            exit::TEMPFAIL
        );
        assert_eq!(
            status_for(&reply(452, "4.3.1 storage"), Stage::EndOfData),
            exit::TEMPFAIL
        );
        assert_eq!(
            status_for(&reply(553, "5.7.1 not yours"), Stage::Mail),
            exit::NOPERM
        );
        assert_eq!(
            status_for(&reply(550, "5.7.1 relay denied"), Stage::Rcpt),
            exit::NOPERM
        );
        assert_eq!(
            status_for(&reply(552, "5.3.4 too big"), Stage::EndOfData),
            exit::DATAERR
        );
        assert_eq!(
            status_for(&reply(501, "5.1.3 bad address"), Stage::Rcpt),
            exit::DATAERR
        );
        assert_eq!(
            status_for(&reply(554, "5.6.0 bad content"), Stage::EndOfData),
            exit::DATAERR
        );
        assert_eq!(
            status_for(&reply(554, "no"), Stage::Greeting),
            exit::UNAVAILABLE
        );
    }
}
