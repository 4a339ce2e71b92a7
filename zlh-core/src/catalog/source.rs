//! The catalog in force, loaded the same way by the CLI and the daemon: refreshed from the store
//! and accepted by [`CatalogKeeper`] (signature, expiry, anti-rollback), or, when the store's copy
//! is refused or unreachable, the catalog accepted before, so an outage of the store does not stop
//! installs of what was already published.

use std::path::PathBuf;

use super::{Catalog, CatalogError, CatalogItem, CatalogKeeper, Channel, TrustedKey};
use crate::artifact::DynStore;
use crate::types::ArtifactKey;
use tokio::sync::Mutex;

/// Where the catalog comes from and where the last accepted one is kept.
pub struct CatalogSource {
    store: DynStore,
    key: ArtifactKey,
    trusted: TrustedKey,
    state_dir: PathBuf,
    /// One load at a time: the keeper's state files are rewritten on acceptance, and two
    /// refreshes interleaving their reads and writes could each see the other's half.
    loading: Mutex<()>,
}

/// A loaded catalog, and why it is the one accepted before when it is.
pub struct Loaded {
    pub catalog: Catalog,
    /// Set when the store's copy was refused or unreachable and the previous catalog is used.
    pub fallback: Option<String>,
}

impl CatalogSource {
    pub fn new(store: DynStore, key: ArtifactKey, trusted: TrustedKey, state_dir: impl Into<PathBuf>) -> Self {
        Self { store, key, trusted, state_dir: state_dir.into(), loading: Mutex::new(()) }
    }

    /// The catalog in force (see [`Self::load_reporting`]); a fallback is only logged.
    pub async fn load(&self) -> Result<Catalog, CatalogError> {
        Ok(self.load_reporting().await?.catalog)
    }

    /// Fetches and accepts the store's catalog; if it is refused or the store fails, returns the
    /// catalog accepted before (with a warning saying why). Fails when none was ever accepted.
    pub async fn load_reporting(&self) -> Result<Loaded, CatalogError> {
        let _guard = self.loading.lock().await;
        let dir = &self.state_dir;
        let mut keeper = CatalogKeeper::open(dir, self.trusted.clone())?;
        match keeper.refresh(self.store.as_ref(), &self.key, chrono::Utc::now()).await {
            Ok(c) => Ok(Loaded { catalog: c.clone(), fallback: None }),
            Err(e) => match keeper.current() {
                Some(previous) if !matches!(e, CatalogError::NoneAccepted) => {
                    tracing::warn!(error = %e, serial = previous.serial, "catalog refused; using the one accepted before");
                    let why = format!("{e}; using the catalog accepted before (serial {})", previous.serial);
                    Ok(Loaded { catalog: previous.clone(), fallback: Some(why) })
                }
                _ => Err(e),
            },
        }
    }
}

/// Resolves an id to one installable version: a runtime first, then an addon of that id.
pub fn resolve(catalog: &Catalog, id: &str, request: &str, channel: Channel) -> Result<CatalogItem, CatalogError> {
    match catalog.runtime(id, request, channel) {
        Err(CatalogError::UnknownId { .. }) if catalog.addons.iter().any(|a| a.id.as_str() == id) => {
            catalog.addon(id, request, channel)
        }
        other => other,
    }
}
