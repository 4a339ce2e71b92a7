//! The agent's HTTP server: hyper serving the router (HTTP/1.1 with upgrades for the console,
//! and HTTP/2), with the peer address as `ConnectInfo<SocketAddr>` as under `axum::serve`.
//! Not `axum::serve` itself: it caps no connections and keeps no deadline for request heads,
//! so clients that only open connections could use up the agent's descriptors.
//!
//! Connections come from an [`AdmittingListener`] (caps per client address and in all; a few
//! beyond the total are served by the health lane, [`zlh_core::net::health_lane`]: `GET /health`
//! answered as ever, anything else a 503). A
//! connection must send its first request head within the head timeout, and later heads within
//! it of the previous answer. Shutdown: the listener closes, every connection finishes the
//! request it is serving and closes, and `serve` returns once all have.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use zlh_core::net::{health_lane, AdmittingListener, ConnectionLimits, FirstRequest};

/// Serves `app` on `listener` until `shutdown` resolves, then drains open connections.
pub async fn serve(
    mut listener: AdmittingListener,
    app: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.head_timeout);
    let builder = Arc::new(builder);
    let stop = CancellationToken::new();
    let mut shutdown = pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer, admitted) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.as_mut() => break,
        };
        let _ = stream.set_nodelay(true);
        // Finished connections are reaped as new ones come.
        while connections.try_join_next().is_some() {}
        let (builder, app, stop, head_timeout) = (builder.clone(), app.clone(), stop.clone(), limits.head_timeout);
        if admitted.health_lane() {
            connections.spawn(async move {
                let deadline = health_lane::DEADLINE.min(head_timeout);
                let health = |req| {
                    let answer = route(&app, req, peer);
                    async move { answer.await.map(health_lane::lane_body) }
                };
                health_lane::serve(stream, deadline, "/health", health).await;
                drop(admitted);
            });
            continue;
        }
        connections.spawn(async move {
            let mut first = FirstRequest::new(head_timeout);
            let seen = first.marker();
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                seen.mark();
                let answer = route(&app, req, peer);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
            let mut stopping = pin!(stop.cancelled());
            let mut told = false;
            let served = std::future::poll_fn(|cx| {
                if !told && stopping.as_mut().poll(cx).is_ready() {
                    told = true;
                    conn.as_mut().graceful_shutdown();
                }
                if first.expired(cx) {
                    return Poll::Ready(Err("no request in time".into()));
                }
                conn.as_mut().poll(cx)
            });
            if let Err(e) = served.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(admitted);
        });
    }
    drop(listener);
    stop.cancel();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// `req` through the router, with the peer address as `ConnectInfo`.
fn route(
    app: &Router,
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
) -> impl Future<Output = axum::response::Response> + Send + 'static {
    let mut req = req.map(axum::body::Body::new);
    req.extensions_mut().insert(ConnectInfo(peer));
    let app = app.clone();
    async move { app.oneshot(req).await.unwrap_or_else(|never| match never {}) }
}
