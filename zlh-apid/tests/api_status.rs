//! A server's agent status when the agent stops answering, over real HTTP on SQLite and
//! PostgreSQL: the poller marks it offline and the API shows the last snapshot as stale, with its
//! age, instead of passing off a gone process as running.

#[macro_use]
mod api_support;

use std::time::{Duration, Instant};

use api_support::{TestApi, DEADLINE};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use zlh_apid::servers::{poll, repo};

/// Polls the server's row until `pred` holds (bounded).
async fn wait_row(api: &TestApi, id: &str, what: &str, pred: impl Fn(&repo::Server) -> bool) -> repo::Server {
    let started = Instant::now();
    loop {
        let s = repo::get(&api.state.db, id).await.unwrap().expect("the server");
        if pred(&s) {
            return s;
        }
        assert!(started.elapsed() < DEADLINE, "[{}] {id} never got {what}: {s:?}", api.backend);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn an_agent_that_stops_answering_shows_a_stale_status_with_its_age(api: TestApi) {
    let backend = api.backend;
    let a = api.register("alice").await;
    let id = api.create_game(&a).await;
    let v = api.wait_running(&a, &id).await;
    assert_eq!(
        (&v["stale"], &v["staleSecs"], &v["agent"]["stale"]),
        (&Value::Bool(false), &Value::Null, &Value::Bool(false)),
        "[{backend}] {v}"
    );
    assert_eq!(v["agent"]["state"], "running", "{v}");

    let shutdown = CancellationToken::new();
    poll::spawn(api.state.clone(), Duration::from_millis(20), shutdown.clone());
    wait_row(&api, &id, "polled online", |s| s.agent_status == "online" && s.agent_last_seen.is_some()).await;

    // The agent's process is gone: its port refuses connections.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    sqlx::query("UPDATE servers SET agent_url = $1 WHERE id = $2")
        .bind(format!("http://{dead}/"))
        .bind(&id)
        .execute(api.state.db.pool())
        .await
        .unwrap();
    let row = wait_row(&api, &id, "polled offline", |s| s.agent_status == "offline").await;
    shutdown.cancel();
    // It was last seen 42 s ago (the poller keeps that time while the agent is offline).
    let seen = row.agent_last_seen.unwrap() - 42_000;
    sqlx::query("UPDATE servers SET agent_last_seen = $1 WHERE id = $2")
        .bind(seen)
        .bind(&id)
        .execute(api.state.db.pool())
        .await
        .unwrap();

    let (status, v) = api.send(Method::GET, &format!("/api/servers/{id}/status"), Some(&a.token), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["agentStatus"], "offline", "[{backend}] {v}");
    assert_eq!(v["stale"], true, "[{backend}] {v}");
    let age = v["staleSecs"].as_i64().unwrap_or_else(|| panic!("an age: {v}"));
    assert!((42..60).contains(&age), "[{backend}] staleSecs {age}: {v}");
    assert_eq!(v["agentLastSeen"].as_i64(), Some(seen), "{v}");
    assert_eq!(
        (v["agent"]["state"].as_str(), &v["agent"]["stale"]),
        (Some("running"), &Value::Bool(true)),
        "the last snapshot, marked: {v}"
    );

    // The list and the server's own page say the same.
    let (_, shown) = api.send(Method::GET, &format!("/api/servers/{id}"), Some(&a.token), None).await;
    assert_eq!(
        (&shown["stale"], shown["staleSecs"].as_i64().is_some_and(|s| s >= 42)),
        (&Value::Bool(true), true),
        "{shown}"
    );
    let (_, list) = api.send(Method::GET, "/api/servers", Some(&a.token), None).await;
    assert_eq!(list["servers"][0]["stale"], true, "{list}");
}

on_both_backends!(tokio::test;
    an_agent_that_stops_answering_shows_a_stale_status_with_its_age,
);
