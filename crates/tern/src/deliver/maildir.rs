//! Local delivery into Maildir (https://cr.yp.to/proto/maildir.html).
//!
//! Each copy is written to `tmp/`, made durable, and moved into `new/`; the
//! copy counts as delivered only after `new/` itself was synced. A batch
//! shares that cost: all its files are written first, then one `syncfs(2)`
//! per file system makes every one of them durable at once, then they are
//! moved, then each distinct `new/` directory is synced once. Per message
//! that is a create, a write and a rename, and no fsync of its own: on ext4
//! a per-file fsync writes that file's inode block, and a batch's inodes
//! share blocks (measured: the per-file fsyncs, their inode block writes and
//! the threads contending on the directory lock were most of the delivery
//! cost).
//!
//! Exactly once across crashes. A crash between a copy's move into `new/`
//! and the spool's record of it makes the queue deliver that copy again. So
//! a copy's name is derived from what identifies it (the message's queue ID
//! and arrival time, the recipient's index in the envelope), never from the
//! clock or the process: every attempt at one copy uses the same name, in
//! `tmp/` and in `new/`. The move into `new/` refuses to replace an existing
//! name. For a copy an earlier attempt may have delivered (the caller knows:
//! the message was recovered at start-up or is being retried), a file found
//! under its name that holds exactly this copy is that earlier delivery: it
//! counts as delivered and no second one is written. A copy the user has
//! read since was moved to `cur/` under its name plus an info suffix
//! (`:2,S`), so for such a copy `cur/` is read as well, once per mailbox per
//! batch. A first attempt never reads `cur/` nor compares, and any file
//! under its name is a stranger's (a queue ID reused after the clock went
//! back), as is one with other content: the copy then goes under a unique
//! name beside it, never lost.
//!
//! Invariants: a reader never sees a partial file in `new/` (the data is
//! durable before the move, and the move is atomic); a failed copy leaves
//! no file of its own attempt behind in `tmp/` or `new/` (an earlier
//! attempt's copy stays where it is); the `tmp/` file an interrupted attempt
//! left is replaced or removed by the next attempt at that copy; a copy is
//! reported delivered only once its name is durable in `new/` or `cur/`.
//!
//! Not here: the decision what to deliver where, and whether an earlier
//! attempt may have delivered a copy (the queue); headers other than the
//! prefix the caller passes.
//!
//! Ownership. A mailbox has an owner, a group and modes (`[mailbox]`,
//! `[[user]] owner`; see `config::MailboxAccess`): the Maildir folder and
//! its `tmp/`, `new/` and `cur/` are created with them, and each copy gets
//! its mode and owner on its descriptor right after it is created in
//! `tmp/`, before a byte is written, so a reader such as Dovecot never
//! finds a file in `new/` that is not yet its own. Folders above the
//! Maildir that delivery has to create (`<data_dir>/mail/<user>`) stay the
//! server's, mode 0711: the mailbox owner can pass through them without
//! seeing the other mailboxes. Existing folders are never changed. Giving
//! a file to another user takes `CAP_CHOWN`, and writing into a folder of
//! theirs `CAP_DAC_OVERRIDE`, which the delivery thread holds when the
//! configuration needs them (see `privileges`).
//!
//! Errors: per copy, as `io::Error`; the queue turns every one into a
//! deferral (a full mailbox disk must never bounce or lose mail).

use crate::config::MailboxAccess;
use crate::spool::MsgId;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::warn;

/// What identifies one copy on every attempt to deliver it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyKey {
    pub queue_id: MsgId,
    /// Unix seconds at acceptance, from the stored envelope: the time part
    /// of the Maildir name, the same on a redelivery days later.
    pub received_at: i64,
    /// The recipient's index in the envelope: two recipients of one message
    /// in one mailbox are two copies with two names.
    pub rcpt: usize,
}

/// One copy of a message for one mailbox.
pub struct LocalCopy<'a> {
    pub maildir: &'a Path,
    /// The mailbox's owner, group and modes.
    pub access: MailboxAccess,
    /// Header lines added for this copy (`Return-Path:`, `Delivered-To:`).
    pub prefix: &'a [u8],
    pub body: &'a [u8],
    pub key: CopyKey,
    /// An earlier attempt may have delivered this copy (a crash or a failed
    /// spool record came after it): look for it in `cur/` too, and take a
    /// copy found in `new/` for it.
    pub redelivery: bool,
}

/// How a delivered copy got into the mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Written by this attempt.
    Written,
    /// An earlier attempt's copy, still in `new/`.
    EarlierInNew,
    /// An earlier attempt's copy that the user has seen (moved to `cur/`).
    EarlierInCur,
}

/// Maildir file names: derived from the copy, plus the host.
pub struct MaildirNamer {
    host: String,
    /// For the unique names of clashing copies only.
    sequence: AtomicU64,
}

impl MaildirNamer {
    pub fn new(hostname: &str) -> MaildirNamer {
        // The spec asks to encode '/' and ':' in the host part.
        let host = hostname.replace('/', "\\057").replace(':', "\\072");
        MaildirNamer {
            host,
            sequence: AtomicU64::new(0),
        }
    }

    /// `<arrival>.Q<queue ID>R<recipient index>.<host>,S=<size>`: the same
    /// on every attempt at this copy, and unique as long as queue IDs are.
    pub fn name(&self, key: &CopyKey, size: usize) -> String {
        format!(
            "{}.Q{}R{}.{},S={}",
            key.received_at, key.queue_id, key.rcpt, self.host, size
        )
    }

    /// A name no other copy has (the time, the process and a per-process
    /// sequence, as in classic Maildir names), for a first attempt whose
    /// own name is taken by a stranger.
    fn unique(&self, key: &CopyKey, size: usize) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.Q{}R{}M{}P{}N{}.{},S={}",
            now.as_secs(),
            key.queue_id,
            key.rcpt,
            now.subsec_micros(),
            std::process::id(),
            seq,
            self.host,
            size
        )
    }
}

/// A mailbox's folder, `tmp/` and `new/`, opened once per batch: every
/// create, rename and removal is relative to them, so the kernel walks each
/// mailbox's path once per batch instead of three times per copy (the walks
/// were a tenth of the delivery thread's time in the kernel).
///
/// The Maildir folder and everything in it belong to the mailbox owner,
/// who may replace `tmp/` or `new/` by a symbolic link to a folder they
/// cannot write (`/etc`); the delivery thread can (`CAP_DAC_OVERRIDE`), so
/// the Maildir is opened from its parent and its folders from it, by
/// descriptor and never through a link: a link in their place defers the
/// copy with an error naming it, and nothing is written. The folders above
/// the Maildir are walked the same way, except that a link root owns (the
/// administrator's, as `/var/mail -> /srv/mail`) is followed: one that
/// `server.user` put in `<data_dir>/mail` is refused too.
struct MaildirDirs {
    maildir: File,
    tmp: File,
    new: File,
    /// The file system holding the mailbox: copies on one share a `syncfs`.
    dev: u64,
}

impl MaildirDirs {
    /// Creates what is missing of the mailbox, then opens its folders.
    fn open(maildir: &Path, access: &MailboxAccess) -> io::Result<MaildirDirs> {
        let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", maildir.display()));
        let (parent, name) = match (maildir.parent(), maildir.file_name()) {
            (Some(parent), Some(name)) => (parent, crate::fsutil::c_name(name).map_err(at)?),
            _ => return Err(at(io::Error::from(io::ErrorKind::InvalidInput))),
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let ours = MailboxAccess {
            owner: None,
            group: None,
            dir_mode: ANCESTOR_DIR_MODE,
            ..*access
        };
        let mut create = |dir: &File, name: &CStr| {
            let path = Path::new(OsStr::from_bytes(name.to_bytes()));
            open_or_create(dir, name, path, &ours).map(|_| true)
        };
        let above = crate::fsutil::open_dir_path(parent, &mut create)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", parent.display())))?;
        let (dir, created) = open_or_create(&above, &name, maildir, access)?;
        let sub = |name: &CStr| {
            let path = maildir.join(OsStr::from_bytes(name.to_bytes()));
            open_or_create(&dir, name, &path, access)
        };
        let (tmp, made_tmp) = sub(c"tmp")?;
        let (new, made_new) = sub(c"new")?;
        if created || made_tmp || made_new {
            // A new mailbox is complete, as readers expect; an existing one
            // without cur/ (nobody has read it yet) is left so.
            sub(c"cur")?;
        }
        let dev = tmp.metadata()?.dev();
        Ok(MaildirDirs {
            maildir: dir,
            tmp,
            new,
            dev,
        })
    }
}

/// Opens the folder `name` in `parent` (`path` names it), never through a
/// symbolic link; creates it first if it is missing, with the mailbox's
/// folder mode and owner, durably. Whether it was created comes back too.
fn open_or_create(
    parent: &File,
    name: &CStr,
    path: &Path,
    access: &MailboxAccess,
) -> io::Result<(File, bool)> {
    let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match crate::fsutil::open_dir_at(parent, name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        opened => return opened.map(|dir| (dir, false)).map_err(at),
    }
    let failed = |e: io::Error| io::Error::new(e.kind(), format!("create {}: {e}", path.display()));
    // SAFETY: `name` is NUL-terminated; `parent` is an open directory.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(failed(e));
        }
        // Made meanwhile by someone else: theirs, left as it is.
        return crate::fsutil::open_dir_at(parent, name)
            .map(|dir| (dir, false))
            .map_err(at);
    }
    // What was just made, unless a link was swapped in: then refused.
    let dir = crate::fsutil::open_dir_at(parent, name).map_err(failed)?;
    set_mode_and_owner(&dir, Some(access.dir_mode), access).map_err(failed)?;
    parent.sync_all().map_err(failed)?;
    Ok((dir, true))
}

type Mailboxes<'a> = BTreeMap<&'a Path, Result<MaildirDirs, (io::ErrorKind, String)>>;

/// What `cur/` holds under a redelivered copy's name.
enum InCur {
    Nothing,
    /// This copy, from an earlier attempt.
    Earlier,
    /// A different message under the same name (a queue ID reused after
    /// the clock went back): the copy must go under a unique name.
    Stranger,
}

/// Where a copy stands once its file is written.
enum Staged {
    /// In `tmp/` under the copy's name.
    InTmp {
        name: CString,
        /// A stranger's file in `cur/` has the name.
        taken: bool,
    },
    /// An earlier attempt's copy is in `cur/`: nothing to write.
    InCur,
}

/// Where a copy stands once it is in the mailbox (not yet synced).
enum Placed {
    /// In `new/` under this name.
    InNew(CString, Delivered),
    InCur,
}

/// Delivers every copy; blocking (run it on a blocking thread). The result
/// at index i belongs to `copies[i]`.
pub fn deliver_batch(namer: &MaildirNamer, copies: &[LocalCopy<'_>]) -> Vec<io::Result<Delivered>> {
    // Each mailbox is checked (and created) once per batch, not once per copy.
    let mut mailboxes: Mailboxes<'_> = BTreeMap::new();
    for copy in copies {
        mailboxes.entry(copy.maildir).or_insert_with(|| {
            MaildirDirs::open(copy.maildir, &copy.access).map_err(|e| (e.kind(), e.to_string()))
        });
    }
    let mailbox_of = |copy: &LocalCopy<'_>| -> io::Result<&MaildirDirs> {
        match mailboxes.get(copy.maildir) {
            Some(Ok(mailbox)) => Ok(mailbox),
            // The text names the path that failed.
            Some(Err((kind, text))) => Err(io::Error::new(*kind, text.clone())),
            None => Err(io::Error::other("mailbox not prepared")),
        }
    };
    let names: Vec<io::Result<CString>> = copies
        .iter()
        .map(|c| {
            let name = namer.name(&c.key, c.prefix.len() + c.body.len());
            // Only a NUL in the configured host name could fail this.
            CString::new(name).map_err(io::Error::other)
        })
        .collect();
    let in_cur = find_earlier_in_cur(copies, &names, &mailboxes);
    let mut staged: Vec<io::Result<Staged>> = copies
        .iter()
        .zip(names)
        .zip(in_cur)
        .map(|((copy, name), in_cur)| {
            let (name, mailbox) = (name?, mailbox_of(copy)?);
            let taken = match in_cur? {
                InCur::Earlier => {
                    // An interrupted attempt's leftover, if any.
                    let _ = unlinkat(&mailbox.tmp, &name);
                    return Ok(Staged::InCur);
                }
                InCur::Stranger => true,
                InCur::Nothing => false,
            };
            write_tmp(copy, mailbox, &name)?;
            Ok(Staged::InTmp { name, taken })
        })
        .collect();
    sync_file_systems(copies, &mailboxes, &mut staged);
    let mut placed: Vec<io::Result<Placed>> = copies
        .iter()
        .zip(staged)
        .map(|(copy, staged)| match staged? {
            Staged::InCur => Ok(Placed::InCur),
            Staged::InTmp { name, taken } => {
                move_into_new(namer, copy, mailbox_of(copy)?, name, taken)
            }
        })
        .collect();
    // The moves (and an earlier attempt's move, which the crash may have
    // caught before its sync) are durable only once each new/ is synced.
    let mut dirs: BTreeMap<&Path, Vec<usize>> = BTreeMap::new();
    for (i, p) in placed.iter().enumerate() {
        if let Ok(Placed::InNew(..)) = p {
            dirs.entry(copies[i].maildir).or_default().push(i);
        }
    }
    for (maildir, members) in dirs {
        let Some(Ok(mailbox)) = mailboxes.get(maildir) else {
            continue;
        };
        if let Err(e) = mailbox.new.sync_all() {
            for i in members {
                if let Ok(Placed::InNew(name, Delivered::Written)) = &placed[i] {
                    // Not durable: take it back, so the invariant holds (the
                    // retry would also find and keep it).
                    let _ = unlinkat(&mailbox.new, name);
                }
                placed[i] = Err(io::Error::new(
                    e.kind(),
                    format!("fsync {}/new: {e}", maildir.display()),
                ));
            }
        }
    }
    placed
        .into_iter()
        .map(|p| {
            p.map(|p| match p {
                Placed::InNew(_, delivered) => delivered,
                Placed::InCur => Delivered::EarlierInCur,
            })
        })
        .collect()
}

/// Moves a copy from `tmp/` into `new/` under its name. If that name is
/// taken in `new/`, it is this copy's earlier delivery on a redelivery (if
/// the file holds this very copy), or else a stranger's; a copy whose name
/// a stranger took (there or, `taken`, in `cur/`) moves under a unique name.
fn move_into_new(
    namer: &MaildirNamer,
    copy: &LocalCopy<'_>,
    mailbox: &MaildirDirs,
    name: CString,
    taken: bool,
) -> io::Result<Placed> {
    let failed = |e: io::Error| {
        let _ = unlinkat(&mailbox.tmp, &name);
        io::Error::new(
            e.kind(),
            format!("rename into {}/new: {e}", copy.maildir.display()),
        )
    };
    if !taken {
        if move_unless_taken(&mailbox.tmp, &name, &mailbox.new, &name).map_err(failed)? {
            return Ok(Placed::InNew(name, Delivered::Written));
        }
        if copy.redelivery && holds_copy(open_at(&mailbox.new, &name), copy).map_err(failed)? {
            let _ = unlinkat(&mailbox.tmp, &name);
            return Ok(Placed::InNew(name, Delivered::EarlierInNew));
        }
    }
    let size = copy.prefix.len() + copy.body.len();
    let unique =
        CString::new(namer.unique(&copy.key, size)).map_err(|e| failed(io::Error::other(e)))?;
    warn!(event = "delivery.name_taken", maildir = %copy.maildir.display(), name = %name.to_string_lossy(), instead = %unique.to_string_lossy());
    match move_unless_taken(&mailbox.tmp, &name, &mailbox.new, &unique) {
        Ok(true) => Ok(Placed::InNew(unique, Delivered::Written)),
        Ok(false) => Err(failed(io::ErrorKind::AlreadyExists.into())),
        Err(e) => Err(failed(e)),
    }
}

/// Whether `file` holds exactly this copy: only then is a file under the
/// copy's name its earlier delivery (a stranger keeps its file, and ours
/// goes beside it). A file gone meanwhile was moved on by a mail reader
/// (to `cur/`, or to another flag there): its name is all there is to go
/// by, and it was ours.
fn holds_copy(file: io::Result<File>, copy: &LocalCopy<'_>) -> io::Result<bool> {
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let (head, tail) = (copy.prefix, copy.body);
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() != (head.len() + tail.len()) as u64 {
        return Ok(false);
    }
    let mut text = Vec::with_capacity(head.len() + tail.len());
    io::Read::read_to_end(&mut file, &mut text)?;
    Ok(text.len() == head.len() + tail.len()
        && text[..head.len()] == *head
        && text[head.len()..] == *tail)
}

/// `openat(dir, name)` for reading, never through a symlink, and without
/// waiting: a FIFO a mailbox owner put under a copy's name must not block
/// the delivery thread (it then holds no copy: wrong type and size).
fn open_at(dir: &File, name: &CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the fd we get back is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// For each copy, what its mailbox's `cur/` holds under its name: one
/// `readdir` per mailbox holding a redelivered copy (a first attempt never
/// pays for one), and one `fsync` of `cur/` where an earlier copy was
/// found, since the reader's move into `cur/` may not be durable yet (nor
/// was the earlier attempt's into `new/`, if the crash came first).
fn find_earlier_in_cur(
    copies: &[LocalCopy<'_>],
    names: &[io::Result<CString>],
    mailboxes: &Mailboxes<'_>,
) -> Vec<io::Result<InCur>> {
    let mut found: Vec<io::Result<InCur>> = copies.iter().map(|_| Ok(InCur::Nothing)).collect();
    let mut wanted: BTreeMap<&Path, HashMap<&[u8], Vec<usize>>> = BTreeMap::new();
    for (i, copy) in copies.iter().enumerate() {
        if let (true, Ok(name), Some(Ok(_))) =
            (copy.redelivery, &names[i], mailboxes.get(copy.maildir))
        {
            wanted
                .entry(copy.maildir)
                .or_default()
                .entry(name.as_bytes())
                .or_default()
                .push(i);
        }
    }
    for (maildir, wanted) in wanted {
        let cur_path = maildir.join("cur");
        let with_path =
            |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", cur_path.display()));
        let Some(Ok(mailbox)) = mailboxes.get(maildir) else {
            continue;
        };
        let hits = match crate::fsutil::open_dir_at(&mailbox.maildir, c"cur") {
            // A mailbox nobody has read yet may have none.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            opened => opened.and_then(|cur| Ok((scan_cur(&cur, &wanted)?, cur))),
        };
        let (hits, cur) = match hits {
            Ok(hits) => hits,
            Err(e) => {
                for i in wanted.into_values().flatten() {
                    found[i] = Err(with_path(io::Error::new(e.kind(), e.to_string())));
                }
                continue;
            }
        };
        let mut earlier = Vec::new();
        for (i, name) in hits {
            found[i] = match holds_copy(open_at(&cur, &name), &copies[i]) {
                Ok(true) => {
                    earlier.push(i);
                    Ok(InCur::Earlier)
                }
                Ok(false) => Ok(InCur::Stranger),
                Err(e) => Err(io::Error::new(
                    e.kind(),
                    format!("{}/{}: {e}", cur_path.display(), name.to_string_lossy()),
                )),
            };
        }
        if earlier.is_empty() {
            continue;
        }
        if let Err(e) = cur.sync_all() {
            for i in earlier {
                found[i] = Err(io::Error::new(
                    e.kind(),
                    format!("fsync {}: {e}", cur_path.display()),
                ));
            }
        }
    }
    found
}

/// The copies among `wanted` (by name) that the open `cur/` holds a file
/// for, with that file's name.
fn scan_cur(cur: &File, wanted: &HashMap<&[u8], Vec<usize>>) -> io::Result<Vec<(usize, CString)>> {
    let mut hits = Vec::new();
    for name in crate::fsutil::names_in(cur)? {
        if let Some(copies) = earlier_copy_of(name.as_bytes(), wanted) {
            hits.extend(copies.iter().map(|&i| (i, name.clone())));
        }
    }
    Ok(hits)
}

/// Which wanted name the `cur/` entry `entry` carries: its unique part is
/// the name up to the info (`:2,S`; `;` or `!` on readers whose file
/// systems forbid `:`), possibly followed by fields a reader appended
/// (Dovecot's `,W=<size>`).
fn earlier_copy_of<'w>(
    entry: &[u8],
    wanted: &'w HashMap<&[u8], Vec<usize>>,
) -> Option<&'w Vec<usize>> {
    for (at, byte) in entry.iter().enumerate() {
        if matches!(byte, b':' | b';' | b'!' | b',') {
            if let Some(copies) = wanted.get(&entry[..at]) {
                return Some(copies);
            }
            if *byte == b':' {
                return None;
            }
        }
    }
    wanted.get(entry)
}

/// Writes one copy into `tmp/` under its name. The file is closed at once,
/// so a batch holds three descriptors per mailbox, not one per copy: the
/// later `syncfs` through the mailbox's `tmp/`, opened before any copy was
/// written, still reports every write-back error since (Linux 5.8+).
fn write_tmp(copy: &LocalCopy<'_>, mailbox: &MaildirDirs, name: &CStr) -> io::Result<()> {
    let failed = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "{}/tmp/{}: {e}",
                copy.maildir.display(),
                name.to_string_lossy()
            ),
        )
    };
    let mode = copy.access.file_mode;
    let mut file = match create_new_at(&mailbox.tmp, name, mode) {
        // An interrupted attempt at this copy left its file (the name is
        // the copy's own), perhaps cut short: write it anew.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            unlinkat(&mailbox.tmp, name).map_err(failed)?;
            create_new_at(&mailbox.tmp, name, mode)
        }
        created => created,
    }
    .map_err(failed)?;
    // Final mode and owner before the rename into new/ (see the module
    // comment); the mode first, while the file is still ours to chmod.
    // The umask can only have taken group and other bits: chmod only when
    // the mode has some.
    let chmod = (mode & 0o077 != 0).then_some(mode);
    set_mode_and_owner(&file, chmod, &copy.access).map_err(|e| {
        let _ = unlinkat(&mailbox.tmp, name);
        failed(e)
    })?;
    write_both(&mut file, copy.prefix, copy.body).map_err(|e| {
        let _ = unlinkat(&mailbox.tmp, name);
        failed(e)
    })
}

/// Writes `head` then `tail` with as few system calls as the kernel allows
/// (usually one `writev`), without copying them into one buffer.
fn write_both(file: &mut File, head: &[u8], tail: &[u8]) -> io::Result<()> {
    let mut done = 0;
    let total = head.len() + tail.len();
    while done < total {
        let n = if done < head.len() {
            file.write_vectored(&[io::IoSlice::new(&head[done..]), io::IoSlice::new(tail)])?
        } else {
            file.write(&tail[done - head.len()..])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// One `syncfs` per file system holding written copies; a failure fails
/// (and removes) every copy on that file system.
fn sync_file_systems(
    copies: &[LocalCopy<'_>],
    mailboxes: &Mailboxes<'_>,
    written: &mut [io::Result<Staged>],
) {
    let mut by_fs: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, w) in written.iter().enumerate() {
        if let (Ok(Staged::InTmp { .. }), Some(Ok(mailbox))) = (w, mailboxes.get(copies[i].maildir))
        {
            by_fs.entry(mailbox.dev).or_default().push(i);
        }
    }
    for members in by_fs.into_values() {
        let synced = match mailboxes.get(copies[members[0]].maildir) {
            Some(Ok(mailbox)) => syncfs(&mailbox.tmp),
            _ => continue,
        };
        if let Err(e) = synced {
            // Only copies written now: a copy found in cur/ is not ours to
            // fail (its own sync was done).
            for i in members {
                if let (Ok(Staged::InTmp { name, .. }), Some(Ok(mailbox))) =
                    (&written[i], mailboxes.get(copies[i].maildir))
                {
                    let _ = unlinkat(&mailbox.tmp, name);
                }
                written[i] = Err(io::Error::new(e.kind(), format!("syncfs: {e}")));
            }
        }
    }
}

/// `syncfs(2)`: every dirty page and inode of the file system `file` is on,
/// durable when it returns; since Linux 5.8 it also reports every write-back
/// error on that file system since `file` was opened.
fn syncfs(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own for the duration of the call.
    if unsafe { libc::syncfs(file.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `openat(dir, name, O_CREAT|O_EXCL)`: a new file with `mode` (less the
/// umask), never one that already exists (nor a symlink's target).
fn create_new_at(dir: &File, name: &CStr, mode: u32) -> io::Result<File> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the fd we get back is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Moves `from_dir/from` to `to_dir/to` unless `to_dir/to` exists:
/// `Ok(false)` then, and `from` stays where it is.
fn move_unless_taken(from_dir: &File, from: &CStr, to_dir: &File, to: &CStr) -> io::Result<bool> {
    // SAFETY: both names are NUL-terminated; both fds are open directories.
    let rc = unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // A file system without RENAME_NOREPLACE (NFS, some FUSE ones).
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            move_unless_present(from_dir, from, to_dir, to)
        }
        _ => Err(e),
    }
}

/// [`move_unless_taken`] as a look, then a plain rename: no other copy can
/// slip in between, since names carry our queue IDs and only the delivery
/// thread creates them (mail readers only take names out of `new/`).
fn move_unless_present(from_dir: &File, from: &CStr, to_dir: &File, to: &CStr) -> io::Result<bool> {
    if exists_at(to_dir, to)? {
        return Ok(false);
    }
    renameat(from_dir, from, to_dir, to).map(|()| true)
}

/// Whether `dir/name` exists (a symlink counts, whatever it points to).
fn exists_at(dir: &File, name: &CStr) -> io::Result<bool> {
    match crate::fsutil::stat_at(dir, name) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn renameat(from_dir: &File, from: &CStr, to_dir: &File, to: &CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated; both fds are open directories.
    let rc = unsafe {
        libc::renameat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unlinkat(dir: &File, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; `dir` is an open directory.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mode of the folders above a Maildir that delivery creates: the mailbox
/// owner passes through, nobody lists them.
const ANCESTOR_DIR_MODE: u32 = 0o711;

/// `fchmod` to `mode` (when given) then `fchown` to the configured owner
/// and group, if any.
fn set_mode_and_owner(file: &File, mode: Option<u32>, access: &MailboxAccess) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fchmod/fchown on a descriptor we own; -1 (all bits set)
    // leaves an id unchanged.
    unsafe {
        if let Some(mode) = mode
            && libc::fchmod(fd, mode as libc::mode_t) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if (access.owner.is_some() || access.group.is_some())
            && libc::fchown(
                fd,
                access.owner.unwrap_or(u32::MAX),
                access.group.unwrap_or(u32::MAX),
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn key(rcpt: usize) -> CopyKey {
        CopyKey {
            queue_id: MsgId(0x032E_9D2C_2F50_0001),
            received_at: 1_796_508_070,
            rcpt,
        }
    }

    fn copy<'a>(maildir: &'a Path, body: &'a [u8], rcpt: usize) -> LocalCopy<'a> {
        LocalCopy {
            maildir,
            access: MailboxAccess::default(),
            prefix: b"Delivered-To: a@x\r\n",
            body,
            key: key(rcpt),
            redelivery: false,
        }
    }

    fn redelivery(copy: LocalCopy<'_>) -> LocalCopy<'_> {
        LocalCopy {
            redelivery: true,
            ..copy
        }
    }

    /// Sorted names in `maildir/sub`.
    fn names(maildir: &Path, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(maildir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn delivered(results: Vec<io::Result<Delivered>>) -> Vec<Delivered> {
        results.into_iter().map(|r| r.unwrap()).collect()
    }

    fn mailbox() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let maildir = root.path().join("a/Maildir");
        (root, maildir)
    }

    /// Ids and modes of what delivery made, for the ownership tests.
    fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
        let meta = fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid(), meta.mode() & 0o7777)
    }

    /// Giving files away takes root (or CAP_CHOWN): the suite runs as root.
    fn can_chown() -> bool {
        caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_CHOWN).unwrap_or(false)
    }

    #[test]
    fn copies_and_folders_get_the_mailbox_owner_and_modes() {
        if !can_chown() {
            eprintln!("skipped: giving files to another user needs CAP_CHOWN");
            return;
        }
        let (root, maildir) = mailbox();
        // nobody:nogroup on Debian; any ids do for the kernel.
        let access = MailboxAccess {
            owner: Some(65534),
            group: Some(65533),
            file_mode: 0o640,
            dir_mode: 0o750,
        };
        let namer = MaildirNamer::new("host");
        let copies = [LocalCopy {
            access,
            ..copy(&maildir, b"body\r\n", 0)
        }];
        let results = deliver_batch(&namer, &copies);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let (me, my_group) = (unsafe { libc::geteuid() }, unsafe { libc::getegid() });
        // Above the Maildir: ours, passable.
        assert_eq!(
            owner_and_mode(&root.path().join("a")),
            (me, my_group, 0o711)
        );
        for dir in ["", "tmp", "new", "cur"] {
            assert_eq!(
                owner_and_mode(&maildir.join(dir)),
                (65534, 65533, 0o750),
                "{dir}"
            );
        }
        let new = names(&maildir, "new");
        assert_eq!(new.len(), 1);
        assert_eq!(
            owner_and_mode(&maildir.join("new").join(&new[0])),
            (65534, 65533, 0o640)
        );
        assert!(names(&maildir, "tmp").is_empty());
    }

    #[test]
    fn a_copy_that_cannot_be_given_away_is_not_delivered() {
        if !can_chown() {
            eprintln!("skipped: needs CAP_CHOWN to take it away from this thread");
            return;
        }
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("host");
        // The folders are made while we can; then this test's thread (and
        // no other: capabilities are per thread) loses the power to chown.
        MaildirDirs::open(&maildir, &MailboxAccess::default()).unwrap();
        let access = MailboxAccess {
            owner: Some(65534),
            ..MailboxAccess::default()
        };
        caps::drop(None, caps::CapSet::Effective, caps::Capability::CAP_CHOWN).unwrap();
        let results = deliver_batch(
            &namer,
            &[LocalCopy {
                access,
                ..copy(&maildir, b"body\r\n", 0)
            }],
        );
        caps::raise(None, caps::CapSet::Effective, caps::Capability::CAP_CHOWN).unwrap();
        let error = results.into_iter().next().unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}");
        assert!(names(&maildir, "tmp").is_empty());
        assert!(names(&maildir, "new").is_empty());
    }

    #[test]
    fn existing_folders_are_left_as_they_are() {
        let (_root, maildir) = mailbox();
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        fs::set_permissions(&maildir, fs::Permissions::from_mode(0o755)).unwrap();
        let access = MailboxAccess {
            file_mode: 0o644,
            ..MailboxAccess::default()
        };
        let copies = [LocalCopy {
            access,
            ..copy(&maildir, b"body\r\n", 0)
        }];
        let results = deliver_batch(&MaildirNamer::new("host"), &copies);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        assert_eq!(owner_and_mode(&maildir).2, 0o755);
        let new = names(&maildir, "new");
        assert_eq!(new.len(), 1);
        assert_eq!(owner_and_mode(&maildir.join("new").join(&new[0])).2, 0o644);
    }

    #[test]
    fn batch_writes_every_copy_into_new() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a/Maildir");
        let b = root.path().join("b/Maildir");
        let namer = MaildirNamer::new("host/x:y");
        let copies = vec![
            LocalCopy {
                prefix: b"Delivered-To: a@x\r\n",
                ..copy(&a, b"body1\r\n", 0)
            },
            LocalCopy {
                prefix: b"Delivered-To: b@x\r\n",
                ..copy(&b, b"body2\r\n", 1)
            },
            LocalCopy {
                prefix: &[],
                ..copy(&a, b"body3\r\n", 2)
            },
        ];
        let results = deliver_batch(&namer, &copies);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let mut in_a: Vec<Vec<u8>> = fs::read_dir(a.join("new"))
            .unwrap()
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect();
        in_a.sort();
        assert_eq!(
            in_a,
            vec![
                b"Delivered-To: a@x\r\nbody1\r\n".to_vec(),
                b"body3\r\n".to_vec()
            ]
        );
        assert!(names(&a, "tmp").is_empty());
        let name = &names(&b, "new")[0];
        assert!(name.contains("host\\057x\\072y,S=26"), "{name}");
    }

    #[test]
    fn unwritable_mailbox_fails_only_its_copy() {
        let root = tempfile::tempdir().unwrap();
        let good = root.path().join("good");
        let blocker = root.path().join("file");
        fs::write(&blocker, b"not a directory").unwrap();
        let bad = blocker.join("Maildir");
        let namer = MaildirNamer::new("h");
        let copies = vec![copy(&bad, b"x", 0), copy(&good, b"y", 1)];
        let results = deliver_batch(&namer, &copies);
        assert!(results[0].is_err());
        assert!(results[1].is_ok());
    }

    #[test]
    fn a_copy_is_named_after_its_message_and_recipient_not_the_clock() {
        let namer = MaildirNamer::new("mx.test");
        let name = namer.name(&key(2), 455);
        assert_eq!(name, "1796508070.Q032E9D2C2F500001R2.mx.test,S=455");
        // Another process (a restart), later: the same name.
        assert_eq!(MaildirNamer::new("mx.test").name(&key(2), 455), name);
        assert_ne!(namer.name(&key(3), 455), name);
        let (_root, maildir) = mailbox();
        let results = deliver_batch(&namer, &[copy(&maildir, b"body\r\n", 2)]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        let size = b"Delivered-To: a@x\r\nbody\r\n".len();
        assert_eq!(names(&maildir, "new"), vec![namer.name(&key(2), size)]);
    }

    #[test]
    fn a_redelivery_finds_the_copy_in_new_and_writes_no_second_one() {
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("h");
        let first = deliver_batch(&namer, &[copy(&maildir, b"body\r\n", 0)]);
        assert_eq!(delivered(first), vec![Delivered::Written]);
        let before = names(&maildir, "new");
        // The crash came before the spool recorded it: delivered again.
        let again = deliver_batch(&namer, &[redelivery(copy(&maildir, b"body\r\n", 0))]);
        assert_eq!(delivered(again), vec![Delivered::EarlierInNew]);
        assert_eq!(names(&maildir, "new"), before);
        assert!(names(&maildir, "tmp").is_empty());
        let text = fs::read(maildir.join("new").join(&before[0])).unwrap();
        assert_eq!(text, b"Delivered-To: a@x\r\nbody\r\n");
    }

    #[test]
    fn a_redelivery_finds_a_copy_the_user_has_read_in_cur() {
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("h");
        let copies = [copy(&maildir, b"one\r\n", 0), copy(&maildir, b"two\r\n", 1)];
        assert!(deliver_batch(&namer, &copies).iter().all(|r| r.is_ok()));
        // A mail reader moves both to cur/: one with the standard info,
        // one with a field of its own before it (Dovecot's W=).
        let new = names(&maildir, "new");
        let read = [format!("{}:2,S", new[0]), format!("{},W=30:2,RS", new[1])];
        for (name, read) in new.iter().zip(&read) {
            fs::rename(
                maildir.join("new").join(name),
                maildir.join("cur").join(read),
            )
            .unwrap();
        }
        let again = deliver_batch(&namer, &copies.map(redelivery));
        assert_eq!(
            delivered(again),
            vec![Delivered::EarlierInCur, Delivered::EarlierInCur]
        );
        assert!(names(&maildir, "new").is_empty());
        assert!(names(&maildir, "tmp").is_empty());
        let mut read = read.to_vec();
        read.sort();
        assert_eq!(names(&maildir, "cur"), read);
    }

    #[test]
    fn a_longer_name_in_cur_is_not_taken_for_the_copy() {
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("h");
        let c = redelivery(copy(&maildir, b"body\r\n", 1));
        let name = namer.name(&c.key, c.prefix.len() + c.body.len());
        fs::create_dir_all(maildir.join("cur")).unwrap();
        // Another copy whose name starts like ours (recipient 1 vs 12, a
        // size with one more digit).
        fs::write(maildir.join("cur").join(format!("{name}0:2,S")), b"x").unwrap();
        let other = namer.name(&key(12), c.prefix.len() + c.body.len());
        fs::write(maildir.join("cur").join(format!("{other}:2,")), b"x").unwrap();
        let results = deliver_batch(&namer, &[c]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        assert_eq!(names(&maildir, "new"), vec![name]);
    }

    #[test]
    fn a_leftover_tmp_file_of_an_interrupted_attempt_is_replaced_or_removed() {
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("h");
        let c = redelivery(copy(&maildir, b"the whole body\r\n", 0));
        let name = namer.name(&c.key, c.prefix.len() + c.body.len());
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        fs::write(
            maildir.join("tmp").join(&name),
            b"Delivered-To: a@x\r\nthe wh",
        )
        .unwrap();
        let results = deliver_batch(&namer, &[c]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        assert!(names(&maildir, "tmp").is_empty());
        let text = fs::read(maildir.join("new").join(&name)).unwrap();
        assert_eq!(text, b"Delivered-To: a@x\r\nthe whole body\r\n");

        // A leftover next to a copy the user already read: removed too.
        let c = redelivery(copy(&maildir, b"body\r\n", 1));
        let name = namer.name(&c.key, c.prefix.len() + c.body.len());
        let read = maildir.join("cur").join(format!("{name}:2,S"));
        fs::write(read, b"Delivered-To: a@x\r\nbody\r\n").unwrap();
        fs::write(maildir.join("tmp").join(&name), b"Deliv").unwrap();
        let results = deliver_batch(&namer, &[c]);
        assert_eq!(delivered(results), vec![Delivered::EarlierInCur]);
        assert!(names(&maildir, "tmp").is_empty());
        assert_eq!(names(&maildir, "new").len(), 1);

        // A first attempt meeting a leftover of its own name replaces it too.
        let c = copy(&maildir, b"fresh\r\n", 2);
        let name = namer.name(&c.key, c.prefix.len() + c.body.len());
        fs::write(maildir.join("tmp").join(&name), b"junk").unwrap();
        let results = deliver_batch(&namer, &[c]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        assert!(names(&maildir, "tmp").is_empty());
        let text = fs::read(maildir.join("new").join(&name)).unwrap();
        assert_eq!(text, b"Delivered-To: a@x\r\nfresh\r\n");
    }

    #[test]
    fn two_recipients_in_one_mailbox_get_a_copy_each() {
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("h");
        let copies = [
            copy(&maildir, b"body\r\n", 0),
            copy(&maildir, b"body\r\n", 3),
        ];
        let results = deliver_batch(&namer, &copies);
        assert_eq!(
            delivered(results),
            vec![Delivered::Written, Delivered::Written]
        );
        assert_eq!(names(&maildir, "new").len(), 2);
        // One of them delivered before a crash: the redelivery writes only
        // the other.
        let (_root, maildir) = mailbox();
        let first = deliver_batch(&namer, &[copy(&maildir, b"body\r\n", 0)]);
        assert!(first[0].is_ok());
        let copies = [
            copy(&maildir, b"body\r\n", 0),
            copy(&maildir, b"body\r\n", 3),
        ];
        let again = deliver_batch(&namer, &copies.map(redelivery));
        assert_eq!(
            delivered(again),
            vec![Delivered::EarlierInNew, Delivered::Written]
        );
        assert_eq!(names(&maildir, "new").len(), 2);
    }

    #[test]
    fn a_first_attempt_whose_name_is_taken_gets_a_unique_one() {
        // A stranger's file under our name (a queue ID reused after the
        // clock went back): a first attempt must not take it for its copy.
        let (_root, maildir) = mailbox();
        let namer = MaildirNamer::new("h");
        let c = copy(&maildir, b"body\r\n", 0);
        let name = namer.name(&c.key, c.prefix.len() + c.body.len());
        fs::create_dir_all(maildir.join("new")).unwrap();
        fs::create_dir_all(maildir.join("tmp")).unwrap();
        fs::write(maildir.join("new").join(&name), b"an older message").unwrap();
        let results = deliver_batch(&namer, &[c]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        let new = names(&maildir, "new");
        assert_eq!(new.len(), 2);
        let ours = new.iter().find(|n| **n != name).unwrap();
        assert!(ours.contains(".Q032E9D2C2F500001R0M"), "{ours}");
        assert_eq!(
            fs::read(maildir.join("new").join(ours)).unwrap(),
            b"Delivered-To: a@x\r\nbody\r\n"
        );
        assert!(names(&maildir, "tmp").is_empty());
    }

    #[test]
    fn a_redelivery_never_takes_a_strangers_file_for_its_copy() {
        // Same name, other content (a queue ID reused after the clock went
        // back), in new/ and in cur/: the copy goes beside it.
        for sub in ["new", "cur"] {
            let (_root, maildir) = mailbox();
            let namer = MaildirNamer::new("h");
            let c = redelivery(copy(&maildir, b"body\r\n", 0));
            let size = c.prefix.len() + c.body.len();
            let name = namer.name(&c.key, size);
            for sub in ["tmp", "new", "cur"] {
                fs::create_dir_all(maildir.join(sub)).unwrap();
            }
            let info = if sub == "cur" { ":2,S" } else { "" };
            let stranger = maildir.join(sub).join(format!("{name}{info}"));
            // Even the size in the name matches.
            fs::write(&stranger, vec![b'x'; size]).unwrap();
            let results = deliver_batch(&namer, &[c]);
            assert_eq!(delivered(results), vec![Delivered::Written], "{sub}");
            let ours: Vec<String> = names(&maildir, "new")
                .into_iter()
                .filter(|n| *n != name)
                .collect();
            assert_eq!(ours.len(), 1, "{sub}");
            assert_eq!(
                fs::read(maildir.join("new").join(&ours[0])).unwrap(),
                b"Delivered-To: a@x\r\nbody\r\n"
            );
            assert_eq!(fs::read(&stranger).unwrap(), vec![b'x'; size]);
            assert!(names(&maildir, "tmp").is_empty());
        }
    }

    #[test]
    fn only_a_redelivery_reads_cur() {
        // cur/ unreadable (a file in its place): a first attempt does not
        // notice; a redelivery cannot tell, so it fails (a deferral).
        let (_root, maildir) = mailbox();
        fs::create_dir_all(maildir.join("tmp")).unwrap();
        fs::create_dir_all(maildir.join("new")).unwrap();
        fs::write(maildir.join("cur"), b"not a directory").unwrap();
        let namer = MaildirNamer::new("h");
        let results = deliver_batch(&namer, &[copy(&maildir, b"1\r\n", 0)]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        let results = deliver_batch(&namer, &[redelivery(copy(&maildir, b"2\r\n", 1))]);
        assert!(results[0].is_err(), "{results:?}");
        assert_eq!(names(&maildir, "new").len(), 1);
        assert!(names(&maildir, "tmp").is_empty());
    }

    #[test]
    fn without_rename_noreplace_a_taken_name_is_still_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        for sub in ["from", "to"] {
            fs::create_dir(root.path().join(sub)).unwrap();
        }
        let from = crate::fsutil::open_dir(&root.path().join("from")).unwrap();
        let to = crate::fsutil::open_dir(&root.path().join("to")).unwrap();
        let name = CString::new("m").unwrap();
        fs::write(root.path().join("from/m"), b"new").unwrap();
        fs::write(root.path().join("to/m"), b"earlier").unwrap();
        assert!(!move_unless_present(&from, &name, &to, &name).unwrap());
        assert_eq!(fs::read(root.path().join("to/m")).unwrap(), b"earlier");
        assert!(root.path().join("from/m").exists());
        fs::remove_file(root.path().join("to/m")).unwrap();
        assert!(move_unless_present(&from, &name, &to, &name).unwrap());
        assert_eq!(fs::read(root.path().join("to/m")).unwrap(), b"new");
        assert!(!root.path().join("from/m").exists());
    }

    /// A mailbox owner can put a link where `tmp/`, `new/` or `cur/` or
    /// the Maildir itself should be; delivery (which may write where they
    /// cannot) must not follow it.
    #[test]
    fn a_link_in_a_maildir_defers_the_copy_and_nothing_is_written_through_it() {
        for (link, again) in [("tmp", false), ("new", false), ("cur", true), ("", false)] {
            let (root, maildir) = mailbox();
            let elsewhere = root.path().join("etc");
            fs::create_dir(&elsewhere).unwrap();
            if link.is_empty() {
                fs::create_dir_all(elsewhere.join("tmp")).unwrap();
                fs::create_dir_all(elsewhere.join("new")).unwrap();
                fs::create_dir_all(maildir.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(&elsewhere, &maildir).unwrap();
            } else {
                for sub in ["tmp", "new", "cur"] {
                    if sub != link {
                        fs::create_dir_all(maildir.join(sub)).unwrap();
                    }
                }
                std::os::unix::fs::symlink(&elsewhere, maildir.join(link)).unwrap();
            }
            let one = copy(&maildir, b"body\r\n", 0);
            let copies = [if again { redelivery(one) } else { one }];
            let results = deliver_batch(&MaildirNamer::new("host"), &copies);
            let error = results.into_iter().next().unwrap().unwrap_err();
            assert!(
                error.to_string().contains("is a symbolic link"),
                "{link}: {error}"
            );
            let written: Vec<_> = walkdir(&elsewhere);
            assert!(written.is_empty(), "{link}: {written:?}");
            if !link.is_empty() {
                assert!(names(&maildir, if link == "tmp" { "new" } else { "tmp" }).is_empty());
            }
        }
    }

    #[test]
    fn a_fifo_under_the_copys_name_does_not_block_a_redelivery() {
        let (_root, maildir) = mailbox();
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        let namer = MaildirNamer::new("host");
        let one = redelivery(copy(&maildir, b"body\r\n", 0));
        let name = namer.name(&one.key, one.prefix.len() + one.body.len());
        for sub in ["new", "cur"] {
            let fifo = CString::new(maildir.join(sub).join(&name).as_os_str().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        }
        let results = deliver_batch(&namer, &[one]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        // Beside the stranger, under a unique name.
        assert_eq!(names(&maildir, "new").len(), 2);
    }

    #[test]
    fn a_link_above_the_maildir_is_followed_only_if_root_made_it() {
        if !can_chown() {
            eprintln!("skipped: a link of another owner takes CAP_CHOWN to make");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let elsewhere = root.path().join("etc");
        fs::create_dir(&elsewhere).unwrap();
        let link = root.path().join("mail");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let maildir = link.join("alice/Maildir");
        let namer = MaildirNamer::new("host");
        // server.user's link (in a folder of theirs): refused.
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        let results = deliver_batch(&namer, &[copy(&maildir, b"body\r\n", 0)]);
        let error = results.into_iter().next().unwrap().unwrap_err();
        assert!(error.to_string().contains("is a symbolic link"), "{error}");
        assert!(fs::read_dir(&elsewhere).unwrap().next().is_none());
        // The administrator's: followed, and the missing folders made.
        std::os::unix::fs::lchown(&link, Some(0), Some(0)).unwrap();
        let results = deliver_batch(&namer, &[copy(&maildir, b"body\r\n", 0)]);
        assert_eq!(delivered(results), vec![Delivered::Written]);
        assert_eq!(names(&elsewhere.join("alice/Maildir"), "new").len(), 1);
        assert_eq!(owner_and_mode(&elsewhere.join("alice")).2, 0o711);
    }

    /// Every file below `dir`, by path.
    fn walkdir(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walkdir(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
