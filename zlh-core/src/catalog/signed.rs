//! Minisign verification and anti-rollback (being filled in by the catalog work: the signatures
//! below are the agreed interface).

use std::path::Path;

use chrono::{DateTime, Utc};

use super::{Catalog, CatalogError};
use crate::artifact::ArtifactStore;
use crate::types::ArtifactKey;

/// The minisign public key catalogs must be signed with.
pub struct TrustedKey(());

impl TrustedKey {
    /// Parses a minisign `.pub` file's text (untrusted comment line + key line) or the bare key line.
    pub fn parse(_text: &str) -> Result<Self, CatalogError> {
        unimplemented!()
    }
    pub fn from_file(_path: &Path) -> Result<Self, CatalogError> {
        unimplemented!()
    }
}

/// Verifies signature, validity and expiry of a catalog, without anti-rollback.
pub fn verify_catalog(
    _json: &[u8],
    _signature: &str,
    _key: &TrustedKey,
    _now: DateTime<Utc>,
) -> Result<Catalog, CatalogError> {
    unimplemented!()
}

/// Keeps the last accepted catalog on disk (`<dir>/catalog.json` + `.minisig`) and accepts only
/// newer ones: the anti-rollback record.
pub struct CatalogKeeper(());

impl CatalogKeeper {
    /// Opens the state dir, loading (and re-verifying) the last accepted catalog if there is one.
    pub fn open(_state_dir: &Path, _key: TrustedKey) -> Result<Self, CatalogError> {
        unimplemented!()
    }
    /// The catalog in force, if any.
    pub fn current(&self) -> Option<&Catalog> {
        unimplemented!()
    }
    /// Verifies and accepts a catalog; on any refusal the previous one stays in force.
    pub fn accept(&mut self, _json: &[u8], _signature: &str, _now: DateTime<Utc>) -> Result<&Catalog, CatalogError> {
        unimplemented!()
    }
    /// Fetches `key` and `key.minisig` from the store and accepts them.
    pub async fn refresh(
        &mut self,
        _store: &dyn ArtifactStore,
        _key: &ArtifactKey,
        _now: DateTime<Utc>,
    ) -> Result<&Catalog, CatalogError> {
        unimplemented!()
    }
}
