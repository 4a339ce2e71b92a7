//! The relays to a server's agent (files, mods, runtimes, power, console), on SQLite and
//! PostgreSQL: only a running server's agent is asked. A server still provisioning or being
//! deleted answers 409 saying so, rather than a 502 for an agent that is simply not up yet.

#[macro_use]
mod api_support;

use api_support::TestApi;
use reqwest::{Method, StatusCode};
use serde_json::json;
use zlh_apid::servers::repo::{self, state, Kind};

async fn only_a_running_servers_agent_is_asked(api: TestApi) {
    let user = api.register("early").await;
    let vmid = 5000;
    let s = repo::insert(&api.state.db, &user.id, Kind::Game, "g", "basic", &json!({})).await.unwrap();
    repo::set_vmid(&api.state.db, &s.id, vmid).await.unwrap();
    repo::set_endpoint(&api.state.db, &s.id, api.agent.endpoint(vmid).agent_url.as_str(), None).await.unwrap();
    let files = format!("/api/servers/{}/files/list?path=", s.id);
    let power = format!("/api/servers/{}/game/start", s.id);
    for (server_state, says) in [(state::PROVISIONING, "still being provisioned"), (state::DELETING, "being deleted")] {
        repo::set_state(&api.state.db, &s.id, server_state, None).await.unwrap();
        for (method, path) in [(Method::GET, &files), (Method::POST, &power)] {
            let (status, body) = api.send(method.clone(), path, Some(&user.token), None).await;
            assert_eq!(status, StatusCode::CONFLICT, "[{}] {server_state}: {method} {path}: {body}", api.backend);
            assert!(body["error"].as_str().unwrap().contains(says), "{body}");
        }
        let protocols = format!("zlh-console, zlh-auth.{}", user.token);
        let refused = api.console(&s.id, "", Some(&protocols)).await.map(|_| ()).unwrap_err();
        assert_eq!(refused.0, StatusCode::CONFLICT, "[{}] {server_state}: console: {}", api.backend, refused.1);
    }
    assert!(api.agent.seen_by(vmid).is_empty(), "{:?}", api.agent.seen_by(vmid));
    // Running, the same requests reach the agent.
    repo::set_state(&api.state.db, &s.id, state::RUNNING, None).await.unwrap();
    let (status, body) = api.send(Method::GET, &files, Some(&user.token), None).await;
    assert_eq!(status, StatusCode::OK, "[{}] {body}", api.backend);
    assert!(!api.agent.seen_by(vmid).is_empty());
}

on_both_backends!(tokio::test; only_a_running_servers_agent_is_asked);
