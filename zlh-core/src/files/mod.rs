//! The file manager behind the agent's `/files` routes: every operation is confined to one root
//! directory (the game server dir or the dev workspace), and every write lands atomically.
//!
//! [`Jail`] opens the root with `cap-std`, so paths resolve beneath it (openat2 `RESOLVE_BENEATH`
//! where the kernel has it) and a symlink inside the tree that points outside is refused rather than
//! followed. User paths are checked first by [`RelPath::parse`]: relative, no NUL, no `..` that
//! leaves the root, no reserved temp names. [`UploadManager`] adds resumable uploads (the tus
//! protocol's model: create, append at an offset, resume, cancel) whose partial data stays hidden
//! inside the root until a rename puts the finished file in place.
//!
//! Errors name the user's relative path, never the host path of the root.

use std::io;
use std::time::SystemTime;

use serde::Serialize;

mod jail;
mod upload;

pub use jail::{AtomicWrite, Jail};
pub use upload::{UploadInfo, UploadLimits, UploadManager};

/// Name prefix of the files an atomic write fills before renaming them into place.
pub const TEMP_PREFIX: &str = ".zlh-tmp-";
/// Name prefix of a resumable upload's partial data, kept in the root until it is complete.
pub const UPLOAD_PREFIX: &str = ".zlh-upload-";
/// Longest user path accepted (Linux `PATH_MAX`).
const MAX_PATH_LEN: usize = 4096;

/// Everything a file operation can refuse or fail with. The `path` is always the user's path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("{path:?} does not exist")]
    NotFound { path: String },
    #[error("{path:?} already exists")]
    AlreadyExists { path: String },
    #[error("{path:?} is not a directory")]
    NotADirectory { path: String },
    #[error("{path:?} is a directory")]
    IsADirectory { path: String },
    #[error("directory {path:?} is not empty (delete it recursively)")]
    NotEmpty { path: String },
    #[error("{path:?} leads outside the files root")]
    Escape { path: String },
    #[error("{path:?} is larger than the limit of {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("{path:?} does not fit in the quota ({available} bytes free)")]
    QuotaExceeded { path: String, available: u64 },
    #[error("no space left on the device for {path:?}")]
    NoSpace { path: String },
    #[error("upload {id:?} does not exist (finished long ago, cancelled, or expired)")]
    UnknownUpload { id: String },
    #[error("upload is at offset {current}, not {got}")]
    OffsetConflict { current: u64, got: u64 },
    #[error("upload {id:?} is busy with another request")]
    UploadBusy { id: String },
    #[error("transfer of {path:?} interrupted after {written} bytes: {reason}")]
    Interrupted { path: String, written: u64, reason: String },
    #[error("I/O error on {path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    pub(crate) fn invalid(path: &str, reason: impl Into<String>) -> Self {
        Self::InvalidPath { path: path.to_owned(), reason: reason.into() }
    }

    /// Classifies an OS error on the user's `path`: cap-std reports an escape as a
    /// `PermissionDenied` that carries no OS error code.
    pub fn from_io(path: &str, e: io::Error) -> Self {
        let path = path.to_owned();
        if e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none() {
            return Self::Escape { path };
        }
        match e.raw_os_error() {
            Some(libc::ENOENT) => return Self::NotFound { path },
            Some(libc::EEXIST) => return Self::AlreadyExists { path },
            Some(libc::ENOTDIR) => return Self::NotADirectory { path },
            Some(libc::EISDIR) => return Self::IsADirectory { path },
            Some(libc::ENOTEMPTY) => return Self::NotEmpty { path },
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => return Self::NoSpace { path },
            Some(libc::ENAMETOOLONG) => return Self::invalid(&path, "name too long"),
            Some(libc::ELOOP) => return Self::invalid(&path, "too many levels of symbolic links"),
            // openat2 RESOLVE_BENEATH answers EXDEV for a path that would leave the root.
            Some(libc::EXDEV) => return Self::Escape { path },
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::NotFound => Self::NotFound { path },
            io::ErrorKind::AlreadyExists => Self::AlreadyExists { path },
            _ => Self::Io { path, source: e },
        }
    }
}

/// What kind of thing an entry is; a symlink is reported as itself, never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device node.
    Other,
}

/// One directory entry as [`Jail::list`] and [`Jail::stat`] report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// A user path after validation: components relative to the root, without `.`, `..` or empty
/// parts. `..` is applied lexically; one that would climb above the root is an escape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath {
    parts: Vec<String>,
}

impl RelPath {
    /// Checks `input` (the user's path). An empty path or `.` is the root itself.
    pub fn parse(input: &str) -> Result<Self, FileError> {
        if input.len() > MAX_PATH_LEN {
            let start: String = input.chars().take(64).collect();
            return Err(FileError::invalid(&format!("{start}..."), "path too long"));
        }
        if input.contains('\0') {
            return Err(FileError::invalid(input, "contains a NUL byte"));
        }
        if input.starts_with('/') {
            return Err(FileError::invalid(input, "must be relative to the files root"));
        }
        let mut parts: Vec<String> = Vec::new();
        for part in input.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(FileError::Escape { path: input.to_owned() });
                    }
                }
                name if is_reserved(name) => {
                    return Err(FileError::invalid(input, format!("{name:?} is a reserved name")));
                }
                name => parts.push(name.to_owned()),
            }
        }
        Ok(Self { parts })
    }

    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The path as given to cap-std: `.` for the root.
    pub fn as_path(&self) -> std::path::PathBuf {
        if self.parts.is_empty() {
            ".".into()
        } else {
            self.parts.iter().collect()
        }
    }

    /// The parent directory and the last component; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        let (last, parent) = self.parts.split_last()?;
        Some((RelPath { parts: parent.to_vec() }, last))
    }

    pub fn parts(&self) -> &[String] {
        &self.parts
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.parts.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&self.parts.join("/"))
        }
    }
}

/// True for the names of the agent's own hidden temp files, which users can neither see nor name.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) || name.starts_with(UPLOAD_PREFIX)
}

/// 128 random bits as 32 lowercase hex digits: temp names and upload ids.
pub(crate) fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_normalises_inside_the_root() {
        assert_eq!(RelPath::parse("a/./b//c/").unwrap().to_string(), "a/b/c");
        assert_eq!(RelPath::parse("a/../b").unwrap().to_string(), "b");
        assert!(RelPath::parse("").unwrap().is_root());
        assert!(RelPath::parse(".").unwrap().is_root());
    }

    #[test]
    fn parse_refuses_leaving_absolute_nul_and_reserved() {
        assert!(matches!(RelPath::parse("../x"), Err(FileError::Escape { .. })));
        assert!(matches!(RelPath::parse("a/../../x"), Err(FileError::Escape { .. })));
        assert!(matches!(RelPath::parse("/etc/passwd"), Err(FileError::InvalidPath { .. })));
        assert!(matches!(RelPath::parse("a\0b"), Err(FileError::InvalidPath { .. })));
        assert!(matches!(RelPath::parse("x/.zlh-tmp-1234"), Err(FileError::InvalidPath { .. })));
        assert!(matches!(RelPath::parse(".zlh-upload-ab"), Err(FileError::InvalidPath { .. })));
        assert!(matches!(RelPath::parse(&"a/".repeat(3000)), Err(FileError::InvalidPath { .. })));
    }

    #[test]
    fn escape_from_cap_std_is_told_apart_from_a_real_permission_error() {
        let escape = io::Error::new(io::ErrorKind::PermissionDenied, "a path led outside of the filesystem");
        assert!(matches!(FileError::from_io("x", escape), FileError::Escape { .. }));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(matches!(FileError::from_io("x", denied), FileError::Io { .. }));
    }
}
