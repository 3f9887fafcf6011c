"""A pass-through FUSE file system that fails on demand, for the storage-fault
tests (test_disk_full.py).

Run as `python3 faultfs.py BACKING MOUNTPOINT` (foreground, root). Everything
under MOUNTPOINT is BACKING, until the test writes a command to the control
file `MOUNTPOINT/.faultfs`:

  ok                 nothing fails
  erofs [PREFIX]     every change (create, write, truncate, rename, mkdir,
                     unlink, fsync, ...) fails with EROFS: a file system that
                     turned read-only under open files, as ext4 does with
                     errors=remount-ro
  eio [PREFIX]       the same changes fail with EIO: a failing disk
  syncfail [PREFIX]  writes succeed, every fsync/fdatasync (files and
                     directories) fails with EIO: the "fsyncgate" case

PREFIX limits the fault to paths under it (relative to the mount, e.g.
`mail/`); reads always work. Reading the control file returns the current
command. The mode lives in this process only: unmounting clears it.

Why FUSE and not `mount -o remount,ro` of a tmpfs: the kernel refuses to
remount a file system read-only while any file on it is open for writing
(EBUSY), and the server always holds its active spool segment open; and an
ext4 that an error turned read-only cannot be made writable again on a
running kernel without unmounting it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading

from fuse import FUSE, FuseOSError, Operations

CONTROL = "/.faultfs"
MODES = {"ok", "erofs", "eio", "syncfail"}


class FaultFS(Operations):
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._mutex = threading.Lock()
        self.mode = "ok"
        self.prefix = ""

    # -- fault switch

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _applies(self, path: str) -> bool:
        return path.lstrip("/").startswith(self.prefix)

    def _change(self, *paths: str) -> None:
        """Called before every change: raise the configured fault."""
        with self._mutex:
            mode = self.mode
        if mode in ("erofs", "eio") and any(self._applies(p) for p in paths):
            raise FuseOSError(errno.EROFS if mode == "erofs" else errno.EIO)

    def _sync(self, path: str) -> None:
        """Called before every fsync: raise the configured fault."""
        with self._mutex:
            mode = self.mode
        if mode != "ok" and self._applies(path):
            raise FuseOSError(errno.EROFS if mode == "erofs" else errno.EIO)

    def _command(self) -> bytes:
        with self._mutex:
            return f"{self.mode} {self.prefix}".strip().encode() + b"\n"

    def _set(self, text: str) -> None:
        words = text.split()
        if not words or words[0] not in MODES or len(words) > 2:
            raise FuseOSError(errno.EINVAL)
        with self._mutex:
            self.mode = words[0]
            self.prefix = words[1] if len(words) == 2 else ""
        print(f"faultfs: {self.mode} {self.prefix}".strip(), flush=True)

    # -- metadata

    def getattr(self, path, fh=None):
        if path == CONTROL:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1,
                    "st_size": len(self._command()), "st_uid": 0, "st_gid": 0}
        st = os.lstat(self._full(path))
        return {k: getattr(st, k) for k in (
            "st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink",
            "st_size", "st_uid", "st_ino", "st_blocks")}

    def access(self, path, amode):
        if path != CONTROL and not os.access(self._full(path), amode):
            raise FuseOSError(errno.EACCES)

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def readlink(self, path):
        return os.readlink(self._full(path))

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
            "f_files", "f_flag", "f_frsize", "f_namemax")}

    # -- changes to the tree

    def chmod(self, path, mode):
        self._change(path)
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        self._change(path)
        os.lchown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        if path == CONTROL:
            return
        self._change(path)
        os.utime(self._full(path), times, follow_symlinks=False)

    def mkdir(self, path, mode):
        self._change(path)
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        self._change(path)
        os.rmdir(self._full(path))

    def mknod(self, path, mode, dev):
        self._change(path)
        os.mknod(self._full(path), mode, dev)

    def unlink(self, path):
        self._change(path)
        os.unlink(self._full(path))

    def symlink(self, target, source):
        self._change(target)
        os.symlink(source, self._full(target))

    def link(self, target, source):
        self._change(target, source)
        os.link(self._full(source), self._full(target))

    def rename(self, old, new):
        self._change(old, new)
        os.rename(self._full(old), self._full(new))

    def truncate(self, path, length, fh=None):
        if path == CONTROL:
            return
        self._change(path)
        os.truncate(self._full(path), length)

    # -- files

    def create(self, path, mode, fi):
        self._change(path)
        fi.fh = os.open(self._full(path), fi.flags, mode)
        return 0

    def open(self, path, fi):
        if path == CONTROL:
            fi.fh = 0
            fi.direct_io = True
            return 0
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._change(path)
        fi.fh = os.open(self._full(path), fi.flags)
        return 0

    def read(self, path, size, offset, fi):
        if path == CONTROL:
            return self._command()[offset:offset + size]
        return os.pread(fi.fh, size, offset)

    def write(self, path, data, offset, fi):
        if path == CONTROL:
            self._set(data.decode(errors="replace"))
            return len(data)
        self._change(path)
        return os.pwrite(fi.fh, data, offset)

    def flush(self, path, fi):
        return 0

    def release(self, path, fi):
        if path != CONTROL:
            os.close(fi.fh)
        return 0

    def fsync(self, path, datasync, fi):
        self._sync(path)
        if datasync:
            os.fdatasync(fi.fh)
        else:
            os.fsync(fi.fh)
        return 0

    def fsyncdir(self, path, datasync, fi):
        self._sync(path)
        fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(FaultFS(backing), mountpoint, foreground=True, raw_fi=True, nothreads=False)


if __name__ == "__main__":
    main()
