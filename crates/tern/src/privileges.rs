//! Who Tern runs as: the drop from root to `server.user`, the capabilities
//! that survive it, and the accounts the configuration names.
//!
//! Start-up, when started as root with `server.user` set (see
//! `server::prepare`): the listeners are bound (ports below 1024), the data
//! folders are created and handed to that user, the TLS and DKIM keys are
//! read (a Let's Encrypt `privkey.pem` is root's alone), and only then does
//! [`Plan::apply`] switch the supplementary groups, the group and the user,
//! all three of real, effective and saved, and check that root cannot be
//! had back. All of it happens before the tokio runtime starts a thread:
//! the capability calls act on the calling thread alone, and a thread made
//! earlier would keep root's.
//!
//! Mailboxes owned by another user (the virtual-mailbox setup: Dovecot runs
//! as `vmail` and Tern as `tern`). A Maildir file must carry its owner and
//! mode before it is renamed into `new/`, and the folders are the owner's,
//! so whoever writes them must be able to give a file away (`CAP_CHOWN`)
//! and to write into a folder that is not its own (`CAP_DAC_OVERRIDE`).
//! Designs considered:
//! - Stay root, or keep `CAP_SETUID` to switch the file-system user per
//!   mailbox (`setfsuid`, as Postfix's `virtual` does by running as root):
//!   either can become root again at will, so the drop would mean nothing.
//! - A privileged delivery process beside the unprivileged server, fed over
//!   a pipe: the sound separation, at the cost of a second process, a
//!   protocol and its failure modes; not worth it while delivery is one
//!   thread of ours.
//! - Shared group write instead of owners (files `tern:vmail 0660`): needs
//!   no privilege, but the issue is a configured owner, and Dovecot's
//!   checks and quota accounting expect the mail user to own its files.
//! - Chosen: exactly `CAP_CHOWN` and `CAP_DAC_OVERRIDE` survive the drop,
//!   and only when a configured mailbox owner or group is not the server's
//!   own (otherwise none does), and only on the delivery thread: it is
//!   started right after the drop, before any other thread, and raises
//!   them for itself ([`enter_delivery_thread`]); then the main thread
//!   clears even its permitted set ([`leave_to_delivery_thread`]), so every
//!   thread made afterwards (the runtime's, which read from clients) has
//!   none it could raise. `CAP_SETUID`/`CAP_SETGID` are gone,
//!   so root is never regained, and the bounding set is cut to the two as
//!   well where we may (so no exec can bring others back). These two are
//!   still powerful over files: the price of the owner being another user,
//!   paid only by configurations that ask for it.
//!
//! Started as an ordinary user, Tern runs as that user; capabilities it was
//! given (systemd's `AmbientCapabilities=`) are cut to the same two at most
//! (`CAP_NET_BIND_SERVICE` is needed only for the bind, which is done).
//! Started as root without `server.user`, it stays root with a loud
//! warning: the embedded default and test set-ups run that way, and a
//! config that asks for nothing should not stop a working server; a
//! production config sets `server.user`.
//!
//! Errors: start-up errors are `String`s naming the key or the call that
//! failed; the caller prints them and exits.

use crate::config::{MailboxAccess, RunAs, Runtime};
use caps::{CapSet, Capability, CapsHashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;
use tracing::{debug, info, warn};

/// What the delivery thread needs to write mailboxes of another owner.
pub const MAILBOX_CAPABILITIES: [Capability; 2] =
    [Capability::CAP_CHOWN, Capability::CAP_DAC_OVERRIDE];

/// A user as the system's user database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

/// `getpwnam_r`: `None` for a name the database does not know.
pub fn user_by_name(name: &str) -> io::Result<Option<Account>> {
    let c_name = CString::new(name).map_err(io::Error::other)?;
    lookup(|buf| {
        // SAFETY: every pointer is valid for the call; the ids are copied
        // out before `buf`, which holds the entry's strings, is reused.
        unsafe {
            let mut entry: libc::passwd = std::mem::zeroed();
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            );
            (
                rc,
                (!found.is_null()).then_some((entry.pw_uid, entry.pw_gid)),
            )
        }
    })
    .map(|found| {
        found.map(|(uid, gid)| Account {
            name: name.to_string(),
            uid,
            gid,
        })
    })
}

/// `getpwuid_r`: the name of `uid`, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut name = None;
    let found = lookup(|buf| {
        // SAFETY: as in `user_by_name`; the name is copied while `buf` lives.
        unsafe {
            let mut entry: libc::passwd = std::mem::zeroed();
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwuid_r(
                uid,
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            );
            if rc == 0 && !found.is_null() && !entry.pw_name.is_null() {
                name = Some(CStr::from_ptr(entry.pw_name).to_string_lossy().into_owned());
            }
            (
                rc,
                (!found.is_null()).then_some((entry.pw_uid, entry.pw_gid)),
            )
        }
    });
    found.ok().flatten().and(name)
}

/// `getgrnam_r`: the id of group `name`, `None` if there is no such group.
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let c_name = CString::new(name).map_err(io::Error::other)?;
    lookup(|buf| {
        // SAFETY: as in `user_by_name`, for a `group` entry.
        unsafe {
            let mut entry: libc::group = std::mem::zeroed();
            let mut found: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            );
            (rc, (!found.is_null()).then_some((entry.gr_gid, 0)))
        }
    })
    .map(|found| found.map(|(gid, _)| gid))
}

/// The groups `user` is a member of by the group database, `gid` first
/// (what `initgroups` would set).
pub fn groups_of(user: &str, gid: u32) -> io::Result<Vec<u32>> {
    let c_name = CString::new(user).map_err(io::Error::other)?;
    let mut size: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; usize::try_from(size).unwrap_or(0)];
        let mut n = size;
        // SAFETY: `groups` holds `n` entries; getgrouplist writes at most
        // that many and stores the real count in `n`.
        let rc = unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(usize::try_from(n).unwrap_or(0));
            return Ok(groups);
        }
        if n <= size {
            // glibc reports the size needed; a libc that does not is
            // answered by doubling, up to the kernel's limit.
            n = size.saturating_mul(2);
        }
        if n > 65_536 {
            return Err(io::Error::other(format!("{user} is in too many groups")));
        }
        size = n;
    }
}

/// Runs a `get*_r` lookup with a buffer grown until the entry fits. `call`
/// returns the error number and, when found, two ids from the entry.
fn lookup(
    mut call: impl FnMut(&mut [u8]) -> (libc::c_int, Option<(u32, u32)>),
) -> io::Result<Option<(u32, u32)>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match call(&mut buf) {
            (0, found) => return Ok(found),
            // "Not found" as some NSS modules spell it.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (libc::ERANGE, _) if buf.len() < 1 << 20 => {
                let grown = buf.len() * 2;
                buf.resize(grown, 0);
            }
            (errno, _) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// A user name or id from the config, resolved: a name must exist; a
/// number is taken as it is (as Postfix's `static:5000`), with its primary
/// group when the database knows it.
pub fn resolve_user(value: &str) -> Result<(u32, Option<u32>), String> {
    if let Ok(uid) = value.parse::<u32>() {
        let gid = user_name(uid)
            .and_then(|name| user_by_name(&name).ok().flatten())
            .map(|a| a.gid);
        return Ok((uid, gid));
    }
    match user_by_name(value) {
        Ok(Some(account)) => Ok((account.uid, Some(account.gid))),
        Ok(None) => Err(format!("no such user {value:?}")),
        Err(e) => Err(format!("cannot look up user {value:?}: {e}")),
    }
}

/// A group name or id from the config, resolved.
pub fn resolve_group(value: &str) -> Result<u32, String> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(gid);
    }
    match group_by_name(value) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => Err(format!("no such group {value:?}")),
        Err(e) => Err(format!("cannot look up group {value:?}: {e}")),
    }
}

fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process runs as root (effective user).
pub fn is_root() -> bool {
    geteuid() == 0
}

/// The supplementary groups of this process, with the effective group.
fn current_groups() -> Vec<u32> {
    // SAFETY: a zero-sized query returns the count; the second call writes
    // at most that many entries into a buffer of that size.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut groups = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(0)];
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    groups.truncate(usize::try_from(n).unwrap_or(0));
    // SAFETY: getegid has no preconditions and cannot fail.
    groups.push(unsafe { libc::getegid() });
    groups
}

/// What start-up will do about privileges; decided before anything is bound.
#[derive(Debug)]
pub enum Plan {
    /// Root, with `server.user`: drop to it, keeping `keep` (permitted only).
    Drop {
        run_as: RunAs,
        keep: Vec<Capability>,
    },
    /// Root without `server.user` (or with `server.user = "root"`).
    StayRoot { asked: bool },
    /// Not root: stay who we are, with at most `keep`.
    AsStarted { keep: Vec<Capability> },
}

/// The mailbox owners and groups that are not `uid`'s own or among
/// `groups`, with the user each belongs to: such a mailbox needs
/// [`MAILBOX_CAPABILITIES`].
fn foreign_mailboxes(runtime: &Runtime, uid: u32, groups: &[u32]) -> Vec<String> {
    let mut names: Vec<String> = runtime
        .users
        .values()
        .filter(|u| foreign(&u.access, uid, groups))
        .map(|u| u.name.clone())
        .collect();
    names.sort();
    names
}

fn foreign(access: &MailboxAccess, uid: u32, groups: &[u32]) -> bool {
    access.owner.is_some_and(|o| o != uid) || access.group.is_some_and(|g| !groups.contains(&g))
}

impl Plan {
    /// Decides from the config and who we are. Fails when mailboxes need
    /// an owner that an unprivileged process without the capabilities
    /// cannot give.
    pub fn for_runtime(runtime: &Runtime) -> Result<Plan, String> {
        if is_root() {
            let Some(run_as) = runtime.run_as.clone() else {
                return Ok(Plan::StayRoot { asked: false });
            };
            if run_as.uid == 0 {
                return Ok(Plan::StayRoot { asked: true });
            }
            let keep = if foreign_mailboxes(runtime, run_as.uid, &run_as.groups).is_empty() {
                Vec::new()
            } else {
                MAILBOX_CAPABILITIES.to_vec()
            };
            return Ok(Plan::Drop { run_as, keep });
        }
        let uid = geteuid();
        if let Some(run_as) = &runtime.run_as
            && run_as.uid != uid
        {
            warn!(
                event = "server.not_root",
                server_user = %run_as.user,
                uid,
                "server.user names another user, but tern was not started as root: it runs as the user that started it"
            );
        }
        let foreign = foreign_mailboxes(runtime, uid, &current_groups());
        if foreign.is_empty() {
            return Ok(Plan::AsStarted { keep: Vec::new() });
        }
        let permitted = caps::read(None, CapSet::Permitted).unwrap_or_default();
        let missing: Vec<String> = MAILBOX_CAPABILITIES
            .iter()
            .filter(|c| !permitted.contains(c))
            .map(|c| c.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the Maildirs of {} have an owner or group (mailbox.owner/group, [[user]] owner/group) \
                 other than the user tern runs as (uid {uid}), and tern lacks {} to give files to them: \
                 start it as root with server.user set, or grant it these capabilities",
                foreign.join(", "),
                missing.join(" and ")
            ));
        }
        Ok(Plan::AsStarted {
            keep: MAILBOX_CAPABILITIES.to_vec(),
        })
    }

    /// The user the server's files must belong to, when start-up must hand
    /// them over (root dropping to another user).
    pub fn new_owner(&self) -> Option<(u32, u32)> {
        match self {
            Plan::Drop { run_as, .. } => Some((run_as.uid, run_as.gid)),
            _ => None,
        }
    }

    /// Switches to the planned user and capabilities. Call with no other
    /// thread running.
    pub fn apply(&self) -> Result<(), String> {
        match self {
            Plan::StayRoot { asked: false } => {
                warn!(
                    event = "server.running_as_root",
                    "tern runs as root: every session is handled with root's power over this host. Set server.user (e.g. \"tern\") so it drops to that user once its listeners are bound"
                );
                Ok(())
            }
            Plan::StayRoot { asked: true } => Ok(()),
            Plan::AsStarted { keep } => {
                confine(keep)?;
                info!(event = "server.privileges", uid = geteuid(), kept = ?names(keep));
                Ok(())
            }
            Plan::Drop { run_as, keep } => {
                drop_to(run_as, keep)?;
                info!(event = "server.privileges", user = %run_as.user, uid = run_as.uid, gid = run_as.gid, kept = ?names(keep), "dropped root");
                Ok(())
            }
        }
    }
}

fn names(caps: &[Capability]) -> Vec<String> {
    caps.iter().map(|c| c.to_string()).collect()
}

/// The capabilities the delivery thread raises for itself, once set by
/// [`confine`]; unset (root stays root): nothing to raise.
static DELIVERY_CAPABILITIES: OnceLock<Vec<Capability>> = OnceLock::new();

fn set_of(caps: &[Capability]) -> CapsHashSet {
    caps.iter().copied().collect()
}

/// Leaves `keep` permitted and nothing in force on this thread (threads
/// made later inherit that), nothing inheritable or ambient, and cuts the
/// bounding set to `keep` where we are allowed to.
fn confine(keep: &[Capability]) -> Result<(), String> {
    let failed = |what: &str, e: caps::errors::CapsError| format!("cannot {what}: {e}");
    let _ = DELIVERY_CAPABILITIES.set(keep.to_vec());
    // An ordinary user usually has nothing to give up: then no call is made
    // (a sandbox may refuse capset even when it would change nothing).
    let read = |set| caps::read(None, set).unwrap_or_else(|_| caps::all());
    let ambient = if caps::runtime::ambient_set_supported().is_ok() {
        read(CapSet::Ambient)
    } else {
        CapsHashSet::new()
    };
    if read(CapSet::Effective).is_empty()
        && read(CapSet::Inheritable).is_empty()
        && ambient.is_empty()
        && read(CapSet::Permitted).is_subset(&set_of(keep))
    {
        return Ok(());
    }
    // Effective first: it must stay within permitted at every step.
    caps::clear(None, CapSet::Effective).map_err(|e| failed("clear the capabilities", e))?;
    caps::set(None, CapSet::Permitted, &set_of(keep))
        .map_err(|e| failed("limit the permitted capabilities", e))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| failed("clear the inheritable capabilities", e))?;
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient)
            .map_err(|e| failed("clear the ambient capabilities", e))?;
    }
    Ok(())
}

/// Root to `run_as`, keeping `keep` permitted; verified.
fn drop_to(run_as: &RunAs, keep: &[Capability]) -> Result<(), String> {
    let os = |what: &str| format!("cannot {what}: {}", io::Error::last_os_error());
    // Capabilities are per thread: one started before now would keep root's.
    if let Ok(threads) = std::fs::read_dir("/proc/self/task")
        && threads.count() > 1
    {
        return Err("privileges must be dropped before any other thread starts".into());
    }
    // The bounding set needs CAP_SETPCAP, which root has here and loses
    // below; under systemd's CapabilityBoundingSet= it is usually cut
    // already, and a refusal only leaves that limit to the unit.
    for cap in caps::all() {
        if !keep.contains(&cap)
            && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false)
            && let Err(e) = caps::drop(None, CapSet::Bounding, cap)
        {
            debug!(event = "server.bounding_set_kept", capability = %cap, error = %e);
            break;
        }
    }
    if !keep.is_empty() {
        caps::securebits::set_keepcaps(true)
            .map_err(|e| format!("cannot keep capabilities across the user switch: {e}"))?;
    }
    let groups: Vec<libc::gid_t> = run_as.groups.clone();
    // SAFETY: plain system calls on values we own; glibc applies the id
    // changes to every thread (there is only this one).
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(os("set the supplementary groups"));
        }
        if libc::setresgid(run_as.gid, run_as.gid, run_as.gid) != 0 {
            return Err(os(&format!("switch to group {}", run_as.gid)));
        }
        if libc::setresuid(run_as.uid, run_as.uid, run_as.uid) != 0 {
            return Err(os(&format!("switch to user {}", run_as.user)));
        }
    }
    if !keep.is_empty() {
        caps::securebits::set_keepcaps(false)
            .map_err(|e| format!("cannot reset the keep-capabilities flag: {e}"))?;
    }
    confine(keep)?;
    verify_dropped(run_as, keep)
}

/// The drop holds: every user and group id is the new one, and neither root
/// nor a capability beyond `keep` can be had back.
fn verify_dropped(run_as: &RunAs, keep: &[Capability]) -> Result<(), String> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut gr, mut ge, mut gs) = (0, 0, 0);
    // SAFETY: the calls write into the integers we pass.
    let ok = unsafe {
        libc::getresuid(&mut r, &mut e, &mut s) == 0
            && libc::getresgid(&mut gr, &mut ge, &mut gs) == 0
    };
    if !ok || [r, e, s] != [run_as.uid; 3] || [gr, ge, gs] != [run_as.gid; 3] {
        return Err(format!(
            "the switch to user {} did not hold (uids {r}/{e}/{s}, gids {gr}/{ge}/{gs})",
            run_as.user
        ));
    }
    // SAFETY: attempts that must fail; if one succeeds we refuse to run.
    let regained = unsafe { libc::setuid(0) == 0 || libc::setgid(0) == 0 };
    if regained {
        return Err("root could be regained after the switch: refusing to run".into());
    }
    let permitted = caps::read(None, CapSet::Permitted)
        .map_err(|e| format!("cannot read the capabilities: {e}"))?;
    if !permitted.is_subset(&set_of(keep)) {
        return Err(format!(
            "capabilities beyond {:?} survived the switch: refusing to run",
            names(keep)
        ));
    }
    Ok(())
}

/// For a reload (SIGHUP): whether the running server can give the new
/// config's mailboxes their owners. After the drop it holds the mailbox
/// capabilities only if start-up needed them, so a reload that brings a new
/// owner needs a restart; the error names the users concerned.
pub fn check_mailbox_owners(runtime: &Runtime) -> Result<(), String> {
    let uid = geteuid();
    if uid == 0 {
        return Ok(());
    }
    let foreign = foreign_mailboxes(runtime, uid, &current_groups());
    let kept = DELIVERY_CAPABILITIES
        .get()
        .is_some_and(|kept| MAILBOX_CAPABILITIES.iter().all(|c| kept.contains(c)));
    if foreign.is_empty() || kept {
        return Ok(());
    }
    Err(format!(
        "mailbox.owner/group: the Maildirs of {} would belong to another user, and this server \
         (uid {uid}) kept no capability to give them away: restart tern to apply it",
        foreign.join(", ")
    ))
}

/// Called by the thread that started the delivery thread, before any other
/// thread exists: gives up every capability kept for delivery on this
/// thread (capability sets are per thread, and a thread made later starts
/// with its maker's), so the delivery thread, which got its own copy when
/// it was made, is the only one that holds them, even as permitted.
pub fn leave_to_delivery_thread() -> Result<(), String> {
    if DELIVERY_CAPABILITIES.get().is_none_or(Vec::is_empty) {
        return Ok(());
    }
    let failed = |what: &str, e: caps::errors::CapsError| format!("cannot {what}: {e}");
    caps::clear(None, CapSet::Effective).map_err(|e| failed("clear the capabilities", e))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| failed("clear the inheritable capabilities", e))?;
    caps::clear(None, CapSet::Permitted)
        .map_err(|e| failed("clear the permitted capabilities", e))?;
    match caps::read(None, CapSet::Permitted) {
        Ok(left) if left.is_empty() => Ok(()),
        Ok(left) => Err(format!(
            "capabilities {left:?} survived outside the delivery thread: refusing to run"
        )),
        Err(e) => Err(failed("read the capabilities", e)),
    }
}

/// Called by the delivery thread when it starts: puts the mailbox
/// capabilities kept through the drop in force for that thread alone.
/// Failure only means deliveries to another owner fail (and are retried),
/// so it is logged, not fatal.
pub fn enter_delivery_thread() {
    let Some(keep) = DELIVERY_CAPABILITIES.get() else {
        return;
    };
    if keep.is_empty() {
        return;
    }
    if let Err(e) = caps::set(None, CapSet::Effective, &set_of(keep)) {
        warn!(event = "delivery.capabilities", error = %e, "Maildirs of another owner cannot be written");
    }
}

/// Hands a folder or file tree of the server's (spool, TLS files) to
/// `owner`; entries that are already its own are left alone.
///
/// This runs as root on folders `owner` has held since the last start, so
/// `owner` may have put anything there, timed to the walk: the tree is
/// walked by descriptor, each name opened relative to its folder's
/// descriptor and never through a symbolic link (a link is left as it is,
/// and logged), so no link or swapped folder leads root's `chown` outside
/// the tree. `path` is opened from `base` (the open data folder, whose own
/// path `base_path` the caller trusts) one name at a time when it lies
/// below it; on a path elsewhere only links root made are followed.
pub fn hand_over(
    base: &File,
    base_path: &Path,
    path: &Path,
    owner: (u32, u32),
    recursive: bool,
) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let Some((parent, name)) = open_parent(base, base_path, path).map_err(with_path)? else {
        return Ok(());
    };
    hand_over_at(&parent, &name, path, owner, recursive)
}

/// The open folder holding `path` and `path`'s last name; `None` when a
/// folder on the way does not exist. Below `base_path` every folder on the
/// way is opened from `base` by descriptor, never through a link (a link
/// on the way is refused with an error); elsewhere a link is followed only
/// if root made it (`fsutil::open_dir_path`).
pub fn open_parent(
    base: &File,
    base_path: &Path,
    path: &Path,
) -> io::Result<Option<(File, CString)>> {
    use std::path::Component;
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name"));
    };
    let name = crate::fsutil::c_name(name)?;
    let Some(parent) = path.parent() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no parent folder",
        ));
    };
    let below = match parent.strip_prefix(base_path) {
        Ok(below) => below,
        Err(_) => {
            let mut nothing_made = |_: &File, _: &CStr| Ok(false);
            return match crate::fsutil::open_dir_path(parent, &mut nothing_made) {
                Ok(dir) => Ok(Some((dir, name))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            };
        }
    };
    let mut dir = base.try_clone()?;
    for part in below.components() {
        match part {
            Component::Normal(part) => {
                dir = match crate::fsutil::open_dir_at(&dir, &crate::fsutil::c_name(part)?) {
                    Ok(next) => next,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
            }
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a path below the data folder must not climb out of it (..)",
                ));
            }
        }
    }
    Ok(Some((dir, name)))
}

/// [`hand_over`] of the entry `name` in the open folder `dir` (`path`
/// names it in messages).
pub fn hand_over_at(
    dir: &File,
    name: &CStr,
    path: &Path,
    owner: (u32, u32),
    recursive: bool,
) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let skipped = |why: &str| {
        warn!(event = "server.hand_over_skipped", path = %path.display(), "{why}: left as it is");
        Ok(())
    };
    let stat = match crate::fsutil::stat_at(dir, name) {
        Ok(stat) => stat,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e)),
    };
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFLNK => skipped("a symbolic link"),
        libc::S_IFDIR => {
            let folder = match crate::fsutil::open_dir_at(dir, name) {
                Ok(folder) => folder,
                Err(e) if crate::fsutil::is_symlink_error(&e) => {
                    return skipped("replaced by a symbolic link");
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(with_path(e)),
            };
            let stat = crate::fsutil::stat_fd(&folder).map_err(with_path)?;
            if (stat.st_uid, stat.st_gid) != owner {
                chown_fd(&folder, owner).map_err(with_path)?;
            }
            if recursive {
                for entry in crate::fsutil::names_in(&folder).map_err(with_path)? {
                    let below = path.join(std::ffi::OsStr::from_bytes(entry.to_bytes()));
                    hand_over_at(&folder, &entry, &below, owner, true)?;
                }
            }
            Ok(())
        }
        _ => {
            if (stat.st_uid, stat.st_gid) == owner {
                return Ok(());
            }
            // Pinned by an O_PATH descriptor (which opens nothing: a FIFO
            // or a device is not touched), so what is checked is what is
            // given away.
            let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: `name` is NUL-terminated; the fd is ours alone.
            let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(with_path(e))
                };
            }
            // SAFETY: `fd` was just opened and is owned by nobody else.
            let file = unsafe { File::from_raw_fd(fd) };
            let stat = crate::fsutil::stat_fd(&file).map_err(with_path)?;
            match stat.st_mode & libc::S_IFMT {
                libc::S_IFLNK => skipped("replaced by a symbolic link"),
                libc::S_IFDIR => skipped("replaced by a folder"),
                // A second name may be a hard link to a file elsewhere
                // (where links to others' files are not protected).
                _ if stat.st_nlink > 1 => skipped("a file with more than one name"),
                _ => chown_fd(&file, owner).map_err(with_path),
            }
        }
    }
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`: the owner of what `file` holds open
/// (an `O_PATH` descriptor included), never of a link's target.
pub fn chown_fd(file: &File, (uid, gid): (u32, u32)) -> io::Result<()> {
    // SAFETY: an empty NUL-terminated name with AT_EMPTY_PATH acts on the
    // descriptor itself, which we own.
    let rc = unsafe {
        libc::fchownat(
            file.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The owner files made by a root-run command (`tern user`, `tern dkim
/// generate`) get, so the server that dropped to `server.user` can still
/// read and replace them. Set once per process by [`commands_hand_over_to`].
static COMMAND_FILE_OWNER: OnceLock<(u32, u32)> = OnceLock::new();

/// For a command run by root: files it creates for the server belong to
/// `server.user` (when configured and not root).
pub fn commands_hand_over_to(runtime: &Runtime) {
    if let Some(run_as) = &runtime.run_as
        && is_root()
        && run_as.uid != 0
    {
        let _ = COMMAND_FILE_OWNER.set((run_as.uid, run_as.gid));
    }
}

/// The owner set by [`commands_hand_over_to`], if any.
pub fn command_file_owner() -> Option<(u32, u32)> {
    COMMAND_FILE_OWNER.get().copied()
}

/// Gives a file a command just created to the server's user (see
/// [`commands_hand_over_to`]); a no-op otherwise.
pub fn hand_over_file(file: &File) -> io::Result<()> {
    let Some((uid, gid)) = command_file_owner() else {
        return Ok(());
    };
    // SAFETY: fchown on a descriptor we own.
    if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_nobody_resolve_and_strangers_do_not() {
        assert_eq!(resolve_user("root").unwrap(), (0, Some(0)));
        assert_eq!(resolve_user("0").unwrap(), (0, Some(0)));
        // A number no account has is taken as it is (static:5000).
        assert_eq!(resolve_user("4000000").unwrap(), (4_000_000, None));
        assert_eq!(
            resolve_user("no-such-user-tern").unwrap_err(),
            "no such user \"no-such-user-tern\""
        );
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(
            resolve_group("no-such-group-tern").unwrap_err(),
            "no such group \"no-such-group-tern\""
        );
        assert_eq!(user_name(0).as_deref(), Some("root"));
        let groups = groups_of("root", 0).unwrap();
        assert_eq!(groups.first(), Some(&0));
    }

    #[test]
    fn root_can_always_apply_new_mailbox_owners() {
        let text = "[mailbox]\nowner = \"4000000\"\ngroup = \"4000000\"\n";
        let runtime = crate::config::parse(text, Path::new("/")).unwrap();
        if is_root() {
            assert!(check_mailbox_owners(&runtime).is_ok());
        } else {
            let e = check_mailbox_owners(&runtime).unwrap_err();
            assert!(e.contains("Maildirs of me "), "{e}");
        }
    }

    /// The owner and group of `path` itself (a link's own, not its target's).
    fn ids(path: &Path) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn hand_over_never_follows_a_link_out_of_the_tree() {
        if !is_root() {
            eprintln!("skipped: giving files away needs root");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let outside = root.path().join("etc");
        std::fs::create_dir_all(data.join("spool/sub")).unwrap();
        std::fs::write(data.join("spool/sub/segment"), b"x").unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("shadow"), b"secret").unwrap();
        // What the user owning the tree could plant: links to root's files
        // and folders, as an entry, as a subfolder and as a tree's own name.
        std::os::unix::fs::symlink(&outside, data.join("spool/sub/folder")).unwrap();
        std::os::unix::fs::symlink(outside.join("shadow"), data.join("spool/file")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("tls")).unwrap();
        std::fs::hard_link(outside.join("shadow"), data.join("spool/hard")).unwrap();
        let owner = (65534, 65533);
        let top = crate::fsutil::open_dir(&data).unwrap();
        for tree in ["spool", "tls"] {
            hand_over(&top, &data, &data.join(tree), owner, true).unwrap();
        }
        // A folder on the way that is a link is refused, not followed.
        let e = hand_over(&top, &data, &data.join("tls/shadow"), owner, false).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(ids(&outside), (0, 0));
        assert_eq!(ids(&outside.join("shadow")), (0, 0));
        for own in ["spool", "spool/sub", "spool/sub/segment"] {
            assert_eq!(ids(&data.join(own)), owner, "{own}");
        }
        // The links themselves are left as they are too.
        assert_eq!(ids(&data.join("spool/sub/folder")), (0, 0));
        assert_eq!(ids(&data.join("tls")), (0, 0));
        // A missing tree is nothing to hand over.
        hand_over(&top, &data, &data.join("none/x"), owner, true).unwrap();
    }

    #[test]
    fn foreign_owner_or_group_needs_the_capabilities() {
        let access = |owner, group| MailboxAccess {
            owner,
            group,
            ..MailboxAccess::default()
        };
        assert!(!foreign(&access(None, None), 100, &[100]));
        assert!(!foreign(&access(Some(100), Some(100)), 100, &[100]));
        assert!(foreign(&access(Some(5000), None), 100, &[100]));
        assert!(foreign(&access(None, Some(5000)), 100, &[100]));
        assert!(!foreign(&access(None, Some(5000)), 100, &[100, 5000]));
    }
}
