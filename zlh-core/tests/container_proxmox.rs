//! `ProxmoxHost` against a stand-in Proxmox VE API over real HTTP: the documented JSON envelopes,
//! task ids that finish after a few polls, DHCP addresses that appear late, errors in the reason
//! phrase, and the API token checked on every call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use serde_json::{json, Value};
use zlh_core::agent_client::agent_token_for;
use zlh_core::container::{
    ContainerError, ContainerHost, ContainerKind, ContainerSpec, ContainerState, ProxmoxConfig, ProxmoxHost, Templates,
};
use zlh_core::tls::Fingerprint;

const TOKEN_ID: &str = "zlh@pve!apid";
const SECRET: &str = "6f3c2a1e-8b9d-4e7f-a0b1-c2d3e4f5a6b7";
const GAME_TEMPLATE: u32 = 9000;
const DEV_TEMPLATE: u32 = 9001;
/// Polls a task answers `running` before it stops.
const TASK_POLLS: u32 = 3;
/// Polls of the interfaces before the DHCP address shows.
const ADDRESS_POLLS: u32 = 4;

#[derive(Debug, Clone, Default)]
struct Ct {
    running: bool,
    template: bool,
    config: HashMap<String, String>,
    address_polls_left: u32,
    /// Never gets an address.
    no_dhcp: bool,
    /// Ignores a clean shutdown.
    stubborn: bool,
}

enum Effect {
    Create(u32, Ct),
    Run(u32, bool),
    Remove(u32),
    Nothing,
}

struct Task {
    polls_left: u32,
    exitstatus: String,
    effect: Effect,
}

#[derive(Default)]
struct Pve {
    cts: HashMap<u32, Ct>,
    tasks: HashMap<String, Task>,
    calls: Vec<String>,
    clone_forms: Vec<HashMap<String, String>>,
    resize_forms: Vec<HashMap<String, String>>,
    delete_queries: Vec<HashMap<String, String>>,
    task_polls: u32,
    /// The next n `status/current` reads answer 503.
    flaky: u32,
    next_task: u32,
}

type Shared = Arc<Mutex<Pve>>;

/// A Proxmox VE error: the message is in the reason phrase, the body an empty envelope.
fn pve_error(status: StatusCode, reason: &str) -> Response {
    let mut resp = (status, Json(json!({"data": null}))).into_response();
    resp.extensions_mut().insert(hyper::ext::ReasonPhrase::try_from(reason.to_string()).unwrap());
    resp
}

fn missing(vmid: u32) -> Response {
    pve_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("Configuration file 'nodes/pve/lxc/{vmid}.conf' does not exist"),
    )
}

fn data(v: Value) -> Response {
    Json(json!({ "data": v })).into_response()
}

impl Pve {
    fn task(&mut self, kind: &str, vmid: u32, exitstatus: &str, effect: Effect) -> Response {
        self.next_task += 1;
        let upid = format!("UPID:pve:{:08X}:0001:65F00000:{kind}:{vmid}:{TOKEN_ID}:", self.next_task);
        let polls_left = self.task_polls;
        self.tasks.insert(upid.clone(), Task { polls_left, exitstatus: exitstatus.into(), effect });
        data(json!(upid))
    }
}

async fn auth(
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    State(pve): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let expected = format!("PVEAPIToken={TOKEN_ID}={SECRET}");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return pve_error(StatusCode::UNAUTHORIZED, "invalid token value!");
    }
    pve.lock().unwrap().calls.push(format!("{method} {}", uri.path()));
    next.run(req).await
}

async fn clone_ct(
    State(pve): State<Shared>,
    Path((node, vmid)): Path<(String, u32)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut p = pve.lock().unwrap();
    assert_eq!(node, "pve");
    p.clone_forms.push(form.clone());
    if !p.cts.get(&vmid).is_some_and(|c| c.template) {
        return missing(vmid);
    }
    let newid: u32 = form["newid"].parse().unwrap();
    if p.cts.contains_key(&newid) {
        return pve_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("CT {newid} already exists on node 'pve'"));
    }
    let hostname = form.get("hostname").cloned().unwrap_or_default();
    let mut ct = Ct { config: HashMap::from([("hostname".into(), hostname.clone())]), ..Ct::default() };
    ct.no_dhcp = hostname.starts_with("nodhcp");
    ct.stubborn = hostname.starts_with("stubborn");
    if hostname.starts_with("full") {
        return p.task("qmclone", newid, "clone failed: storage 'fast' has no space left (need 8G)", Effect::Nothing);
    }
    p.task("vzclone", newid, "OK", Effect::Create(newid, ct))
}

async fn task_status(State(pve): State<Shared>, Path((node, upid)): Path<(String, String)>) -> Response {
    let mut p = pve.lock().unwrap();
    assert_eq!(node, "pve", "the node is taken from the UPID");
    let Some(task) = p.tasks.get_mut(&upid) else {
        return pve_error(StatusCode::INTERNAL_SERVER_ERROR, "unable to parse worker upid");
    };
    if task.polls_left > 0 {
        task.polls_left -= 1;
        return data(json!({"upid": upid, "status": "running", "type": "vzclone", "node": "pve"}));
    }
    let exitstatus = task.exitstatus.clone();
    match std::mem::replace(&mut task.effect, Effect::Nothing) {
        Effect::Create(vmid, ct) => {
            p.cts.insert(vmid, ct);
        }
        Effect::Run(vmid, running) => {
            if let Some(ct) = p.cts.get_mut(&vmid) {
                ct.running = running;
                ct.address_polls_left = ADDRESS_POLLS;
            }
        }
        Effect::Remove(vmid) => {
            p.cts.remove(&vmid);
        }
        Effect::Nothing => {}
    }
    data(json!({"upid": upid, "status": "stopped", "exitstatus": exitstatus, "node": "pve"}))
}

async fn put_config(
    State(pve): State<Shared>,
    Path((_node, vmid)): Path<(String, u32)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut p = pve.lock().unwrap();
    let Some(ct) = p.cts.get_mut(&vmid) else { return missing(vmid) };
    if form.get("memory").is_some_and(|m| m.parse::<u32>().is_err()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"data": null, "errors": {"memory": "type check ('integer') failed"}})),
        )
            .into_response();
    }
    ct.config.extend(form);
    data(Value::Null)
}

async fn get_config(State(pve): State<Shared>, Path((_node, vmid)): Path<(String, u32)>) -> Response {
    let p = pve.lock().unwrap();
    match p.cts.get(&vmid) {
        Some(ct) => data(json!(ct.config)),
        None => missing(vmid),
    }
}

async fn resize(
    State(pve): State<Shared>,
    Path((_node, vmid)): Path<(String, u32)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut p = pve.lock().unwrap();
    if !p.cts.contains_key(&vmid) {
        return missing(vmid);
    }
    p.resize_forms.push(form);
    p.task("resize", vmid, "OK", Effect::Nothing)
}

async fn power(State(pve): State<Shared>, Path((_node, vmid, action)): Path<(String, u32, String)>) -> Response {
    let mut p = pve.lock().unwrap();
    let Some(ct) = p.cts.get(&vmid).cloned() else { return missing(vmid) };
    match action.as_str() {
        "start" if ct.running => pve_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("CT {vmid} already running")),
        "start" => p.task("vzstart", vmid, "OK", Effect::Run(vmid, true)),
        "shutdown" if ct.stubborn => {
            p.task("vzshutdown", vmid, "shutdown timeout: container did not stop", Effect::Nothing)
        }
        "shutdown" => p.task("vzshutdown", vmid, "OK", Effect::Run(vmid, false)),
        "stop" => p.task("vzstop", vmid, "OK", Effect::Run(vmid, false)),
        _ => pve_error(StatusCode::NOT_IMPLEMENTED, "Method not implemented"),
    }
}

async fn current(State(pve): State<Shared>, Path((_node, vmid)): Path<(String, u32)>) -> Response {
    let mut p = pve.lock().unwrap();
    if p.flaky > 0 {
        p.flaky -= 1;
        return pve_error(StatusCode::SERVICE_UNAVAILABLE, "service temporarily unavailable");
    }
    match p.cts.get(&vmid) {
        Some(ct) => {
            data(json!({"vmid": vmid, "status": if ct.running { "running" } else { "stopped" }, "type": "lxc"}))
        }
        None => missing(vmid),
    }
}

async fn interfaces(State(pve): State<Shared>, Path((_node, vmid)): Path<(String, u32)>) -> Response {
    let mut p = pve.lock().unwrap();
    let Some(ct) = p.cts.get_mut(&vmid) else { return missing(vmid) };
    if !ct.running {
        return pve_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("CT {vmid} not running"));
    }
    let lo = json!({"name": "lo", "hwaddr": "00:00:00:00:00:00", "inet": "127.0.0.1/8", "inet6": "::1/128"});
    if ct.no_dhcp || ct.address_polls_left > 0 {
        ct.address_polls_left = ct.address_polls_left.saturating_sub(1);
        return data(
            json!([lo, {"name": "eth0", "hwaddr": "bc:24:11:00:00:01", "inet6": "fe80::be24:11ff:fe00:1/64"}]),
        );
    }
    // A documentation address (TEST-NET-3): the tests never connect to it.
    let eth0 = json!({"name": "eth0", "hwaddr": "bc:24:11:00:00:01", "inet": format!("203.0.113.{}/24", vmid % 250), "inet6": "fe80::be24:11ff:fe00:1/64"});
    data(json!([lo, eth0]))
}

async fn delete_ct(
    State(pve): State<Shared>,
    Path((_node, vmid)): Path<(String, u32)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut p = pve.lock().unwrap();
    p.delete_queries.push(q);
    match p.cts.get(&vmid) {
        None => missing(vmid),
        Some(ct) if ct.running => {
            pve_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("CT {vmid} is running - destroy failed"))
        }
        Some(_) => p.task("vzdestroy", vmid, "OK", Effect::Remove(vmid)),
    }
}

struct StandIn {
    pve: Shared,
    url: url::Url,
}

impl StandIn {
    async fn start() -> Self {
        let (pve, router) = Self::api();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { pve, url: format!("http://{addr}/").parse().unwrap() }
    }

    /// Over HTTPS with a fresh self-signed certificate, as a Proxmox VE node serves by default;
    /// also returns that certificate's fingerprint.
    async fn start_tls() -> (Self, Fingerprint) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::service::TowerToHyperService;
        use tokio_rustls::rustls;
        let (pve, router) = Self::api();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, service) = (acceptor.clone(), TowerToHyperService::new(router.clone()));
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake here.
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (Self { pve, url: format!("https://{addr}/").parse().unwrap() }, Fingerprint::of(der.as_ref()))
    }

    /// The stand-in API: its state and its routes.
    fn api() -> (Shared, Router) {
        let mut pve = Pve { task_polls: TASK_POLLS, ..Pve::default() };
        for t in [GAME_TEMPLATE, DEV_TEMPLATE] {
            pve.cts.insert(t, Ct { template: true, ..Ct::default() });
        }
        let pve: Shared = Arc::new(Mutex::new(pve));
        let lxc = "/api2/json/nodes/{node}/lxc/{vmid}";
        let router = Router::new()
            .route(&format!("{lxc}/clone"), post(clone_ct))
            .route(&format!("{lxc}/config"), put(put_config).get(get_config))
            .route(&format!("{lxc}/resize"), put(resize))
            .route(&format!("{lxc}/status/current"), get(current))
            .route(&format!("{lxc}/status/{{action}}"), post(power))
            .route(&format!("{lxc}/interfaces"), get(interfaces))
            .route(lxc, axum::routing::delete(delete_ct))
            .route("/api2/json/nodes/{node}/tasks/{upid}/status", get(task_status))
            .layer(axum::middleware::from_fn_with_state(pve.clone(), auth))
            .with_state(pve.clone());
        (pve, router)
    }

    fn config(&self) -> ProxmoxConfig {
        let mut c = ProxmoxConfig::new(
            self.url.clone(),
            "pve",
            TOKEN_ID,
            SECRET,
            Templates { game: GAME_TEMPLATE, dev: DEV_TEMPLATE },
            "fast",
            "vmbr1",
        );
        c.poll_interval = Duration::from_millis(5);
        c.retry_backoff = Duration::from_millis(5);
        c.address_timeout = Duration::from_secs(5);
        c.task_timeout = Duration::from_secs(5);
        c.shutdown_timeout = Duration::from_secs(1);
        c
    }

    fn host(&self) -> ProxmoxHost {
        ProxmoxHost::new(self.config()).unwrap()
    }

    fn ct(&self, vmid: u32) -> Option<Ct> {
        self.pve.lock().unwrap().cts.get(&vmid).cloned()
    }

    fn calls(&self) -> Vec<String> {
        self.pve.lock().unwrap().calls.clone()
    }
}

fn spec(vmid: u32, kind: ContainerKind, hostname: &str) -> ContainerSpec {
    ContainerSpec {
        vmid,
        kind,
        hostname: hostname.into(),
        memory_mb: 2048,
        disk_gb: 8,
        cores: 2,
        agent_token: "agent-token-0123456789abcdef0123456789".into(),
        ports: vec![25565],
    }
}

#[tokio::test]
async fn create_clones_sizes_starts_and_finds_the_address() {
    let pve = StandIn::start().await;
    let host = pve.host();
    let c = host.create(&spec(6001, ContainerKind::Dev, "dev-6001")).await.unwrap();
    assert_eq!(c.vmid, 6001);
    assert_eq!(c.endpoint.agent_url.as_str(), "http://203.0.113.1:18888/");
    assert_eq!(c.endpoint.code_server, Some("203.0.113.1:6000".parse().unwrap()));

    let ct = pve.ct(6001).expect("cloned");
    assert!(ct.running, "a created container runs: its address comes from DHCP");
    assert_eq!(ct.config["memory"], "2048");
    assert_eq!(ct.config["cores"], "2");
    assert_eq!(ct.config["swap"], "512");
    assert_eq!(ct.config["net0"], "name=eth0,bridge=vmbr1,ip=dhcp");
    assert_eq!(ct.config["tags"], "zlh;dev");
    {
        let p = pve.pve.lock().unwrap();
        let clone = &p.clone_forms[0];
        assert_eq!((clone["newid"].as_str(), clone["full"].as_str()), ("6001", "1"));
        assert_eq!((clone["hostname"].as_str(), clone["storage"].as_str()), ("dev-6001", "fast"));
        assert_eq!(p.resize_forms[0], HashMap::from([("disk".into(), "rootfs".into()), ("size".into(), "8G".into())]));
        assert!(p.calls.contains(&format!("POST /api2/json/nodes/pve/lxc/{DEV_TEMPLATE}/clone")), "{:?}", p.calls);
        let task_polls = p.calls.iter().filter(|c| c.contains("/tasks/")).count() as u32;
        assert!(task_polls >= 3 * (TASK_POLLS + 1), "clone, resize and start were waited for: {task_polls}");
        let address_polls = p.calls.iter().filter(|c| c.ends_with("/interfaces")).count() as u32;
        assert_eq!(address_polls, ADDRESS_POLLS + 1, "the address was waited for");
    }

    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Running);
    assert_eq!(host.agent_endpoint(6001).await.unwrap(), c.endpoint);
    let err = host.create(&spec(6001, ContainerKind::Dev, "dev-6001")).await.unwrap_err();
    assert!(matches!(err, ContainerError::Conflict(_)), "{err:?}");

    // A game container comes from the game template and has no code-server.
    let g = host.create(&spec(5001, ContainerKind::Game, "game-5001")).await.unwrap();
    assert_eq!(g.endpoint.code_server, None);
    assert!(pve.calls().contains(&format!("POST /api2/json/nodes/pve/lxc/{GAME_TEMPLATE}/clone")));
}

#[tokio::test]
async fn a_failed_clone_task_reports_its_exit_status_and_leaves_nothing() {
    let pve = StandIn::start().await;
    let err = pve.host().create(&spec(6002, ContainerKind::Dev, "full-6002")).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ContainerError::Backend { .. }), "{err:?}");
    assert!(text.contains("clone failed: storage 'fast' has no space left"), "{text}");
    assert!(pve.ct(6002).is_none());
}

#[tokio::test]
async fn no_address_in_time_is_a_timeout_and_the_clone_is_removed() {
    let pve = StandIn::start().await;
    let mut config = pve.config();
    config.address_timeout = Duration::from_millis(100);
    let host = ProxmoxHost::new(config).unwrap();
    let err = host.create(&spec(6003, ContainerKind::Dev, "nodhcp-6003")).await.unwrap_err();
    assert!(matches!(err, ContainerError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("no address"), "{err}");
    assert!(pve.ct(6003).is_none(), "the half-made container was destroyed");
    assert!(
        pve.calls().contains(&"POST /api2/json/nodes/pve/lxc/6003/status/stop".to_string())
            || pve.calls().contains(&"POST /api2/json/nodes/pve/lxc/6003/status/shutdown".to_string())
    );
}

#[tokio::test]
async fn a_wrong_token_is_an_auth_error() {
    let pve = StandIn::start().await;
    let mut config = pve.config();
    config.token_secret = "not-the-secret".into();
    let err = ProxmoxHost::new(config).unwrap().status(6001).await.unwrap_err();
    assert!(matches!(err, ContainerError::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("invalid token value"), "{err}");
    assert!(!format!("{err} {:?}", pve.config()).contains(SECRET), "the secret is never shown");
}

#[tokio::test]
async fn a_self_signed_node_is_reached_through_its_pinned_fingerprint_only() {
    let (pve, pin) = StandIn::start_tls().await;
    let mut pinned = pve.config();
    pinned.tls_fingerprint = Some(pin);
    let created = ProxmoxHost::new(pinned.clone()).unwrap().create(&spec(6010, ContainerKind::Game, "g-6010")).await;
    assert!(created.is_ok(), "the pinned certificate is trusted: {created:?}");
    let calls = pve.calls().len();
    assert!(calls > 0);

    // Another certificate's fingerprint, or no pin at all: the handshake fails, so the API token
    // never leaves, and no call reaches the node.
    let mut wrong = pve.config();
    wrong.tls_fingerprint = Some(Fingerprint::of(b"some other certificate"));
    let err = ProxmoxHost::new(wrong).unwrap().status(6010).await.unwrap_err();
    assert!(!format!("{err} {err:?}").contains(SECRET), "{err}");
    let err = ProxmoxHost::new(pve.config()).unwrap().status(6010).await.unwrap_err();
    assert!(!format!("{err} {err:?}").contains(SECRET), "{err}");
    assert_eq!(pve.calls().len(), calls, "refused before any request was sent");

    // Pinning and trusting anything at once is a contradiction, refused before any call.
    pinned.danger_accept_invalid_certs = true;
    assert!(matches!(ProxmoxHost::new(pinned), Err(ContainerError::InvalidSpec(_))));
}

#[tokio::test]
async fn stop_is_clean_then_hard_and_destroy_purges_and_is_idempotent() {
    let pve = StandIn::start().await;
    let host = pve.host();
    host.create(&spec(6004, ContainerKind::Game, "game-6004")).await.unwrap();
    host.stop(6004).await.unwrap();
    assert_eq!(host.status(6004).await.unwrap(), ContainerState::Stopped);
    assert!(!pve.calls().iter().any(|c| c.ends_with("6004/status/stop")), "a clean shutdown sufficed");
    host.stop(6004).await.unwrap();
    // Stopped: the last known address is still given.
    assert_eq!(host.agent_endpoint(6004).await.unwrap().agent_url.as_str(), "http://203.0.113.4:18888/");
    host.start(6004).await.unwrap();
    assert_eq!(host.status(6004).await.unwrap(), ContainerState::Running);

    host.create(&spec(6005, ContainerKind::Game, "stubborn-6005")).await.unwrap();
    host.stop(6005).await.unwrap();
    assert!(!pve.ct(6005).unwrap().running);
    assert!(pve.calls().iter().any(|c| c.ends_with("6005/status/stop")), "hard stop after the failed shutdown");

    host.destroy(6004).await.unwrap();
    assert_eq!(host.status(6004).await.unwrap(), ContainerState::Missing);
    let q = pve.pve.lock().unwrap().delete_queries.last().cloned().unwrap();
    assert_eq!((q["purge"].as_str(), q["destroy-unreferenced-disks"].as_str()), ("1", "1"));
    host.destroy(6004).await.unwrap();
    assert!(matches!(host.start(6004).await, Err(ContainerError::NotFound(6004))));
    assert!(matches!(host.stop(6004).await, Err(ContainerError::NotFound(6004))));
    assert!(matches!(host.agent_endpoint(6004).await, Err(ContainerError::NotFound(6004))));
}

#[tokio::test]
async fn transient_503s_are_retried() {
    let pve = StandIn::start().await;
    pve.pve.lock().unwrap().flaky = 2;
    assert_eq!(pve.host().status(6010).await.unwrap(), ContainerState::Missing);
    pve.pve.lock().unwrap().flaky = 10;
    let err = pve.host().status(6010).await.unwrap_err();
    assert!(err.to_string().contains("503"), "gives up after a few tries: {err}");
}

#[tokio::test]
async fn derived_tokens_and_hostnames_are_checked_before_anything_is_cloned() {
    let pve = StandIn::start().await;
    let master = b"fleet-master-secret-0123456789abcdef".to_vec();
    let mut config = pve.config();
    config.agent_token_master = Some(master.clone());
    let host = ProxmoxHost::new(config).unwrap();
    assert_eq!(host.agent_token(6020).unwrap(), agent_token_for(&master, 6020));

    let err = host.create(&spec(6020, ContainerKind::Dev, "dev-6020")).await.unwrap_err();
    assert!(matches!(&err, ContainerError::InvalidSpec(m) if m.contains("derived")), "{err:?}");
    let mut good = spec(6020, ContainerKind::Dev, "dev-6021");
    good.agent_token = agent_token_for(&master, 6020);
    let err = host.create(&good).await.unwrap_err();
    assert!(matches!(&err, ContainerError::InvalidSpec(m) if m.contains("-6020")), "{err:?}");
    assert!(pve.pve.lock().unwrap().clone_forms.is_empty());

    good.hostname = "dev-6020".into();
    host.create(&good).await.unwrap();
    let mut short = pve.config();
    short.agent_token_master = Some(vec![1; 8]);
    assert!(ProxmoxHost::new(short).is_err());
}
