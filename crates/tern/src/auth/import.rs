//! Dovecot passwd-file lines (`user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`),
//! for `tern user import`. Only the user and the password fields are read.
//!
//! Schemes taken: `{ARGON2ID}` / `{ARGON2I}` (a PHC string), `{SHA512-CRYPT}`,
//! `{SHA256-CRYPT}`, and `{CRYPT}` when its hash is `$6$` or `$5$`; a field
//! without a `{SCHEME}` prefix is taken when the hash names its algorithm
//! itself (`$argon2id$`, `$6$`). Anything else (PLAIN, MD5-CRYPT, BLF-CRYPT,
//! SSHA...) is refused with its line number. Imported users have no SCRAM
//! keys: SCRAM is refused for them until their password is set again.

use super::secret::StoredHash;
use std::fmt;

/// One importable line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedUser {
    pub line: usize,
    pub name: String,
    pub hash: StoredHash,
}

/// A line that cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Every line of a passwd-file: what can be imported and what cannot.
/// Blank lines and `#` comments are skipped.
pub fn parse_passwd_file(text: &str) -> (Vec<ImportedUser>, Vec<ImportError>) {
    let mut users: Vec<ImportedUser> = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim_end_matches('\r');
        if trimmed.trim().is_empty() || trimmed.trim_start().starts_with('#') {
            continue;
        }
        match parse_line(trimmed) {
            Ok((name, hash)) => {
                if let Some(first) = users.iter().find(|u| u.name.eq_ignore_ascii_case(&name)) {
                    errors.push(ImportError {
                        line,
                        message: format!("user {name:?} already on line {}", first.line),
                    });
                } else {
                    users.push(ImportedUser { line, name, hash });
                }
            }
            Err(message) => errors.push(ImportError { line, message }),
        }
    }
    (users, errors)
}

fn parse_line(line: &str) -> Result<(String, StoredHash), String> {
    let mut fields = line.splitn(3, ':');
    let name = fields.next().unwrap_or_default().trim();
    let password = fields
        .next()
        .ok_or("no password field (user:{SCHEME}hash:...)")?
        .trim();
    if !super::store::valid_name(name) {
        return Err(format!(
            "user name {:?} is not one Tern accepts (A-Z a-z 0-9 . _ - @ +)",
            crate::control::render::sanitize(name)
        ));
    }
    let (scheme, hash) = match password.strip_prefix('{') {
        Some(rest) => {
            let (scheme, hash) = rest
                .split_once('}')
                .ok_or("password scheme without its closing }")?;
            (Some(scheme.to_ascii_uppercase()), hash)
        }
        None => (None, password),
    };
    let accepted = match scheme.as_deref() {
        None => hash.starts_with("$argon2") || hash.starts_with("$6$") || hash.starts_with("$5$"),
        Some("ARGON2ID") => hash.starts_with("$argon2id$"),
        Some("ARGON2I") => hash.starts_with("$argon2i$"),
        Some("SHA512-CRYPT") => hash.starts_with("$6$"),
        Some("SHA256-CRYPT") => hash.starts_with("$5$"),
        Some("CRYPT") => hash.starts_with("$6$") || hash.starts_with("$5$"),
        Some(other) => {
            return Err(format!(
                "password scheme {{{other}}} is not supported (ARGON2ID, ARGON2I, \
                 SHA512-CRYPT, SHA256-CRYPT, CRYPT with $6$/$5$)"
            ));
        }
    };
    if !accepted {
        return Err(match scheme {
            Some(s) => format!("the hash does not match its scheme {{{s}}}"),
            None => "no {SCHEME} prefix and the hash does not name its algorithm".into(),
        });
    }
    let hash = StoredHash::parse(hash)?;
    Ok((name.to_string(), hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_lines_with_and_without_scheme() {
        let text = "# users\n\
            alice:{SHA512-CRYPT}$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/:1000:1000::/home/alice::userdb_quota=1G\n\
            \n\
            bob@example.test:{CRYPT}$6$rounds=5000$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/\n\
            carol:{PLAIN}secret\n\
            dave:{ARGON2ID}$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n\
            eve:nocolonafter\n\
            Alice:{SHA512-CRYPT}$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/\n";
        let (users, errors) = parse_passwd_file(text);
        let names: Vec<_> = users.iter().map(|u| (u.line, u.name.as_str())).collect();
        assert_eq!(names, [(2, "alice"), (4, "bob@example.test")]);
        let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [5, 6, 7, 8], "{errors:?}");
        assert!(errors[0].message.contains("{PLAIN}"));
        assert!(errors[1].message.contains("does not match"));
        assert!(errors[3].message.contains("already on line 2"));
    }
}
