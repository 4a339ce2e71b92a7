//! Clients that only open connections: one address gets its share of connections and no more
//! while everyone else (and its own established connections) is still answered; connections
//! that send no complete request head in time are closed; the daemon starts with its soft
//! open-files limit raised to the hard one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use zlh_apid::config::ApiConfig;
use zlh_apid::ide::IdeState;

const WAIT: Duration = Duration::from_secs(5);
const METRICS_TOKEN: &str = "metrics-token-metrics-token-0123";

async fn serve(config: ApiConfig) -> (SocketAddr, zlh_apid::db::testing::TestDb) {
    let t = zlh_apid::db::testing::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = zlh_apid::state::for_tests(t.db.clone(), config.clone());
    let ide = IdeState::new(&config, &[9u8; 32], addr.port()).unwrap();
    let front = zlh_apid::ide::front(zlh_apid::http::app(app.clone()), app, ide);
    tokio::spawn(zlh_apid::http::server::serve(listener, front, std::future::pending()));
    (addr, t)
}

/// A connection to `addr` from the loopback address `from` (all of 127/8 is this machine).
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends `request` and reads one answer (a `Content-Length` framed one, as the API's are).
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

const HEALTH: &str = "GET /api/health HTTP/1.1\r\nhost: api\r\n\r\n";

/// True once the server has closed `conn` (end of stream or a reset).
async fn closed(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(conn.read(&mut buf).await, Ok(0) | Err(_))
}

#[tokio::test]
async fn one_address_gets_its_share_of_connections_and_everyone_else_is_still_answered() {
    let mut config = ApiConfig { metrics_token: Some(METRICS_TOKEN.into()), ..ApiConfig::default() };
    config.connections.per_address = 20;
    let (addr, _db) = serve(config).await;

    // A client's session, established before the flood.
    let mut session = connect_from([127, 0, 0, 1], addr).await;
    assert!(ask(&mut session, HEALTH).await.starts_with("HTTP/1.1 200"));

    // The same address opens connections and sends nothing: 19 more fit under its cap...
    let mut idle = Vec::new();
    for _ in 0..19 {
        idle.push(connect_from([127, 0, 0, 1], addr).await);
    }
    // ...and the next ones are closed at once, long before any head timeout.
    for i in 0..10 {
        let mut extra = connect_from([127, 0, 0, 1], addr).await;
        let refused = tokio::time::timeout(WAIT, closed(&mut extra)).await;
        assert!(refused.is_ok_and(|c| c), "connection {} over the cap must be closed at once", 20 + i);
    }

    // The established session and other addresses are answered meanwhile.
    let started = Instant::now();
    assert!(ask(&mut session, HEALTH).await.starts_with("HTTP/1.1 200"));
    let mut other = connect_from([127, 0, 0, 2], addr).await;
    assert!(ask(&mut other, HEALTH).await.starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < WAIT);

    // The refusals are counted.
    let scrape = format!("GET /metrics HTTP/1.1\r\nhost: api\r\nauthorization: Bearer {METRICS_TOKEN}\r\n\r\n");
    let metrics = ask(&mut other, &scrape).await;
    assert!(metrics.contains("zlh_api_connections_refused_total{reason=\"per_address\"} 10"), "{metrics}");

    // Once its connections close, the address gets its places back.
    drop(idle);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = connect_from([127, 0, 0, 1], addr).await;
        // A refused connection is closed before it can be answered.
        let _ = again.write_all(HEALTH.as_bytes()).await;
        let mut buf = [0u8; 16];
        if matches!(again.read(&mut buf).await, Ok(n) if n > 0) {
            assert!(buf.starts_with(b"HTTP/1.1 200"));
            break;
        }
        assert!(Instant::now() < deadline, "closed connections must give their places back");
        tokio::task::yield_now().await;
    }
}

/// The body of an answer from [`ask`].
fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Much less than the health lane's deadline: a connection closed within it was refused.
const AT_ONCE: Duration = Duration::from_millis(1000);

#[tokio::test]
async fn with_every_connection_taken_health_is_still_answered_and_the_rest_told_to_retry() {
    let mut config = ApiConfig { metrics_token: Some(METRICS_TOKEN.into()), ..ApiConfig::default() };
    config.connections.max = 10;
    config.connections.per_address = 2;
    config.connections.health_reserve = 4;
    let (addr, _db) = serve(config).await;

    let mut session = connect_from([127, 0, 0, 1], addr).await;
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
    let answer = ask(&mut other, "GET /api/servers HTTP/1.1\r\nhost: api\r\n\r\n").await;
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
    let scrape = format!("GET /metrics HTTP/1.1\r\nhost: api\r\nauthorization: Bearer {METRICS_TOKEN}\r\n\r\n");
    let metrics = ask(&mut session, &scrape).await;
    assert!(metrics.contains("zlh_api_connections_refused_total{reason=\"per_address\"} 1"), "{metrics}");
    assert!(metrics.contains("zlh_api_connections_refused_total{reason=\"health_lane\"}"), "{metrics}");
    assert!(metrics.contains("zlh_api_connections_refused_total{reason=\"total\"}"), "{metrics}");
    drop((flood, lane, more));
}

#[tokio::test]
async fn a_connection_that_sends_no_complete_request_head_in_time_is_closed() {
    let head_timeout = Duration::from_millis(300);
    let mut config = ApiConfig::default();
    config.connections.head_timeout = head_timeout;
    let (addr, _db) = serve(config).await;

    let cases: [(&str, &[u8]); 4] = [
        ("nothing", b""),
        ("part of a head", b"GET /api/health HTTP/1.1\r\nhost: api\r\n"),
        ("part of an HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
        ("a full request, then part of the next head", b"GET /api/health HTTP/1.1\r\nhost: api\r\n\r\nGET /"),
    ];
    for (what, sent) in cases {
        let started = Instant::now();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(sent).await.unwrap();
        // Whatever answer a full request gets, then the close.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(head_timeout + WAIT, conn.read_to_end(&mut rest)).await;
        let took = started.elapsed();
        assert!(read.is_ok(), "{what}: still open after {took:?}");
        assert!(took >= head_timeout, "{what}: closed after {took:?}, before the head timeout");
    }

    // A connection that sends its request in time is answered.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    assert!(ask(&mut conn, HEALTH).await.starts_with("HTTP/1.1 200"));
}

/// `zlh-apid serve` started with a soft open-files limit below the hard one.
#[tokio::test]
async fn the_daemon_raises_its_soft_open_files_limit_to_the_hard_one() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.expect("a finite hard limit");
    let soft = 256.min(hard);
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -S -n {soft} && exec \"$0\" --log-format text serve"))
        .arg(env!("CARGO_BIN_EXE_zlh-apid"))
        .env("ZLH_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("ZLH_DATA_DIR", dir.path())
        .env("ZLH_CONTAINER_HOST", "mock")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut health = loop {
        if let Ok(conn) = TcpStream::connect(("127.0.0.1", port)).await {
            break conn;
        }
        assert!(child.try_wait().unwrap().is_none(), "zlh-apid exited");
        assert!(Instant::now() < deadline, "zlh-apid did not start listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(ask(&mut health, HEALTH).await.starts_with("HTTP/1.1 200"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, [hard.to_string(), hard.to_string()], "{line}");
}
