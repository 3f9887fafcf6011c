//! The `[sendmail]` section: the local submission socket that `tern
//! sendmail` hands messages to, who may name which envelope sender through
//! it, and the domain unqualified addresses get. Validated into
//! [`SendmailSettings`], which the server (to bind the socket and judge
//! senders) and the `tern sendmail` command (to find the socket and qualify
//! addresses) both read.

use super::ConfigError;
use super::schema::FileConfig;
use super::validate::{Errors, absolute, apply_defaults, valid_domain};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendmailConfig {
    pub enabled: bool,
    /// Default: `<data_dir>/public/submit.sock`.
    pub socket: Option<PathBuf>,
    pub sender: String,
    /// Default: the first of `local.domains`.
    pub origin: Option<String>,
}

impl Default for SendmailConfig {
    fn default() -> Self {
        SendmailConfig {
            enabled: true,
            socket: None,
            sender: SenderRule::Any.name().to_string(),
            origin: None,
        }
    }
}

/// Which envelope senders (`-f`) a local user may give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderRule {
    /// Any address, as Postfix's and Sendmail's `sendmail` allow: the
    /// `Received:` field and the log name the uid whatever it claims.
    Any,
    /// Only `login@origin` (or the null sender); root and the server's own
    /// user may still give any (they run the bounces and the admin's scripts).
    Own,
}

impl SenderRule {
    const ALL: [SenderRule; 2] = [SenderRule::Any, SenderRule::Own];

    pub fn name(self) -> &'static str {
        match self {
            SenderRule::Any => "any",
            SenderRule::Own => "own",
        }
    }
}

/// `[sendmail]` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendmailSettings {
    /// Whether the server listens on `socket`.
    pub enabled: bool,
    pub socket: PathBuf,
    pub sender: SenderRule,
    /// The domain of addresses given without one (`root`) and of the
    /// `From:` added to a message without one (Postfix's `myorigin`).
    pub origin: String,
}

/// The default socket: in a folder of its own that everyone may enter, so
/// the data folder itself can stay closed to other users.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("public").join("submit.sock")
}

pub(super) fn check_sendmail(
    file: &FileConfig,
    base: &Path,
    data_dir: &Path,
    errors: &mut Errors,
) -> SendmailSettings {
    let s = &file.sendmail;
    let sender = SenderRule::ALL
        .into_iter()
        .find(|r| r.name() == s.sender)
        .unwrap_or_else(|| {
            errors.push(
                "sendmail.sender",
                format!("{:?} is not \"any\" or \"own\"", s.sender),
            );
            SenderRule::Any
        });
    let socket = s
        .socket
        .as_deref()
        .map(|p| absolute(base, p))
        .unwrap_or_else(|| default_socket(data_dir));
    // sun_path holds 108 octets with its terminating NUL. Only a path the
    // administrator wrote is refused here: a deep data_dir must not stop a
    // server that never asked for the socket (it starts without, and says so).
    if s.socket.is_some() && socket.as_os_str().len() > MAX_SOCKET_PATH {
        errors.push(
            "sendmail.socket",
            format!(
                "{} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} octets)",
                socket.display()
            ),
        );
    }
    let origin = match &s.origin {
        Some(origin) => {
            if !valid_domain(origin) {
                errors.push(
                    "sendmail.origin",
                    format!("{origin:?} is not a valid domain"),
                );
            }
            origin.to_lowercase()
        }
        // apply_defaults leaves at least one domain.
        None => file
            .local
            .domains
            .first()
            .map(|d| d.to_lowercase())
            .unwrap_or_else(|| "localhost".into()),
    };
    SendmailSettings {
        enabled: s.enabled,
        socket,
        sender,
        origin,
    }
}

/// The longest socket path `bind(2)` takes.
const MAX_SOCKET_PATH: usize = 107;

/// `[sendmail]` of a config file (or of the embedded default), read
/// without validating anything else: `tern sendmail` runs as any user, who
/// may not be able to read the TLS keys or the users file that a full
/// validation opens, and needs only this section and `data_dir`.
pub fn sendmail_settings_of(config: Option<&Path>) -> Result<SendmailSettings, Vec<ConfigError>> {
    let (text, base) = super::config_text(config)?;
    let mut file: FileConfig =
        toml::from_str(&text).map_err(|e| vec![super::toml_error(&text, &e)])?;
    apply_defaults(&mut file);
    let data_dir = absolute(
        &base,
        file.data_dir.as_deref().unwrap_or(Path::new("tern-data")),
    );
    let mut errors = Errors(Vec::new());
    let settings = check_sendmail(&file, &base, &data_dir, &mut errors);
    if errors.0.is_empty() {
        Ok(settings)
    } else {
        Err(errors.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const BASE: &str = r#"
data_dir = "/var/lib/tern"
[local]
domains = ["Example.Test", "other.test"]
[[user]]
name = "alice"
addresses = ["alice@example.test"]
"#;

    #[test]
    fn defaults_derive_from_data_dir_and_the_first_domain() {
        let rt = parse(BASE, Path::new("/etc/tern")).unwrap();
        assert_eq!(
            rt.sendmail,
            SendmailSettings {
                enabled: true,
                socket: PathBuf::from("/var/lib/tern/public/submit.sock"),
                sender: SenderRule::Any,
                origin: "example.test".into(),
            }
        );
        // The command reads the same values without a full validation.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tern.toml");
        std::fs::write(&file, BASE).unwrap();
        assert_eq!(sendmail_settings_of(Some(&file)).unwrap(), rt.sendmail);
    }

    #[test]
    fn keys_are_read_and_relative_socket_paths_follow_the_config() {
        let text = format!(
            "{BASE}[sendmail]\nenabled = false\nsocket = \"run/s.sock\"\nsender = \"own\"\norigin = \"Mail.Example.Test\"\n"
        );
        let rt = parse(&text, Path::new("/etc/tern")).unwrap();
        assert_eq!(
            rt.sendmail,
            SendmailSettings {
                enabled: false,
                socket: PathBuf::from("/etc/tern/run/s.sock"),
                sender: SenderRule::Own,
                origin: "mail.example.test".into(),
            }
        );
    }

    #[test]
    fn the_example_documents_every_key() {
        let text = include_str!("../../../../tern.example.toml");
        let section = text
            .split("\n[sendmail]\n")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .expect("tern.example.toml has a [sendmail] section");
        for key in ["enabled", "socket", "sender", "origin"] {
            assert!(
                section.contains(&format!("{key} =")),
                "tern.example.toml does not document sendmail.{key}"
            );
        }
        let rt = parse(text, Path::new("/etc/tern")).unwrap();
        assert_eq!(rt.sendmail.socket, default_socket(&rt.data_dir));
    }

    #[test]
    fn a_deep_data_dir_does_not_stop_the_server() {
        let deep = format!("/{}", "d".repeat(100));
        let rt = parse(&BASE.replace("/var/lib/tern", &deep), Path::new("/")).unwrap();
        assert!(rt.sendmail.socket.starts_with(&deep));
    }

    #[test]
    fn bad_values_name_their_key() {
        let long = "x".repeat(120);
        let text = format!(
            "{BASE}[sendmail]\nsender = \"anyone\"\norigin = \"not a domain\"\nsocket = \"/{long}\"\n"
        );
        let errors = parse(&text, Path::new("/etc/tern")).unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["sendmail.sender", "sendmail.socket", "sendmail.origin"],
            "{errors:?}"
        );
        let errors = parse(
            &format!("{BASE}[sendmail]\nsocket_path = \"x\"\n"),
            Path::new("/etc/tern"),
        )
        .unwrap_err();
        assert!(errors[0].message.contains("socket_path"), "{errors:?}");
    }
}
