//! Shared by the API tests: a stand-in agent that answers the agent contract for every container
//! (each container's agent lives under `/agents/<vmid>/` of one server, so every request says
//! which container it was for), and a [`TestApi`]: the whole router on 127.0.0.1:0 over a real
//! database, with an in-memory container host pointing every container at the stand-in.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, head, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing::{self, TestDb};
use zlh_apid::state::AppState;
use zlh_core::container::mock::MockHost;
use zlh_core::container::AgentEndpoint;
use zlh_core::files::{FileError, Jail, UploadLimits, UploadManager};
use zlh_core::token::{self, Claims};

pub const PASSWORD: &str = "correct horse battery";
pub const ADMIN_EMAIL: &str = "operator@example.com";
/// Game ports the tests hand out (not the default range, so the test proves the config is used).
pub const GAME_PORTS: std::ops::RangeInclusive<u32> = 31000..=31999;
/// The runtime the stand-in agent fails to install.
pub const FAILING_RUNTIME: &str = "cobol";
/// Long enough for a loaded machine, short enough that a hang fails the test.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One request as the stand-in agent received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub vmid: u32,
    pub method: String,
    /// Path under the container's agent (`/files/list`), query included.
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Book {
    seen: Vec<Seen>,
    configs: HashMap<u32, Value>,
    failing_runtimes: HashSet<String>,
    status_answers: HashMap<u32, usize>,
    first_error_at: HashMap<u32, Instant>,
    actions: Vec<(u32, String)>,
    tickets: Vec<Claims>,
    ticket_refusals: Vec<(u32, String)>,
    written: HashMap<u32, u64>,
    /// Body bytes tus PATCHes of each container have received so far.
    patched: HashMap<u32, u64>,
}

type TokenFn = Box<dyn Fn(u32) -> String + Send + Sync>;

/// The agent of every container, strict about tokens: each request must carry the bearer token of
/// the container its path names (console sockets: a console ticket signed for it).
pub struct StandIn {
    /// `http://127.0.0.1:<port>/`
    pub base: url::Url,
    book: Mutex<Book>,
    tokens: OnceLock<TokenFn>,
    /// While true, `/status` answers wait.
    hold_status: watch::Sender<bool>,
    /// Each container's files live in `<files>/<vmid>`; tus uploads are the agent's own.
    files: tempfile::TempDir,
    uploads: UploadManager,
}

impl StandIn {
    /// Binds 127.0.0.1:0 and serves; tokens must be given with [`Self::trust`] before requests.
    pub async fn start() -> Arc<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stand-in agent");
        let addr = listener.local_addr().unwrap();
        let files = tempfile::tempdir().expect("a files dir for the stand-in agent");
        let uploads = UploadManager::new(&files.path().join("state"), UploadLimits::default()).expect("upload state");
        let agent = Arc::new(Self {
            base: format!("http://{addr}/").parse().unwrap(),
            book: Mutex::new(Book::default()),
            tokens: OnceLock::new(),
            hold_status: watch::channel(false).0,
            files,
            uploads,
        });
        let app = Router::new()
            .route("/agents/{vmid}/health", get(|| async { Json(json!({ "ok": true })) }))
            .route("/agents/{vmid}/config", post(configure))
            .route("/agents/{vmid}/status", get(status))
            .route("/agents/{vmid}/{action}", post(power))
            .route("/agents/{vmid}/dev/codeserver/{action}", post(code_server))
            .route("/agents/{vmid}/files/list", get(files_list))
            .route("/agents/{vmid}/files/write", put(files_write))
            .route("/agents/{vmid}/files/uploads", post(upload_create))
            .route("/agents/{vmid}/files/uploads/{id}", head(upload_head).patch(upload_patch))
            .route("/agents/{vmid}/mods/{name}", delete(mod_action))
            .route("/agents/{vmid}/mods/{name}/{action}", post(mod_action))
            .route(
                "/agents/{vmid}/mods",
                get(|Path(vmid): Path<u32>| async move { Json(json!({ "vmid": vmid, "mods": [] })) }),
            )
            .route(
                "/agents/{vmid}/runtimes",
                get(|Path(vmid): Path<u32>| async move { Json(json!({ "vmid": vmid, "runtimes": [] })) }),
            )
            .route("/agents/{vmid}/console/stream", get(console))
            .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({ "error": "no such route" }))) })
            .layer(from_fn_with_state(agent.clone(), record_and_authenticate))
            .with_state(agent.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.expect("stand-in agent") });
        agent
    }

    /// The tokens the agents expect: `token(vmid)`.
    pub fn trust(&self, token: impl Fn(u32) -> String + Send + Sync + 'static) {
        assert!(self.tokens.set(Box::new(token)).is_ok(), "tokens are set once");
    }

    fn token(&self, vmid: u32) -> String {
        (self.tokens.get().expect("the stand-in agent was told its tokens"))(vmid)
    }

    /// Where container `vmid`'s agent lives.
    pub fn endpoint(&self, vmid: u32) -> AgentEndpoint {
        // Nothing listens there: the IDE's proxying is tested elsewhere; here only whether a
        // server has an IDE at all.
        let code_server = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9)));
        AgentEndpoint { agent_url: self.base.join(&format!("agents/{vmid}/")).unwrap(), code_server }
    }

    /// Containers configured with `runtime` report a failed install.
    pub fn fail_runtime(&self, runtime: &str) {
        self.book.lock().unwrap().failing_runtimes.insert(runtime.into());
    }

    /// While held, `/status` does not answer.
    pub fn hold_status(&self, hold: bool) {
        self.hold_status.send_replace(hold);
    }

    /// Every request so far (all containers).
    pub fn seen(&self) -> Vec<Seen> {
        self.book.lock().unwrap().seen.clone()
    }

    pub fn seen_by(&self, vmid: u32) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.vmid == vmid).collect()
    }

    /// The payload container `vmid` was configured with.
    pub fn config(&self, vmid: u32) -> Option<Value> {
        self.book.lock().unwrap().configs.get(&vmid).cloned()
    }

    /// Every configured container's payload.
    pub fn configs(&self) -> BTreeMap<u32, Value> {
        self.book.lock().unwrap().configs.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// `/status` answers sent, for all containers.
    pub fn status_answers(&self) -> usize {
        self.book.lock().unwrap().status_answers.values().sum()
    }

    /// When container `vmid` first reported its install error.
    pub fn first_error_at(&self, vmid: u32) -> Option<Instant> {
        self.book.lock().unwrap().first_error_at.get(&vmid).copied()
    }

    /// Power and code-server actions of container `vmid` (`start`, `codeserver/stop`, …).
    pub fn actions(&self, vmid: u32) -> Vec<String> {
        self.book.lock().unwrap().actions.iter().filter(|(v, _)| *v == vmid).map(|(_, a)| a.clone()).collect()
    }

    /// The console tickets accepted.
    pub fn tickets(&self) -> Vec<Claims> {
        self.book.lock().unwrap().tickets.clone()
    }

    pub fn ticket_refusals(&self) -> Vec<(u32, String)> {
        self.book.lock().unwrap().ticket_refusals.clone()
    }

    /// Container `vmid`'s file at `path` (relative to its files root), if it exists.
    pub fn file(&self, vmid: u32, path: &str) -> Option<Vec<u8>> {
        std::fs::read(self.files.path().join(vmid.to_string()).join(path)).ok()
    }

    /// Body bytes tus PATCHes of container `vmid` have received so far.
    pub fn patched(&self, vmid: u32) -> u64 {
        self.book.lock().unwrap().patched.get(&vmid).copied().unwrap_or(0)
    }

    /// Container `vmid`'s files root, as the agent opens it.
    fn jail(&self, vmid: u32) -> Jail {
        let root = self.files.path().join(vmid.to_string());
        std::fs::create_dir_all(&root).expect("a files root");
        Jail::open(&root, None).expect("open the files root")
    }

    /// Body bytes received by `PUT /files/write` of container `vmid`.
    pub fn written(&self, vmid: u32) -> u64 {
        self.book.lock().unwrap().written.get(&vmid).copied().unwrap_or(0)
    }
}

fn agent_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Records every request, then lets through only those carrying the bearer token of the container
/// their path names. `/health` is open and the console authenticates with its ticket.
async fn record_and_authenticate(State(agent): State<Arc<StandIn>>, req: Request, next: Next) -> Response {
    let full = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let Some(rest) = full.strip_prefix("/agents/") else { return agent_error(StatusCode::NOT_FOUND, "no such agent") };
    let (vmid, path) = rest.split_once('/').map(|(v, p)| (v, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let Ok(vmid) = vmid.parse::<u32>() else { return agent_error(StatusCode::NOT_FOUND, "no such agent") };
    let headers = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let route = path.split('?').next().unwrap_or_default().to_string();
    agent.book.lock().unwrap().seen.push(Seen { vmid, method: req.method().to_string(), path, headers });
    if route == "/health" || route == "/console/stream" {
        return next.run(req).await;
    }
    let expected = format!("Bearer {}", agent.token(vmid));
    let given = req.headers().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
    if !bool::from(given.ct_eq(expected.as_bytes())) {
        return agent_error(StatusCode::UNAUTHORIZED, "invalid token");
    }
    next.run(req).await
}

fn status_of(book: &mut Book, vmid: u32) -> Value {
    let Some(config) = book.configs.get(&vmid) else {
        return json!({ "state": "idle", "vmid": vmid, "provisioningComplete": false });
    };
    let kind = config["container_type"].clone();
    match config["runtime"].as_str().filter(|r| book.failing_runtimes.contains(*r)) {
        Some(runtime) => {
            let error = format!("runtime {runtime} not in catalog");
            book.first_error_at.entry(vmid).or_insert_with(Instant::now);
            json!({ "state": "error", "vmid": vmid, "containerType": kind, "provisioningComplete": false, "error": error })
        }
        None => json!({ "state": "running", "vmid": vmid, "containerType": kind, "provisioningComplete": true }),
    }
}

async fn configure(State(agent): State<Arc<StandIn>>, Path(vmid): Path<u32>, Json(payload): Json<Value>) -> Response {
    if payload["vmid"].as_u64() != Some(vmid as u64) {
        return agent_error(StatusCode::BAD_REQUEST, "payload is for another container");
    }
    let mut book = agent.book.lock().unwrap();
    book.configs.insert(vmid, payload);
    let mut status = status_of(&mut book, vmid);
    status["state"] = json!("installing");
    status["provisioningComplete"] = json!(false);
    (StatusCode::ACCEPTED, Json(status)).into_response()
}

async fn status(State(agent): State<Arc<StandIn>>, Path(vmid): Path<u32>) -> Json<Value> {
    let mut held = agent.hold_status.subscribe();
    let _ = held.wait_for(|hold| !*hold).await;
    let mut book = agent.book.lock().unwrap();
    *book.status_answers.entry(vmid).or_default() += 1;
    Json(status_of(&mut book, vmid))
}

async fn power(State(agent): State<Arc<StandIn>>, Path((vmid, action)): Path<(u32, String)>) -> Response {
    if !["start", "stop", "restart", "kill"].contains(&action.as_str()) {
        return agent_error(StatusCode::NOT_FOUND, "no such route");
    }
    agent.book.lock().unwrap().actions.push((vmid, action.clone()));
    (StatusCode::ACCEPTED, Json(json!({ "accepted": true, "action": action }))).into_response()
}

async fn code_server(State(agent): State<Arc<StandIn>>, Path((vmid, action)): Path<(u32, String)>) -> Json<Value> {
    agent.book.lock().unwrap().actions.push((vmid, format!("codeserver/{action}")));
    Json(json!({ "codeServer": { "state": if action == "stop" { "stopped" } else { "running" } } }))
}

async fn files_list(Path(vmid): Path<u32>, headers: HeaderMap) -> Json<Value> {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    Json(json!({ "vmid": vmid, "entries": [], "headers": headers }))
}

/// Counts the body as it streams in.
async fn files_write(State(agent): State<Arc<StandIn>>, Path(vmid): Path<u32>, body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => bytes += c.len() as u64,
            Err(e) => return agent_error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
        }
    }
    *agent.book.lock().unwrap().written.entry(vmid).or_default() += bytes;
    Json(json!({ "vmid": vmid, "bytes": bytes })).into_response()
}

/// A tus refusal as the agent sends it (the real offset with a 409).
fn tus_error(e: FileError) -> Response {
    let status = match &e {
        FileError::UnknownUpload { .. } | FileError::NotFound { .. } => StatusCode::NOT_FOUND,
        FileError::OffsetConflict { .. } | FileError::AlreadyExists { .. } => StatusCode::CONFLICT,
        FileError::UploadBusy { .. } => StatusCode::LOCKED,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut resp = agent_error(status, &e.to_string());
    if let FileError::OffsetConflict { current, .. } = e {
        resp.headers_mut().insert("upload-offset", current.into());
    }
    resp
}

fn tus_resumable(mut resp: Response) -> Response {
    resp.headers_mut().insert("tus-resumable", axum::http::HeaderValue::from_static("1.0.0"));
    resp
}

fn u64_header(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A tus upload (the agent's own bookkeeping), created where the agent's real one puts it:
/// under `X-Forwarded-Prefix`. The target is the `path` or `filename` metadata.
async fn upload_create(State(agent): State<Arc<StandIn>>, Path(vmid): Path<u32>, headers: HeaderMap) -> Response {
    use base64::Engine;
    let Some(length) = u64_header(&headers, "upload-length") else {
        return agent_error(StatusCode::BAD_REQUEST, "Upload-Length is required");
    };
    let metadata = headers.get("upload-metadata").and_then(|v| v.to_str().ok()).unwrap_or("");
    let target = metadata.split(',').filter_map(|pair| pair.trim().split_once(' ')).find_map(|(key, value)| {
        let value = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
        ["path", "filename"].contains(&key).then(|| String::from_utf8(value).ok()).flatten()
    });
    let Some(target) = target else { return agent_error(StatusCode::BAD_REQUEST, "Upload-Metadata needs a path") };
    let info = match agent.uploads.create(&agent.jail(vmid), &target, length, true).await {
        Ok(info) => info,
        Err(e) => return tus_resumable(tus_error(e)),
    };
    let prefix = headers.get("x-forwarded-prefix").and_then(|v| v.to_str().ok()).unwrap_or("");
    let location = format!("{}/files/uploads/{}", prefix.trim_end_matches('/'), info.id);
    let offset = info.offset.to_string();
    tus_resumable(
        (StatusCode::CREATED, [("location", location.as_str()), ("upload-offset", offset.as_str())]).into_response(),
    )
}

async fn upload_head(State(agent): State<Arc<StandIn>>, Path((vmid, id)): Path<(u32, String)>) -> Response {
    match agent.uploads.status(&agent.jail(vmid), &id).await {
        Ok(info) => tus_resumable(
            (
                StatusCode::OK,
                [
                    ("upload-offset", info.offset.to_string()),
                    ("upload-length", info.length.to_string()),
                    ("cache-control", "no-store".to_string()),
                ],
            )
                .into_response(),
        ),
        Err(e) => tus_resumable(tus_error(e)),
    }
}

/// Appends as the agent does: on a task of its own, so what arrived is kept when the sender
/// goes away mid-body.
async fn upload_patch(
    State(agent): State<Arc<StandIn>>,
    Path((vmid, id)): Path<(u32, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(offset) = u64_header(&headers, "upload-offset") else {
        return agent_error(StatusCode::BAD_REQUEST, "Upload-Offset is required");
    };
    let declared = u64_header(&headers, "content-length");
    let counter = agent.clone();
    let stream = body
        .into_data_stream()
        .inspect(move |chunk| {
            if let Ok(c) = chunk {
                *counter.book.lock().unwrap().patched.entry(vmid).or_default() += c.len() as u64;
            }
        })
        .map(|chunk| chunk.map_err(|e| e.to_string()));
    let jail = agent.jail(vmid);
    let task = tokio::spawn(async move { agent.uploads.append(&jail, &id, offset, declared, stream).await });
    match task.await.expect("the append task") {
        Ok(info) => {
            tus_resumable((StatusCode::NO_CONTENT, [("upload-offset", info.offset.to_string())]).into_response())
        }
        Err(e) => tus_resumable(tus_error(e)),
    }
}

/// `DELETE /mods/{name}` and `POST /mods/{name}/{action}`: echoes the name as the agent decoded it.
async fn mod_action(Path(params): Path<Vec<(String, String)>>) -> Json<Value> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Json(json!({ "vmid": get("vmid"), "name": get("name"), "action": get("action") }))
}

/// Accepts only a ticket signed for this container's token, then echoes text prefixed by the vmid.
async fn console(
    State(agent): State<Arc<StandIn>>,
    Path(vmid): Path<u32>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let ticket = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix("zlh-ticket."))
        .map(str::to_string);
    let key = token::console_ticket_key(&agent.token(vmid));
    let verified = ticket.as_deref().ok_or_else(|| "no ticket".to_string()).and_then(|t| {
        token::verify(&key, t, token::CONSOLE_PURPOSE, vmid, chrono::Utc::now()).map_err(|e| e.to_string())
    });
    match verified {
        Ok(claims) => {
            agent.book.lock().unwrap().tickets.push(claims);
            ws.protocols(["zlh-console"]).on_upgrade(move |socket| echo(socket, vmid))
        }
        Err(reason) => {
            agent.book.lock().unwrap().ticket_refusals.push((vmid, reason.clone()));
            agent_error(StatusCode::UNAUTHORIZED, &reason)
        }
    }
}

async fn echo(mut socket: WebSocket, vmid: u32) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(format!("{vmid}: {}", t.as_str()).into()),
            Message::Close(_) => return,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

/// A registered user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub email: String,
    pub token: String,
}

/// The whole API over one test database, a mock container host and the stand-in agent.
pub struct TestApi {
    pub backend: &'static str,
    pub base: String,
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub host: Arc<MockHost>,
    pub agent: Arc<StandIn>,
    pub http: reqwest::Client,
    _db: TestDb,
    _catalog_dir: tempfile::TempDir,
}

/// What the test catalog offers, stable unless said: runtimes node 22.11.0, 20.18.1 (and
/// 23.0.0 beta), java 21.0.5 and [`FAILING_RUNTIME`] 3.0.0; the code-server addon; games
/// minecraft paper 1.21.4 and 1.20.6, minecraft vanilla 1.21.4 (on java 21).
pub async fn test_catalog() -> (Arc<zlh_core::catalog::CatalogSource>, tempfile::TempDir) {
    use zlh_core::artifact::{ArtifactStoreExt, MemoryStore};
    use zlh_core::catalog::{
        ArchiveFormat, ArtifactRef, Catalog, CatalogSource, Channel, GameVersion, ItemKind, PackageVersion,
        RuntimeRequirement, TrustedKey,
    };
    use zlh_core::{ArtifactKey, Digest, RuntimeId, Version};
    let artifact = |key: &str| ArtifactRef {
        key: ArtifactKey::parse(key).unwrap(),
        sha256: Digest::of(key.as_bytes()),
        size: 1,
        format: ArchiveFormat::TarGz,
        unpacked_size: 1,
        entries: 1,
    };
    let id = |s: &str| RuntimeId::parse(s).unwrap();
    let mut catalog = Catalog::empty(1, chrono::Utc::now() + chrono::Duration::days(30));
    let packages = [
        (ItemKind::Runtime, "node", "22.11.0", Channel::Stable),
        (ItemKind::Runtime, "node", "20.18.1", Channel::Stable),
        (ItemKind::Runtime, "node", "23.0.0", Channel::Beta),
        (ItemKind::Runtime, "java", "21.0.5", Channel::Stable),
        (ItemKind::Runtime, FAILING_RUNTIME, "3.0.0", Channel::Stable),
        (ItemKind::Addon, "code-server", "4.96.0", Channel::Stable),
    ];
    for (kind, name, version, channel) in packages {
        let v = PackageVersion {
            version: Version::parse(version).unwrap(),
            channel,
            artifact: artifact(&format!("{name}/{version}.tar.gz")),
            bin: vec!["bin".into()],
            env: Default::default(),
        };
        catalog.upsert_package_version(kind, &id(name), v).unwrap();
    }
    for (variant, version) in [("paper", "1.21.4"), ("paper", "1.20.6"), ("vanilla", "1.21.4")] {
        let v = GameVersion {
            version: Version::parse(version).unwrap(),
            channel: Channel::Stable,
            artifact: artifact(&format!("minecraft-{variant}/{version}.tar.gz")),
            runtime: RuntimeRequirement { id: id("java"), version: "21".into() },
            launch: None,
        };
        catalog.upsert_game_version(&id("minecraft"), &id(variant), v).unwrap();
    }
    let json = catalog.to_json_pretty();
    let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let sig = minisign::sign(Some(&keys.pk), &keys.sk, json.as_slice(), None, None).unwrap().into_string();
    let store = Arc::new(MemoryStore::new());
    store.put_bytes(&ArtifactKey::parse("catalog.json").unwrap(), json.into()).await.unwrap();
    store.put_bytes(&ArtifactKey::parse("catalog.json.minisig").unwrap(), sig.into_bytes().into()).await.unwrap();
    let trusted = TrustedKey::parse(&keys.pk.to_box().unwrap().into_string()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = CatalogSource::new(store, ArtifactKey::parse("catalog.json").unwrap(), trusted, dir.path());
    (Arc::new(source), dir)
}

/// The configuration every API test runs with.
pub fn config() -> ApiConfig {
    ApiConfig { game_ports: GAME_PORTS, ..ApiConfig::default() }
}

impl TestApi {
    pub async fn sqlite() -> Self {
        Self::start("sqlite", testing::sqlite().await, config()).await
    }

    pub async fn postgres() -> Self {
        Self::start("postgres", testing::postgres().await, config()).await
    }

    pub async fn start(backend: &'static str, db: TestDb, config: ApiConfig) -> Self {
        let agent = StandIn::start().await;
        let host = Arc::new(MockHost::new(agent.base.clone()));
        for vmid in (5000..=5999).chain(6000..=6999) {
            host.set_endpoint(vmid, agent.endpoint(vmid));
        }
        let (catalog, catalog_dir) = test_catalog().await;
        let state = AppState::build(db.db.clone(), config.clone(), &[42u8; 32], host.clone(), Some(catalog))
            .expect("API state");
        let weak: Weak<AppState> = Arc::downgrade(&state);
        agent.trust(move |vmid| weak.upgrade().expect("the API is running").agent_token(vmid));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the API");
        let addr = listener.local_addr().unwrap();
        let ide = zlh_apid::ide::IdeState::new(&config, &[42u8; 32], addr.port()).expect("IDE state");
        let _ = state.ide.set(ide.clone());
        // Served as `zlh-apid serve` serves it: the IDE's front, then the API.
        let front = zlh_apid::ide::front(zlh_apid::http::app(state.clone()), state.clone(), ide);
        tokio::spawn(zlh_apid::http::server::serve(listener, front, std::future::pending()));
        Self {
            backend,
            base: format!("http://{addr}"),
            addr,
            state,
            host,
            agent,
            http: reqwest::Client::builder().pool_max_idle_per_host(200).build().unwrap(),
            _db: db,
            _catalog_dir: catalog_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `ws://…` of an API path.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub async fn register(&self, name: &str) -> User {
        self.register_email(name, &format!("{name}@example.com")).await
    }

    pub async fn register_email(&self, name: &str, email: &str) -> User {
        let body = json!({ "email": email, "username": name, "password": PASSWORD });
        let (status, v) = self.send(Method::POST, "/api/auth/register", None, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "[{}] register {name}: {v}", self.backend);
        let token = v["token"].as_str().expect("a session token").to_string();
        let (status, me) = self.send(Method::GET, "/api/auth/me", Some(&token), None).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        User { id: me["id"].as_str().unwrap().to_string(), email: email.into(), token }
    }

    /// Registers `name` and makes it an admin as the operator does (`zlh-apid admin grant`).
    pub async fn register_admin(&self, name: &str) -> User {
        let admin = self.register_email(name, ADMIN_EMAIL).await;
        zlh_apid::auth::admins::grant(&self.state.db, ADMIN_EMAIL).await.expect("grant admin");
        admin
    }

    /// A request with the user's bearer token, if any.
    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(path));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a request and reads the answer as JSON (a non-JSON body becomes a JSON string).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.request(method, path, token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        read(req.send().await.expect("the API answers")).await
    }

    /// `POST /api/servers` for a small game server; its id.
    pub async fn create_game(&self, user: &User) -> String {
        let body = json!({ "game": "minecraft", "variant": "paper", "version": "1.21.4", "memory_mb": 1024 });
        let (status, v) = self.send(Method::POST, "/api/servers", Some(&user.token), Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "[{}] create game: {v}", self.backend);
        v["id"].as_str().unwrap().to_string()
    }

    /// `POST /api/dev` with `runtime`; its id.
    pub async fn create_dev(&self, user: &User, runtime: &str) -> String {
        let body = json!({ "runtime": runtime, "enable_code_server": true });
        let (status, v) = self.send(Method::POST, "/api/dev", Some(&user.token), Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "[{}] create dev: {v}", self.backend);
        v["id"].as_str().unwrap().to_string()
    }

    /// Polls `GET /api/servers/{id}/status` until `pred` holds (bounded by [`DEADLINE`]).
    pub async fn wait_for(&self, user: &User, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/api/servers/{id}/status");
        let started = Instant::now();
        loop {
            let (status, v) = self.send(Method::GET, &path, Some(&user.token), None).await;
            if status == StatusCode::OK && pred(&v) {
                return v;
            }
            assert!(started.elapsed() < DEADLINE, "[{}] server {id} never became {what}: {status} {v}", self.backend);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server is running (failing at once if it failed instead).
    pub async fn wait_running(&self, user: &User, id: &str) -> Value {
        let v =
            self.wait_for(user, id, "running or failed", |v| v["state"] == "running" || v["state"] == "failed").await;
        assert_eq!(v["state"], "running", "[{}] {v}", self.backend);
        v
    }

    /// A vmid's row count in a table (leases).
    pub async fn count(&self, sql: &str) -> i64 {
        use sqlx::Row;
        sqlx::query(sql).fetch_one(self.state.db.pool()).await.expect("count query").get::<i64, _>(0)
    }
}

/// A browser's console socket.
pub type Console = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl TestApi {
    /// Opens `/api/servers/{id}/console` offering `protocols` (as a browser would). A refused
    /// handshake gives the HTTP status and body.
    pub async fn console(
        &self,
        id: &str,
        query: &str,
        protocols: Option<&str>,
    ) -> Result<(Console, tokio_tungstenite::tungstenite::handshake::client::Response), (StatusCode, Value)> {
        let headers: Vec<(&str, &str)> = protocols.map(|p| ("sec-websocket-protocol", p)).into_iter().collect();
        self.console_with_headers(id, query, &headers).await
    }

    /// [`Self::console`] with any request headers.
    pub async fn console_with_headers(
        &self,
        id: &str,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Console, tokio_tungstenite::tungstenite::handshake::client::Response), (StatusCode, Value)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Error;
        let mut request = self.ws_url(&format!("/api/servers/{id}/console{query}")).into_client_request().unwrap();
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok(ok) => Ok(ok),
            Err(Error::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                let text = String::from_utf8_lossy(&body).into_owned();
                Err((resp.status(), serde_json::from_str(&text).unwrap_or(Value::String(text))))
            }
            Err(e) => panic!("[{}] console handshake failed below HTTP: {e}", self.backend),
        }
    }
}

/// Status and JSON body of a response.
pub async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Runs an async test body against SQLite and against PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both_backends {
    ($flavor:meta; $($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[$flavor]
                async fn $name() {
                    super::$name($crate::api_support::TestApi::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[$flavor]
                async fn $name() {
                    super::$name($crate::api_support::TestApi::postgres().await).await
                }
            )*
        }
    };
}
