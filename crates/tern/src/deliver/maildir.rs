//! Local delivery into Maildir (https://cr.yp.to/proto/maildir.html).
//!
//! Each copy is written to `tmp/` under a unique name, made durable, and
//! renamed into `new/`; the copy counts as delivered only after `new/` itself
//! was synced. A batch shares that cost: all its files are written first,
//! then one `syncfs(2)` per file system makes every one of them durable at
//! once, then they are renamed, then each distinct `new/` directory is synced
//! once. Per message that is a create, a write and a rename, and no fsync of
//! its own: on ext4 a per-file fsync writes that file's inode block, and a
//! batch's inodes share blocks (measured: the per-file fsyncs, their inode
//! block writes and the threads contending on the directory lock were most
//! of the delivery cost).
//!
//! Invariants: a reader never sees a partial file in `new/` (the data is
//! durable before the rename, and the rename is atomic); a failed copy
//! leaves no file behind in `tmp/` or `new/`.
//!
//! Not here: the decision what to deliver where (the queue), headers other
//! than the prefix the caller passes.
//!
//! Errors: per copy, as `io::Error`; the queue turns every one into a
//! deferral (a full mailbox disk must never bounce or lose mail).

use crate::fsutil::create_dir_durable;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One copy of a message for one mailbox.
pub struct LocalCopy<'a> {
    pub maildir: &'a Path,
    /// Header lines added for this copy (`Return-Path:`, `Delivered-To:`).
    pub prefix: &'a [u8],
    pub body: &'a [u8],
}

/// Source of unique file names: time, pid, a per-process sequence and the host.
pub struct MaildirNamer {
    host: String,
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

    fn next(&self, size: usize) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.M{}P{}Q{}.{},S={}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            seq,
            self.host,
            size
        )
    }
}

/// A mailbox's `tmp/` and `new/`, opened once per batch: every create,
/// rename and removal is relative to them, so the kernel walks each
/// mailbox's path once per batch instead of three times per copy (the walks
/// were a tenth of the delivery thread's time in the kernel).
struct MaildirDirs {
    tmp: File,
    new: File,
    /// The file system holding the mailbox: copies on one share a `syncfs`.
    dev: u64,
}

impl MaildirDirs {
    /// Creates the mailbox if needed, then opens its directories.
    fn open(maildir: &Path) -> io::Result<MaildirDirs> {
        ensure_maildir(maildir)?;
        let open_dir = |sub: &str| {
            let dir = maildir.join(sub);
            // O_DIRECTORY: something else put in its place (a FIFO) must
            // fail here, not block the delivery thread.
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(&dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
        };
        let tmp = open_dir("tmp")?;
        let new = open_dir("new")?;
        let dev = tmp.metadata()?.dev();
        Ok(MaildirDirs { tmp, new, dev })
    }
}

/// Delivers every copy; blocking (run it on a blocking thread). The result
/// at index i belongs to `copies[i]`.
pub fn deliver_batch(namer: &MaildirNamer, copies: &[LocalCopy<'_>]) -> Vec<io::Result<()>> {
    // Each mailbox is checked (and created) once per batch, not once per copy.
    let mut mailboxes: BTreeMap<&Path, Result<MaildirDirs, (io::ErrorKind, String)>> =
        BTreeMap::new();
    for copy in copies {
        mailboxes.entry(copy.maildir).or_insert_with(|| {
            MaildirDirs::open(copy.maildir).map_err(|e| (e.kind(), e.to_string()))
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
    // Each copy's name, the same in tmp/ and, once renamed, in new/.
    let mut written: Vec<io::Result<CString>> = copies
        .iter()
        .map(|c| write_tmp(namer, c, mailbox_of(c)?))
        .collect();
    sync_file_systems(copies, &mailboxes, &mut written);
    let mut outcomes: Vec<io::Result<CString>> = copies
        .iter()
        .zip(written)
        .map(|(copy, name)| {
            let name = name?;
            let mailbox = mailbox_of(copy)?;
            match renameat(&mailbox.tmp, &name, &mailbox.new, &name) {
                Ok(()) => Ok(name),
                Err(e) => {
                    let _ = unlinkat(&mailbox.tmp, &name);
                    Err(io::Error::new(
                        e.kind(),
                        format!("rename into {}/new: {e}", copy.maildir.display()),
                    ))
                }
            }
        })
        .collect();
    // The renames are durable only once each new/ directory is synced.
    let mut dirs: BTreeMap<&Path, Vec<usize>> = BTreeMap::new();
    for (i, o) in outcomes.iter().enumerate() {
        if o.is_ok() {
            dirs.entry(copies[i].maildir).or_default().push(i);
        }
    }
    for (maildir, members) in dirs {
        let Some(Ok(mailbox)) = mailboxes.get(maildir) else {
            continue;
        };
        if let Err(e) = mailbox.new.sync_all() {
            for i in members {
                if let Ok(name) = &outcomes[i] {
                    // Not durable: take it back so a retry does not leave two copies.
                    let _ = unlinkat(&mailbox.new, name);
                }
                outcomes[i] = Err(io::Error::new(
                    e.kind(),
                    format!("fsync {}/new: {e}", maildir.display()),
                ));
            }
        }
    }
    outcomes.into_iter().map(|o| o.map(|_| ())).collect()
}

/// Writes one copy into `tmp/` under a fresh name, which it returns. The
/// file is closed at once, so a batch holds two descriptors per mailbox,
/// not one per copy: the later `syncfs` through the mailbox's `tmp/`,
/// opened before any copy was written, still reports every write-back
/// error since (Linux 5.8+).
fn write_tmp(
    namer: &MaildirNamer,
    copy: &LocalCopy<'_>,
    mailbox: &MaildirDirs,
) -> io::Result<CString> {
    let text_name = namer.next(copy.prefix.len() + copy.body.len());
    let failed = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("{}/tmp/{text_name}: {e}", copy.maildir.display()),
        )
    };
    // Our names never hold a NUL (time, numbers, the escaped host name).
    let name = CString::new(text_name.as_bytes()).map_err(|e| failed(io::Error::other(e)))?;
    let mut file = create_new_at(&mailbox.tmp, &name).map_err(&failed)?;
    match write_both(&mut file, copy.prefix, copy.body) {
        Ok(()) => Ok(name),
        Err(e) => {
            let _ = unlinkat(&mailbox.tmp, &name);
            Err(failed(e))
        }
    }
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
    mailboxes: &BTreeMap<&Path, Result<MaildirDirs, (io::ErrorKind, String)>>,
    written: &mut [io::Result<CString>],
) {
    let mut by_fs: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, w) in written.iter().enumerate() {
        if let (Ok(_), Some(Ok(mailbox))) = (w, mailboxes.get(copies[i].maildir)) {
            by_fs.entry(mailbox.dev).or_default().push(i);
        }
    }
    for members in by_fs.into_values() {
        let synced = match mailboxes.get(copies[members[0]].maildir) {
            Some(Ok(mailbox)) => syncfs(&mailbox.tmp),
            _ => continue,
        };
        if let Err(e) = synced {
            for i in members {
                if let (Ok(name), Some(Ok(mailbox))) =
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

/// `openat(dir, name, O_CREAT|O_EXCL)`: a new file, mode 0600, never one
/// that already exists (nor a symlink's target).
fn create_new_at(dir: &File, name: &CStr) -> io::Result<File> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the fd we get back is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
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

/// Creates `maildir/{tmp,new,cur}` (and any missing ancestors) if needed,
/// durably.
fn ensure_maildir(maildir: &Path) -> io::Result<()> {
    if maildir.join("new").is_dir() && maildir.join("tmp").is_dir() {
        return Ok(());
    }
    for sub in ["tmp", "new", "cur"] {
        create_dir_durable(&maildir.join(sub))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn batch_writes_every_copy_into_new() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a/Maildir");
        let b = root.path().join("b/Maildir");
        let namer = MaildirNamer::new("host/x:y");
        let copies = vec![
            LocalCopy {
                maildir: &a,
                prefix: b"Delivered-To: a@x\r\n",
                body: b"body1\r\n",
            },
            LocalCopy {
                maildir: &b,
                prefix: b"Delivered-To: b@x\r\n",
                body: b"body2\r\n",
            },
            LocalCopy {
                maildir: &a,
                prefix: &[],
                body: b"body3\r\n",
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
        assert_eq!(fs::read_dir(a.join("tmp")).unwrap().count(), 0);
        let name = fs::read_dir(b.join("new"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let name = name.to_string_lossy();
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
        let copies = vec![
            LocalCopy {
                maildir: &bad,
                prefix: &[],
                body: b"x",
            },
            LocalCopy {
                maildir: &good,
                prefix: &[],
                body: b"y",
            },
        ];
        let results = deliver_batch(&namer, &copies);
        assert!(results[0].is_err());
        assert!(results[1].is_ok());
    }
}
