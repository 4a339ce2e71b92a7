//! Tenancy over real HTTP, on SQLite and PostgreSQL: another user's server answers every route
//! exactly like a missing one and nothing reaches its agent; without a session every route is
//! 401; the owner and an admin get through; the relay hands the agent its own token, never the
//! user's credentials, and keeps relayed paths inside their route.

#[macro_use]
mod api_support;

use std::time::Duration;

use api_support::{TestApi, User};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// User A's running game server and dev container, and a second user B.
struct Fixture {
    a: User,
    b: User,
    game: String,
    game_vmid: u32,
    dev: String,
    dev_vmid: u32,
}

async fn setup(api: &TestApi) -> Fixture {
    let a = api.register("alice").await;
    let b = api.register("bob").await;
    let game = api.create_game(&a).await;
    let dev = api.create_dev(&a, "node").await;
    let game_vmid = api.wait_running(&a, &game).await["vmid"].as_u64().unwrap() as u32;
    let dev_vmid = api.wait_running(&a, &dev).await["vmid"].as_u64().unwrap() as u32;
    Fixture { a, b, game, game_vmid, dev, dev_vmid }
}

const UPLOAD_BYTES: usize = 256 * 1024;

/// One route of a server, and how to call it.
#[derive(Debug, Clone, Copy)]
enum Call {
    Plain(&'static str, &'static str),
    /// `PUT …/files/write` with a body.
    Write,
    /// `POST …/files/uploads` (tus creation).
    Upload,
}

/// Every HTTP route of a server (the console socket is checked on its own).
fn server_routes() -> Vec<Call> {
    use Call::Plain;
    vec![
        Plain("GET", ""),
        Plain("GET", "/status"),
        Plain("POST", "/game/start"),
        Plain("POST", "/game/stop"),
        Plain("POST", "/game/restart"),
        Plain("POST", "/game/kill"),
        Plain("POST", "/codeserver/start"),
        Plain("POST", "/codeserver/stop"),
        Plain("POST", "/codeserver/restart"),
        Plain("GET", "/files/list?path=%2F"),
        Call::Write,
        Call::Upload,
        Plain("GET", "/mods"),
        Plain("GET", "/runtimes"),
        Plain("DELETE", ""),
    ]
}

async fn hit(api: &TestApi, id: &str, call: Call, token: Option<&str>) -> (StatusCode, Value) {
    let base = format!("/api/servers/{id}");
    let req = match call {
        Call::Plain(method, rest) => api.request(method.parse().unwrap(), &format!("{base}{rest}"), token),
        Call::Write => api
            .request(Method::PUT, &format!("{base}/files/write?path=big.bin"), token)
            .header("content-type", "application/octet-stream")
            .body(vec![7u8; UPLOAD_BYTES]),
        Call::Upload => api
            .request(Method::POST, &format!("{base}/files/uploads"), token)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "5")
            .header("upload-metadata", "filename aGVsbG8udHh0"),
    };
    api_support::read(req.send().await.expect("the API answers")).await
}

/// A server id nobody has.
fn missing_id() -> String {
    zlh_apid::db::new_id()
}

async fn another_user_gets_404_on_every_route_and_reaches_no_agent(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let agent_before = api.agent.seen().len();
    let host_before = api.host.calls().len();

    for query in ["", "?all=true"] {
        let (status, list) = api.send(Method::GET, &format!("/api/servers{query}"), Some(&f.b.token), None).await;
        assert_eq!(status, StatusCode::OK, "[{backend}] {list}");
        assert_eq!(list["servers"], json!([]), "[{backend}] B's list{query} shows none of A's servers");
    }

    let missing = missing_id();
    for id in [&f.game, &f.dev] {
        for call in server_routes() {
            let theirs = hit(&api, id, call, Some(&f.b.token)).await;
            let nobodys = hit(&api, &missing, call, Some(&f.b.token)).await;
            assert_eq!(theirs.0, StatusCode::NOT_FOUND, "[{backend}] B on A's {call:?}: {theirs:?}");
            assert_eq!(theirs, nobodys, "[{backend}] A's server and a missing one look the same ({call:?})");
            assert!(theirs.1["error"].is_string(), "{theirs:?}");
        }
        let offered = format!("zlh-console, zlh-auth.{}", f.b.token);
        let theirs = api.console(id, "", Some(&offered)).await.map(|_| ()).expect_err("B's console is refused");
        let nobodys = api.console(&missing, "", Some(&offered)).await.map(|_| ()).expect_err("refused");
        assert_eq!(theirs.0, StatusCode::NOT_FOUND, "[{backend}] {theirs:?}");
        assert_eq!(theirs, nobodys, "[{backend}] the console of A's server and of a missing one look the same");
    }

    assert_eq!(api.agent.seen().len(), agent_before, "[{backend}] B reached an agent: {:?}", api.agent.seen());
    assert_eq!(api.host.calls().len(), host_before, "[{backend}] B's requests touched a container");
    assert!(api.agent.actions(f.game_vmid).is_empty() && api.agent.actions(f.dev_vmid).is_empty());
    assert_eq!(api.agent.written(f.game_vmid), 0);
    for id in [&f.game, &f.dev] {
        let (status, v) = api.send(Method::GET, &format!("/api/servers/{id}"), Some(&f.a.token), None).await;
        assert_eq!(
            (status, v["state"].as_str()),
            (StatusCode::OK, Some("running")),
            "[{backend}] B's DELETE was a no-op"
        );
    }
}

async fn without_a_session_every_route_is_401(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let agent_before = api.agent.seen().len();
    let not_signed_in = json!({ "error": "not signed in" });
    for token in [None, Some("not-a-token"), Some("a.b.c")] {
        for (method, path) in [("GET", "/api/servers"), ("POST", "/api/servers"), ("POST", "/api/dev")] {
            let (status, v) = api.send(method.parse().unwrap(), path, token, Some(json!({}))).await;
            assert_eq!((status, &v), (StatusCode::UNAUTHORIZED, &not_signed_in), "[{backend}] {method} {path}");
        }
        for id in [&f.game, &f.dev] {
            for call in server_routes() {
                let (status, v) = hit(&api, id, call, token).await;
                assert_eq!((status, &v), (StatusCode::UNAUTHORIZED, &not_signed_in), "[{backend}] {call:?} {token:?}");
            }
            let offered = token.map(|t| format!("zlh-console, zlh-auth.{t}")).unwrap_or("zlh-console".into());
            let err = api.console(id, "", Some(&offered)).await.map(|_| ()).expect_err("refused");
            assert_eq!(err, (StatusCode::UNAUTHORIZED, not_signed_in.clone()), "[{backend}] console {token:?}");
        }
    }
    assert_eq!(api.agent.seen().len(), agent_before, "[{backend}] an anonymous request reached an agent");
}

async fn the_owner_and_an_admin_reach_the_server(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let a = Some(f.a.token.as_str());

    let (status, list) = api.send(Method::GET, "/api/servers", a, None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["servers"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![f.game.as_str(), f.dev.as_str()], "[{backend}] {list}");

    for (id, vmid) in [(&f.game, f.game_vmid), (&f.dev, f.dev_vmid)] {
        let (status, v) = hit(&api, id, Call::Plain("GET", ""), a).await;
        assert_eq!((status, v["vmid"].as_u64()), (StatusCode::OK, Some(vmid as u64)), "[{backend}] {v}");
        let (status, v) = hit(&api, id, Call::Plain("GET", "/status"), a).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!((v["agentStatus"].as_str(), v["agent"]["state"].as_str()), (Some("online"), Some("running")));
        for rest in ["/mods", "/runtimes"] {
            let (status, v) = hit(&api, id, Call::Plain("GET", rest), a).await;
            assert_eq!((status, v["vmid"].as_u64()), (StatusCode::OK, Some(vmid as u64)), "[{backend}] {rest}: {v}");
        }
        let (status, v) = hit(&api, id, Call::Write, a).await;
        assert_eq!((status, v["bytes"].as_u64()), (StatusCode::OK, Some(UPLOAD_BYTES as u64)), "[{backend}] {v}");
        assert_eq!(api.agent.written(vmid), UPLOAD_BYTES as u64, "the body streamed through whole");
        let (mut ws, resp) = api
            .console(id, "", Some(&format!("zlh-console, zlh-auth.{}", f.a.token)))
            .await
            .unwrap_or_else(|e| panic!("[{backend}] A's console: {e:?}"));
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.close(None).await.unwrap();
    }

    for action in ["/game/start", "/game/stop", "/game/restart", "/game/kill"] {
        let (status, v) = hit(&api, &f.game, Call::Plain("POST", action), a).await;
        assert_eq!(status, StatusCode::ACCEPTED, "[{backend}] {action}: {v}");
    }
    assert_eq!(api.agent.actions(f.game_vmid), ["start", "stop", "restart", "kill"], "[{backend}]");
    let (status, _) = hit(&api, &f.dev, Call::Plain("POST", "/game/start"), a).await;
    assert_eq!(status, StatusCode::CONFLICT, "a dev container has no game power actions");
    for action in ["/codeserver/start", "/codeserver/stop", "/codeserver/restart"] {
        let (status, v) = hit(&api, &f.dev, Call::Plain("POST", action), a).await;
        assert_eq!((status, v["ok"].as_bool()), (StatusCode::OK, Some(true)), "[{backend}] {action}: {v}");
    }
    assert_eq!(api.agent.actions(f.dev_vmid), ["codeserver/start", "codeserver/stop", "codeserver/restart"]);

    // An operator reads any server, and lists all of them on request.
    let admin = api.register_admin("operator").await;
    let op = Some(admin.token.as_str());
    let (status, v) = hit(&api, &f.game, Call::Plain("GET", ""), op).await;
    assert_eq!((status, v["id"].as_str()), (StatusCode::OK, Some(f.game.as_str())), "[{backend}] admin: {v}");
    let (status, v) = hit(&api, &f.dev, Call::Plain("GET", "/status"), op).await;
    assert_eq!((status, v["state"].as_str()), (StatusCode::OK, Some("running")), "[{backend}] admin: {v}");
    let (_, mine) = api.send(Method::GET, "/api/servers", op, None).await;
    assert_eq!(mine["servers"], json!([]), "an admin's own list holds their own servers");
    let (_, all) = api.send(Method::GET, "/api/servers?all=true", op, None).await;
    assert_eq!(all["servers"].as_array().map(Vec::len), Some(2), "[{backend}] {all}");

    // Last: the owner deletes.
    let (status, v) = hit(&api, &f.dev, Call::Plain("DELETE", ""), a).await;
    assert_eq!((status, v["state"].as_str()), (StatusCode::ACCEPTED, Some("deleting")), "[{backend}] {v}");
}

async fn the_agent_gets_its_own_token_never_the_users_credentials(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let before = api.agent.seen_by(f.dev_vmid).len();
    let resp = api
        .request(Method::GET, &format!("/api/servers/{}/files/list?path=src", f.dev), Some(&f.a.token))
        .header("cookie", format!("zlh_session={}; theme=dark", f.a.token))
        .header("x-forwarded-prefix", "/elsewhere")
        .send()
        .await
        .unwrap();
    let (status, listing) = api_support::read(resp).await;
    assert_eq!(status, StatusCode::OK, "[{backend}] {listing}");
    assert_eq!(listing["vmid"].as_u64(), Some(f.dev_vmid as u64), "the request reached A's own container");

    let seen = api.agent.seen_by(f.dev_vmid);
    assert_eq!(seen.len(), before + 1, "one relayed request");
    let relayed = seen.last().unwrap();
    assert_eq!((relayed.method.as_str(), relayed.path.as_str()), ("GET", "/files/list?path=src"));
    let agent_token = api.state.agent_token(f.dev_vmid);
    assert_eq!(relayed.header("authorization"), Some(format!("Bearer {agent_token}").as_str()), "[{backend}]");
    assert_eq!(relayed.header("cookie"), None, "cookies stay with the API");
    assert_eq!(relayed.header("x-forwarded-prefix"), Some(format!("/api/servers/{}", f.dev).as_str()));
    for (name, value) in &relayed.headers {
        assert!(!value.contains(&f.a.token), "[{backend}] the session token reached the agent in {name}");
    }
    assert_eq!(listing["headers"]["authorization"], json!(format!("Bearer {agent_token}")));

    // tus: the upload's Location points back under the API, never at the agent.
    let resp = api
        .request(Method::POST, &format!("/api/servers/{}/files/uploads", f.game), Some(&f.a.token))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "5")
        .header("upload-metadata", "filename aGVsbG8udHh0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED, "[{backend}]");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let under = format!("/api/servers/{}/files/uploads/", f.game);
    assert!(location.starts_with(&under), "[{backend}] Location {location} is not under {under}");
    assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
    let created = api.agent.seen_by(f.game_vmid).into_iter().last().unwrap();
    assert_eq!(created.header("upload-length"), Some("5"), "tus headers pass through");
    assert_eq!(
        created.header("authorization"),
        Some(format!("Bearer {}", api.state.agent_token(f.game_vmid)).as_str())
    );
}

/// Sends one raw HTTP/1.1 request (no client normalises its path) and returns the status.
async fn raw_status(api: &TestApi, method: &str, path: &str, token: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        api.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {text}"))
}

async fn relayed_paths_cannot_leave_their_route(api: TestApi) {
    let f = setup(&api).await;
    let backend = api.backend;
    let before = api.agent.seen().len();
    for rest in ["files/../config", "files/%2e%2e/stop", "files/%2E./kill", "mods/./../start", "runtimes/.%2e/status"] {
        let path = format!("/api/servers/{}/{rest}", f.game);
        let status = raw_status(&api, "POST", &path, &f.a.token).await;
        assert_eq!(status, 400, "[{backend}] {path}");
    }
    assert_eq!(api.agent.seen().len(), before, "[{backend}] a dotted path reached an agent: {:?}", api.agent.seen());
    assert!(api.agent.actions(f.game_vmid).is_empty());
    // An ordinary relayed path still works over the same raw connection style.
    assert_eq!(raw_status(&api, "GET", &format!("/api/servers/{}/mods", f.game), &f.a.token).await, 200);
}

on_both_backends!(tokio::test;
    another_user_gets_404_on_every_route_and_reaches_no_agent,
    without_a_session_every_route_is_401,
    the_owner_and_an_admin_reach_the_server,
    the_agent_gets_its_own_token_never_the_users_credentials,
    relayed_paths_cannot_leave_their_route,
);
