//! `Draft`: the buffer a session streams a body into before commit.
//!
//! Up to `draft_memory_limit` bytes stay in memory; beyond that everything is
//! spilled to a scratch file in `dir/scratch/`, so nothing unbounded is held in
//! memory (the session enforces the size limit, RFC 1870 §6).
//!
//! Invariants: a scratch file exists only while its `Draft` (or the `Scratch`
//! handed to the committer) is alive: it is removed on drop and after commit.
//! Stale ones left by a crash are removed at `Spool::open`.
//! Does not fsync scratch files: they are only buffers; durability comes from
//! the log append at commit.
//! Errors: `std::io::Error` from creating or writing the scratch file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;

#[derive(Debug)]
pub(crate) struct DraftCfg {
    pub scratch_dir: PathBuf,
    pub limit: usize,
    /// Live drafts of this spool (`Shared::open_drafts`).
    pub open: Arc<AtomicUsize>,
}

/// A message body being received.
#[derive(Debug)]
pub struct Draft {
    cfg: Arc<DraftCfg>,
    mem: Vec<u8>,
    /// Set once the body outgrew memory; owns the scratch file path.
    file: Option<(PathBuf, tokio::fs::File)>,
    /// Octets written (the client's content), not counting `prefix`.
    len: u64,
    /// Header fields to store in front of the content (`prepend`).
    prefix: Vec<u8>,
}

impl Draft {
    pub(crate) fn new(cfg: Arc<DraftCfg>) -> Draft {
        cfg.open.fetch_add(1, Ordering::Relaxed);
        Draft {
            cfg,
            mem: Vec::new(),
            file: None,
            len: 0,
            prefix: Vec::new(),
        }
    }

    /// Puts `fields` (whole header fields, CRLF-terminated) in front of
    /// everything written so far and of earlier prepends: the message is
    /// stored as the last prepend, ..., the first, then the content. Lets
    /// a trace or signature field that depends on the whole message be
    /// added at its end without copying the content.
    pub fn prepend(&mut self, fields: &[u8]) {
        self.prefix.splice(0..0, fields.iter().copied());
    }

    /// The content written so far (without prepended fields), read back:
    /// for header checks and signing at the end of the message.
    pub async fn content(&mut self) -> std::io::Result<Vec<u8>> {
        match self.file.as_mut() {
            None => Ok(self.mem.clone()),
            Some((path, f)) => {
                f.flush().await?;
                tokio::fs::read(path.as_path()).await
            }
        }
    }

    /// Append body bytes (already dot-unstuffed by the protocol engine).
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() && self.mem.len() + bytes.len() <= self.cfg.limit {
            self.mem.extend_from_slice(bytes);
            self.len += bytes.len() as u64;
            return Ok(());
        }
        if self.file.is_none() {
            let path = self
                .cfg
                .scratch_dir
                .join(format!("{:016x}.tmp", rand::random::<u64>()));
            let f = tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .await?;
            // Own the path before the first write so a failure still removes it.
            self.file = Some((path, f));
            let mem = std::mem::take(&mut self.mem);
            if let Some((_, f)) = self.file.as_mut() {
                f.write_all(&mem).await?;
            }
        }
        if let Some((_, f)) = self.file.as_mut() {
            f.write_all(bytes).await?;
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Tests: spill to a scratch file and make it `extra` bytes longer
    /// without writing them (a sparse file), so multi-GiB drafts are cheap.
    #[cfg(test)]
    pub(crate) async fn grow_sparse(&mut self, extra: u64) -> std::io::Result<()> {
        let spill = vec![b'x'; self.cfg.limit + 1];
        self.write(&spill).await?;
        if let Some((_, f)) = self.file.as_mut() {
            f.flush().await?;
            f.set_len(self.len + extra).await?;
        }
        self.len += extra;
        Ok(())
    }

    /// Octets of the stored message so far: prepended fields and content.
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hand the body over to the committer.
    /// The body, taken out; the draft still counts as being received
    /// until it is dropped (see `Spool::commit_as`).
    pub(crate) async fn take_body(&mut self) -> std::io::Result<Body> {
        let prefix = std::mem::take(&mut self.prefix);
        let content = self.content_body().await?;
        Ok(if prefix.is_empty() {
            content
        } else {
            Body::Prefixed(prefix, Box::new(content))
        })
    }

    async fn content_body(&mut self) -> std::io::Result<Body> {
        let len = self.len;
        match self.file.take() {
            None => Ok(Body::Mem(std::mem::take(&mut self.mem))),
            Some((path, mut f)) => {
                // tokio's File buffers one write in flight: flush before the
                // committer reads the file through a std handle.
                if let Err(e) = f.flush().await {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                let file = f.into_std().await;
                Ok(Body::File(Scratch { path, file, len }))
            }
        }
    }
}

impl Drop for Draft {
    fn drop(&mut self) {
        self.cfg.open.fetch_sub(1, Ordering::Relaxed);
        if let Some((path, _)) = self.file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A spilled body on its way into the log; removed when dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    pub path: PathBuf,
    pub file: std::fs::File,
    pub len: u64,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A body ready to be appended.
#[derive(Debug)]
pub(crate) enum Body {
    Mem(Vec<u8>),
    File(Scratch),
    /// Header fields the server adds in front of what the client sent
    /// (`Draft::prepend`), written first without copying the rest.
    Prefixed(Vec<u8>, Box<Body>),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Mem(v) => v.len() as u64,
            Body::File(s) => s.len,
            Body::Prefixed(prefix, rest) => prefix.len() as u64 + rest.len(),
        }
    }
}

/// Remove scratch files left behind by a crash (they never held anything
/// acknowledged).
pub(crate) fn clean_scratch(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        if ent.file_type()?.is_file() {
            std::fs::remove_file(ent.path())?;
            n += 1;
        }
    }
    Ok(n)
}
