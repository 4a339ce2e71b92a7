//! The agent status poller at fleet size: 10,000 stand-in agents behind one local HTTP server,
//! 10 of them hung, polled in one round (the goal: every agent every 5 s).
//!
//! - `poller_round/baseline`: the least any poller must do: 10,000 authenticated `GET /status`
//!   requests, 256 in flight, bodies read, nothing parsed, the hung ones cut at the same timeout.
//! - `poller_round/zlh`: one `StatusPoller` round: the same requests, plus status parsing,
//!   last-seen bookkeeping and a result per agent to the sink.
//!
//! Printed after the group: the ratio of zlh to the baseline, and a round's absolute time against
//! the 5 s period.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use criterion::{criterion_group, Criterion};
use futures::StreamExt;
use serde_json::json;
use zlh_core::agent_client::{AgentClient, AgentClientConfig, PollTarget, PollerConfig, StatusPoller};
use zlh_core::container::AgentEndpoint;

const AGENTS: u32 = 10_000;
const HUNG: u32 = 10;
const IN_FLIGHT: usize = 256;
const TIMEOUT: Duration = Duration::from_millis(500);

fn token(vmid: u32) -> String {
    format!("token-{vmid}-0123456789abcdef0123456789")
}

async fn status(headers: HeaderMap) -> Response {
    let vmid = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer token-"))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u32>().ok());
    let Some(vmid) = vmid else { return StatusCode::UNAUTHORIZED.into_response() };
    if vmid < HUNG {
        std::future::pending::<()>().await;
    }
    Json(json!({"state": "running", "vmid": vmid, "provisioningComplete": true, "crashCount": 0,
                "runtime": {"id": "java", "version": "21.0.5", "path": "/opt/zlh/runtimes/java/current"}}))
    .into_response()
}

async fn fleet() -> url::Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().route("/status", get(status))).await.unwrap() });
    format!("http://{addr}/").parse().unwrap()
}

fn targets(base: &url::Url) -> Vec<PollTarget> {
    (0..AGENTS)
        .map(|vmid| PollTarget {
            vmid,
            endpoint: AgentEndpoint { agent_url: base.clone(), code_server: None },
            token: token(vmid),
        })
        .collect()
}

async fn baseline_round(client: &reqwest::Client, base: &url::Url) -> Duration {
    let began = Instant::now();
    let url = base.join("status").unwrap();
    futures::stream::iter(0..AGENTS)
        .map(|vmid| {
            let req = client.get(url.clone()).bearer_auth(token(vmid)).timeout(TIMEOUT).send();
            async move {
                if let Ok(r) = req.await {
                    let _ = r.bytes().await;
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<()>()
        .await;
    began.elapsed()
}

fn rounds(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let base = rt.block_on(fleet());
    let reqwest_client = reqwest::Client::builder().pool_max_idle_per_host(IN_FLIGHT).build().unwrap();
    let config = PollerConfig { interval: Duration::from_secs(5), max_in_flight: IN_FLIGHT, poll_timeout: TIMEOUT };
    let results = Arc::new(AtomicUsize::new(0));
    let sink = {
        let results = results.clone();
        Arc::new(move |_r: zlh_core::agent_client::PollResult| {
            results.fetch_add(1, Ordering::Relaxed);
        })
    };
    let client = AgentClient::new(AgentClientConfig::default()).unwrap();
    let all = targets(&base);
    let mut poller = StatusPoller::new(&client, config, Arc::new(move || all.clone()), sink);

    let mut group = c.benchmark_group("poller_round");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    let mut baseline_last = Duration::ZERO;
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    baseline_last = baseline_round(&reqwest_client, &base).await;
                    total += baseline_last;
                }
                total
            })
        })
    });
    let mut zlh_last = Duration::ZERO;
    group.bench_function("zlh", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let stats = poller.poll_round().await;
                    assert_eq!(stats.targets, AGENTS as usize);
                    assert_eq!(stats.offline, HUNG as usize, "the hung agents, and only they, are offline");
                    zlh_last = stats.elapsed;
                    total += stats.elapsed;
                }
                total
            })
        })
    });
    group.finish();
    assert!(results.load(Ordering::Relaxed) > 0);
    println!(
        "poller_round: last zlh round {zlh_last:?} vs baseline {baseline_last:?} (ratio {:.2}); period 5 s, {AGENTS} agents, {HUNG} hung",
        zlh_last.as_secs_f64() / baseline_last.as_secs_f64().max(1e-9)
    );
}

criterion_group!(benches, rounds);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    for name in ["poller_round"] {
        if let (Some(base), Some(zlh)) = (mean(name, "baseline"), mean(name, "zlh")) {
            println!("{name}: zlh / baseline = {:.3} ({:.3} s / {:.3} s mean)", zlh / base, zlh / 1e9, base / 1e9);
        }
    }
}

/// criterion's mean estimate (ns) of one benchmark of this run.
fn mean(group: &str, id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{dir}/criterion/{group}/{id}/new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}
