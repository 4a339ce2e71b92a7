//! The console relay end to end, on SQLite and PostgreSQL: a browser's socket (session token in
//! the subprotocol list) is joined to its own container's agent, which receives a console ticket
//! bound to the user and the vmid and never the user's session; other users and anonymous
//! sockets are refused before anything reaches an agent.

#[macro_use]
mod api_support;

use std::time::Duration;

use api_support::{Console, TestApi, User};
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use tokio_tungstenite::tungstenite::Message;

fn protocols(user: &User) -> String {
    format!("zlh-console, zlh-auth.{}", user.token)
}

/// The next text frame (bounded).
async fn next_text(ws: &mut Console) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the console answers")
            .expect("the console is open")
            .expect("a frame");
        match msg {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Close(c) => panic!("the console closed: {c:?}"),
            _ => continue,
        }
    }
}

/// The console requests the agent of `vmid` received.
fn console_requests(api: &TestApi, vmid: u32) -> usize {
    api.agent.seen_by(vmid).iter().filter(|s| s.path.starts_with("/console/stream")).count()
}

async fn the_console_echoes_through_the_agent_of_its_own_container(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let dev = api.create_dev(&a, "node").await;
    let game = api.create_game(&a).await;
    let dev_vmid = api.wait_running(&a, &dev).await["vmid"].as_u64().unwrap() as u32;
    let game_vmid = api.wait_running(&a, &game).await["vmid"].as_u64().unwrap() as u32;

    let (mut ws, resp) = api
        .console(&dev, "?mode=shell", Some(&protocols(&a)))
        .await
        .unwrap_or_else(|e| panic!("[{backend}] console refused: {e:?}"));
    assert_eq!(resp.headers()["sec-websocket-protocol"], "zlh-console", "the session token is never echoed");
    ws.send(Message::text("ls -la")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{dev_vmid}: ls -la"), "[{backend}]");
    ws.send(Message::text("echo ünïcode")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{dev_vmid}: echo ünïcode"));

    // The agent saw a ticket for this user and this container, and nothing of the session.
    let tickets = api.agent.tickets();
    assert_eq!(tickets.len(), 1, "[{backend}] {tickets:?}");
    let t = &tickets[0];
    assert_eq!((t.vmid, t.sub.as_str(), t.aud.as_str()), (dev_vmid, a.id.as_str(), "zlh-console"), "[{backend}]");
    assert!(t.exp - t.iat <= 60, "a short-lived ticket: {t:?}");
    let opened = api.agent.seen_by(dev_vmid).into_iter().find(|s| s.path.starts_with("/console/stream")).unwrap();
    assert_eq!(opened.path, "/console/stream?mode=shell", "the mode reaches the agent");
    let offered = opened.header("sec-websocket-protocol").unwrap_or_default();
    assert!(offered.starts_with("zlh-console, zlh-ticket."), "[{backend}] {offered}");
    for (name, value) in &opened.headers {
        assert!(!value.contains(&a.token), "[{backend}] the session token reached the agent in {name}");
    }
    ws.close(None).await.unwrap();

    // Another container's console reaches that container's agent; a bearer header works too.
    let bearer = format!("Bearer {}", a.token);
    let (mut ws, _) = api
        .console_with_headers(&game, "", &[("authorization", &bearer), ("sec-websocket-protocol", "zlh-console")])
        .await
        .unwrap_or_else(|e| panic!("[{backend}] console refused: {e:?}"));
    ws.send(Message::text("say hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, format!("{game_vmid}: say hi"), "[{backend}]");
    assert_eq!(api.agent.tickets().last().map(|t| t.vmid), Some(game_vmid));
    assert!(api.agent.ticket_refusals().is_empty(), "{:?}", api.agent.ticket_refusals());
}

async fn another_users_session_is_refused(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let b = api.register("bob").await;
    let dev = api.create_dev(&a, "node").await;
    let vmid = api.wait_running(&a, &dev).await["vmid"].as_u64().unwrap() as u32;

    let refused = api.console(&dev, "", Some(&protocols(&b))).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.0, StatusCode::NOT_FOUND, "[{backend}] {refused:?}");
    let bearer = format!("Bearer {}", b.token);
    let refused = api.console_with_headers(&dev, "", &[("authorization", &bearer)]).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.0, StatusCode::NOT_FOUND, "[{backend}] {refused:?}");
    assert_eq!(console_requests(&api, vmid), 0, "[{backend}] B's console reached the agent");
    assert!(api.agent.tickets().is_empty(), "no ticket was issued for B");

    // B's own container is a different agent: A's session does not open it either.
    let own = api.create_dev(&b, "node").await;
    api.wait_running(&b, &own).await;
    let refused = api.console(&own, "", Some(&protocols(&a))).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.0, StatusCode::NOT_FOUND, "[{backend}]");
    let (mut ws, _) = api.console(&own, "", Some(&protocols(&b))).await.expect("B opens B's console");
    ws.send(Message::text("whoami")).await.unwrap();
    assert!(next_text(&mut ws).await.ends_with(": whoami"));
    assert_eq!(api.agent.tickets().iter().map(|t| t.sub.as_str()).collect::<Vec<_>>(), vec![b.id.as_str()]);
}

async fn a_socket_without_a_valid_session_is_refused(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let dev = api.create_dev(&a, "node").await;
    let vmid = api.wait_running(&a, &dev).await["vmid"].as_u64().unwrap() as u32;

    for offered in
        [None, Some("zlh-console"), Some("zlh-console, zlh-auth."), Some("zlh-console, zlh-auth.forged.token.x")]
    {
        let refused = api.console(&dev, "", offered).await.map(|_| ()).unwrap_err();
        assert_eq!(refused.0, StatusCode::UNAUTHORIZED, "[{backend}] {offered:?}: {refused:?}");
    }
    // A session that was signed out no longer opens anything.
    let (status, _) = api.send(Method::POST, "/api/auth/logout", Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK);
    let refused = api.console(&dev, "", Some(&protocols(&a))).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.0, StatusCode::UNAUTHORIZED, "[{backend}] a revoked session: {refused:?}");
    assert_eq!(console_requests(&api, vmid), 0, "[{backend}] a refused socket reached the agent");
    assert!(api.agent.tickets().is_empty());
}

on_both_backends!(tokio::test;
    the_console_echoes_through_the_agent_of_its_own_container,
    another_users_session_is_refused,
    a_socket_without_a_valid_session_is_refused,
);
