//! Full validation of a catalog.
//!
//! Serde already refuses malformed ids, versions, digests and artifact keys (the domain types
//! validate on parse) and unknown fields. What is checked here spans entries: uniqueness, sane
//! sizes, safe install paths, env names, and that every reference points at something that exists.
//! A catalog that passes is safe for the installer to act on without further checks.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};

use super::{ArchiveFormat, ArtifactRef, Catalog, CatalogError, Channel, GameVersion, PackageVersion, SCHEMA};
use crate::types::{ArtifactKey, Digest, RuntimeId, Version};

/// Largest `catalog.json` accepted; a real catalog is a few hundred KiB.
pub const MAX_CATALOG_BYTES: usize = 16 << 20;

fn invalid(msg: String) -> CatalogError {
    CatalogError::Invalid(msg)
}

impl Catalog {
    /// Parses and fully validates `catalog.json` (it does not check the signature or expiry).
    pub fn parse(json: &[u8]) -> Result<Catalog, CatalogError> {
        if json.len() > MAX_CATALOG_BYTES {
            return Err(CatalogError::Parse(format!(
                "{} bytes is more than the {MAX_CATALOG_BYTES} allowed",
                json.len()
            )));
        }
        let catalog: Catalog = serde_json::from_slice(json).map_err(|e| CatalogError::Parse(e.to_string()))?;
        catalog.validate()?;
        Ok(catalog)
    }

    /// Checks everything serde cannot; errors name the offending id and version.
    pub fn validate(&self) -> Result<(), CatalogError> {
        if self.schema != SCHEMA {
            return Err(invalid(format!("schema {} is not supported (expected {SCHEMA})", self.schema)));
        }
        let mut artifacts = ArtifactIndex::default();
        for (kind, packages) in [("runtime", &self.runtimes), ("addon", &self.addons)] {
            unique_ids(kind, packages.iter().map(|p| &p.id))?;
            for p in packages {
                let label = format!("{kind} {}", p.id);
                unique_versions(&label, p.versions.iter().map(|v| &v.version))?;
                for v in &p.versions {
                    check_package_version(&format!("{label} {}", v.version), v, &mut artifacts)?;
                }
            }
        }
        unique_ids("game", self.games.iter().map(|g| &g.id))?;
        for g in &self.games {
            if g.variants.is_empty() {
                return Err(invalid(format!("game {} has no variants", g.id)));
            }
            unique_ids(&format!("variant of game {}", g.id), g.variants.iter().map(|v| &v.id))?;
            for var in &g.variants {
                let label = format!("game {}/{}", g.id, var.id);
                unique_versions(&label, var.versions.iter().map(|v| &v.version))?;
                for v in &var.versions {
                    self.check_game_version(&format!("{label} {}", v.version), v, &mut artifacts)?;
                }
            }
        }
        Ok(())
    }

    fn check_game_version<'a>(
        &self,
        label: &str,
        v: &'a GameVersion,
        artifacts: &mut ArtifactIndex<'a>,
    ) -> Result<(), CatalogError> {
        check_artifact(label, &v.artifact, artifacts)?;
        if let Some(launch) = &v.launch {
            if launch.command.first().is_none_or(|c| c.trim().is_empty()) {
                return Err(invalid(format!("{label}: launch command is empty")));
            }
            if let Some(pattern) = &launch.chat_pattern {
                regex::Regex::new(pattern)
                    .map_err(|e| invalid(format!("{label}: chat_pattern is not a valid regex: {e}")))?;
            }
        }
        // Same resolution the installer will do, over every channel: at least one version must fit.
        let req = &v.runtime;
        self.runtime(req.id.as_str(), &req.version, Channel::Dev)
            .map(drop)
            .map_err(|e| invalid(format!("{label} needs runtime {} {:?}: {e}", req.id, req.version)))
    }
}

fn unique_ids<'a>(kind: &str, ids: impl Iterator<Item = &'a RuntimeId>) -> Result<(), CatalogError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(invalid(format!("duplicate {kind} id {id}")));
        }
    }
    Ok(())
}

fn unique_versions<'a>(label: &str, versions: impl Iterator<Item = &'a Version>) -> Result<(), CatalogError> {
    let mut seen = HashSet::new();
    for v in versions {
        if !seen.insert(v) {
            return Err(invalid(format!("{label}: version {v} is listed twice")));
        }
    }
    if seen.is_empty() {
        return Err(invalid(format!("{label} has no versions")));
    }
    Ok(())
}

fn check_package_version<'a>(
    label: &str,
    v: &'a PackageVersion,
    artifacts: &mut ArtifactIndex<'a>,
) -> Result<(), CatalogError> {
    check_artifact(label, &v.artifact, artifacts)?;
    for dir in &v.bin {
        if !is_safe_relative_path(dir) {
            return Err(invalid(format!("{label}: bin entry {dir:?} must be a relative path inside the install")));
        }
    }
    for name in v.env.keys() {
        if !is_env_name(name) {
            return Err(invalid(format!("{label}: env name {name:?} is not a valid variable name")));
        }
    }
    Ok(())
}

fn check_artifact<'a>(label: &str, a: &'a ArtifactRef, artifacts: &mut ArtifactIndex<'a>) -> Result<(), CatalogError> {
    if a.size == 0 {
        return Err(invalid(format!("{label}: artifact size must be more than 0")));
    }
    if a.entries == 0 {
        return Err(invalid(format!("{label}: artifact must have at least one entry")));
    }
    if a.format == ArchiveFormat::File && (a.unpacked_size != a.size || a.entries != 1) {
        return Err(invalid(format!(
            "{label}: a `file` artifact has unpacked_size == size ({}) and exactly 1 entry (got {} and {})",
            a.size, a.unpacked_size, a.entries
        )));
    }
    artifacts.insert(label, a)
}

/// Artifact key → what the first entry using it said its bytes are, and who that was.
#[derive(Default)]
struct ArtifactIndex<'a>(HashMap<&'a ArtifactKey, (Digest, u64, String)>);

impl<'a> ArtifactIndex<'a> {
    /// Records `a`; a key shared by two entries must describe the same bytes.
    fn insert(&mut self, label: &str, a: &'a ArtifactRef) -> Result<(), CatalogError> {
        match self.0.get(&a.key) {
            Some((sha, size, owner)) if (*sha, *size) != (a.sha256, a.size) => Err(invalid(format!(
                "{label}: artifact {} is also used by {owner} with a different sha256 or size",
                a.key
            ))),
            Some(_) => Ok(()),
            None => {
                self.0.insert(&a.key, (a.sha256, a.size, label.to_owned()));
                Ok(())
            }
        }
    }
}

/// Relative, no `..`, no root, no control characters: it stays inside the install dir.
fn is_safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.chars().any(|c| c.is_control() || c == '\\')
        && Path::new(p).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Catalog {
    /// Canonical JSON for publishing: ids sorted, versions newest first, pretty-printed, so the
    /// same content always yields the same bytes (and the same signature input).
    pub fn to_json_pretty(&self) -> Vec<u8> {
        let mut c = self.clone();
        for list in [&mut c.runtimes, &mut c.addons] {
            list.sort_by(|a, b| a.id.cmp(&b.id));
            for p in list.iter_mut() {
                p.versions.sort_by(|a, b| b.version.cmp(&a.version));
            }
        }
        c.games.sort_by(|a, b| a.id.cmp(&b.id));
        for g in &mut c.games {
            g.variants.sort_by(|a, b| a.id.cmp(&b.id));
            for var in &mut g.variants {
                var.versions.sort_by(|a, b| b.version.cmp(&a.version));
            }
        }
        let mut out = serde_json::to_vec_pretty(&c).expect("a catalog always serializes");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_paths_must_stay_inside() {
        for ok in ["bin", "lib/bin", "./bin", "bin/"] {
            assert!(is_safe_relative_path(ok), "{ok:?} refused");
        }
        for bad in ["", "/bin", "../bin", "bin/../..", "a\\b", "a\nb"] {
            assert!(!is_safe_relative_path(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn env_names() {
        for ok in ["JAVA_HOME", "_x", "a1"] {
            assert!(is_env_name(ok), "{ok:?} refused");
        }
        for bad in ["", "1A", "A-B", "A B", "A=B", "É"] {
            assert!(!is_env_name(bad), "{bad:?} accepted");
        }
    }
}
