//! Minisign verification and anti-rollback.
//!
//! A catalog decides which bytes agents download and run, so it is trusted only when signed by
//! the operator's minisign key, not expired, and not older than one already accepted (a replayed
//! old catalog could reinstate a vulnerable version). [`CatalogKeeper`] remembers the last
//! accepted catalog on disk so these rules survive restarts and crashes.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use minisign_verify::{PublicKey, Signature};
use serde::{Deserialize, Serialize};

use super::validate::MAX_CATALOG_BYTES;
use super::{Catalog, CatalogError};
use crate::artifact::{ArtifactError, ArtifactStore, ArtifactStoreExt};
use crate::atomic;
use crate::types::{ArtifactKey, Digest};

/// Largest `.minisig` accepted: four short lines plus a trusted comment.
pub const MAX_SIGNATURE_BYTES: usize = 8 << 10;

const CATALOG_FILE: &str = "catalog.json";
const SIGNATURE_FILE: &str = "catalog.json.minisig";
/// The anti-rollback record, written last: see [`CatalogKeeper`].
const RECORD_FILE: &str = "accepted.json";
/// Bound for the record: a signature, JSON-escaped at worst six bytes per byte, plus a little.
const MAX_RECORD_BYTES: usize = MAX_SIGNATURE_BYTES * 6 + 1024;

/// The minisign public key catalogs must be signed with.
#[derive(Debug, Clone)]
pub struct TrustedKey(PublicKey);

impl TrustedKey {
    /// Parses a minisign `.pub` file's text (untrusted comment line + key line) or the bare key line.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let key_line = match lines.as_slice() {
            [key] => key,
            [comment, key] if comment.starts_with("untrusted comment:") => key,
            _ => {
                return Err(CatalogError::BadTrustedKey(
                    "expected a key line, optionally preceded by an `untrusted comment:` line".into(),
                ))
            }
        };
        PublicKey::from_base64(key_line).map(TrustedKey).map_err(|e| CatalogError::BadTrustedKey(e.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<Self, CatalogError> {
        let text = fs::read_to_string(path).map_err(|source| CatalogError::Io { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| match e {
            CatalogError::BadTrustedKey(msg) => CatalogError::BadTrustedKey(format!("{}: {msg}", path.display())),
            other => other,
        })
    }
}

fn bad_signature(msg: &str) -> CatalogError {
    CatalogError::BadSignature(msg.into())
}

/// Decodes a `.minisig` exactly as `minisign -S` writes it: untrusted comment, signature,
/// trusted comment, global signature (a trailing newline is fine, anything else is not).
fn decode_signature(text: &str) -> Result<Signature, CatalogError> {
    if text.trim().is_empty() {
        return Err(bad_signature("the catalog has no signature (signature is empty)"));
    }
    if text.len() > MAX_SIGNATURE_BYTES {
        return Err(bad_signature("malformed signature: too large"));
    }
    let lines: Vec<&str> = text.trim_end_matches(['\n', '\r']).lines().collect();
    if lines.len() != 4 || !lines[0].starts_with("untrusted comment:") {
        return Err(bad_signature("malformed signature: expected the four lines of a minisign signature file"));
    }
    Signature::decode(text).map_err(|e| match e {
        minisign_verify::Error::UnsupportedAlgorithm => bad_signature("unsupported signature algorithm"),
        _ => bad_signature("malformed signature: not a minisign signature"),
    })
}

/// Checks `signature` over the exact bytes `json`. Both the prehashed (`ED`, minisign's default)
/// and the legacy (`Ed`, older minisign) algorithms are Ed25519 over the content, so both are
/// accepted; the trusted comment is covered by the global signature either way.
fn verify_signature(json: &[u8], signature: &str, key: &TrustedKey) -> Result<(), CatalogError> {
    let sig = decode_signature(signature)?;
    key.0.verify(json, &sig, true).map_err(|e| match e {
        minisign_verify::Error::UnexpectedKeyId => {
            bad_signature("signed by another key (key id differs from the trusted key)")
        }
        minisign_verify::Error::InvalidSignature => {
            bad_signature("signature does not match the catalog bytes (tampered, or signed over other content)")
        }
        other => CatalogError::BadSignature(other.to_string()),
    })
}

/// Signature, then parse and validation; expiry is the caller's business.
fn verify_signed(json: &[u8], signature: &str, key: &TrustedKey) -> Result<Catalog, CatalogError> {
    verify_signature(json, signature, key)?;
    Catalog::parse(json)
}

/// Verifies signature, validity and expiry of a catalog, without anti-rollback.
pub fn verify_catalog(
    json: &[u8],
    signature: &str,
    key: &TrustedKey,
    now: DateTime<Utc>,
) -> Result<Catalog, CatalogError> {
    let catalog = verify_signed(json, signature, key)?;
    if catalog.is_expired(now) {
        return Err(CatalogError::Expired { expires: catalog.expires });
    }
    Ok(catalog)
}

impl Catalog {
    /// True once `expires` is reached: an expired catalog is refused by [`verify_catalog`], and
    /// one already in force should be refreshed before it is relied on.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires <= now
    }
}

/// What `accepted.json` holds: the highest catalog accepted, with its signature so the catalog
/// can be recovered when a crash tore the `catalog.json` / `.minisig` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptedRecord {
    serial: u64,
    sha256: Digest,
    signature: String,
}

/// A verified catalog with the exact bytes and signature it came as.
struct Accepted {
    catalog: Catalog,
    json: Vec<u8>,
    record: AcceptedRecord,
}

/// Keeps the last accepted catalog on disk (`<dir>/catalog.json` + `.minisig`) and accepts only
/// newer ones: the anti-rollback record.
///
/// Writes go signature, catalog, then `accepted.json`, each atomic. A crash between them leaves
/// either a pair that verifies (the record is then repaired on open) or the old catalog beside a
/// new signature, which is recovered with the signature kept in the record. The floor is the
/// higher of the record and the verified catalog, so no torn state lowers it.
pub struct CatalogKeeper {
    dir: PathBuf,
    key: TrustedKey,
    current: Option<Accepted>,
    /// Serial and hash of the newest catalog ever accepted (may outlive `current` if the state
    /// files were damaged).
    floor: Option<AcceptedRecord>,
}

impl CatalogKeeper {
    /// Opens the state dir, loading (and re-verifying) the last accepted catalog if there is one.
    pub fn open(state_dir: &Path, key: TrustedKey) -> Result<Self, CatalogError> {
        fs::create_dir_all(state_dir).map_err(|source| CatalogError::Io { path: state_dir.into(), source })?;
        let mut keeper = CatalogKeeper { dir: state_dir.to_path_buf(), key, current: None, floor: None };

        let record_path = keeper.path(RECORD_FILE);
        let record: Option<AcceptedRecord> = match read_optional(&record_path, MAX_RECORD_BYTES)? {
            // A record we cannot read would silently drop the rollback floor: refuse instead.
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                CatalogError::Invalid(format!(
                    "state file {} is unreadable ({e}); remove it to reset",
                    record_path.display()
                ))
            })?),
            None => None,
        };
        let json = read_optional(&keeper.path(CATALOG_FILE), MAX_CATALOG_BYTES)?;
        let signature = read_optional(&keeper.path(SIGNATURE_FILE), MAX_SIGNATURE_BYTES)?
            .map(|s| String::from_utf8_lossy(&s).into_owned());

        if let Some(json) = json {
            // The pair as written, else the catalog with the signature kept in the record.
            let candidates = signature.iter().chain(record.iter().map(|r| &r.signature));
            keeper.current = candidates
                .filter_map(|sig| Some((verify_signed(&json, sig, &keeper.key).ok()?, sig.clone())))
                .map(|(catalog, signature)| Accepted {
                    record: AcceptedRecord { serial: catalog.serial, sha256: Digest::of(&json), signature },
                    catalog,
                    json: json.clone(),
                })
                .next();
        }
        keeper.floor = match (&keeper.current, &record) {
            (Some(cur), Some(rec)) if rec.serial > cur.record.serial => Some(rec.clone()),
            (Some(cur), _) => Some(cur.record.clone()),
            (None, rec) => rec.clone(),
        };
        // Heal a torn state now, so that a crash during the next write cannot compound it.
        if let Some(cur) = &keeper.current {
            let torn = signature.as_ref() != Some(&cur.record.signature) || record.as_ref() != Some(&cur.record);
            if torn && keeper.floor.as_ref() == Some(&cur.record) {
                keeper.persist(&cur.json, &cur.record)?;
            }
        }
        Ok(keeper)
    }

    /// The catalog in force, if any. It may have expired since it was accepted: check
    /// [`Catalog::is_expired`] before relying on it.
    pub fn current(&self) -> Option<&Catalog> {
        self.current.as_ref().map(|a| &a.catalog)
    }

    /// Serial of the newest catalog ever accepted here: offers below it are rollbacks.
    pub fn accepted_serial(&self) -> Option<u64> {
        self.floor.as_ref().map(|r| r.serial)
    }

    /// Verifies and accepts a catalog; on any refusal the previous one stays in force.
    pub fn accept(&mut self, json: &[u8], signature: &str, now: DateTime<Utc>) -> Result<&Catalog, CatalogError> {
        let catalog = verify_catalog(json, signature, &self.key, now)?;
        let record = AcceptedRecord { serial: catalog.serial, sha256: Digest::of(json), signature: signature.into() };
        if let Some(floor) = &self.floor {
            if record.serial < floor.serial {
                return Err(CatalogError::Rollback { offered: record.serial, accepted: floor.serial });
            }
            if record.serial == floor.serial && record.sha256 != floor.sha256 {
                return Err(CatalogError::SerialReused { serial: record.serial });
            }
        }
        let unchanged = self.current.as_ref().is_some_and(|cur| cur.record.sha256 == record.sha256);
        if !unchanged {
            self.persist(json, &record)?;
            self.floor = Some(record.clone());
            self.current = Some(Accepted { catalog, json: json.to_vec(), record });
        }
        Ok(self.current().expect("a catalog was just accepted"))
    }

    /// Fetches `key` and `key.minisig` from the store and accepts them.
    pub async fn refresh(
        &mut self,
        store: &dyn ArtifactStore,
        key: &ArtifactKey,
        now: DateTime<Utc>,
    ) -> Result<&Catalog, CatalogError> {
        let sig_key = key.with_suffix(".minisig").map_err(ArtifactError::from)?;
        let signature = match store.get_bytes(&sig_key, MAX_SIGNATURE_BYTES as u64).await {
            Ok(bytes) => {
                String::from_utf8(bytes.to_vec()).map_err(|_| bad_signature("malformed signature: not UTF-8 text"))?
            }
            Err(e) if e.is_not_found() => {
                return Err(CatalogError::BadSignature(format!(
                    "the store has no signature for {key} (no signature object {sig_key})"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let json = store.get_bytes(key, MAX_CATALOG_BYTES as u64).await?;
        self.accept(&json, &signature, now)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Signature, catalog, record: in this order, each atomically (see the type's docs).
    fn persist(&self, json: &[u8], record: &AcceptedRecord) -> Result<(), CatalogError> {
        let record_json = serde_json::to_vec_pretty(record).expect("a record always serializes");
        for (name, bytes) in
            [(SIGNATURE_FILE, record.signature.as_bytes()), (CATALOG_FILE, json), (RECORD_FILE, &record_json[..])]
        {
            let path = self.path(name);
            atomic::write_file(&path, bytes).map_err(|source| CatalogError::Io { path, source })?;
        }
        Ok(())
    }
}

/// A state file's bytes, `None` if it does not exist; refuses files over `max` bytes.
fn read_optional(path: &Path, max: usize) -> Result<Option<Vec<u8>>, CatalogError> {
    let io_err = |source| CatalogError::Io { path: path.into(), source };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() > max {
        return Err(io_err(io::Error::other(format!("larger than {max} bytes"))));
    }
    Ok(Some(bytes))
}
