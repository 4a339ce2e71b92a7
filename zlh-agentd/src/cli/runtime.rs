//! `zlh-agentd runtime install|upgrade|list|verify|remove|rollback`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use zlh_core::artifact::{self, DynStore};
use zlh_core::catalog::{Channel, ItemKind, TrustedKey};
use zlh_core::runtime::{InstallError, InstalledRuntime, Installer, InstallerOptions, RuntimeInstaller};
use zlh_core::{ArtifactKey, RuntimeId, Version};

use super::{progress, StoreArgs};
use zlh_core::catalog::{resolve, CatalogSource};

#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// Install root: one directory per runtime id, versions below it.
    #[arg(long, env = "ZLH_RUNTIME_ROOT", global = true, default_value = "/opt/zlh/runtimes")]
    root: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    command: RuntimeCommand,
}

#[derive(Debug, Subcommand)]
enum RuntimeCommand {
    /// Install a version (exact, a prefix such as `21`, or the newest) and make it current.
    Install(InstallArgs),
    /// Install the newest matching version and make it current, keeping the old one for rollback.
    Upgrade(InstallArgs),
    /// List installed versions.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash an installed version against its manifest (default: the current version).
    Verify {
        /// Runtime or addon id.
        id: String,
        /// Installed version to check; the current one when omitted.
        version: Option<String>,
    },
    /// Remove an installed version; the current one only with --force.
    Remove {
        /// Runtime or addon id.
        id: String,
        /// Installed version to remove.
        version: String,
        /// Remove it even if it is the current version (nothing is current afterwards).
        #[arg(long)]
        force: bool,
    },
    /// Make the previous (or the given) installed version current again.
    Rollback {
        /// Runtime or addon id.
        id: String,
        /// Installed version to make current; the one current before when omitted.
        version: Option<String>,
    },
}

#[derive(Debug, Args)]
struct InstallArgs {
    /// Runtime or addon id (`java`, `node`, `code-server`).
    id: String,
    /// Exact version or prefix; the newest when omitted.
    version: Option<String>,
    /// Least stable channel to accept.
    #[arg(long, default_value = "stable")]
    channel: Channel,
    /// Directory keeping the last accepted catalog (anti-rollback); default `<root>/.catalog`.
    #[arg(long, env = "ZLH_CATALOG_STATE")]
    state_dir: Option<PathBuf>,
}

pub async fn run(args: RuntimeArgs) -> anyhow::Result<()> {
    match args.command {
        RuntimeCommand::Install(a) => install(&args.root, &args.store, a, false).await,
        RuntimeCommand::Upgrade(a) => install(&args.root, &args.store, a, true).await,
        RuntimeCommand::List { json } => list(&args.root, json).await,
        RuntimeCommand::Verify { id, version } => verify(&args.root, &id, version.as_deref()).await,
        RuntimeCommand::Remove { id, version, force } => {
            let inst = local_installer(&args.root)?;
            match inst.remove(&RuntimeId::parse(&id)?, &Version::parse(&version)?, force).await {
                Err(InstallError::IsCurrent { id, version }) => bail!(
                    "{id} {version} is the current version; pass --force to remove it anyway, or make another \
                     version current first (`zlh-agentd runtime rollback {id}`)"
                ),
                other => other?,
            }
            println!("removed {id} {version}");
            Ok(())
        }
        RuntimeCommand::Rollback { id, version } => {
            let inst = local_installer(&args.root)?;
            let to = version.as_deref().map(Version::parse).transpose()?;
            let now = inst.rollback(&RuntimeId::parse(&id)?, to).await?;
            println!("{} {} is current ({})", now.id, now.version, now.path.display());
            Ok(())
        }
    }
}

/// An installer for commands that never download (list, verify, remove, rollback).
fn local_installer(root: &std::path::Path) -> anyhow::Result<Installer> {
    let store: DynStore = Arc::new(artifact::MemoryStore::new());
    Ok(Installer::open(InstallerOptions::new(root, store))?)
}

async fn install(root: &std::path::Path, from: &StoreArgs, args: InstallArgs, upgrade: bool) -> anyhow::Result<()> {
    let store = artifact::from_url(from.url()?)?;
    let state_dir = args.state_dir.clone().unwrap_or_else(|| root.join(".catalog"));
    let trusted = TrustedKey::from_file(from.trusted_key()?)?;
    let source = CatalogSource::new(store.clone(), ArtifactKey::parse(&from.catalog_key)?, trusted, state_dir);
    let loaded = source.load_reporting().await?;
    if let Some(why) = &loaded.fallback {
        eprintln!("warning: {why}");
    }
    let item = resolve(&loaded.catalog, &args.id, args.version.as_deref().unwrap_or(""), args.channel)?;
    if item.kind == ItemKind::Game {
        bail!("{} is a game server, not a runtime", item.id);
    }
    let inst = Installer::open(InstallerOptions::new(root, store))?;
    let bar = progress::show(inst.subscribe());
    let result = if upgrade {
        inst.upgrade(&item).await.map(|u| (u.current, u.previous))
    } else {
        inst.install(&item, true).await.map(|i| (i, None))
    };
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    let (installed, previous) = result?;
    match previous {
        Some(p) => {
            println!("{} {} is current (was {p}) at {}", installed.id, installed.version, installed.path.display())
        }
        None => println!("{} {} is current at {}", installed.id, installed.version, installed.path.display()),
    }
    Ok(())
}

async fn list(root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let installed: Vec<InstalledRuntime> = local_installer(root)?.list().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&installed)?);
        return Ok(());
    }
    if installed.is_empty() {
        println!("nothing installed in {}", root.display());
    }
    for i in installed {
        let mark = if i.current { "*" } else { " " };
        println!("{mark} {:<16} {:<16} {}", i.id, i.version, i.path.display());
    }
    Ok(())
}

async fn verify(root: &std::path::Path, id: &str, version: Option<&str>) -> anyhow::Result<()> {
    let inst = local_installer(root)?;
    let id = RuntimeId::parse(id)?;
    let version = match version {
        Some(v) => Version::parse(v)?,
        None => inst.current_version(&id).with_context(|| format!("{id} has no current version"))?,
    };
    let report = inst.verify(&id, &version).await?;
    if !report.is_ok() {
        bail!(
            "{id} {version} failed verification: changed or missing: [{}]; not in manifest: [{}]",
            report.mismatched.join(", "),
            report.unexpected.join(", ")
        );
    }
    println!("{id} {version}: {} files verified", report.files_checked);
    Ok(())
}
