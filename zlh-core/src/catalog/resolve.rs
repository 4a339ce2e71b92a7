//! Picking one installable version out of the catalog.
//!
//! A request is an exact version, a prefix by whole components (`21` → newest `21.x`), or
//! `latest`/empty for the newest. Only versions at least as stable as the asked channel count.

use std::collections::BTreeMap;
use std::fmt;

use super::{
    ArtifactRef, Catalog, CatalogError, Channel, GameLaunch, GameVariant, Package, PackageVersion, RuntimeRequirement,
};
use crate::types::{RuntimeId, Version};

/// Which list of the catalog an id belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    Runtime,
    Addon,
    Game,
}

impl fmt::Display for ItemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ItemKind::Runtime => "runtime",
            ItemKind::Addon => "addon",
            ItemKind::Game => "game",
        })
    }
}

impl ItemKind {
    /// How `zlh-agentd publish promote` is told this kind (runtimes are its default).
    pub fn promote_flag(self) -> &'static str {
        match self {
            ItemKind::Runtime => "",
            ItemKind::Addon => "--kind addon ",
            ItemKind::Game => "--kind game ",
        }
    }
}

/// One resolved, installable catalog entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    pub kind: ItemKind,
    /// Install id: the runtime or addon id, or `<game>-<variant>` for games.
    pub id: RuntimeId,
    pub version: Version,
    pub channel: Channel,
    pub artifact: ArtifactRef,
    pub bin: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// For games: the runtime the server needs.
    pub runtime: Option<RuntimeRequirement>,
    /// For games: how to start it (the catalog's, or the Minecraft default).
    pub launch: Option<GameLaunch>,
}

/// The newest version of `id` that matches `request` and passes the channel filter. When only a
/// less stable channel has one, the error says so (a release published but never promoted).
fn pick<'a, T>(
    kind: ItemKind,
    id: &str,
    versions: impl Iterator<Item = (&'a Version, Channel, &'a T)>,
    request: &str,
    channel: Channel,
) -> Result<&'a T, CatalogError>
where
    T: 'a,
{
    let mut all: Vec<(&Version, Channel, &T)> = versions.collect();
    all.sort_by(|a, b| b.0.cmp(a.0));
    let request = request.trim();
    let best = |eligible: &dyn Fn(Channel) -> bool| {
        let candidates = || all.iter().filter(|(_, c, _)| eligible(*c));
        // An exact match wins over a longer version that merely shares the prefix.
        candidates().find(|(v, _, _)| v.as_str() == request).or_else(|| {
            candidates().find(|(v, _, _)| request.is_empty() || request == "latest" || v.matches_prefix(request))
        })
    };
    if let Some((_, _, t)) = best(&|c| c >= channel) {
        return Ok(t);
    }
    let available = list(all.iter().filter(|(_, c, _)| *c >= channel).map(|(v, _, _)| v.as_str()));
    if let Some((version, found, _)) = best(&|c| c < channel) {
        return Err(CatalogError::OnOtherChannel {
            kind,
            id: id.to_owned(),
            version: version.to_string(),
            found: *found,
            wanted: channel,
            available,
        });
    }
    Err(CatalogError::NoMatchingVersion { id: id.to_owned(), request: request.to_owned(), channel, available })
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn package_item(kind: ItemKind, id: &RuntimeId, v: &PackageVersion) -> CatalogItem {
    CatalogItem {
        kind,
        id: id.clone(),
        version: v.version.clone(),
        channel: v.channel,
        artifact: v.artifact.clone(),
        bin: v.bin.clone(),
        env: v.env.clone(),
        runtime: None,
        launch: None,
    }
}

impl Catalog {
    /// Resolves a runtime (`java`, `21`, stable) to one version.
    pub fn runtime(&self, id: &str, request: &str, channel: Channel) -> Result<CatalogItem, CatalogError> {
        self.package(ItemKind::Runtime, id, request, channel)
    }

    /// Resolves an addon (`code-server`) to one version.
    pub fn addon(&self, id: &str, request: &str, channel: Channel) -> Result<CatalogItem, CatalogError> {
        self.package(ItemKind::Addon, id, request, channel)
    }

    fn package(&self, kind: ItemKind, id: &str, request: &str, channel: Channel) -> Result<CatalogItem, CatalogError> {
        let list_of = self.packages(kind);
        let pkg = list_of.iter().find(|p| p.id.as_str() == id).ok_or_else(|| CatalogError::UnknownId {
            kind,
            id: id.to_owned(),
            available: list(list_of.iter().map(|p| p.id.as_str())),
        })?;
        let v = pick(kind, id, pkg.versions.iter().map(|v| (&v.version, v.channel, v)), request, channel)?;
        Ok(package_item(kind, &pkg.id, v))
    }

    /// Resolves a game server (`minecraft`, `paper`, `1.21`) to one version.
    pub fn game(
        &self,
        game: &str,
        variant: &str,
        request: &str,
        channel: Channel,
    ) -> Result<CatalogItem, CatalogError> {
        let g = self.games.iter().find(|g| g.id.as_str() == game).ok_or_else(|| CatalogError::UnknownId {
            kind: ItemKind::Game,
            id: game.to_owned(),
            available: list(self.games.iter().map(|g| g.id.as_str())),
        })?;
        let var = g.variants.iter().find(|v| v.id.as_str() == variant).ok_or_else(|| CatalogError::UnknownId {
            kind: ItemKind::Game,
            id: format!("{game}/{variant}"),
            available: list(g.variants.iter().map(|v| v.id.as_str())),
        })?;
        let full = format!("{game}-{variant}");
        let v = pick(ItemKind::Game, &full, var.versions.iter().map(|v| (&v.version, v.channel, v)), request, channel)?;
        Ok(CatalogItem {
            kind: ItemKind::Game,
            id: RuntimeId::parse(&full).map_err(|e| CatalogError::Invalid(e.to_string()))?,
            version: v.version.clone(),
            channel: v.channel,
            artifact: v.artifact.clone(),
            bin: Vec::new(),
            env: BTreeMap::new(),
            runtime: Some(v.runtime.clone()),
            launch: Some(v.launch.clone().unwrap_or_else(GameLaunch::minecraft_default)),
        })
    }

    /// Versions of an install id (runtime, addon, or `<game>-<variant>`) at least as stable as
    /// `channel`, newest first. Empty for an unknown id.
    pub fn versions(&self, kind: ItemKind, id: &str, channel: Channel) -> Vec<Version> {
        let all: Vec<(&Version, Channel)> = match kind {
            ItemKind::Runtime | ItemKind::Addon => self
                .packages(kind)
                .iter()
                .filter(|p| p.id.as_str() == id)
                .flat_map(|p| p.versions.iter().map(|v| (&v.version, v.channel)))
                .collect(),
            ItemKind::Game => self
                .game_variants()
                .filter(|(full, _, _)| full == id)
                .flat_map(|(_, _, var)| var.versions.iter().map(|v| (&v.version, v.channel)))
                .collect(),
        };
        let mut vs: Vec<Version> = all.into_iter().filter(|(_, c)| *c >= channel).map(|(v, _)| v.clone()).collect();
        vs.sort_by(|a, b| b.cmp(a));
        vs
    }

    /// Looks an entry up by install id and exact version, in any channel (for verify and repair).
    pub fn find_exact(&self, kind: ItemKind, id: &str, version: &str) -> Result<CatalogItem, CatalogError> {
        let item = match kind {
            ItemKind::Runtime | ItemKind::Addon => self.package(kind, id, version, Channel::Dev)?,
            ItemKind::Game => {
                let Some((_, g, var)) = self.game_variants().find(|(full, _, _)| full == id) else {
                    let ids: Vec<String> = self.game_variants().map(|(full, _, _)| full).collect();
                    return Err(CatalogError::UnknownId {
                        kind,
                        id: id.into(),
                        available: list(ids.iter().map(String::as_str)),
                    });
                };
                self.game(g, var.id.as_str(), version, Channel::Dev)?
            }
        };
        // A prefix request resolves to a longer version; only the exact one counts here.
        if item.version.as_str() == version {
            return Ok(item);
        }
        Err(CatalogError::NoMatchingVersion {
            id: id.into(),
            request: version.into(),
            channel: Channel::Dev,
            available: list(self.versions(kind, id, Channel::Dev).iter().map(Version::as_str)),
        })
    }

    /// The runtimes or addons list.
    pub(super) fn packages(&self, kind: ItemKind) -> &[Package] {
        if kind == ItemKind::Addon {
            &self.addons
        } else {
            &self.runtimes
        }
    }

    /// Every game variant with its install id `<game>-<variant>`.
    pub(super) fn game_variants(&self) -> impl Iterator<Item = (String, &str, &GameVariant)> + '_ {
        self.games.iter().flat_map(|g| g.variants.iter().map(move |v| (format!("{}-{}", g.id, v.id), g.id.as_str(), v)))
    }
}
