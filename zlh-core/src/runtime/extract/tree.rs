//! The in-memory view of what an extraction has created, and the checks that need it.
//!
//! The destination starts empty and only the extraction writes into it, so this map is exactly
//! what is on disk: parents are checked here instead of with `stat`, and symlink targets are
//! resolved here, following the archive's other symlinks, once every entry is known.

use std::collections::HashMap;

use super::{ExtractError, IMPLICIT_DIR_MODE, MAX_COMPONENT, MAX_PATH};
use crate::runtime::layout::{ManifestEntry, MANIFEST_NAME};
use crate::types::Digest;

/// Symlinks followed while resolving one target before giving up (Linux allows 40).
const MAX_HOPS: usize = 40;

/// What a path is.
#[derive(Debug, Clone)]
pub(super) enum Node {
    /// `explicit`: listed in the archive, not just implied by a child's path.
    Dir {
        mode: u32,
        explicit: bool,
    },
    /// `index`: position of the file's data in the hasher's output (shared by hard links).
    File {
        index: usize,
        size: u64,
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

pub(super) struct Tree {
    /// Creation order, for the manifest.
    nodes: Vec<(String, Node)>,
    by_path: HashMap<String, usize>,
    files: usize,
    max_entries: u64,
    /// A directory already checked to be a directory all the way up (most entries share one).
    last_parent: String,
}

impl Tree {
    pub(super) fn new(max_entries: u64) -> Self {
        Self { nodes: Vec::new(), by_path: HashMap::new(), files: 0, max_entries, last_parent: String::new() }
    }

    pub(super) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Regular files written (hard links not counted).
    pub(super) fn file_count(&self) -> usize {
        self.files
    }

    pub(super) fn get(&self, path: &str) -> Option<&Node> {
        self.by_path.get(path).map(|&i| &self.nodes[i].1)
    }

    /// Records a new path: the one place for the reserved-name, duplicate and entry-count checks.
    pub(super) fn add(&mut self, path: &str, node: Node) -> Result<(), ExtractError> {
        if path == MANIFEST_NAME {
            return Err(ExtractError::ReservedName { path: path.to_owned() });
        }
        if self.by_path.contains_key(path) {
            return Err(ExtractError::Duplicate { path: path.to_owned() });
        }
        if self.nodes.len() as u64 >= self.max_entries {
            return Err(ExtractError::TooManyEntries { path: path.to_owned(), limit: self.max_entries });
        }
        self.by_path.insert(path.to_owned(), self.nodes.len());
        self.nodes.push((path.to_owned(), node));
        Ok(())
    }

    /// Records a regular file whose data is the next one sent to the hasher.
    pub(super) fn add_file(&mut self, path: &str, size: u64, mode: u32) -> Result<(), ExtractError> {
        self.add(path, Node::File { index: self.files, size, mode })?;
        self.files += 1;
        Ok(())
    }

    /// Records a listed directory. Returns true when it was already created as an implied parent
    /// (then only its mode changes); listing the same directory twice is a duplicate.
    pub(super) fn add_dir(&mut self, path: &str, mode: u32) -> Result<bool, ExtractError> {
        if let Some(&i) = self.by_path.get(path) {
            if let Node::Dir { explicit: explicit @ false, mode: m } = &mut self.nodes[i].1 {
                *explicit = true;
                *m = mode;
                return Ok(true);
            }
        }
        self.add(path, Node::Dir { mode, explicit: true })?;
        Ok(false)
    }

    /// Checks that every parent of `path` is a directory created by this extraction, recording
    /// missing ones as implied directories. Returns the ones to create, outermost first.
    pub(super) fn add_parents(&mut self, path: &str) -> Result<Vec<String>, ExtractError> {
        let Some((parent, _)) = path.rsplit_once('/') else { return Ok(Vec::new()) };
        if parent == self.last_parent {
            return Ok(Vec::new());
        }
        let mut created = Vec::new();
        for (i, _) in path.match_indices('/') {
            let prefix = &path[..i];
            match self.get(prefix) {
                Some(Node::Dir { .. }) => {}
                Some(Node::Symlink { .. }) => {
                    return Err(ExtractError::ThroughSymlink { path: path.to_owned(), parent: prefix.to_owned() })
                }
                Some(Node::File { .. }) => {
                    return Err(ExtractError::NotADirectory { path: path.to_owned(), parent: prefix.to_owned() })
                }
                None => {
                    self.add(prefix, Node::Dir { mode: IMPLICIT_DIR_MODE, explicit: false })?;
                    created.push(prefix.to_owned());
                }
            }
        }
        self.last_parent = parent.to_owned();
        Ok(created)
    }

    /// Refuses any symlink that resolves outside the destination, following the archive's other
    /// symlinks (`a/b/u -> ../..` then `t -> a/b/u/../..` escapes although `t` alone looks fine).
    /// Targets that do not exist are resolved lexically; the kernel would fail on them anyway.
    pub(super) fn check_symlinks(&self) -> Result<(), ExtractError> {
        for (path, node) in &self.nodes {
            if let Node::Symlink { target } = node {
                self.resolve(path, target)?;
            }
        }
        Ok(())
    }

    fn resolve(&self, link: &str, target: &str) -> Result<(), ExtractError> {
        let escapes = || ExtractError::SymlinkEscapes { path: link.to_owned(), target: target.to_owned() };
        let mut at: Vec<&str> = link.split('/').collect();
        at.pop(); // resolved relative to the link's directory
        let mut todo: Vec<&str> = target.split('/').rev().collect();
        let mut hops = 0;
        while let Some(component) = todo.pop() {
            match component {
                "" | "." => {}
                ".." => {
                    if at.pop().is_none() {
                        return Err(escapes());
                    }
                }
                name => {
                    at.push(name);
                    if let Some(Node::Symlink { target: next }) = self.get(&at.join("/")) {
                        hops += 1;
                        if hops > MAX_HOPS {
                            return Err(ExtractError::SymlinkLoop { path: link.to_owned(), target: target.to_owned() });
                        }
                        if next.starts_with('/') {
                            return Err(escapes());
                        }
                        at.pop();
                        todo.extend(next.split('/').rev());
                    }
                }
            }
        }
        Ok(())
    }

    /// The manifest entries, in creation order; `digests[i]` is the digest of file data `i`.
    pub(super) fn into_manifest(self, digests: &[Digest]) -> Vec<ManifestEntry> {
        self.nodes
            .into_iter()
            .map(|(path, node)| match node {
                Node::Dir { mode, .. } => ManifestEntry::Dir { path, mode },
                Node::File { index, size, mode } => ManifestEntry::File { path, size, sha256: digests[index], mode },
                Node::Symlink { target } => ManifestEntry::Symlink { path, target },
            })
            .collect()
    }
}

/// Normalizes an entry path: `/`-separated, no `.` or empty components. Refuses absolute paths,
/// `..` and bad names. The empty string means the destination itself (`./`).
pub(super) fn normalize(raw: &[u8]) -> Result<String, ExtractError> {
    let shown = String::from_utf8_lossy(raw);
    if raw.is_empty() {
        return Err(ExtractError::EmptyPath { path: String::new() });
    }
    let name = check_name(raw, &shown)?;
    if name.starts_with('/') {
        return Err(ExtractError::AbsolutePath { path: name });
    }
    let mut out = String::with_capacity(name.len());
    for component in name.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(ExtractError::ParentComponent { path: name }),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

/// Checks a path or link target for length, NUL bytes and UTF-8; `path` names the entry in errors.
pub(super) fn check_name(raw: &[u8], path: &str) -> Result<String, ExtractError> {
    if raw.len() > MAX_PATH || raw.split(|&b| b == b'/').any(|c| c.len() > MAX_COMPONENT) {
        return Err(ExtractError::PathTooLong { path: truncated(path) });
    }
    if raw.contains(&0) {
        return Err(ExtractError::InvalidName { path: path.to_owned(), reason: "NUL byte" });
    }
    String::from_utf8(raw.to_vec())
        .map_err(|_| ExtractError::InvalidName { path: path.to_owned(), reason: "not UTF-8" })
}

/// Bounds what an error message echoes back.
fn truncated(path: &str) -> String {
    path.chars().take(256).collect()
}
