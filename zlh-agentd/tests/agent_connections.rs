//! Clients that only open connections to the real agent: one address gets its share of
//! connections and no more while its established session and other addresses are answered;
//! connections that send no complete request head in time are closed; the agent starts with
//! its soft open-files limit raised to the hard one.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(5);
const HEALTH: &str = "GET /health HTTP/1.1\r\nhost: agent\r\n\r\n";

/// A connection to `addr` from the loopback address `from` (all of 127/8 is this machine).
async fn try_connect_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(addr).await
}

async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    try_connect_from(from, addr).await.unwrap()
}

/// Sends `request` and reads one `Content-Length` framed answer.
async fn ask(conn: &mut TcpStream, request: &str) -> String {
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before answering: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.parse().unwrap()))
                    .unwrap_or(0);
                if body.len() >= len {
                    return text.into_owned();
                }
            }
        }
    })
    .await
    .expect("an answer in time")
}

/// True once the agent has closed `conn` (end of stream or a reset).
async fn closed(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(conn.read(&mut buf).await, Ok(0) | Err(_))
}

#[tokio::test]
async fn one_address_gets_its_share_of_connections_and_the_open_files_limit_is_raised() {
    let fx = Fixture::new().await;
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.expect("a finite hard limit");
    let env = [("ZLH_AGENT_MAX_CONNECTIONS_PER_ADDRESS", "20")];
    let agent = Agent::start_limited(&fx, "flood", &env, Some(256.min(hard)));
    let addr = SocketAddr::from(([127, 0, 0, 1], agent.port));
    // Up once it accepts connections; asked from another address than the flood's.
    let deadline = Instant::now() + Duration::from_secs(60);
    while try_connect_from([127, 0, 0, 3], addr).await.is_err() {
        assert!(Instant::now() < deadline, "agent not up: {}", agent.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, [hard.to_string(), hard.to_string()], "soft limit raised to the hard one: {line}");

    let mut session = connect_from([127, 0, 0, 1], addr).await;
    assert!(ask(&mut session, HEALTH).await.starts_with("HTTP/1.1 200"));
    let mut idle = Vec::new();
    for _ in 0..19 {
        idle.push(connect_from([127, 0, 0, 1], addr).await);
    }
    for i in 0..10 {
        let mut extra = connect_from([127, 0, 0, 1], addr).await;
        let refused = tokio::time::timeout(WAIT, closed(&mut extra)).await;
        assert!(refused.is_ok_and(|c| c), "connection {} over the cap must be closed at once", 20 + i);
    }

    assert!(ask(&mut session, HEALTH).await.starts_with("HTTP/1.1 200"), "the established session still answers");
    let mut other = connect_from([127, 0, 0, 2], addr).await;
    assert!(ask(&mut other, HEALTH).await.starts_with("HTTP/1.1 200"), "another address is answered");
    let scrape = format!("GET /metrics HTTP/1.1\r\nhost: agent\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
    let metrics = ask(&mut other, &scrape).await;
    assert!(metrics.contains("zlh_agent_connections_refused_total{reason=\"per_address\"} 10"), "{metrics}");
    drop(idle);
}

/// The body of an answer from [`ask`].
fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Much less than the health lane's deadline: a connection closed within it was refused.
const AT_ONCE: Duration = Duration::from_millis(1000);

#[tokio::test]
async fn with_every_connection_taken_health_is_still_answered_and_the_rest_told_to_retry() {
    let fx = Fixture::new().await;
    let env = [
        ("ZLH_AGENT_MAX_CONNECTIONS", "10"),
        ("ZLH_AGENT_MAX_CONNECTIONS_PER_ADDRESS", "2"),
        ("ZLH_AGENT_HEALTH_RESERVE", "4"),
    ];
    let agent = Agent::start(&fx, "lane", &env);
    let addr = SocketAddr::from(([127, 0, 0, 1], agent.port));
    // The client's session: the first connection once the agent is up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut session = loop {
        if let Ok(conn) = try_connect_from([127, 0, 0, 1], addr).await {
            break conn;
        }
        assert!(Instant::now() < deadline, "agent not up: {}", agent.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let healthy = ask(&mut session, HEALTH).await;
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
    // A flood from many addresses takes the other 9 places of the total.
    let mut flood = Vec::new();
    for i in 0..9 {
        flood.push(connect_from([127, 0, 0, 2 + i / 2], addr).await);
    }

    // A new connection's health check is answered as the route answers it, then closed.
    let mut monitor = connect_from([127, 0, 0, 7], addr).await;
    let answer = ask(&mut monitor, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(body(&answer), body(&healthy));
    assert!(tokio::time::timeout(WAIT, closed(&mut monitor)).await.is_ok_and(|c| c), "one request, then closed");
    // Any other request is told to come back.
    let mut other = connect_from([127, 0, 0, 8], addr).await;
    let answer = ask(&mut other, "GET /status HTTP/1.1\r\nhost: agent\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    assert_eq!(body(&answer), r#"{"error":"too many connections; try again shortly"}"#);

    // One address gets no more of the lane than its share...
    let lane = [connect_from([127, 0, 0, 9], addr).await, connect_from([127, 0, 0, 9], addr).await];
    let mut third = connect_from([127, 0, 0, 9], addr).await;
    assert!(tokio::time::timeout(AT_ONCE, closed(&mut third)).await.is_ok_and(|c| c), "over the address's cap");
    // ...and beyond the total and the lane, connections are closed at once.
    let more = [connect_from([127, 0, 0, 10], addr).await, connect_from([127, 0, 0, 10], addr).await];
    let mut beyond = connect_from([127, 0, 0, 11], addr).await;
    assert!(tokio::time::timeout(AT_ONCE, closed(&mut beyond)).await.is_ok_and(|c| c), "beyond total and lane");

    // The established session is served in full all along.
    assert!(ask(&mut session, HEALTH).await.starts_with("HTTP/1.1 200"));
    let scrape = format!("GET /metrics HTTP/1.1\r\nhost: agent\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
    let metrics = ask(&mut session, &scrape).await;
    assert!(metrics.contains("zlh_agent_connections_refused_total{reason=\"per_address\"} 1"), "{metrics}");
    assert!(metrics.contains("zlh_agent_connections_refused_total{reason=\"health_lane\"}"), "{metrics}");
    assert!(metrics.contains("zlh_agent_connections_refused_total{reason=\"total\"}"), "{metrics}");
    drop((flood, lane, more));
}

#[tokio::test]
async fn a_connection_that_sends_no_complete_request_head_in_time_is_closed() {
    let fx = Fixture::new().await;
    let head_timeout = Duration::from_millis(300);
    let mut agent = Agent::start(&fx, "slow", &[("ZLH_AGENT_HEAD_TIMEOUT_MS", "300")]);
    agent.ready().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], agent.port));

    let cases: [(&str, &[u8]); 4] = [
        ("nothing", b""),
        ("part of a head", b"GET /health HTTP/1.1\r\nhost: agent\r\n"),
        ("part of an HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
        ("a full request, then part of the next head", b"GET /health HTTP/1.1\r\nhost: agent\r\n\r\nGET /"),
    ];
    for (what, sent) in cases {
        let started = Instant::now();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(head_timeout + WAIT, conn.read_to_end(&mut rest)).await;
        let took = started.elapsed();
        assert!(read.is_ok(), "{what}: still open after {took:?}");
        assert!(took >= head_timeout, "{what}: closed after {took:?}, before the head timeout");
    }
}
