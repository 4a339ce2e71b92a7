//! The health lane: a connection admitted beyond the total cap ([`super::Admitted::health_lane`])
//! gets one request answered and is closed. Only the health route is served in full, so that
//! monitoring still sees a daemon whose connections are all taken; anything else gets a 503.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The longest a lane connection stays open (its request head and its answer), unless the head
/// timeout is shorter: a lane place held by a slow client is one monitoring cannot have.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// The answer to everything but the health route.
pub const BUSY_BODY: &str = r#"{"error":"too many connections; try again shortly"}"#;

/// What the lane answers with: the health route's body, or [`BUSY_BODY`]. One concrete type, as
/// a generic one leaves the connection's future unprovably `Send`.
pub type LaneBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Serves one HTTP/1 request on `stream` within `deadline`, then closes: `GET <health_path>` is
/// answered by `health` (the real route), anything else `503` with [`BUSY_BODY`].
pub async fn serve<F, Fut>(stream: TcpStream, deadline: Duration, health_path: &str, health: F)
where
    F: Fn(Request<Incoming>) -> Fut,
    Fut: Future<Output = Response<LaneBody>>,
{
    let service = hyper::service::service_fn(|req: Request<Incoming>| {
        let answer = (req.method() == Method::GET && req.uri().path() == health_path).then(|| health(req));
        async move {
            Ok::<_, Infallible>(match answer {
                Some(answer) => answer.await,
                None => busy(),
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(deadline, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "health lane connection ended with an error"),
        Err(_) => tracing::debug!("health lane connection closed at its deadline"),
    }
}

/// `body` as a [`LaneBody`].
pub fn lane_body<B>(body: B) -> LaneBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    body.map_err(Into::into).boxed_unsync()
}

fn busy() -> Response<LaneBody> {
    let body = Full::new(Bytes::from_static(BUSY_BODY.as_bytes())).map_err(|never| match never {}).boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}
