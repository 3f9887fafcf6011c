//! Small durable file-system steps shared by the spool side and delivery.
//!
//! A new directory entry (a file or a directory) survives a crash only once
//! the directory holding it is synced; ext4 with a journal tends to order
//! this for us, other file systems (and ext4 without a journal) do not.
//!
//! Errors: `io::Error` with the path in its text.

use std::fs::{self, File};
use std::io;
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
}
