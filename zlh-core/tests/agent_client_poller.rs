//! The status poller against 1,000 stand-in agents behind one real HTTP server (each agent known
//! by its own bearer token): bounded concurrency, hung agents cost only their timeout, online and
//! last-seen from real answers, and rounds that never overlap.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use zlh_core::agent_client::{AgentClient, AgentClientConfig, PollResult, PollTarget, PollerConfig, StatusPoller};
use zlh_core::container::AgentEndpoint;

#[derive(Default)]
struct Fleet {
    hung: Mutex<HashSet<u32>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    answered: AtomicUsize,
}

/// Counts a request in flight for as long as its handler lives (a hung one until the client
/// gives up and the connection closes).
struct InFlight(Arc<Fleet>);

impl InFlight {
    fn new(fleet: &Arc<Fleet>) -> Self {
        let now = fleet.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        fleet.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(fleet.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn token(vmid: u32) -> String {
    format!("token-{vmid}-0123456789abcdef0123456789")
}

async fn status(State(fleet): State<Arc<Fleet>>, headers: HeaderMap) -> Response {
    let _guard = InFlight::new(&fleet);
    let vmid = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer token-"))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u32>().ok());
    let Some(vmid) = vmid else {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "bad token"}))).into_response();
    };
    if fleet.hung.lock().unwrap().contains(&vmid) {
        std::future::pending::<()>().await;
    }
    // Let requests overlap so the bound is actually exercised.
    tokio::task::yield_now().await;
    fleet.answered.fetch_add(1, Ordering::SeqCst);
    Json(json!({"state": "running", "vmid": vmid, "provisioningComplete": true})).into_response()
}

async fn fleet_server(fleet: Arc<Fleet>) -> url::Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route("/status", get(status)).with_state(fleet);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/").parse().unwrap()
}

fn targets(url: &url::Url, vmids: impl Iterator<Item = u32>) -> Vec<PollTarget> {
    vmids
        .map(|vmid| PollTarget {
            vmid,
            endpoint: AgentEndpoint { agent_url: url.clone(), code_server: None },
            token: token(vmid),
        })
        .collect()
}

fn client() -> AgentClient {
    AgentClient::new(AgentClientConfig::default()).unwrap()
}

type Collected = Arc<Mutex<Vec<PollResult>>>;

fn collecting_sink() -> (Collected, Arc<dyn Fn(PollResult) + Send + Sync>) {
    let results: Collected = Arc::default();
    let sink = {
        let results = results.clone();
        Arc::new(move |r: PollResult| results.lock().unwrap().push(r)) as Arc<dyn Fn(PollResult) + Send + Sync>
    };
    (results, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_agents_with_ten_hung_in_one_bounded_round() {
    let fleet = Arc::new(Fleet::default());
    let hung: HashSet<u32> = (0..10).map(|i| 1000 + i * 97).collect();
    *fleet.hung.lock().unwrap() = hung.clone();
    let url = fleet_server(fleet.clone()).await;
    let all = targets(&url, 1000..2000);
    let source = Arc::new(move || all.clone());
    let (results, sink) = collecting_sink();
    let timeout = Duration::from_millis(500);
    let config = PollerConfig { interval: Duration::from_secs(5), max_in_flight: 50, poll_timeout: timeout };
    let mut poller = StatusPoller::new(&client(), config, source, sink);

    let started = Instant::now();
    let stats = poller.poll_round().await;
    let elapsed = started.elapsed();
    assert!(elapsed >= timeout, "the hung agents were waited for: {elapsed:?}");
    assert!(elapsed < timeout + Duration::from_millis(1500), "one round costs about one timeout: {elapsed:?}");
    assert_eq!((stats.targets, stats.online, stats.offline), (1000, 990, 10));
    let max = fleet.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 50, "at most 50 polls in flight, saw {max}");
    assert!(max >= 10, "polls ran concurrently, saw at most {max}");

    let first: HashMap<u32, PollResult> = results.lock().unwrap().drain(..).map(|r| (r.vmid, r)).collect();
    assert_eq!(first.len(), 1000, "one result per agent");
    for (vmid, r) in &first {
        if hung.contains(vmid) {
            assert!(!r.online && r.status.is_none() && r.last_seen.is_none(), "{r:?}");
            assert!(r.error.as_deref().unwrap().contains("did not answer"), "{r:?}");
        } else {
            assert!(r.online, "{r:?}");
            assert_eq!(r.status.as_ref().unwrap().vmid, Some(*vmid));
            assert_eq!(r.last_seen, Some(r.checked_at));
        }
    }

    // Next round: the hung agents recover and one healthy agent hangs. It goes offline but keeps
    // the time it was last seen.
    *fleet.hung.lock().unwrap() = HashSet::from([1500]);
    let stats = poller.poll_round().await;
    assert_eq!((stats.online, stats.offline), (999, 1));
    let second: HashMap<u32, PollResult> = results.lock().unwrap().drain(..).map(|r| (r.vmid, r)).collect();
    let r = &second[&1500];
    assert!(!r.online);
    assert_eq!(r.last_seen, first[&1500].last_seen, "last seen in the first round");
    for vmid in &hung {
        assert!(second[vmid].online && second[vmid].last_seen.is_some(), "{:?}", second[vmid]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_never_overlap_when_a_round_outlasts_the_interval() {
    let fleet = Arc::new(Fleet::default());
    *fleet.hung.lock().unwrap() = HashSet::from([7]);
    let url = fleet_server(fleet.clone()).await;
    let listed = targets(&url, 1..=20);
    let issued = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicUsize::new(0));
    let overlapped = Arc::new(AtomicBool::new(false));
    let round_starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let third_round = Arc::new(tokio::sync::Notify::new());
    let source = {
        let (issued, delivered, overlapped) = (issued.clone(), delivered.clone(), overlapped.clone());
        let (round_starts, third_round) = (round_starts.clone(), third_round.clone());
        Arc::new(move || {
            // A round starts only once every result of the previous one is in.
            if delivered.load(Ordering::SeqCst) != issued.load(Ordering::SeqCst) {
                overlapped.store(true, Ordering::SeqCst);
            }
            issued.fetch_add(listed.len(), Ordering::SeqCst);
            let mut starts = round_starts.lock().unwrap();
            starts.push(Instant::now());
            if starts.len() == 3 {
                third_round.notify_one();
            }
            listed.clone()
        })
    };
    let sink = {
        let delivered = delivered.clone();
        Arc::new(move |_: PollResult| {
            delivered.fetch_add(1, Ordering::SeqCst);
        })
    };
    let timeout = Duration::from_millis(300);
    let config = PollerConfig { interval: Duration::from_millis(50), max_in_flight: 8, poll_timeout: timeout };
    let poller = StatusPoller::new(&client(), config, source, sink);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(poller.run(shutdown.clone()));

    tokio::time::timeout(Duration::from_secs(10), third_round.notified()).await.expect("three rounds started");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running).await.expect("run stops on shutdown").unwrap();

    assert!(!overlapped.load(Ordering::SeqCst), "a round started before the previous one ended");
    let starts = round_starts.lock().unwrap().clone();
    for pair in starts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= timeout, "rounds are spaced by the slow round, not the 50 ms interval: {gap:?}");
    }
    assert!(fleet.answered.load(Ordering::SeqCst) >= 38, "the other agents were polled every round");
}
