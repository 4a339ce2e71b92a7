//! `/runtimes`: the operator's `runtime` CLI as routes (list, install, rollback, remove, verify).
//!
//! Installs are synchronous: the response comes when the runtime is installed (or has failed),
//! which for a large runtime may be minutes, so callers should allow a generous timeout. The
//! install runs in its own task: a client that gives up does not cancel it, and asking again
//! joins the install in flight (the installer shares concurrent installs of the same version).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use zlh_core::catalog::{CatalogError, Channel, ItemKind};
use zlh_core::runtime::{InstallError, InstalledRuntime, Installer, RuntimeInstaller, VerifyReport};
use zlh_core::{RuntimeId, Version};

use super::{ApiError, ApiResult};
use crate::metrics::{InstallOutcome, Metrics};
use zlh_core::catalog::{resolve, CatalogSource};

#[derive(Clone)]
pub struct RuntimesState {
    pub installer: Arc<Installer>,
    pub catalog: Arc<CatalogSource>,
    /// When set, install outcomes are counted in `zlh_agent_install_total`.
    pub metrics: Option<Arc<Metrics>>,
}

/// `GET /runtimes`, `POST /runtimes/install`, `POST /runtimes/{id}/rollback`,
/// `DELETE /runtimes/{id}/{version}?force=true`, `POST /runtimes/{id}/{version}/verify`.
pub fn router(state: RuntimesState) -> Router {
    Router::new()
        .route("/runtimes", get(list))
        .route("/runtimes/install", post(install))
        .route("/runtimes/{id}/rollback", post(rollback))
        .route("/runtimes/{id}/{version}", delete(remove))
        .route("/runtimes/{id}/{version}/verify", post(verify))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallBody {
    id: String,
    /// Exact version or prefix (`21`); the newest when omitted.
    #[serde(default)]
    version: Option<String>,
    /// Least stable channel accepted; default `stable`.
    #[serde(default)]
    channel: Channel,
    #[serde(default = "yes")]
    activate: bool,
}

fn yes() -> bool {
    true
}

/// The installed entry, and the version that was current before when this made another current.
#[derive(Debug, Serialize)]
struct Installed {
    #[serde(flatten)]
    runtime: InstalledRuntime,
    previous: Option<Version>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Serialize)]
struct Verified {
    ok: bool,
    #[serde(flatten)]
    report: VerifyReport,
}

async fn list(State(state): State<RuntimesState>) -> ApiResult<Json<Vec<InstalledRuntime>>> {
    Ok(Json(state.installer.list().await.map_err(install_error)?))
}

async fn install(State(state): State<RuntimesState>, body: Bytes) -> ApiResult<Json<Installed>> {
    let req: InstallBody =
        json_body(&body)?.ok_or_else(|| ApiError::bad_request("a JSON body with an id is required"))?;
    let catalog = state.catalog.load().await.map_err(catalog_unavailable)?;
    let item = resolve(&catalog, &req.id, req.version.as_deref().unwrap_or(""), req.channel).map_err(catalog_error)?;
    if item.kind == ItemKind::Game {
        return Err(ApiError::bad_request(format!("{} is a game server, not a runtime", item.id)));
    }
    let previous = state.installer.current_version(&item.id);
    let (installer, metrics) = (state.installer.clone(), state.metrics.clone());
    let task = tokio::spawn(async move {
        let result = installer.install(&item, req.activate).await;
        if let Some(m) = &metrics {
            let outcome = if result.is_ok() { InstallOutcome::Ok } else { InstallOutcome::Failed };
            m.record_install(item.id.as_str(), outcome);
        }
        result
    });
    let runtime =
        task.await.map_err(|e| ApiError::internal(format!("install task failed: {e}")))?.map_err(install_error)?;
    let previous = previous.filter(|p| runtime.current && *p != runtime.version);
    Ok(Json(Installed { runtime, previous }))
}

async fn rollback(
    State(state): State<RuntimesState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<InstalledRuntime>> {
    let req: RollbackBody = json_body(&body)?.unwrap_or_default();
    let id = RuntimeId::parse(&id).map_err(bad_value)?;
    let to = req.version.as_deref().map(Version::parse).transpose().map_err(bad_value)?;
    Ok(Json(state.installer.rollback(&id, to).await.map_err(install_error)?))
}

async fn remove(
    State(state): State<RuntimesState>,
    Path((id, version)): Path<(String, String)>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = RuntimeId::parse(&id).map_err(bad_value)?;
    let version = Version::parse(&version).map_err(bad_value)?;
    state.installer.remove(&id, &version, q.force).await.map_err(install_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn verify(
    State(state): State<RuntimesState>,
    Path((id, version)): Path<(String, String)>,
) -> ApiResult<Json<Verified>> {
    let id = RuntimeId::parse(&id).map_err(bad_value)?;
    let version = Version::parse(&version).map_err(bad_value)?;
    let report = state.installer.verify(&id, &version).await.map_err(install_error)?;
    Ok(Json(Verified { ok: report.is_ok(), report }))
}

/// Parses an optional JSON body: empty is `None`, anything else must be the expected object.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<Option<T>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn bad_value(e: zlh_core::types::InvalidValue) -> ApiError {
    ApiError::bad_request(e.to_string())
}

/// The catalog could not be loaded: the agent's own state is at fault (500) or, most often, the
/// store is unreachable or serves a catalog that is refused, with none accepted before (502).
fn catalog_unavailable(e: CatalogError) -> ApiError {
    let status = match e {
        CatalogError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, format!("catalog unavailable: {e}"))
}

/// Resolving against a loaded catalog: only an unknown id or version can fail here.
fn catalog_error(e: CatalogError) -> ApiError {
    let status = match &e {
        CatalogError::UnknownId { .. }
        | CatalogError::NoMatchingVersion { .. }
        | CatalogError::OnOtherChannel { .. } => StatusCode::NOT_FOUND,
        CatalogError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, e.to_string())
}

fn install_status(e: &InstallError) -> StatusCode {
    match e {
        InstallError::NotInstalled { .. } => StatusCode::NOT_FOUND,
        InstallError::IsCurrent { .. } | InstallError::NoRollback { .. } => StatusCode::CONFLICT,
        // The store served bytes that are not what the signed catalog promised, or none at all.
        InstallError::DigestMismatch { .. }
        | InstallError::SizeMismatch { .. }
        | InstallError::Archive { .. }
        | InstallError::Store(_) => StatusCode::BAD_GATEWAY,
        InstallError::Manifest { .. } | InstallError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        InstallError::Shared(inner) => install_status(inner),
    }
}

fn install_error(e: InstallError) -> ApiError {
    ApiError::new(install_status(&e), e.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use bytes::Bytes;
    use serde_json::{json, Value};
    use zlh_core::artifact::{self, ArtifactStoreExt, DynStore};
    use zlh_core::catalog::{ArchiveFormat, ArtifactRef, Catalog, PackageVersion, TrustedKey};
    use zlh_core::runtime::InstallerOptions;
    use zlh_core::{ArtifactKey, Digest};

    use super::*;

    struct Fixture {
        tmp: tempfile::TempDir,
        keypair: minisign::KeyPair,
        store: DynStore,
        catalog: std::sync::Mutex<Catalog>,
        metrics: Arc<Metrics>,
        base: String,
        client: reqwest::Client,
    }

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// A node-like runtime: `bin/node` prints its version.
    fn runtime_tar_zst(version: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let script = format!("#!/bin/sh\necho node {version}\n");
        for (path, data, mode) in [("bin/node", script.as_bytes(), 0o755), ("README", b"node".as_slice(), 0o644)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            b.append_data(&mut h, path, data).unwrap();
        }
        zstd::encode_all(b.into_inner().unwrap().as_slice(), 3).unwrap()
    }

    async fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let keypair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let store = artifact::from_url(&format!("file://{}", tmp.path().join("store").display())).unwrap();
        let trusted = TrustedKey::parse(&keypair.pk.to_box().unwrap().to_string()).unwrap();
        let root = tmp.path().join("runtimes");
        let mut options = InstallerOptions::new(&root, store.clone());
        options.durable = false;
        let installer = Arc::new(Installer::open(options).unwrap());
        let key = ArtifactKey::parse("catalog.json").unwrap();
        let catalog = Arc::new(CatalogSource::new(store.clone(), key, trusted, root.join(".catalog")));
        let metrics = Arc::new(Metrics::default());
        let state = RuntimesState { installer, catalog, metrics: Some(metrics.clone()) };
        let base = serve(router(state)).await;
        let catalog = std::sync::Mutex::new(Catalog::empty(0, chrono::Utc::now() + chrono::Duration::days(30)));
        Fixture { tmp, keypair, store, catalog, metrics, base, client: reqwest::Client::new() }
    }

    impl Fixture {
        fn root(&self) -> PathBuf {
            self.tmp.path().join("runtimes")
        }

        /// Uploads a node version (whose catalog digest is `sha256` when given, to fake a bad
        /// artifact), then signs and pushes the catalog with the next serial.
        async fn publish_with(&self, version: &str, sha256: Option<Digest>) {
            let bytes = runtime_tar_zst(version);
            let key = ArtifactKey::parse(&format!("runtimes/node/{version}/node-{version}.tar.zst")).unwrap();
            self.store.put_bytes(&key, Bytes::from(bytes.clone())).await.unwrap();
            let artifact = ArtifactRef {
                key,
                sha256: sha256.unwrap_or_else(|| Digest::of(&bytes)),
                size: bytes.len() as u64,
                format: ArchiveFormat::TarZst,
                unpacked_size: 1 << 20,
                entries: 16,
            };
            let entry = PackageVersion {
                version: Version::parse(version).unwrap(),
                channel: Channel::Stable,
                artifact,
                bin: vec!["bin".into()],
                env: Default::default(),
            };
            let json = {
                let mut catalog = self.catalog.lock().unwrap();
                let id = RuntimeId::parse("node").unwrap();
                catalog.upsert_package_version(ItemKind::Runtime, &id, entry).unwrap();
                catalog.bump_serial();
                catalog.to_json_pretty()
            };
            let sig = minisign::sign(Some(&self.keypair.pk), &self.keypair.sk, json.as_slice(), None, None).unwrap();
            for (key, bytes) in [("catalog.json.minisig", sig.to_string().into_bytes()), ("catalog.json", json)] {
                self.store.put_bytes(&ArtifactKey::parse(key).unwrap(), Bytes::from(bytes)).await.unwrap();
            }
        }

        async fn publish(&self, version: &str) {
            self.publish_with(version, None).await
        }

        async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
            let mut req = self.client.request(method, format!("{}{path}", self.base));
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
        }

        async fn post(&self, path: &str, body: Value) -> (u16, Value) {
            self.send(reqwest::Method::POST, path, Some(body)).await
        }

        async fn list(&self) -> Vec<(String, bool)> {
            let (status, body) = self.send(reqwest::Method::GET, "/runtimes", None).await;
            assert_eq!(status, 200, "{body}");
            body.as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (format!("{} {}", r["id"].as_str().unwrap(), r["version"].as_str().unwrap()), r["current"] == true)
                })
                .collect()
        }
    }

    fn run(path: &Path) -> String {
        let out = std::process::Command::new(path).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[tokio::test]
    async fn install_upgrade_verify_rollback_remove() {
        let f = fixture().await;
        assert!(f.list().await.is_empty());
        f.publish("20.18.1").await;

        let (status, body) = f.post("/runtimes/install", json!({"id": "node", "version": "20"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["version"], &body["current"], &body["previous"]),
            (&json!("20.18.1"), &json!(true), &Value::Null)
        );
        assert_eq!(run(&f.root().join("node/current/bin/node")), "node 20.18.1\n");

        f.publish("22.11.0").await;
        let (status, body) = f.post("/runtimes/install", json!({"id": "node"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!((&body["version"], &body["previous"]), (&json!("22.11.0"), &json!("20.18.1")));
        assert_eq!(run(&f.root().join("node/current/bin/node")), "node 22.11.0\n");
        assert_eq!(f.list().await, [("node 20.18.1".to_owned(), false), ("node 22.11.0".to_owned(), true)]);

        let (status, body) = f.post("/runtimes/node/22.11.0/verify", json!(null)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!((&body["ok"], &body["files_checked"]), (&json!(true), &json!(2)));

        let (status, body) = f.send(reqwest::Method::DELETE, "/runtimes/node/22.11.0", None).await;
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("current version"), "{body}");

        // Rollback with no body goes to the previous version.
        let (status, body) = f.send(reqwest::Method::POST, "/runtimes/node/rollback", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["version"], "20.18.1");
        assert_eq!(run(&f.root().join("node/current/bin/node")), "node 20.18.1\n");
        let (status, body) = f.post("/runtimes/node/rollback", json!({"version": "22.11.0"})).await;
        assert_eq!((status, &body["version"]), (200, &json!("22.11.0")), "{body}");

        let (status, _) = f.send(reqwest::Method::DELETE, "/runtimes/node/20.18.1", None).await;
        assert_eq!(status, 204);
        let (status, _) = f.send(reqwest::Method::DELETE, "/runtimes/node/22.11.0?force=true", None).await;
        assert_eq!(status, 204);
        assert!(f.list().await.is_empty());
        let (status, body) = f.send(reqwest::Method::DELETE, "/runtimes/node/22.11.0", None).await;
        assert_eq!(status, 404, "{body}");

        // Tampering is reported, not hidden.
        f.post("/runtimes/install", json!({"id": "node", "version": "20"})).await;
        std::fs::write(f.root().join("node/20.18.1/README"), "changed").unwrap();
        let (status, body) = f.post("/runtimes/node/20.18.1/verify", json!(null)).await;
        assert_eq!((status, &body["ok"], &body["mismatched"]), (200, &json!(false), &json!(["README"])), "{body}");

        let text = f.metrics.encode();
        assert!(text.contains(r#"zlh_agent_install_total{id="node",outcome="ok"} 3"#), "{text}");
    }

    #[tokio::test]
    async fn unknown_ids_and_versions_are_not_found_and_list_what_exists() {
        let f = fixture().await;
        f.publish("20.18.1").await;
        let (status, body) = f.post("/runtimes/install", json!({"id": "python"})).await;
        assert_eq!(status, 404, "{body}");
        assert!(body["error"].as_str().unwrap().contains("node"), "{body}");
        let (status, body) = f.post("/runtimes/install", json!({"id": "node", "version": "18"})).await;
        assert_eq!(status, 404, "{body}");
        assert!(body["error"].as_str().unwrap().contains("20.18.1"), "{body}");
        let (status, body) = f.post("/runtimes/node/rollback", json!({})).await;
        assert_eq!(status, 409, "{body}");
        let (status, body) = f.post("/runtimes/node/9.9.9/verify", json!(null)).await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = f.post("/runtimes/install", json!({"id": "node", "channel": "nightly"})).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = f.post("/runtimes/install", json!({})).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = f.post("/runtimes/Bad..Id/rollback", json!({})).await;
        assert_eq!(status, 400, "{body}");
        assert!(!f.root().join("node").exists());
        // Unknown ids are not counted: they would make a label value of any string.
        assert!(!f.metrics.encode().contains("python"));
    }

    #[tokio::test]
    async fn an_artifact_that_does_not_match_the_catalog_is_a_bad_gateway() {
        let f = fixture().await;
        f.publish_with("20.18.1", Some(Digest::of(b"something else"))).await;
        let (status, body) = f.post("/runtimes/install", json!({"id": "node"})).await;
        assert_eq!(status, 502, "{body}");
        assert!(body["error"].as_str().unwrap().contains("digest mismatch"), "{body}");
        assert!(f.list().await.is_empty());
        let text = f.metrics.encode();
        assert!(text.contains(r#"zlh_agent_install_total{id="node",outcome="failed"} 1"#), "{text}");
    }

    #[tokio::test]
    async fn without_a_catalog_installs_fail_and_with_one_accepted_they_survive_its_loss() {
        let f = fixture().await;
        let (status, body) = f.post("/runtimes/install", json!({"id": "node"})).await;
        assert_eq!(status, 502, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("catalog unavailable"), "{body}");

        f.publish("20.18.1").await;
        assert_eq!(f.post("/runtimes/install", json!({"id": "node", "activate": false})).await.0, 200);
        assert_eq!(f.list().await, [("node 20.18.1".to_owned(), false)]);
        // The store loses its catalog: the one accepted before is used.
        f.store.delete(&ArtifactKey::parse("catalog.json.minisig").unwrap()).await.unwrap();
        let (status, body) = f.post("/runtimes/install", json!({"id": "node"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(f.list().await, [("node 20.18.1".to_owned(), true)]);
    }
}
