//! Who gets in, and the console: every route of the real agent refuses a request without its
//! token; the console WebSocket round trip to the game server; a PTY shell as the dev user,
//! opened with a short-lived ticket as the API would hand one out.

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Every route the agent serves, with a method it answers to.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/status"),
    ("GET", "/config"),
    ("POST", "/config"),
    ("POST", "/start"),
    ("POST", "/stop"),
    ("POST", "/restart"),
    ("POST", "/kill"),
    ("GET", "/dev/codeserver"),
    ("POST", "/dev/codeserver/start"),
    ("POST", "/dev/codeserver/stop"),
    ("POST", "/dev/codeserver/restart"),
    ("GET", "/mods"),
    ("POST", "/mods"),
    ("POST", "/mods/a.jar/enable"),
    ("POST", "/mods/a.jar/disable"),
    ("DELETE", "/mods/a.jar"),
    ("GET", "/runtimes"),
    ("POST", "/runtimes/install"),
    ("POST", "/runtimes/zrt/rollback"),
    ("DELETE", "/runtimes/zrt/1.0.0"),
    ("POST", "/runtimes/zrt/1.0.0/verify"),
    ("GET", "/metrics"),
    ("GET", "/console/stream"),
];

#[tokio::test]
async fn every_route_refuses_a_request_without_the_token() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("auth");
    agent.ready().await;
    for (method, path) in ROUTES {
        let m: reqwest::Method = method.parse().unwrap();
        for auth in [None, Some("Bearer wrong-token-wrong-token-wrong-token"), Some(TOKEN), Some("Basic eDp5")] {
            let mut req = agent.http.request(m.clone(), agent.url(path)).json(&json!({"vmid": 1}));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let status = req.send().await.unwrap().status();
            assert_eq!(status, 401, "{method} {path} with {auth:?} must be refused, got {status}");
        }
    }
    // With the token the same routes answer (whatever their answer).
    for (method, path) in ROUTES.iter().filter(|(_, p)| *p != "/console/stream") {
        let r = agent.http.request(method.parse().unwrap(), agent.url(path)).bearer_auth(TOKEN).send().await.unwrap();
        assert_ne!(r.status(), 401, "{method} {path}");
    }
    assert_eq!(agent.http.get(agent.url("/health")).send().await.unwrap().status(), 200);
    let logs = agent.logs();
    assert!(!logs.contains(TOKEN), "the token is never logged");
}

async fn ws(agent: &Agent, query: &str, auth: Option<&str>, protocols: Option<&str>) -> WsStream {
    let mut req = format!("ws://127.0.0.1:{}/console/stream{query}", agent.port).into_client_request().unwrap();
    if let Some(a) = auth {
        req.headers_mut().insert("authorization", a.parse().unwrap());
    }
    if let Some(p) = protocols {
        req.headers_mut().insert("sec-websocket-protocol", p.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.unwrap_or_else(|e| panic!("console refused: {e}")).0
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads messages (text or binary, as text) until the collected output contains `needle`.
async fn read_until(ws: &mut WsStream, needle: &str) -> String {
    let mut seen = String::new();
    let wait = async {
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Text(t) => {
                    seen.push_str(&t);
                    seen.push('\n');
                }
                Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Message::Close(c) => panic!("closed {c:?} before {needle:?}; got {seen}"),
                _ => {}
            }
            if seen.contains(needle) {
                return;
            }
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(30), wait).await.is_err() {
        panic!("no {needle:?} in console output: {seen}");
    }
    seen
}

#[tokio::test]
async fn console_round_trip_to_the_game_server() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("console");
    agent.ready().await;
    agent
        .post(
            "/config",
            json!({"vmid": 5010, "container_type": "game", "game": "testgame", "variant": "vanilla",
                   "ports": [25570], "memory_mb": 512}),
        )
        .await;
    agent.wait_status("running", |s| s["state"] == "running").await;
    let mut ws = ws(&agent, "", Some(&format!("Bearer {TOKEN}")), None).await;
    // Recent lines first, then what is typed goes to stdin and its answer comes back.
    read_until(&mut ws, "Done (").await;
    ws.send(Message::text("say hello")).await.unwrap();
    read_until(&mut ws, "echo: say hello").await;
    // The console's `crash` line crashes the server, which shows up in /status.
    ws.send(Message::text("crash")).await.unwrap();
    let s = agent.wait_status("crash", |s| s["crashCount"] == 1).await;
    assert_eq!(s["lastCrash"]["exitCode"], 3);
}

#[tokio::test]
async fn pty_shell_runs_as_the_dev_user_with_a_ticket() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("pty");
    agent.ready().await;
    agent.post("/config", json!({"vmid": 6010, "container_type": "dev", "runtime": "zrt", "version": "1"})).await;
    agent.wait_status("provisioned", |s| s["provisioningComplete"] == true || s["state"] == "error").await;

    // The API hands out a ticket bound to this vmid, signed with a key derived from the agent token.
    let key = zlh_core::token::console_ticket_key(TOKEN);
    let ticket = zlh_core::token::issue(
        &key,
        zlh_core::token::CONSOLE_PURPOSE,
        "user-1",
        6010,
        std::time::Duration::from_secs(60),
        chrono::Utc::now(),
    )
    .unwrap();
    let mut ws = ws(&agent, "?mode=shell", None, Some(&format!("zlh-console, zlh-ticket.{ticket}"))).await;
    ws.send(Message::binary(b"id -un; echo \"home=$HOME\"; command -v zrt; pwd; echo __e\"\"nd__\n".to_vec()))
        .await
        .unwrap();
    let out = read_until(&mut ws, "__end__\r\n").await;
    let user = if is_root() {
        DEV_USER.to_string()
    } else {
        String::from_utf8(std::process::Command::new("id").arg("-un").output().unwrap().stdout).unwrap().trim().into()
    };
    // (The typed line is echoed by the terminal; `__e""nd__` only prints as `__end__`.)
    assert!(out.split(['\r', '\n']).any(|l| l == user), "`id -un` prints {user}: {out}");
    assert!(out.contains(&format!("home={}", agent.root.join("home/dev").display())), "{out}");
    assert!(out.contains(&format!("{}/opt/zlh/runtimes/zrt/current/bin/zrt", agent.root.display())), "{out}");
    assert!(out.contains(&agent.root.join("home/dev/workspace").display().to_string()), "{out}");

    // A ticket for another container is refused.
    let other = zlh_core::token::issue(
        &key,
        zlh_core::token::CONSOLE_PURPOSE,
        "user-1",
        6011,
        std::time::Duration::from_secs(60),
        chrono::Utc::now(),
    )
    .unwrap();
    let mut req = format!("ws://127.0.0.1:{}/console/stream?mode=shell", agent.port).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", format!("zlh-console, zlh-ticket.{other}").parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err(), "a ticket for vmid 6011 opens nothing on 6010");
}
