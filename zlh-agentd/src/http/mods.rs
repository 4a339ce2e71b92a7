//! `/mods`: list, install (from the store, digest-checked), enable, disable and remove the mods or
//! plugins of the game server. The directory only exists once the container is provisioned, so
//! the manager is looked up per request through a provider.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use zlh_core::artifact::ArtifactError;

use super::{ApiError, ApiResult};
use crate::mods::{InstallRequest, ModEntry, ModError, ModManager};

/// Gives the mod manager of the provisioned server, or `None` before provisioning.
pub type ModsProvider = Arc<dyn Fn() -> Option<Arc<ModManager>> + Send + Sync>;

#[derive(Clone)]
pub struct ModsState {
    pub mods: ModsProvider,
    /// The files root the mods dir lies in, whose disk quota installs respect.
    pub files: Option<super::files::FilesState>,
}

/// `GET /mods`, `POST /mods`, `POST /mods/{name}/enable`, `POST /mods/{name}/disable`,
/// `DELETE /mods/{name}`. No authentication here: the caller layers it.
pub fn router(state: ModsState) -> Router {
    Router::new()
        .route("/mods", get(list).post(install))
        .route("/mods/{name}", delete(remove))
        .route("/mods/{name}/enable", post(enable))
        .route("/mods/{name}/disable", post(disable))
        .with_state(state)
}

fn manager(state: &ModsState) -> ApiResult<Arc<ModManager>> {
    (state.mods)().ok_or_else(|| ApiError::conflict("container is not provisioned yet"))
}

async fn list(State(state): State<ModsState>) -> ApiResult<Json<Vec<ModEntry>>> {
    Ok(Json(manager(&state)?.list().await?))
}

async fn install(
    State(state): State<ModsState>,
    body: Result<Json<InstallRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ModEntry>)> {
    let Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mods = manager(&state)?;
    let quota_free = match &state.files {
        Some(files) => files.quota_free().await?,
        None => None,
    };
    let entry = mods.install(req, quota_free).await?;
    if let (Some(files), Some(_)) = (&state.files, quota_free) {
        files.note_written(entry.size, 0);
    }
    Ok((StatusCode::CREATED, Json(entry)))
}

async fn enable(State(state): State<ModsState>, Path(name): Path<String>) -> ApiResult<Json<ModEntry>> {
    Ok(Json(manager(&state)?.enable(&name).await?))
}

async fn disable(State(state): State<ModsState>, Path(name): Path<String>) -> ApiResult<Json<ModEntry>> {
    Ok(Json(manager(&state)?.disable(&name).await?))
}

async fn remove(State(state): State<ModsState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    manager(&state)?.remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

impl From<ModError> for ApiError {
    fn from(e: ModError) -> Self {
        let status = match &e {
            ModError::InvalidName { .. } | ModError::InvalidKey(_) => StatusCode::BAD_REQUEST,
            ModError::NotFound { .. } | ModError::Store(ArtifactError::NotFound { .. }) => StatusCode::NOT_FOUND,
            ModError::Exists { .. } | ModError::BothStates { .. } => StatusCode::CONFLICT,
            ModError::DigestMismatch { .. } | ModError::SizeMismatch { .. } | ModError::TooLarge { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ModError::QuotaExceeded { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ModError::Store(_) => StatusCode::BAD_GATEWAY,
            ModError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::path::PathBuf;
    use std::pin::Pin;

    use bytes::Bytes;
    use futures::stream;
    use serde_json::{json, Value};
    use zlh_core::artifact::{
        self, ArtifactError, ArtifactStore, ArtifactStoreExt, ByteRange, ByteStream, DynStore, GetResult, ObjectMeta,
    };
    use zlh_core::{ArtifactKey, Digest};

    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        store: DynStore,
        server_root: PathBuf,
        mods_dir: PathBuf,
        base: String,
        client: reqwest::Client,
    }

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    async fn fixture_with(store: Option<DynStore>) -> Fixture {
        fixture_full(store, None).await
    }

    /// The server root's files under a disk quota of `quota` bytes (`None`: no file routes state).
    async fn fixture_full(store: Option<DynStore>, quota: Option<u64>) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store = match store {
            Some(s) => s,
            None => artifact::from_url(&format!("file://{}", tmp.path().join("store").display())).unwrap(),
        };
        let server_root = tmp.path().join("server");
        let mods_dir = server_root.join("mods");
        let manager = Arc::new(ModManager::new(&mods_dir, store.clone()));
        let files = quota.map(|q| {
            std::fs::create_dir_all(&server_root).unwrap();
            let root = super::super::files::FilesRoot { path: server_root.clone(), owner: None, quota_bytes: Some(q) };
            let source: super::super::files::RootSource = Arc::new(move || Some(root.clone()));
            super::super::files::FilesState::new(source, tmp.path().join("state"), Default::default()).unwrap()
        });
        let base = serve(router(ModsState { mods: Arc::new(move || Some(manager.clone())), files })).await;
        Fixture { _tmp: tmp, store, server_root, mods_dir, base, client: reqwest::Client::new() }
    }

    async fn fixture() -> Fixture {
        fixture_with(None).await
    }

    impl Fixture {
        async fn publish(&self, key: &str, data: &[u8]) -> Digest {
            self.store.put_bytes(&ArtifactKey::parse(key).unwrap(), Bytes::copy_from_slice(data)).await.unwrap();
            Digest::of(data)
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
        async fn install(&self, body: Value) -> (u16, Value) {
            self.send(reqwest::Method::POST, "/mods", Some(body)).await
        }
        async fn list(&self) -> Value {
            let (status, body) = self.send(reqwest::Method::GET, "/mods", None).await;
            assert_eq!(status, 200, "{body}");
            body
        }
        /// Every name in the mods dir, hidden ones included.
        fn files(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.mods_dir)
                .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            names.sort();
            names
        }
    }

    #[tokio::test]
    async fn install_lists_and_refuses_to_overwrite_unless_asked() {
        let f = fixture().await;
        let sha = f.publish("mods/sodium/0.6.0/sodium-0.6.0.jar", b"sodium jar bytes").await;
        let (status, body) = f.install(json!({"key": "mods/sodium/0.6.0/sodium-0.6.0.jar", "sha256": sha})).await;
        assert_eq!(status, 201, "{body}");
        let expected = json!({"name": "sodium-0.6.0.jar", "enabled": true, "size": 16, "sha256": sha.to_hex()});
        assert_eq!(body, expected);
        assert_eq!(std::fs::read(f.mods_dir.join("sodium-0.6.0.jar")).unwrap(), b"sodium jar bytes");
        assert_eq!(f.list().await, json!([expected]));
        // Only the mod and the hidden digest index: no download leftovers.
        assert_eq!(f.files(), [INDEX_NAME, "sodium-0.6.0.jar"]);

        let sha2 = f.publish("mods/sodium/0.6.1/sodium.jar", b"newer sodium").await;
        let req = json!({"key": "mods/sodium/0.6.1/sodium.jar", "sha256": sha2, "name": "sodium-0.6.0.jar"});
        let (status, body) = f.install(req.clone()).await;
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("already exists"), "{body}");
        assert_eq!(std::fs::read(f.mods_dir.join("sodium-0.6.0.jar")).unwrap(), b"sodium jar bytes");

        let mut replace = req;
        replace["replace"] = json!(true);
        let (status, body) = f.install(replace).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["sha256"], sha2.to_hex());
        assert_eq!(std::fs::read(f.mods_dir.join("sodium-0.6.0.jar")).unwrap(), b"newer sodium");
        assert_eq!(f.list().await[0]["sha256"], sha2.to_hex());
    }

    #[tokio::test]
    async fn wrong_digest_or_size_leaves_nothing_behind() {
        let f = fixture().await;
        f.publish("mods/evil.jar", b"not what the catalog says").await;
        let wrong = Digest::of(b"the real mod");
        let (status, body) = f.install(json!({"key": "mods/evil.jar", "sha256": wrong})).await;
        assert_eq!(status, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("digest mismatch"), "{body}");
        assert!(f.files().is_empty(), "left behind: {:?}", f.files());

        let right = Digest::of(b"not what the catalog says");
        let (status, body) = f.install(json!({"key": "mods/evil.jar", "sha256": right, "size": 5})).await;
        assert_eq!(status, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("size mismatch"), "{body}");
        assert!(f.files().is_empty(), "left behind: {:?}", f.files());
        assert_eq!(f.list().await, json!([]));
    }

    #[tokio::test]
    async fn a_store_failing_mid_download_leaves_nothing_behind() {
        let f = fixture_with(Some(Arc::new(BreaksMidway))).await;
        let (status, body) = f.install(json!({"key": "mods/big.jar", "sha256": Digest::of(b"x")})).await;
        assert_eq!(status, 502, "{body}");
        assert!(body["error"].as_str().unwrap().contains("connection reset"), "{body}");
        // The dir was created for the download, and is empty again.
        assert!(f.mods_dir.is_dir());
        assert!(f.files().is_empty(), "left behind: {:?}", f.files());
    }

    #[tokio::test]
    async fn installs_respect_the_disk_quota_before_and_while_downloading() {
        let f = fixture_full(None, Some(1000)).await;
        std::fs::write(f.server_root.join("server.properties"), [b'p'; 100]).unwrap();
        let big = f.publish("mods/big.jar", &[1; 2000]).await;
        let small = f.publish("mods/small.jar", &[2; 500]).await;

        // A stated size that cannot fit is refused up front; an unstated one once it crosses.
        for body in
            [json!({"key": "mods/big.jar", "sha256": big, "size": 2000}), json!({"key": "mods/big.jar", "sha256": big})]
        {
            let (status, err) = f.install(body).await;
            assert_eq!(status, 507, "{err}");
            assert!(err["error"].as_str().unwrap().contains("quota"), "{err}");
            assert!(f.files().is_empty(), "left behind: {:?}", f.files());
        }
        // 100 + 500 fits in 1000; another 500 does not.
        assert_eq!(f.install(json!({"key": "mods/small.jar", "sha256": small})).await.0, 201);
        let again = json!({"key": "mods/small.jar", "sha256": small, "name": "other.jar", "size": 500});
        assert_eq!(f.install(again).await.0, 507);
        assert_eq!(std::fs::read(f.mods_dir.join("small.jar")).unwrap(), [2; 500]);
        assert_eq!(std::fs::read(f.server_root.join("server.properties")).unwrap(), [b'p'; 100]);
    }

    #[tokio::test]
    async fn missing_artifact_is_not_found() {
        let f = fixture().await;
        let (status, body) = f.install(json!({"key": "mods/nope.jar", "sha256": Digest::of(b"x")})).await;
        assert_eq!(status, 404, "{body}");
        assert!(f.files().is_empty());
    }

    #[tokio::test]
    async fn disable_enable_and_remove() {
        let f = fixture().await;
        let sha = f.publish("mods/lithium.jar", b"lithium").await;
        assert_eq!(f.install(json!({"key": "mods/lithium.jar", "sha256": sha})).await.0, 201);

        let (status, body) = f.send(reqwest::Method::POST, "/mods/lithium.jar/disable", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["enabled"], false);
        assert_eq!(body["sha256"], sha.to_hex());
        assert_eq!(f.files(), [INDEX_NAME, "lithium.jar.disabled"]);
        assert_eq!(f.list().await[0]["enabled"], false);
        // Disabling twice is harmless.
        assert_eq!(f.send(reqwest::Method::POST, "/mods/lithium.jar/disable", None).await.0, 200);

        // A disabled mod still blocks an install of the same name; replacing keeps it disabled.
        let sha2 = f.publish("mods/lithium-2.jar", b"lithium 2").await;
        let req = json!({"key": "mods/lithium-2.jar", "sha256": sha2, "name": "lithium.jar"});
        assert_eq!(f.install(req.clone()).await.0, 409);
        let mut replace = req;
        replace["replace"] = json!(true);
        let (status, body) = f.install(replace).await;
        assert_eq!((status, &body["enabled"]), (201, &json!(false)), "{body}");
        assert_eq!(std::fs::read(f.mods_dir.join("lithium.jar.disabled")).unwrap(), b"lithium 2");

        let (status, body) = f.send(reqwest::Method::POST, "/mods/lithium.jar/enable", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["enabled"], true);
        assert_eq!(f.files(), [INDEX_NAME, "lithium.jar"]);

        assert_eq!(f.send(reqwest::Method::DELETE, "/mods/lithium.jar", None).await.0, 204);
        assert_eq!(f.files(), [INDEX_NAME]);
        assert_eq!(f.list().await, json!([]));
        let (status, body) = f.send(reqwest::Method::DELETE, "/mods/lithium.jar", None).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(f.send(reqwest::Method::POST, "/mods/lithium.jar/enable", None).await.0, 404);
    }

    #[tokio::test]
    async fn bad_names_are_refused_and_nothing_is_written_outside() {
        let f = fixture().await;
        let sha = f.publish("mods/x.jar", b"x").await;
        for name in ["../x.jar", ".hidden.jar", "a/b.jar", "x.exe", "x.jar.disabled", ""] {
            let (status, body) = f.install(json!({"key": "mods/x.jar", "sha256": sha, "name": name})).await;
            assert_eq!(status, 400, "{name:?}: {body}");
            assert!(body["error"].as_str().unwrap().contains("invalid mod file name"), "{body}");
        }
        assert!(!f.server_root.join("x.jar").exists());
        assert!(f.files().is_empty(), "{:?}", f.files());
        for path in ["/mods/..%2Fx.jar/enable", "/mods/.hidden.jar/disable", "/mods/a%2Fb.jar"] {
            let method = if path.ends_with(".jar") { reqwest::Method::DELETE } else { reqwest::Method::POST };
            let (status, body) = f.send(method, path, None).await;
            assert_eq!(status, 400, "{path}: {body}");
        }
        let (status, body) = f.install(json!({"key": "../x.jar", "sha256": sha})).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = f.install(json!({"key": "mods/x.jar", "sha256": "abc"})).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].is_string(), "{body}");
    }

    #[tokio::test]
    async fn files_added_by_hand_are_listed_with_their_current_digest() {
        let f = fixture().await;
        std::fs::create_dir_all(&f.mods_dir).unwrap();
        std::fs::write(f.mods_dir.join("hand.jar"), b"v1").unwrap();
        std::fs::write(f.mods_dir.join("off.jar.disabled"), b"off").unwrap();
        std::fs::write(f.mods_dir.join("notes.txt"), b"not a mod").unwrap();
        std::fs::create_dir(f.mods_dir.join("config.jar")).unwrap();
        let list = f.list().await;
        assert_eq!(
            list,
            json!([
                {"name": "hand.jar", "enabled": true, "size": 2, "sha256": Digest::of(b"v1").to_hex()},
                {"name": "off.jar", "enabled": false, "size": 3, "sha256": Digest::of(b"off").to_hex()},
            ])
        );
        // Changed in place: the cached digest is not trusted.
        std::fs::write(f.mods_dir.join("hand.jar"), b"version 2").unwrap();
        assert_eq!(f.list().await[0]["sha256"], Digest::of(b"version 2").to_hex());
    }

    #[tokio::test]
    async fn concurrent_installs_of_one_name_have_one_winner() {
        let f = fixture().await;
        let a = f.publish("mods/a/x.jar", b"first").await;
        let b = f.publish("mods/b/x.jar", b"second").await;
        let (ra, rb) = tokio::join!(
            f.install(json!({"key": "mods/a/x.jar", "sha256": a})),
            f.install(json!({"key": "mods/b/x.jar", "sha256": b}))
        );
        let mut statuses = [ra.0, rb.0];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "{ra:?} {rb:?}");
        let winner = if ra.0 == 201 { b"first".as_slice() } else { b"second".as_slice() };
        assert_eq!(std::fs::read(f.mods_dir.join("x.jar")).unwrap(), winner);
        assert_eq!(f.files(), [INDEX_NAME, "x.jar"]);
    }

    #[tokio::test]
    async fn installed_files_and_a_created_dir_belong_to_the_server_user() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: changing owners needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = artifact::from_url(&format!("file://{}", tmp.path().join("store").display())).unwrap();
        store.put_bytes(&ArtifactKey::parse("mods/x.jar").unwrap(), Bytes::from_static(b"x")).await.unwrap();
        let dir = tmp.path().join("server/plugins");
        let mods = ModManager::new(&dir, store).with_owner(4242, 4343);
        let req: InstallRequest =
            serde_json::from_value(json!({"key": "mods/x.jar", "sha256": Digest::of(b"x")})).unwrap();
        mods.install(req, None).await.unwrap();
        use std::os::unix::fs::MetadataExt;
        for path in [dir.clone(), dir.join("x.jar")] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{}", path.display());
        }
    }

    #[tokio::test]
    async fn before_provisioning_every_route_says_so() {
        let base = serve(router(ModsState { mods: Arc::new(|| None), files: None })).await;
        let client = reqwest::Client::new();
        let resp = client.get(format!("{base}/mods")).send().await.unwrap();
        assert_eq!(resp.status(), 409);
        assert_eq!(resp.json::<Value>().await.unwrap(), json!({"error": "container is not provisioned yet"}));
        let resp = client
            .post(format!("{base}/mods"))
            .json(&json!({"key": "mods/x.jar", "sha256": Digest::of(b"x")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 409);
    }

    const INDEX_NAME: &str = ".zlh-mods.json";

    /// Serves 64 KiB of any key, then fails for good (not a transient error, so no retry).
    struct BreaksMidway;

    type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, ArtifactError>> + Send + 'a>>;

    // The trait is declared with `async_trait`; these are its desugared signatures.
    impl ArtifactStore for BreaksMidway {
        fn describe(&self) -> String {
            "breaks-midway://".into()
        }
        fn head<'a, 'b, 'c>(&'a self, key: &'b ArtifactKey) -> Fut<'c, ObjectMeta>
        where
            'a: 'c,
            'b: 'c,
        {
            let meta = ObjectMeta { key: key.clone(), size: 1 << 20, last_modified: None, etag: None };
            Box::pin(async move { Ok(meta) })
        }
        fn get_range<'a, 'b, 'c>(&'a self, key: &'b ArtifactKey, _: ByteRange) -> Fut<'c, GetResult>
        where
            'a: 'c,
            'b: 'c,
        {
            let fail = ArtifactError::Backend { store: self.describe(), message: "connection reset".into() };
            let stream: ByteStream = Box::pin(stream::iter([Ok(Bytes::from(vec![7u8; 64 << 10])), Err(fail)]));
            let meta = ObjectMeta { key: key.clone(), size: 1 << 20, last_modified: None, etag: None };
            Box::pin(async move { Ok(GetResult { meta, range: 0..1 << 20, stream }) })
        }
        fn put<'a, 'b, 'c>(&'a self, _: &'b ArtifactKey, _: ByteStream) -> Fut<'c, ObjectMeta>
        where
            'a: 'c,
            'b: 'c,
        {
            let e = ArtifactError::ReadOnly { store: self.describe(), op: "put" };
            Box::pin(async move { Err(e) })
        }
        fn list<'a, 'b, 'c>(&'a self, _: &'b str) -> Fut<'c, Vec<ObjectMeta>>
        where
            'a: 'c,
            'b: 'c,
        {
            Box::pin(async move { Ok(Vec::new()) })
        }
        fn delete<'a, 'b, 'c>(&'a self, _: &'b ArtifactKey) -> Fut<'c, ()>
        where
            'a: 'c,
            'b: 'c,
        {
            let e = ArtifactError::ReadOnly { store: self.describe(), op: "delete" };
            Box::pin(async move { Err(e) })
        }
    }
}
