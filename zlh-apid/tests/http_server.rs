//! The API's own HTTP server (`http::server::serve`) over real TCP: the peer address reaches
//! the API, and a shutdown finishes the request in flight, closes idle connections and returns.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zlh_apid::config::ApiConfig;
use zlh_apid::ide::IdeState;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_closes_idle_connections_and_returns() {
    let t = zlh_apid::db::testing::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ApiConfig::default();
    let app = zlh_apid::state::for_tests(t.db.clone(), config.clone());
    let ide = IdeState::new(&config, &[9u8; 32], addr.port()).unwrap();
    let front = zlh_apid::ide::front(zlh_apid::http::app(app.clone()), app, ide);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(zlh_apid::http::server::serve(listener, front, async move {
        let _ = stopped.await;
    }));

    // An idle kept-alive connection, after one answered request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /api/health HTTP/1.1\r\nhost: api\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));

    // A request whose body is still on its way: `100 Continue` says the API is reading it.
    let body = br#"{"identifier":"nobody@example.com","password":"not-the-password"}"#;
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/auth/login HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(WAIT, busy.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100 Continue"), "{}", String::from_utf8_lossy(&buf[..n]));
    busy.write_all(&body[..10]).await.unwrap();

    stop.send(()).unwrap();
    // The listener closes first: once new connections are refused, shutdown has begun.
    tokio::time::timeout(WAIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener closes");

    // The idle connection is closed by the server.
    let n = tokio::time::timeout(WAIT, idle.read(&mut buf)).await.expect("idle connection closed").unwrap_or(0);
    assert_eq!(n, 0, "an idle connection gets no more answers");

    // The request in flight still gets its answer (a refused login), and then the connection ends.
    busy.write_all(&body[10..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, busy.read_to_end(&mut answer)).await.expect("answer, then close").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    tokio::time::timeout(WAIT, server).await.expect("serve returns once connections are done").unwrap().unwrap();
}
