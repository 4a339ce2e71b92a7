//! `zlh-apid serve`: with no config at all, the whole platform on this machine — a SQLite file,
//! a local artifact store with a signed catalog (seeded with a small demo runtime on first run),
//! and local containers (`zlh-agentd` processes, each with its own root and port) under the data
//! dir. A TOML file and `ZLH_*` variables configure real deployments.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use zlh_core::artifact::{self, ArtifactStoreExt};
use zlh_core::catalog::{
    ArchiveFormat, ArtifactRef, Catalog, CatalogSource, Channel, ItemKind, PackageVersion, TrustedKey,
};
use zlh_core::container::local::{LocalHost, LocalHostConfig};
use zlh_core::container::oci::{OciHost, OciHostConfig};
use zlh_core::container::ContainerHost;
use zlh_core::{ArtifactKey, Digest, RuntimeId, Version};

use crate::config::ApiConfig;
use crate::db::Db;
use crate::state::AppState;

/// How long requests in flight may run on after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// Everything `serve` starts, for tests that run the API in-process.
pub struct Running {
    pub app: Arc<AppState>,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens storage, the container host, the catalog and the background tasks, and starts serving.
pub async fn start(config: ApiConfig) -> anyhow::Result<Running> {
    // Polling thousands of agents keeps a connection to each, and the connection cap is sized
    // by this limit.
    match zlh_core::net::open_files::raise_to_hard_limit() {
        Ok(open_files) => tracing::debug!(open_files, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let data_dir = config.create_data_dir()?;
    let db = Db::connect(&config.database_url()).await.context("opening the database")?;
    let secret = master_secret(&config, &data_dir)?;
    let (store_url, trusted_key) = local_store(&config, &data_dir).await?;
    let mut config = config;
    config.container_host = resolve_container_host(&config.container_host);
    let host = container_host(&config, &secret, &data_dir, &store_url, &trusted_key).await?;
    let store = artifact::from_url(&store_url)?;
    let catalog = Arc::new(CatalogSource::new(
        store,
        ArtifactKey::parse(&config.catalog_key)?,
        TrustedKey::from_file(&trusted_key)?,
        data_dir.join("catalog-state"),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let poll_every = config.poll_interval;
    let ide = crate::ide::IdeState::new(&config, &secret, addr.port())?;
    let app = AppState::build(db, config, &secret, host, Some(catalog))?;
    let _ = app.ide.set(ide.clone());
    let shutdown = CancellationToken::new();
    crate::servers::poll::spawn(app.clone(), poll_every, shutdown.clone());
    crate::servers::provision::spawn_sweeper(app.clone(), Duration::from_secs(15));
    crate::billing::spawn_enforcer(app.db.clone(), app.billing.clone(), app.config.billing_enforce_every);
    // The IDE's front is outermost: dev-<vmid> hosts never reach the API's routes.
    let front = crate::ide::front(crate::http::app(app.clone()), app.clone(), ide);
    let stop = shutdown.clone();
    let server = tokio::spawn(crate::http::server::serve(listener, front, async move { stop.cancelled().await }));
    tracing::info!(%addr, "zlh-apid listening");
    Ok(Running { app, addr, shutdown, server })
}

/// Serves until SIGTERM or SIGINT, then stops accepting and drains.
pub async fn run(config: ApiConfig) -> anyhow::Result<()> {
    let running = start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down: no new connections");
    running.shutdown.cancel();
    if tokio::time::timeout(DRAIN, running.server).await.is_err() {
        tracing::warn!("connections still open after the drain time; closing them");
    }
    Ok(())
}

/// The one secret everything else is derived from: `ZLH_API_SECRET` (at least 32 bytes) or a
/// random one kept in `<data_dir>/secret.key` (owner-only) so sessions survive restarts.
fn master_secret(config: &ApiConfig, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = &config.secret {
        if s.len() < 32 {
            bail!("the API secret must be at least 32 characters");
        }
        return Ok(s.as_bytes().to_vec());
    }
    let path = data_dir.join("secret.key");
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() >= 32 => Ok(bytes),
        Ok(_) => bail!("{} is too short; remove it to make a new one", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = vec![0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
            write_private(&path, &bytes)?;
            Ok(bytes)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The artifact store and its catalog key. Configured ones are used as they are; otherwise a local
/// store under the data dir, with a signing key made on first run and a signed catalog holding a
/// demo runtime, so a dev container can be provisioned with nothing else installed.
async fn local_store(config: &ApiConfig, data_dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    if let (Some(url), Some(key)) = (&config.store, &config.trusted_key) {
        return Ok((url.clone(), key.clone()));
    }
    let store_dir = data_dir.join("store");
    let keys = data_dir.join("keys");
    std::fs::create_dir_all(&store_dir)?;
    std::fs::create_dir_all(&keys)?;
    let url = format!("file://{}", store_dir.display());
    let public = keys.join("catalog.pub");
    let store = artifact::from_url(&url)?;
    let catalog_key = ArtifactKey::parse(&config.catalog_key)?;
    if store.head(&catalog_key).await.is_ok() && public.exists() {
        return Ok((url, public));
    }
    tracing::info!(store = %url, "seeding a local artifact store with a signed demo catalog");
    let kp =
        minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| anyhow::anyhow!("making a signing key: {e}"))?;
    write_private(&keys.join("catalog.key"), kp.sk.to_box(None)?.to_string().as_bytes())?;
    zlh_core::atomic::write_file(&public, kp.pk.to_box()?.to_string().as_bytes())?;
    let mut catalog = Catalog::empty(0, chrono::Utc::now() + chrono::Duration::days(3650));
    let script = "#!/bin/sh\necho \"hello from a zlh runtime ($0)\"\n";
    let hello = [("bin/hello", script.as_bytes(), 0o755)];
    let hello_key = "runtimes/hello/1.0.0/hello-1.0.0-linux-x64.tar.gz";
    publish_demo(&*store, &mut catalog, ItemKind::Runtime, "hello", "1.0.0", hello_key, &hello).await?;
    let ide = [("bin/code-server", DEMO_CODE_SERVER.as_bytes(), 0o755)];
    let ide_key = "addons/code-server/0.0.1/code-server-0.0.1-linux-x64.tar.gz";
    publish_demo(&*store, &mut catalog, ItemKind::Addon, "code-server", "0.0.1", ide_key, &ide).await?;
    catalog.bump_serial();
    let json = catalog.to_json_pretty();
    let sig = minisign::sign(Some(&kp.pk), &kp.sk, json.as_slice(), Some("zlh local catalog"), None)
        .map_err(|e| anyhow::anyhow!("signing the catalog: {e}"))?;
    store
        .put_bytes(
            &ArtifactKey::parse(&format!("{}.minisig", config.catalog_key))?,
            sig.to_string().into_bytes().into(),
        )
        .await?;
    store.put_bytes(&catalog_key, json.into()).await?;
    Ok((url, public))
}

/// Stores `files` as a `.tar.gz` under `key` and lists it in `catalog` as `version` of `id`.
async fn publish_demo(
    store: &dyn artifact::ArtifactStore,
    catalog: &mut Catalog,
    kind: ItemKind,
    id: &str,
    version: &str,
    key: &str,
    files: &[(&str, &[u8], u32)],
) -> anyhow::Result<()> {
    let (bytes, unpacked, entries) = demo_archive(files)?;
    let key = ArtifactKey::parse(key)?;
    store.put_bytes(&key, bytes.clone().into()).await?;
    let version = PackageVersion {
        version: Version::parse(version)?,
        channel: Channel::Stable,
        artifact: ArtifactRef {
            key,
            sha256: Digest::of(&bytes),
            size: bytes.len() as u64,
            format: ArchiveFormat::TarGz,
            unpacked_size: unpacked,
            entries,
        },
        bin: vec!["bin".into()],
        env: Default::default(),
    };
    catalog.upsert_package_version(kind, &RuntimeId::parse(id)?, version)?;
    Ok(())
}

/// The local demo's stand-in for code-server (which is too large to seed): one page on
/// `--bind-addr`, so the hosted IDE flow works end to end on one machine. Publishing the real
/// code-server as addon `code-server` replaces it.
const DEMO_CODE_SERVER: &str = r#"#!/usr/bin/env python3
import html, http.server, sys
args = sys.argv[1:]
bind = args[args.index("--bind-addr") + 1] if "--bind-addr" in args else "127.0.0.1:6000"
host, port = bind.rsplit(":", 1)
workspace = args[-1] if args else "."
page = ("<!doctype html><meta charset=utf-8><title>zlh demo IDE</title><h1>zlh demo IDE</h1>"
        "<p>Workspace: <code>%s</code></p><p>This local demo serves this page in place of code-server; "
        "publish code-server as the addon <code>code-server</code> for the editor.</p>" % html.escape(workspace)).encode()
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), Page).serve_forever()
"#;

fn demo_archive(files: &[(&str, &[u8], u32)]) -> anyhow::Result<(Vec<u8>, u64, u64)> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(0);
        tar.append_data(&mut h, path, *data)?;
    }
    let bytes = tar.into_inner()?.finish()?;
    let (unpacked, entries) = zlh_core::runtime::extract::inspect(ArchiveFormat::TarGz, bytes.as_slice())?;
    Ok((bytes, unpacked, entries))
}

/// What `auto` means on this machine: isolated OCI containers where they can run (root, runc,
/// the CNI plugins, mkfs.ext4), else processes without isolation, said loudly. `local` is the
/// old name of `process`.
fn resolve_container_host(configured: &str) -> String {
    match configured {
        "auto" => match zlh_core::container::oci::unavailable() {
            None => "oci".into(),
            Some(why) => {
                tracing::warn!(
                    why,
                    "containers are processes on this machine WITHOUT isolation: not for strangers' code"
                );
                "process".into()
            }
        },
        "local" | "process" => {
            tracing::warn!(
                "container_host = process: containers are processes WITHOUT isolation: not for strangers' code"
            );
            "process".into()
        }
        other => other.into(),
    }
}

/// The configured container host (already resolved from `auto`).
async fn container_host(
    config: &ApiConfig,
    secret: &[u8],
    data_dir: &Path,
    store_url: &str,
    trusted_key: &Path,
) -> anyhow::Result<Arc<dyn ContainerHost>> {
    match config.container_host.as_str() {
        "process" => {
            let agent = match &config.agent_binary {
                Some(p) => p.clone(),
                None => sibling_binary("zlh-agentd")?,
            };
            let mut local = LocalHostConfig::new(data_dir, agent, store_url, trusted_key);
            local.catalog_key = Some(config.catalog_key.clone());
            Ok(Arc::new(LocalHost::new(local)?))
        }
        "oci" => {
            use std::os::unix::fs::PermissionsExt;
            let agent = match &config.agent_binary {
                Some(p) => p.clone(),
                None => sibling_binary("zlh-agentd")?,
            };
            // The containers' own users pass through the data dir to their bundles: 0711 lets
            // them traverse it without listing it; its secrets are owner-only files.
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o711))?;
            let mut oci = OciHostConfig::new(data_dir.join("oci"), agent, store_url, trusted_key);
            oci.catalog_key = Some(config.catalog_key.clone());
            let host = OciHost::new(oci)?;
            let cleaned = host.recover().await?;
            if !cleaned.is_empty() {
                tracing::warn!(?cleaned, "removed what a crash left of these containers");
            }
            Ok(Arc::new(host))
        }
        "mock" => Ok(Arc::new(zlh_core::container::mock::MockHost::default())),
        "proxmox" => {
            let p = config.proxmox.clone().context("container_host = \"proxmox\" needs a [proxmox] section")?;
            let agent_master = crate::state::derive(secret, "zlh agent master v1");
            Ok(Arc::new(zlh_core::container::proxmox::ProxmoxHost::new(p.host_config(&agent_master))?))
        }
        other => bail!("unknown container_host {other:?} (auto, oci, process, proxmox or mock)"),
    }
}

/// `zlh-agentd` beside this binary (how cargo and packages lay them out), else on the PATH.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name(name);
    if beside.exists() {
        return Ok(beside);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found beside {} or on the PATH (set agent_binary)", exe.display()))
}

/// Writes a secret atomically, readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    zlh_core::atomic::write_file_with(path, |f| {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)
    })
}
