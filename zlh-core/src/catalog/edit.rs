//! The operator's publishing side: editing a catalog before it is signed.
//!
//! Every edit is applied to a copy and re-validated, so a catalog only ever moves from one valid
//! state to another: a failed edit leaves it exactly as it was.

use chrono::{DateTime, Utc};

use super::{
    Catalog, CatalogError, Channel, Game, GameVariant, GameVersion, ItemKind, Package, PackageVersion, SCHEMA,
};
use crate::types::RuntimeId;

impl Catalog {
    /// A catalog with no entries.
    pub fn empty(serial: u64, expires: DateTime<Utc>) -> Catalog {
        Catalog { schema: SCHEMA, serial, expires, runtimes: Vec::new(), addons: Vec::new(), games: Vec::new() }
    }

    /// Adds a runtime or addon version, replacing the entry with the same version if there is one.
    pub fn upsert_package_version(
        &mut self,
        kind: ItemKind,
        id: &RuntimeId,
        version: PackageVersion,
    ) -> Result<(), CatalogError> {
        self.edit(|c| {
            let list = match kind {
                ItemKind::Runtime => &mut c.runtimes,
                ItemKind::Addon => &mut c.addons,
                ItemKind::Game => {
                    return Err(CatalogError::Invalid(format!("{id}: use upsert_game_version for games")));
                }
            };
            let pkg = match list.iter().position(|p| &p.id == id) {
                Some(i) => &mut list[i],
                None => {
                    list.push(Package { id: id.clone(), versions: Vec::new() });
                    list.last_mut().expect("just pushed")
                }
            };
            upsert(&mut pkg.versions, version, |v| &v.version);
            Ok(())
        })
    }

    /// Adds a game server version, replacing the entry with the same version if there is one.
    pub fn upsert_game_version(
        &mut self,
        game: &RuntimeId,
        variant: &RuntimeId,
        version: GameVersion,
    ) -> Result<(), CatalogError> {
        self.edit(|c| {
            let g = match c.games.iter().position(|g| &g.id == game) {
                Some(i) => &mut c.games[i],
                None => {
                    c.games.push(Game { id: game.clone(), variants: Vec::new() });
                    c.games.last_mut().expect("just pushed")
                }
            };
            let var = match g.variants.iter().position(|v| &v.id == variant) {
                Some(i) => &mut g.variants[i],
                None => {
                    g.variants.push(GameVariant { id: variant.clone(), versions: Vec::new() });
                    g.variants.last_mut().expect("just pushed")
                }
            };
            upsert(&mut var.versions, version, |v| &v.version);
            Ok(())
        })
    }

    /// Moves one exact version to `channel`. `id` is an install id: for games `<game>-<variant>`.
    pub fn promote(&mut self, kind: ItemKind, id: &str, version: &str, channel: Channel) -> Result<(), CatalogError> {
        // The lookup errors already list what exists.
        self.find_exact(kind, id, version)?;
        self.edit(|c| {
            let slot = match kind {
                ItemKind::Runtime | ItemKind::Addon => {
                    let list = if kind == ItemKind::Addon { &mut c.addons } else { &mut c.runtimes };
                    list.iter_mut()
                        .filter(|p| p.id.as_str() == id)
                        .flat_map(|p| p.versions.iter_mut())
                        .find(|v| v.version.as_str() == version)
                        .map(|v| &mut v.channel)
                }
                ItemKind::Game => c
                    .games
                    .iter_mut()
                    .flat_map(|g| {
                        let gid = g.id.clone();
                        g.variants.iter_mut().filter(move |var| format!("{gid}-{}", var.id) == id)
                    })
                    .flat_map(|var| var.versions.iter_mut())
                    .find(|v| v.version.as_str() == version)
                    .map(|v| &mut v.channel),
            };
            *slot.expect("find_exact found it") = channel;
            Ok(())
        })
    }

    /// Raises the serial by one, as every published change must; returns the new serial.
    pub fn bump_serial(&mut self) -> u64 {
        self.serial = self.serial.saturating_add(1);
        self.serial
    }

    pub fn set_expires(&mut self, expires: DateTime<Utc>) {
        self.expires = expires;
    }

    /// Applies `change` to a copy and keeps it only if it succeeds and the result validates.
    fn edit(&mut self, change: impl FnOnce(&mut Catalog) -> Result<(), CatalogError>) -> Result<(), CatalogError> {
        let mut next = self.clone();
        change(&mut next)?;
        next.validate()?;
        *self = next;
        Ok(())
    }
}

/// Replaces the element with the same version as `item`, or appends it.
fn upsert<T, V: PartialEq>(list: &mut Vec<T>, item: T, version: impl Fn(&T) -> &V) {
    match list.iter().position(|x| version(x) == version(&item)) {
        Some(i) => list[i] = item,
        None => list.push(item),
    }
}
