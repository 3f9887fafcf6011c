//! Small durable file-system steps shared by the spool side and delivery.
//!
//! A new directory entry (a file or a directory) survives a crash only once
//! the directory holding it is synced; ext4 with a journal tends to order
//! this for us, other file systems (and ext4 without a journal) do not.
//!
//! Folders someone else controls (a mailbox owner's Maildir, the data
//! folder once it is `server.user`'s) are walked by descriptor, one name at
//! a time and never through a symbolic link ([`open_dir_at`], [`stat_at`],
//! [`names_in`]): a privileged caller that went by path could be sent
//! anywhere by a link swapped in between its check and its use.
//!
//! Errors: `io::Error` with the path in its text.

use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// `fsync` of a directory: makes the entries created or renamed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("fsync {}: {e}", dir.display())))
}

/// Creates `dir` and any missing ancestors (mode 0700) and syncs the parent
/// of every directory it created, so the whole chain survives a crash.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // The missing part of the chain, outermost first.
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
        cur = p.parent();
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder
        .create(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// `openat(dir, name)` of a folder, never through a symbolic link: a link
/// in `name`'s place fails with [`is_symlink_error`]'s error, anything that
/// is not a folder (a FIFO put there) fails at once instead of blocking.
pub fn open_dir_at(dir: &File, name: &CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the fd we get back is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd >= 0 {
        // SAFETY: `fd` was just opened and is owned by nobody else.
        return Ok(unsafe { File::from_raw_fd(fd) });
    }
    let e = io::Error::last_os_error();
    // Linux answers ELOOP or ENOTDIR for a link: say which it was.
    if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
        && stat_at(dir, name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    {
        return Err(symlink_error());
    }
    Err(e)
}

/// [`open_dir_at`]'s refusal: a symbolic link where a folder was expected.
#[derive(Debug)]
struct SymlinkRefused;

impl std::fmt::Display for SymlinkRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("is a symbolic link: refusing to go through it")
    }
}

impl std::error::Error for SymlinkRefused {}

fn symlink_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, SymlinkRefused)
}

/// Whether `e` is [`open_dir_at`]'s refusal of a symbolic link.
pub fn is_symlink_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<SymlinkRefused>())
}

/// Opens the folder `path` itself, following links in it as the path says
/// (the caller trusts the path up to there).
pub fn open_dir(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
}

/// How many links [`open_dir_path`] follows in one walk before it gives up
/// (the kernel's own limit for a path).
const MAX_LINKS: u32 = 40;

/// Opens the folder `path` one name at a time, following a symbolic link
/// only if root owns it (the administrator's, as `/var/mail -> /srv/mail`):
/// a link anyone else made (in a folder of theirs) is refused with
/// [`is_symlink_error`]'s error. `create` is called for a missing name with
/// the folder that should hold it, and must make that folder (it answers
/// whether it did; false: the name stays missing, `NotFound`).
pub fn open_dir_path(
    path: &Path,
    create: &mut dyn FnMut(&File, &CStr) -> io::Result<bool>,
) -> io::Result<File> {
    let start = open_dir(Path::new(if path.is_absolute() { "/" } else { "." }))?;
    let mut links = 0;
    walk_from(start, path, create, &mut links)
}

fn walk_from(
    mut dir: File,
    path: &Path,
    create: &mut dyn FnMut(&File, &CStr) -> io::Result<bool>,
    links: &mut u32,
) -> io::Result<File> {
    use std::path::Component;
    for part in path.components() {
        let name = match part {
            Component::RootDir => {
                dir = open_dir(Path::new("/"))?;
                continue;
            }
            Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => CString::from(c".."),
            Component::Normal(name) => c_name(name)?,
        };
        dir = match open_dir_at(&dir, &name) {
            Ok(next) => next,
            Err(e) if is_symlink_error(&e) => follow_root_link(&dir, &name, create, links)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create(&dir, &name)? {
                    return Err(e);
                }
                open_dir_at(&dir, &name)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(dir)
}

/// The folder the link `name` in `dir` leads to, if root owns the link;
/// the link is pinned by a descriptor, so the owner checked is the owner
/// of the link read.
fn follow_root_link(
    dir: &File,
    name: &CStr,
    create: &mut dyn FnMut(&File, &CStr) -> io::Result<bool>,
    links: &mut u32,
) -> io::Result<File> {
    *links += 1;
    if *links > MAX_LINKS {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the fd we get back is ours alone.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let link = unsafe { File::from_raw_fd(fd) };
    let stat = stat_fd(&link)?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFLNK || stat.st_uid != 0 {
        return Err(symlink_error());
    }
    let mut target = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty name reads the link the O_PATH descriptor holds;
    // `target` has room for the length passed.
    let n = unsafe {
        libc::readlinkat(
            link.as_raw_fd(),
            c"".as_ptr(),
            target.as_mut_ptr().cast(),
            target.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    target.truncate(n);
    let target = std::ffi::OsStr::from_bytes(&target);
    // A relative target is read from the folder holding the link.
    walk_from(dir.try_clone()?, Path::new(target), create, links)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: a link is described, not
/// followed.
pub fn stat_at(dir: &File, name: &CStr) -> io::Result<libc::stat> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `dir` an open directory; `stat` is
    // read only after the kernel filled it.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            stat.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so the struct is initialised.
    Ok(unsafe { stat.assume_init() })
}

/// `fstat` of an open file or folder.
pub fn stat_fd(file: &File) -> io::Result<libc::stat> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `file` is open; `stat` is read only after the kernel filled it.
    if unsafe { libc::fstat(file.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so the struct is initialised.
    Ok(unsafe { stat.assume_init() })
}

/// The names in the open folder `dir` (without `.` and `..`), read through
/// the descriptor, so they are that folder's whatever its path now names.
pub fn names_in(dir: &File) -> io::Result<Vec<CString>> {
    // fdopendir takes the descriptor over (closedir closes it) and reads
    // from its offset: give it a copy, rewound.
    let copy = dir.try_clone()?;
    // SAFETY: the copy is ours; fdopendir owns it from here on success.
    let stream = unsafe { libc::fdopendir(copy.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(copy);
    let mut names = Vec::new();
    // SAFETY: `stream` is a valid DIR* until closedir below; each entry's
    // name is copied out before the next readdir.
    let result = unsafe {
        libc::rewinddir(stream);
        loop {
            *libc::__errno_location() = 0;
            let entry = libc::readdir(stream);
            if entry.is_null() {
                let errno = *libc::__errno_location();
                break if errno == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(errno))
                };
            }
            let name = CStr::from_ptr((*entry).d_name.as_ptr());
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                names.push(name.to_owned());
            }
        }
    };
    // SAFETY: closes the stream (and the copied descriptor) exactly once.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// A file name as a C string; a name with a NUL cannot be a file's.
pub fn c_name(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_whole_chain() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
        let file = root.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(create_dir_durable(&file.join("sub")).is_err());
    }

    #[test]
    fn a_folder_is_opened_and_listed_by_descriptor_never_through_a_link() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("real")).unwrap();
        fs::write(root.path().join("real/f"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("real"), root.path().join("link")).unwrap();
        let top = open_dir(root.path()).unwrap();
        let real = open_dir_at(&top, c"real").unwrap();
        assert_eq!(names_in(&real).unwrap(), vec![CString::from(c"f")]);
        // Listed twice: the copy handed to fdopendir starts at the top.
        assert_eq!(names_in(&real).unwrap().len(), 1);
        let e = open_dir_at(&top, c"link").unwrap_err();
        assert!(is_symlink_error(&e), "{e}");
        assert_eq!(
            open_dir_at(&top, c"none").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let st = stat_at(&top, c"link").unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
    }

    #[test]
    fn a_path_is_walked_through_roots_links_only() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: links of two owners take root to make");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let top = root.path();
        fs::create_dir_all(top.join("real/in")).unwrap();
        std::os::unix::fs::symlink("real", top.join("relative")).unwrap();
        std::os::unix::fs::symlink(top.join("real"), top.join("theirs")).unwrap();
        std::os::unix::fs::lchown(top.join("theirs"), Some(65534), None).unwrap();
        std::os::unix::fs::symlink("loop", top.join("loop")).unwrap();
        let mut nothing = |_: &File, _: &CStr| Ok(false);
        let same = |a: &File, b: &Path| {
            use std::os::unix::fs::MetadataExt;
            let (a, b) = (stat_fd(a).unwrap(), fs::metadata(b).unwrap());
            (a.st_dev, a.st_ino) == (b.dev(), b.ino())
        };
        let found = open_dir_path(&top.join("relative/in/../in"), &mut nothing).unwrap();
        assert!(same(&found, &top.join("real/in")));
        let e = open_dir_path(&top.join("theirs/in"), &mut nothing).unwrap_err();
        assert!(is_symlink_error(&e), "{e}");
        let e = open_dir_path(&top.join("loop/x"), &mut nothing).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = open_dir_path(&top.join("real/none"), &mut nothing).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
