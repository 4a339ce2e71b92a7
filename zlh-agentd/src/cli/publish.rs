//! `zlh-agentd publish artifact|promote|push`: the operator's side of the catalog.
//!
//! The flow: `publish artifact` uploads a file and records it in a local `catalog.json` (digest,
//! sizes and entry count computed from the file, serial bumped), on channel `stable` unless a
//! staged release asks for `beta` or `dev`; `publish promote` moves a version between channels; the operator signs with the standard tool (`minisign -Sm
//! catalog.json`); `publish push` checks that signature against the trusted key and uploads both.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use sha2::{Digest as _, Sha256};
use zlh_core::artifact::{self, ArtifactStoreExt};
use zlh_core::catalog::{
    self, ArchiveFormat, ArtifactRef, Catalog, Channel, GameVersion, ItemKind, PackageVersion, RuntimeRequirement,
    TrustedKey,
};
use zlh_core::runtime::extract;
use zlh_core::{atomic, ArtifactKey, Digest, RuntimeId, Version};

use super::StoreArgs;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The catalog being edited, a local file (signed next to it as `<file>.minisig`).
    #[arg(long, env = "ZLH_CATALOG_FILE", global = true, default_value = "catalog.json")]
    catalog_file: PathBuf,
    #[command(subcommand)]
    command: PublishCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    /// A language runtime (java, node…), installed under /opt/zlh/runtimes.
    Runtime,
    /// A service such as code-server, installed under /opt/zlh/services.
    Addon,
    /// A game server build, installed under /opt/zlh/games.
    Game,
}

#[derive(Debug, Subcommand)]
enum PublishCommand {
    /// Upload an artifact and add or update its catalog entry.
    Artifact(ArtifactArgs),
    /// Move a version to another channel (dev → beta → stable).
    Promote {
        /// What the id names.
        #[arg(long, value_enum, default_value = "runtime")]
        kind: Kind,
        /// Runtime or addon id, or `<game>-<variant>` for games.
        id: String,
        /// The exact version to move.
        version: String,
        /// Its new channel: dev, beta or stable.
        channel: Channel,
    },
    /// Check the signature of the catalog file and upload it with its signature.
    Push {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Args)]
struct ArtifactArgs {
    /// The artifact file (`.tar.zst`, `.tar.gz`, or a single file such as a server jar).
    file: PathBuf,
    /// Artifact store URL to upload to: file:///srv/artifacts, s3://bucket?endpoint=…, r2://account/bucket.
    #[arg(long, env = "ZLH_STORE")]
    store: String,
    /// What the artifact is.
    #[arg(long, value_enum, default_value = "runtime")]
    kind: Kind,
    /// Runtime, addon or game id.
    #[arg(long)]
    id: String,
    /// Game variant (games only).
    #[arg(long)]
    variant: Option<String>,
    /// Version of the artifact (`21.0.5`); installs resolve prefixes of it (`21`).
    #[arg(long)]
    version: String,
    /// Channel of the new version. Provisioning and `runtime install` use stable; publish to
    /// beta or dev to stage a release, then `publish promote` it.
    #[arg(long, default_value = "stable")]
    channel: Channel,
    /// Directories to put on PATH (runtimes and addons).
    #[arg(long = "bin")]
    bin: Vec<String>,
    /// Environment entries `KEY=VALUE` (`{install}` expands to the install dir).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Runtime a game server needs, as `id:version-prefix` (games only), e.g. `java:21`.
    #[arg(long)]
    runtime: Option<String>,
    /// For games: how to start the server, as JSON
    /// (`{"command":["java","-Xmx{heap_mb}M","-jar","{install}/server.jar","nogui"],"stop_command":"stop"}`).
    #[arg(long)]
    launch: Option<String>,
    /// Days until the edited catalog expires.
    #[arg(long, default_value_t = 90)]
    expires_days: i64,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    match args.command {
        PublishCommand::Artifact(a) => publish_artifact(&args.catalog_file, a).await,
        PublishCommand::Promote { kind, id, version, channel } => {
            let mut cat = read_catalog(&args.catalog_file)?;
            cat.promote(item_kind(kind), &id, &version, channel)?;
            cat.bump_serial();
            write_catalog(&args.catalog_file, &cat)?;
            println!("{id} {version} is now {channel}; catalog serial {}", cat.serial);
            print_sign_hint(&args.catalog_file);
            Ok(())
        }
        PublishCommand::Push { store } => {
            push(&args.catalog_file, store.url()?, &store.catalog_key, store.trusted_key()?).await
        }
    }
}

fn item_kind(kind: Kind) -> ItemKind {
    match kind {
        Kind::Runtime => ItemKind::Runtime,
        Kind::Addon => ItemKind::Addon,
        Kind::Game => ItemKind::Game,
    }
}

fn read_catalog(path: &Path) -> anyhow::Result<Catalog> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Catalog::parse(&bytes).with_context(|| format!("in {}", path.display()))
}

/// Writes the catalog atomically and removes a signature that no longer matches it.
fn write_catalog(path: &Path, cat: &Catalog) -> anyhow::Result<()> {
    atomic::write_file(path, &cat.to_json_pretty()).with_context(|| format!("writing {}", path.display()))?;
    let sig = signature_path(path);
    if sig.exists() {
        std::fs::remove_file(&sig).with_context(|| format!("removing stale {}", sig.display()))?;
    }
    Ok(())
}

fn signature_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".minisig");
    PathBuf::from(s)
}

fn print_sign_hint(path: &Path) {
    println!("sign it with: minisign -Sm {}", path.display());
}

/// Digest, size and (for archives) unpacked size and entry count of a local artifact file.
fn describe_file(path: &Path, format: ArchiveFormat) -> anyhow::Result<(Digest, u64, u64, u64)> {
    let open = || File::open(path).with_context(|| format!("opening {}", path.display()));
    let mut hasher = Sha256::new();
    let mut reader = BufReader::with_capacity(1 << 20, open()?);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    if size == 0 {
        bail!("{} is empty", path.display());
    }
    let (unpacked, entries) = match format {
        ArchiveFormat::File => (size, 1),
        _ => {
            extract::inspect(format, BufReader::new(open()?)).with_context(|| format!("reading {}", path.display()))?
        }
    };
    Ok((Digest::from_hasher(hasher), size, unpacked, entries))
}

async fn publish_artifact(catalog_file: &Path, a: ArtifactArgs) -> anyhow::Result<()> {
    let file_name = a.file.file_name().and_then(|n| n.to_str()).context("artifact file name is not UTF-8")?.to_owned();
    let format = ArchiveFormat::from_file_name(&file_name);
    let id = RuntimeId::parse(&a.id)?;
    let version = Version::parse(&a.version)?;
    let path = match (a.kind, &a.variant) {
        (Kind::Runtime, _) => format!("runtimes/{id}/{version}/{file_name}"),
        (Kind::Addon, _) => format!("addons/{id}/{version}/{file_name}"),
        (Kind::Game, Some(variant)) => format!("games/{id}/{}/{version}/{file_name}", RuntimeId::parse(variant)?),
        (Kind::Game, None) => bail!("--variant is required for games"),
    };
    let key = ArtifactKey::parse(&path)?;
    let (sha256, size, unpacked_size, entries) = describe_file(&a.file, format)?;
    let artifact = ArtifactRef { key: key.clone(), sha256, size, format, unpacked_size, entries };

    // Edit first (validation can refuse), upload second, write the catalog last: a failure at
    // any step leaves the catalog file as it was.
    let expires = chrono::Utc::now() + chrono::Duration::days(a.expires_days);
    let mut cat = if catalog_file.exists() { read_catalog(catalog_file)? } else { Catalog::empty(0, expires) };
    match a.kind {
        Kind::Runtime | Kind::Addon => {
            let env: BTreeMap<String, String> = a.env.into_iter().collect();
            let entry = PackageVersion { version: version.clone(), channel: a.channel, artifact, bin: a.bin, env };
            cat.upsert_package_version(item_kind(a.kind), &id, entry)?;
        }
        Kind::Game => {
            let runtime = a.runtime.context("--runtime id:version is required for games")?;
            let (rid, rver) = runtime.split_once(':').context("--runtime must look like java:21")?;
            let entry = GameVersion {
                version: version.clone(),
                channel: a.channel,
                artifact,
                runtime: RuntimeRequirement { id: RuntimeId::parse(rid)?, version: rver.to_owned() },
                launch: a
                    .launch
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .context("--launch is not valid JSON")?,
            };
            let variant = RuntimeId::parse(a.variant.as_deref().unwrap_or_default())?;
            cat.upsert_game_version(&id, &variant, entry)?;
        }
    }
    cat.set_expires(expires);
    cat.bump_serial();

    let store = artifact::from_url(&a.store)?;
    store.put_file(&key, &a.file).await.with_context(|| format!("uploading {}", a.file.display()))?;
    write_catalog(catalog_file, &cat)?;
    println!("uploaded {key} ({size} bytes, sha256 {sha256}); catalog serial {}", cat.serial);
    print_sign_hint(catalog_file);
    Ok(())
}

async fn push(catalog_file: &Path, store: &str, catalog_key: &str, trusted_key: &Path) -> anyhow::Result<()> {
    let json = std::fs::read(catalog_file).with_context(|| format!("reading {}", catalog_file.display()))?;
    let sig_path = signature_path(catalog_file);
    let sig = std::fs::read_to_string(&sig_path).with_context(|| {
        format!("reading {} (sign with: minisign -Sm {})", sig_path.display(), catalog_file.display())
    })?;
    let key = TrustedKey::from_file(trusted_key)?;
    let cat = catalog::verify_catalog(&json, &sig, &key, chrono::Utc::now())?;
    let store = artifact::from_url(store)?;
    let catalog_key = ArtifactKey::parse(catalog_key)?;
    // Signature first: an agent reading between the two uploads sees a mismatch and keeps its
    // previous catalog, never an unsigned one.
    store.put_bytes(&catalog_key.with_suffix(".minisig")?, Bytes::from(sig)).await?;
    store.put_bytes(&catalog_key, Bytes::from(json)).await?;
    println!("pushed catalog serial {} to {}", cat.serial, store.describe());
    Ok(())
}
