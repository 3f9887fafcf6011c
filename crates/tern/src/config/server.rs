//! `[server]` (the user and group Tern drops to when started as root) and
//! `[mailbox]` plus the `[[user]]` `owner`/`group` keys (who owns the
//! Maildir folders and files, with which modes). Names are resolved here,
//! so an account that does not exist is a config error naming its key,
//! reported by `check-config` as well as at start-up.
//!
//! Not here: the switch itself and the capabilities it keeps
//! (`privileges.rs`), the chown of each copy (`deliver/maildir.rs`).

use super::schema::{FileConfig, UserConfig};
use super::validate::Errors;
use crate::privileges;
use serde::Deserialize;

/// Mode of a Maildir file when `mailbox.file_mode` is not set: its owner's
/// alone, as the Maildir convention has it.
pub const DEFAULT_FILE_MODE: u32 = 0o600;
/// Mode of a Maildir folder (and `tmp/`, `new/`, `cur/`) by default.
pub const DEFAULT_DIR_MODE: u32 = 0o700;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Started as root, Tern drops to this user (a name or a uid) once its
    /// listeners are bound.
    pub user: Option<String>,
    /// Its group; default: the user's primary group.
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxConfig {
    /// Owner of every Maildir folder and file (a name or a uid); default:
    /// the user Tern runs as.
    pub owner: Option<String>,
    /// Their group; default: the owner's primary group.
    pub group: Option<String>,
    pub file_mode: u32,
    pub dir_mode: u32,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            owner: None,
            group: None,
            file_mode: DEFAULT_FILE_MODE,
            dir_mode: DEFAULT_DIR_MODE,
        }
    }
}

/// The account Tern drops to, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As configured (a name, or a uid written as a number).
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the user's memberships by the group database
    /// (e.g. `ssl-cert`, to re-read certificates on reload), `gid` first.
    pub groups: Vec<u32>,
}

/// Who owns a mailbox's folders and files, and their modes. `None`: left
/// as created (the user and group Tern runs as).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxAccess {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub file_mode: u32,
    pub dir_mode: u32,
}

impl Default for MailboxAccess {
    fn default() -> Self {
        MailboxAccess {
            owner: None,
            group: None,
            file_mode: DEFAULT_FILE_MODE,
            dir_mode: DEFAULT_DIR_MODE,
        }
    }
}

/// `[server]`: the account to drop to, or `None` when none is configured
/// (or it did not resolve: the error is recorded).
pub(super) fn check_server(file: &FileConfig, errors: &mut Errors) -> Option<RunAs> {
    let group = match &file.server.group {
        Some(name) => match privileges::resolve_group(name) {
            Ok(gid) => Some(gid),
            Err(e) => {
                errors.push("server.group", e);
                None
            }
        },
        None => None,
    };
    let Some(user) = &file.server.user else {
        if file.server.group.is_some() {
            errors.push(
                "server.group",
                "needs server.user (the group alone cannot be dropped to)",
            );
        }
        return None;
    };
    let (uid, primary) = match privileges::resolve_user(user) {
        Ok(found) => found,
        Err(e) => {
            errors.push("server.user", e);
            return None;
        }
    };
    if file.server.group.is_some() && group.is_none() {
        return None;
    }
    let Some(gid) = group.or(primary) else {
        errors.push(
            "server.group",
            format!("needed: server.user {user:?} has no user entry to take a group from"),
        );
        return None;
    };
    // Memberships are the database's view of a named user; a bare uid has
    // only its group.
    let name = privileges::user_name(uid);
    let groups = match name.as_deref().map(|n| privileges::groups_of(n, gid)) {
        Some(Ok(groups)) => groups,
        Some(Err(e)) => {
            errors.push(
                "server.user",
                format!("cannot read the groups of {user:?}: {e}"),
            );
            return None;
        }
        None => vec![gid],
    };
    Some(RunAs {
        user: user.clone(),
        uid,
        gid,
        groups,
    })
}

/// `[mailbox]`: the ownership every mailbox gets unless its `[[user]]`
/// entry says otherwise.
pub(super) fn check_mailbox(file: &FileConfig, errors: &mut Errors) -> MailboxAccess {
    let m = &file.mailbox;
    if m.file_mode & !0o666 != 0 || m.file_mode & 0o400 == 0 {
        errors.push(
            "mailbox.file_mode",
            format!(
                "{:#o} is not a file mode that lets the owner read (write it in octal, e.g. 0o600 or 0o640; no execute or special bits)",
                m.file_mode
            ),
        );
    }
    if m.dir_mode & !0o777 != 0 || m.dir_mode & 0o700 != 0o700 {
        errors.push(
            "mailbox.dir_mode",
            format!(
                "{:#o} is not a folder mode that gives the owner rwx (write it in octal, e.g. 0o700 or 0o750; no special bits)",
                m.dir_mode
            ),
        );
    }
    let defaults = MailboxAccess {
        file_mode: m.file_mode,
        dir_mode: m.dir_mode,
        ..MailboxAccess::default()
    };
    owner_and_group(
        defaults,
        m.owner.as_deref(),
        m.group.as_deref(),
        "mailbox",
        errors,
    )
}

/// One `[[user]]`'s mailbox ownership: its `owner`/`group` over the
/// `[mailbox]` defaults.
pub(super) fn user_access(
    defaults: MailboxAccess,
    user: &UserConfig,
    key: &str,
    errors: &mut Errors,
) -> MailboxAccess {
    owner_and_group(
        defaults,
        user.owner.as_deref(),
        user.group.as_deref(),
        key,
        errors,
    )
}

/// `owner` and `group` (under `key.owner`, `key.group`) over `defaults`:
/// a new owner brings its primary group unless a group is named.
fn owner_and_group(
    defaults: MailboxAccess,
    owner: Option<&str>,
    group: Option<&str>,
    key: &str,
    errors: &mut Errors,
) -> MailboxAccess {
    let mut access = defaults;
    if let Some(name) = group {
        match privileges::resolve_group(name) {
            Ok(gid) => access.group = Some(gid),
            Err(e) => errors.push(format!("{key}.group"), e),
        }
    }
    if let Some(name) = owner {
        match privileges::resolve_user(name) {
            Ok((uid, primary)) => {
                access.owner = Some(uid);
                if group.is_none() {
                    match primary {
                        Some(gid) => access.group = Some(gid),
                        None => errors.push(
                            format!("{key}.group"),
                            format!("needed: {key}.owner {name:?} has no user entry to take a group from"),
                        ),
                    }
                }
            }
            Err(e) => errors.push(format!("{key}.owner"), e),
        }
    }
    access
}
