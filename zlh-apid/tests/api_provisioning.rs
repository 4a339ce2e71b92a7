//! Provisioning and deletion as persisted jobs, over real HTTP on SQLite and PostgreSQL: the
//! request answers at once, every step is recorded, an agent error shows in status within
//! seconds and is cleaned up, numbers are never handed out twice (100 concurrent provisions), a
//! deleted server's numbers come back, and bad requests store nothing.

#[macro_use]
mod api_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use api_support::{TestApi, User, DEADLINE, FAILING_RUNTIME, GAME_PORTS};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use zlh_apid::billing::{subscriptions, PlanId};
use zlh_apid::servers::jobs;
use zlh_core::container::mock::MockStep;

const PROVISION_STEPS: [&str; 6] =
    ["allocate", "create container", "start container", "wait for agent", "send config", "wait running"];

/// The job's steps as `(name, state)`, in the order they were recorded.
fn steps(status: &Value) -> Vec<(String, String)> {
    status["job"]["steps"]
        .as_array()
        .expect("the job's steps")
        .iter()
        .map(|s| (s["step"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string()))
        .collect()
}

fn all_done(names: &[&str]) -> Vec<(String, String)> {
    names.iter().map(|n| (n.to_string(), "done".to_string())).collect()
}

/// Polls the database until the server's newest job satisfies `pred` (bounded).
async fn wait_job(api: &TestApi, id: &str, what: &str, pred: impl Fn(&jobs::Job) -> bool) -> jobs::Job {
    let started = Instant::now();
    loop {
        if let Some(job) = jobs::latest_for_server(&api.state.db, id).await.unwrap() {
            if pred(&job) {
                return job;
            }
        }
        assert!(started.elapsed() < DEADLINE, "[{}] the job of {id} never got {what}", api.backend);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn vmid_of(status: &Value) -> u32 {
    status["vmid"].as_u64().expect("a vmid") as u32
}

async fn provisioning_answers_at_once_and_records_every_step(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;

    // Status answers wait: the request must come back while provisioning waits on the agent.
    api.agent.hold_status(true);
    let body = json!({ "name": "survival", "game": "minecraft", "variant": "paper", "version": "1.21.4" });
    let (status, created) = api.send(Method::POST, "/api/servers", Some(&a.token), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "[{backend}] {created}");
    assert_eq!(api.agent.status_answers(), 0, "the POST answered before the agent reported any status");
    assert_eq!(created["state"], "provisioning");
    assert!(created["jobId"].is_string(), "{created}");
    let game = created["id"].as_str().unwrap().to_string();
    let job = wait_job(&api, &game, "to wait on the agent", |j| j.step.as_deref() == Some("wait running")).await;
    assert_eq!(job.state, "running");
    let (_, shown) = api.send(Method::GET, &format!("/api/servers/{game}"), Some(&a.token), None).await;
    assert_eq!(shown["state"], "provisioning", "[{backend}] {shown}");
    api.agent.hold_status(false);

    // The server's final state and its job's end are recorded together: whoever sees the one
    // sees the other.
    let v = api.wait_for(&a, &game, "no longer provisioning", |v| v["state"] != "provisioning").await;
    assert_eq!(v["state"], "running", "[{backend}] {v}");
    assert_eq!(steps(&v), all_done(&PROVISION_STEPS), "[{backend}] {v}");
    assert_eq!((v["job"]["state"].as_str(), &v["job"]["error"]), (Some("done"), &Value::Null), "{v}");
    let at: Vec<i64> = v["job"]["steps"].as_array().unwrap().iter().map(|s| s["at"].as_i64().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "steps recorded in order: {at:?}");
    assert_eq!(v["name"], "survival");
    let vmid = vmid_of(&v);
    assert!((5000..=5999).contains(&vmid), "[{backend}] game vmid {vmid}");
    let port = v["spec"]["ports"][0].as_u64().expect("a game port") as u32;
    assert!(GAME_PORTS.contains(&port), "[{backend}] port {port} outside the configured range");
    assert_eq!(api.host.spec(vmid).expect("the container").ports, vec![port as u16]);
    let payload = api.agent.config(vmid).expect("the agent got its payload");
    assert_eq!(
        (&payload["container_type"], &payload["game"], &payload["ports"]),
        (&json!("game"), &json!("minecraft"), &json!([port])),
        "{payload}"
    );
    assert_eq!(payload["disk_gb"], 10, "the plan's disk, which the agent enforces: {payload}");

    let dev = api.create_dev(&a, "node").await;
    let v = api.wait_running(&a, &dev).await;
    assert_eq!(steps(&v), all_done(&PROVISION_STEPS), "[{backend}] {v}");
    let vmid = vmid_of(&v);
    assert!((6000..=6999).contains(&vmid), "[{backend}] dev vmid {vmid}");
    let payload = api.agent.config(vmid).unwrap();
    assert_eq!((&payload["runtime"], &payload["enable_code_server"]), (&json!("node"), &json!(true)));
    assert_eq!(v["agent"]["state"], "running", "status asks the agent: {v}");
}

async fn an_agent_error_shows_within_5s_and_is_cleaned_up(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let b = api.register("bob").await;
    api.agent.fail_runtime(FAILING_RUNTIME);

    let id = api.create_dev(&a, FAILING_RUNTIME).await;
    // Failed, and in the same answer its job has ended.
    let v = api.wait_for(&a, &id, "no longer provisioning", |v| v["state"] != "provisioning").await;
    let seen_at = Instant::now();
    assert_eq!(v["state"], "failed", "[{backend}] {v}");
    let (vmid, _) = api
        .agent
        .configs()
        .into_iter()
        .find(|(_, p)| p["runtime"] == FAILING_RUNTIME)
        .expect("the agent got the payload");
    let reported = api.agent.first_error_at(vmid).expect("the agent reported its error");
    let delay = seen_at - reported;
    assert!(delay < Duration::from_secs(5), "[{backend}] the error took {delay:?} to show");
    let expected = format!("runtime {FAILING_RUNTIME} not in catalog");
    assert!(v["error"].as_str().unwrap_or_default().contains(&expected), "[{backend}] {v}");
    assert_eq!(v["job"]["state"], "failed");
    let mut want = all_done(&PROVISION_STEPS[..5]);
    want.push(("wait running".into(), "failed".into()));
    assert_eq!(steps(&v), want, "[{backend}] {v}");
    let failed_step = v["job"]["steps"].as_array().unwrap().last().unwrap().clone();
    assert!(failed_step["error"].as_str().unwrap().contains(&expected), "{failed_step}");

    // Cleanup: the container is gone and the numbers are free again.
    assert!(api.host.calls().contains(&(MockStep::Destroy, vmid)), "[{backend}] {:?}", api.host.calls());
    assert!(!api.host.vmids().contains(&vmid));
    assert_eq!(api.count(&format!("SELECT COUNT(*) FROM vmid_leases WHERE vmid = {vmid}")).await, 0);
    let other = api.create_dev(&b, "node").await;
    assert_eq!(vmid_of(&api.wait_running(&b, &other).await), vmid, "[{backend}] the freed vmid is handed out again");

    // The failed server is not a way into the container that now has its old vmid.
    let before = api.agent.seen_by(vmid).len();
    let (status, listing) = api.send(Method::GET, &format!("/api/servers/{id}/files/list"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "[{backend}] A's failed server reached B's container: {listing}");
    let (status, console) =
        api.console(&id, "", Some(&format!("zlh-console, zlh-auth.{}", a.token))).await.map(|_| ()).unwrap_err();
    assert_eq!(status, StatusCode::CONFLICT, "{console}");
    let (_, v) = api.send(Method::GET, &format!("/api/servers/{id}/status"), Some(&a.token), None).await;
    assert_eq!(v["state"], "failed");
    assert_ne!(v["agent"]["state"], "running", "[{backend}] B's agent status shown for A's failed server: {v}");
    assert_eq!(api.agent.seen_by(vmid).len(), before, "[{backend}] {:?}", api.agent.seen_by(vmid));
}

async fn delete_stops_destroys_and_frees_the_numbers(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let id = api.create_game(&a).await;
    let v = api.wait_running(&a, &id).await;
    let (vmid, port) = (vmid_of(&v), v["spec"]["ports"][0].clone());

    // A delete that fails leaves the server deleting, with the failure in its job; asking again retries.
    api.host.fail_once(MockStep::Destroy, "storage busy");
    let (status, v) = api.send(Method::DELETE, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!((status, v["state"].as_str()), (StatusCode::ACCEPTED, Some("deleting")), "[{backend}] {v}");
    let v = api.wait_for(&a, &id, "a failed delete job", |v| v["job"]["state"] == "failed").await;
    assert_eq!(v["state"], "deleting", "[{backend}] {v}");
    assert_eq!(v["job"]["kind"], "delete");
    assert!(v["job"]["error"].as_str().unwrap().contains("storage busy"), "{v}");

    let (status, _) = api.send(Method::DELETE, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let started = Instant::now();
    loop {
        let (status, _) = api.send(Method::GET, &format!("/api/servers/{id}"), Some(&a.token), None).await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "[{backend}] the server was never deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, list) = api.send(Method::GET, "/api/servers", Some(&a.token), None).await;
    assert_eq!(list["servers"], json!([]), "[{backend}] {list}");
    let calls: Vec<MockStep> = api.host.calls().into_iter().filter(|(_, v)| *v == vmid).map(|(s, _)| s).collect();
    let stop = calls.iter().position(|s| *s == MockStep::Stop).expect("the container was stopped");
    assert!(calls[stop..].contains(&MockStep::Destroy), "[{backend}] stopped, then destroyed: {calls:?}");
    assert!(!api.host.vmids().contains(&vmid));
    assert_eq!(api.count("SELECT COUNT(*) FROM vmid_leases").await, 0);
    assert_eq!(api.count("SELECT COUNT(*) FROM port_leases").await, 0);
    let (status, _) = api.send(Method::DELETE, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a deleted server is gone");

    let again = api.create_game(&a).await;
    let v = api.wait_running(&a, &again).await;
    assert_eq!((vmid_of(&v), &v["spec"]["ports"][0]), (vmid, &port), "[{backend}] the numbers are reused");
}

async fn deletes_at_once_start_one_delete_job(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let id = api.create_game(&a).await;
    api.wait_running(&a, &id).await;
    let db = &api.state.db;
    // Two DELETEs that both found the server not yet deleting (here or on two replicas) race
    // to create the job: the database lets one through.
    let first = jobs::create(db, &id, jobs::DELETE).await.unwrap();
    let second = jobs::create(db, &id, jobs::DELETE).await.unwrap_err();
    assert!(zlh_apid::db::is_unique_violation(&second), "[{backend}] {second}");
    // The route answers such a loser like a DELETE of a server already being deleted.
    let (status, v) = api.send(Method::DELETE, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!((status, v["state"].as_str()), (StatusCode::ACCEPTED, Some("deleting")), "[{backend}] {v}");
    let sql = format!("SELECT COUNT(*) FROM jobs WHERE server_id = '{id}' AND kind = 'delete'");
    assert_eq!(api.count(&sql).await, 1, "[{backend}] one delete job");
    // Once it failed, asking again may start another.
    jobs::finish(db, &first.id, Some("storage busy")).await.unwrap();
    jobs::create(db, &id, jobs::DELETE).await.expect("a retry after a failed delete");
}

async fn only_a_dev_server_with_code_server_has_an_ide(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let with = api.create_dev(&a, "node").await;
    api.wait_running(&a, &with).await;
    let (status, v) = api.send(Method::POST, &format!("/api/dev/{with}/ide-token"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {v}");
    assert!(v["url"].as_str().unwrap().contains("/ide?token="), "{v}");

    let body = json!({ "runtime": "node", "enable_code_server": false });
    let (status, v) = api.send(Method::POST, "/api/dev", Some(&a.token), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "[{backend}] {v}");
    let without = v["id"].as_str().unwrap().to_owned();
    api.wait_running(&a, &without).await;
    let (status, v) = api.send(Method::POST, &format!("/api/dev/{without}/ide-token"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "[{backend}] no code-server, no IDE link that ends in a 502: {v}");
    assert!(v["error"].as_str().unwrap().contains("no IDE"), "{v}");
}

/// A browser on the dev host of an IDE link (`url`): a client resolving that host to the API.
struct DevHost {
    http: reqwest::Client,
    url: reqwest::Url,
}

impl DevHost {
    fn new(api: &TestApi, url: &str) -> Self {
        let url = reqwest::Url::parse(url).unwrap();
        let http = reqwest::Client::builder()
            .resolve(url.host_str().unwrap(), api.addr)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self { http, url }
    }

    /// Opens the link: the status, and the session cookie when one is set.
    async fn open(&self) -> (StatusCode, Option<String>) {
        let r = self.http.get(self.url.clone()).send().await.unwrap();
        let cookie = r.headers().get("set-cookie").map(|c| c.to_str().unwrap().split(';').next().unwrap().to_owned());
        (r.status(), cookie)
    }

    /// The IDE's start page with `cookie`.
    async fn page(&self, cookie: &str) -> StatusCode {
        self.http.get(self.url.join("/").unwrap()).header("cookie", cookie).send().await.unwrap().status()
    }
}

async fn a_stopped_ide_says_so_until_code_server_is_started_again(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let id = api.create_dev(&a, "node").await;
    api.wait_running(&a, &id).await;
    let token_path = format!("/api/dev/{id}/ide-token");
    let (status, v) = api.send(Method::POST, &token_path, Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {v}");
    let open = DevHost::new(&api, v["url"].as_str().unwrap());
    let (status, cookie) = open.open().await;
    assert_eq!(status, StatusCode::SEE_OTHER, "[{backend}] the link opens a session");
    let cookie = cookie.expect("a session cookie");
    // The stand-in code-server's address is unreachable: proxied, that is a 502.
    assert_eq!(open.page(&cookie).await, StatusCode::BAD_GATEWAY, "[{backend}]");
    let (status, v) = api.send(Method::POST, &token_path, Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {v}");
    let unused = DevHost::new(&api, v["url"].as_str().unwrap());

    let (status, v) = api.send(Method::POST, &format!("/api/servers/{id}/codeserver/stop"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {v}");
    let (_, server) = api.send(Method::GET, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!(server["ideStopped"], true, "[{backend}] {server}");
    let (status, v) = api.send(Method::POST, &token_path, Some(&a.token), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "[{backend}] no link to a stopped IDE: {v}");
    assert!(v["error"].as_str().unwrap().contains("stopped"), "{v}");
    // The open session and a link issued before the stop both say "stopped" (409), where the
    // proxy used to answer 502 from a code-server that is gone.
    assert_eq!(open.page(&cookie).await, StatusCode::CONFLICT, "[{backend}]");
    assert_eq!(unused.open().await.0, StatusCode::CONFLICT, "[{backend}]");

    let (status, v) =
        api.send(Method::POST, &format!("/api/servers/{id}/codeserver/start"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {v}");
    let (_, server) = api.send(Method::GET, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!(server["ideStopped"], false, "[{backend}] {server}");
    let (status, v) = api.send(Method::POST, &token_path, Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {v}");
    assert_eq!(open.page(&cookie).await, StatusCode::BAD_GATEWAY, "[{backend}] proxied again");
}

async fn bad_requests_are_refused_and_store_nothing(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let cases: Vec<(&str, Value, StatusCode)> = vec![
        ("/api/servers", json!({ "game": "minecraft", "variant": "paper", "colour": "red" }), StatusCode::BAD_REQUEST),
        ("/api/servers", json!({ "variant": "paper" }), StatusCode::BAD_REQUEST),
        ("/api/servers", json!({ "game": "minecraft", "variant": "paper", "world": "../w" }), StatusCode::BAD_REQUEST),
        ("/api/servers", json!({ "game": "mine craft", "variant": "paper" }), StatusCode::BAD_REQUEST),
        (
            "/api/servers",
            json!({ "game": "minecraft", "variant": "paper", "memory_mb": 4096 }),
            StatusCode::PAYMENT_REQUIRED,
        ),
        ("/api/servers", json!("minecraft"), StatusCode::BAD_REQUEST),
        ("/api/dev", json!({ "runtime": "../x" }), StatusCode::BAD_REQUEST),
        ("/api/dev", json!({ "runtime": "node", "version": "1; rm -rf /" }), StatusCode::BAD_REQUEST),
        ("/api/dev", json!({ "runtime": "node", "name": "" }), StatusCode::BAD_REQUEST),
        ("/api/dev", json!({ "runtime": "node", "enable_code_server": "yes" }), StatusCode::BAD_REQUEST),
        ("/api/dev", json!({ "runtime": "node", "memory_mb": 8192 }), StatusCode::PAYMENT_REQUIRED),
    ];
    for (path, body, want) in cases {
        let (status, v) = api.send(Method::POST, path, Some(&a.token), Some(body.clone())).await;
        assert_eq!(status, want, "[{backend}] {path} {body}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "[{backend}] {body}: {v}");
    }
    let resp = api.request(Method::POST, "/api/dev", Some(&a.token)).body("{not json").send().await.unwrap();
    let (status, v) = api_support::read(resp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].is_string());

    let (_, list) = api.send(Method::GET, "/api/servers", Some(&a.token), None).await;
    assert_eq!(list["servers"], json!([]));
    for table in ["servers", "jobs", "vmid_leases", "port_leases"] {
        assert_eq!(api.count(&format!("SELECT COUNT(*) FROM {table}")).await, 0, "[{backend}] rows in {table}");
    }
    assert!(api.host.calls().is_empty(), "{:?}", api.host.calls());
    assert!(api.agent.seen().is_empty());
}

/// What the catalog cannot provision is refused at once (422, naming what exists), resolved as
/// the agent resolves it (a version prefix, newest stable): no job, lease or container is made
/// for it, where it used to be accepted and fail inside a container.
async fn unknown_runtimes_games_and_versions_are_refused_before_anything_exists(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/api/dev", json!({ "runtime": "rust" }), "unknown runtime \"rust\"; available: cobol, java, node"),
        (
            "/api/dev",
            json!({ "runtime": "node", "version": "18" }),
            "no stable version of node matches \"18\"; available: 22.11.0, 20.18.1",
        ),
        // Only a beta has it: the agent installs stable versions.
        ("/api/dev", json!({ "runtime": "node", "version": "23" }), "available: 22.11.0, 20.18.1"),
        (
            "/api/servers",
            json!({ "game": "terraria", "variant": "vanilla" }),
            "unknown game \"terraria\"; available: minecraft",
        ),
        (
            "/api/servers",
            json!({ "game": "minecraft", "variant": "forge" }),
            "unknown game \"minecraft/forge\"; available: paper, vanilla",
        ),
        (
            "/api/servers",
            json!({ "game": "minecraft", "variant": "paper", "version": "1.19" }),
            "no stable version of minecraft-paper matches \"1.19\"; available: 1.21.4, 1.20.6",
        ),
    ];
    for (path, body, says) in cases {
        let (status, v) = api.send(Method::POST, path, Some(&a.token), Some(body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "[{backend}] {path} {body}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "[{backend}] {body}: {error:?} should say {says:?}");
    }
    for table in ["servers", "jobs", "vmid_leases", "port_leases"] {
        assert_eq!(api.count(&format!("SELECT COUNT(*) FROM {table}")).await, 0, "[{backend}] rows in {table}");
    }
    assert!(api.host.calls().is_empty(), "[{backend}] {:?}", api.host.calls());
    assert!(api.agent.seen().is_empty());

    // A prefix that resolves is provisioned, with the request as the agent gets to resolve it.
    let (status, v) =
        api.send(Method::POST, "/api/dev", Some(&a.token), Some(json!({ "runtime": "node", "version": "20" }))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "[{backend}] {v}");
    let running = api.wait_running(&a, v["id"].as_str().unwrap()).await;
    assert_eq!(api.agent.config(vmid_of(&running)).unwrap()["version"], "20");
    let body = json!({ "game": "minecraft", "variant": "paper", "version": "1.20" });
    let (status, v) = api.send(Method::POST, "/api/servers", Some(&a.token), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "[{backend}] {v}");
}

/// One free account cannot take the shared vmid pool: the plan's server count holds, even for
/// creates racing each other, and says which limit refused. A deleted server frees its slot; a
/// bigger plan allows more.
async fn a_plan_caps_the_servers_of_a_user_even_under_racing_creates(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let b = api.register("bob").await;
    let creates = (0..8).map(|i| {
        let api = &api;
        let token = a.token.clone();
        async move {
            let (path, body) = if i % 2 == 0 {
                ("/api/dev", json!({ "runtime": "node", "name": format!("dev {i}") }))
            } else {
                ("/api/servers", json!({ "game": "minecraft", "variant": "paper", "name": format!("world {i}") }))
            };
            api.send(Method::POST, path, Some(&token), Some(body)).await
        }
    });
    let answers = futures::future::join_all(creates).await;
    let accepted: Vec<&Value> = answers.iter().filter(|(s, _)| *s == StatusCode::ACCEPTED).map(|(_, v)| v).collect();
    assert_eq!(accepted.len(), 2, "[{backend}] the Basic plan allows 2: {answers:?}");
    for (status, v) in answers.iter().filter(|(s, _)| *s != StatusCode::ACCEPTED) {
        assert_eq!(*status, StatusCode::PAYMENT_REQUIRED, "[{backend}] {v}");
        assert_eq!(
            v["error"], "the Basic plan allows 2 servers; you have 2 (delete one or upgrade the plan)",
            "[{backend}]"
        );
    }
    let sql = format!("SELECT COUNT(*) FROM servers WHERE user_id = '{}'", a.id);
    assert_eq!(api.count(&sql).await, 2, "[{backend}] refused creates stored nothing");
    assert_eq!(api.count("SELECT COUNT(*) FROM jobs").await, 2, "[{backend}]");
    // Another user's allowance is their own.
    api.create_dev(&b, "node").await;

    // Deleting one frees its slot, once it is gone.
    let first = accepted[0]["id"].as_str().unwrap().to_owned();
    api.wait_running(&a, &first).await;
    let (status, _) = api.send(Method::DELETE, &format!("/api/servers/{first}"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let started = Instant::now();
    while api.send(Method::GET, &format!("/api/servers/{first}"), Some(&a.token), None).await.0 != StatusCode::NOT_FOUND
    {
        assert!(started.elapsed() < DEADLINE, "[{backend}] the server was never deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.create_dev(&a, "node").await;
    let (status, v) = api.send(Method::POST, "/api/dev", Some(&a.token), Some(json!({ "runtime": "node" }))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "[{backend}] full again: {v}");

    // On Standard: up to 5 servers.
    subscriptions::activate(&api.state.db, &a.id, Some(PlanId::Standard), None, None, zlh_apid::db::now_ms())
        .await
        .unwrap();
    for _ in 0..3 {
        api.create_dev(&a, "node").await;
    }
    let (status, v) = api.send(Method::POST, "/api/dev", Some(&a.token), Some(json!({ "runtime": "node" }))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "[{backend}] {v}");
    assert_eq!(v["error"], "the Standard plan allows 5 servers; you have 5 (delete one or upgrade the plan)");
}

/// 100 provisions at once, spread over 10 users: all end running, no vmid or port twice.
async fn hundred_concurrent_provisions(api: TestApi) {
    let backend = api.backend;
    let started = Instant::now();
    let mut users: Vec<User> = Vec::new();
    for i in 0..10 {
        let user = api.register(&format!("user{i}")).await;
        // Ten servers each: the Pro plan's count, at 1 GB each.
        subscriptions::activate(&api.state.db, &user.id, Some(PlanId::Pro), None, None, zlh_apid::db::now_ms())
            .await
            .unwrap();
        users.push(user);
    }
    let creates = (0..100).map(|i| {
        let (api, user) = (&api, &users[i % users.len()]);
        async move {
            let body =
                json!({ "name": format!("world {i}"), "game": "minecraft", "variant": "paper", "memory_mb": 1024 });
            let (status, v) = api.send(Method::POST, "/api/servers", Some(&user.token), Some(body)).await;
            assert_eq!(status, StatusCode::ACCEPTED, "[{}] provision {i}: {v}", api.backend);
        }
    });
    futures::future::join_all(creates).await;

    let mut servers: Vec<Value>;
    loop {
        servers = Vec::new();
        for user in &users {
            let (status, list) = api.send(Method::GET, "/api/servers", Some(&user.token), None).await;
            assert_eq!(status, StatusCode::OK);
            servers.extend(list["servers"].as_array().unwrap().iter().cloned());
        }
        assert_eq!(servers.len(), 100, "[{backend}]");
        let failed: Vec<&Value> = servers.iter().filter(|s| s["state"] == "failed").collect();
        assert!(failed.is_empty(), "[{backend}] failed provisions: {failed:?}");
        if servers.iter().all(|s| s["state"] == "running") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(50), "[{backend}] not all running in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vmids: HashSet<u64> = servers.iter().map(|s| s["vmid"].as_u64().unwrap()).collect();
    let ports: HashSet<u64> = servers.iter().map(|s| s["spec"]["ports"][0].as_u64().unwrap()).collect();
    assert_eq!((vmids.len(), ports.len()), (100, 100), "[{backend}] duplicate numbers");
    assert!(vmids.iter().all(|v| (5000..=5999).contains(v)));
    assert!(ports.iter().all(|p| GAME_PORTS.contains(&(*p as u32))));
    assert_eq!(api.count("SELECT COUNT(DISTINCT vmid) FROM vmid_leases").await, 100);
    assert_eq!(api.count("SELECT COUNT(DISTINCT port) FROM port_leases").await, 100);
    // Every container got a payload naming its own vmid and its own port.
    let configs = api.agent.configs();
    assert_eq!(configs.len(), 100);
    for s in &servers {
        let payload = &configs[&(s["vmid"].as_u64().unwrap() as u32)];
        assert_eq!(payload["ports"], s["spec"]["ports"], "[{backend}] {payload}");
    }
    eprintln!("[{backend}] 100 concurrent provisions running after {:?}", started.elapsed());
}

on_both_backends!(tokio::test;
    provisioning_answers_at_once_and_records_every_step,
    an_agent_error_shows_within_5s_and_is_cleaned_up,
    delete_stops_destroys_and_frees_the_numbers,
    deletes_at_once_start_one_delete_job,
    only_a_dev_server_with_code_server_has_an_ide,
    a_stopped_ide_says_so_until_code_server_is_started_again,
    bad_requests_are_refused_and_store_nothing,
    a_plan_caps_the_servers_of_a_user_even_under_racing_creates,
    unknown_runtimes_games_and_versions_are_refused_before_anything_exists,
);

mod concurrent {
    use super::api_support::TestApi;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_hundred_concurrent_provisions() {
        super::hundred_concurrent_provisions(TestApi::sqlite().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_hundred_concurrent_provisions() {
        super::hundred_concurrent_provisions(TestApi::postgres().await).await
    }
}
