//! The API's HTTP server: accepts connections and serves each with hyper (HTTP/1.1 with
//! upgrades, or HTTP/2), every request going to the IDE front ([`crate::ide::Front`]) first.
//! A connection starts on the IDE's lean HTTP/1.1 path ([`zlh_core::ide::h1`]), which keeps it
//! while it carries plain requests for dev hosts and hands it to hyper at the first that is not.
//!
//! Why not `axum::serve`: dev-host requests are proxied to code-server, and axum's per-request
//! work (its make-service, router, body boxing, a shutdown watch polled with every wake-up) was a
//! fifth of the proxy's CPU (`benches/ide_proxy.rs`). Here a request for a dev host goes straight
//! from hyper to the proxy; everything else reaches the API's router as under `axum::serve`,
//! with the peer address as `ConnectInfo<SocketAddr>`.
//!
//! Connections over the caps per client address and in all are closed on arrival; one that
//! sends no complete request head within the head timeout is closed
//! ([`zlh_core::net::admission`]). A few beyond the total cap are served by the health lane
//! ([`zlh_core::net::health_lane`]): `GET /api/health` answered as ever, anything else a 503.
//!
//! Shutdown: the listener closes, every connection is told to finish the request it is serving
//! and close, and `serve` returns once all have.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use zlh_core::ide::h1::Served;
use zlh_core::net::{health_lane, AdmittingListener, ConnectionLimits, FirstRequest};

use crate::ide::Front;

/// Serves `front` on `listener` until `shutdown` resolves, then drains open connections.
/// Connections are capped per client address and in all, and must send their request heads in
/// time (`[connections]` of the API's config).
pub async fn serve(listener: TcpListener, front: Front, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let limits = front.app().config.connections.clone();
    let metrics = front.app().metrics.clone();
    let mut listener = AdmittingListener::new(listener, &limits).on_refused(move |r| metrics.connection_refused(r));
    let stop = Arc::new(Stop::default());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // WebSockets over HTTP/2 (RFC 8441), as under `axum::serve`.
    builder.http2().enable_connect_protocol();
    // Also the idle time between requests: hyper waits for the next head under the same timer.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.head_timeout);
    let builder = Arc::new(builder);
    let limits = Arc::new(limits);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer, admitted) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.as_mut() => break,
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        // Finished connections are reaped as new ones come, so the set stays as large as the
        // number open.
        while connections.try_join_next().is_some() {}
        if admitted.health_lane() {
            let deadline = health_lane::DEADLINE.min(limits.head_timeout);
            connections.spawn(async move {
                let health = |req| {
                    let front = front.clone();
                    async move { front.handle(req, peer).await }
                };
                health_lane::serve(stream, deadline, "/api/health", health).await;
                drop(admitted);
            });
            continue;
        }
        let builder = builder.clone();
        let watch = Watch::new(stop.clone());
        let limits = limits.clone();
        connections.spawn(async move {
            serve_connection(builder, stream, peer, front, watch, &limits).await;
            drop(admitted);
        });
    }
    drop(listener);
    stop.now();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection, until it closes (or, after shutdown, has finished its request).
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    front: Front,
    watch: Watch,
    limits: &ConnectionLimits,
) {
    // Plain requests for dev hosts take the IDE's lean path; from the first request that is not
    // one (the API's, a WebSocket, HTTP/2), hyper serves the connection.
    let stop = std::future::poll_fn(|cx| if watch.stopping(cx) { Poll::Ready(()) } else { Poll::Pending });
    let stream = match front.serve_lean(stream, peer, stop).await {
        Served::Closed => return,
        Served::Handover(rest) => rest,
    };
    let mut first = FirstRequest::new(limits.head_timeout);
    let seen = first.marker();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        seen.mark();
        let front = front.clone();
        async move { Ok::<_, Infallible>(front.handle(req, peer).await) }
    });
    let mut conn = std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    let mut told = false;
    let served = std::future::poll_fn(|cx| {
        if !told && watch.stopping(cx) {
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
}

/// The shutdown signal every connection watches: a flag and the wakers of the connections.
#[derive(Default)]
struct Stop {
    stopping: AtomicBool,
    watchers: Mutex<Vec<std::sync::Weak<AtomicWaker>>>,
}

impl Stop {
    fn now(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for w in self.watchers.lock().expect("stop lock").drain(..) {
            if let Some(w) = w.upgrade() {
                w.wake();
            }
        }
    }
}

/// One connection's view of [`Stop`]: checking it costs an atomic load and a waker
/// registration, not a lock, as it is checked at every wake-up of the connection.
struct Watch {
    stop: Arc<Stop>,
    waker: Arc<AtomicWaker>,
}

impl Watch {
    fn new(stop: Arc<Stop>) -> Self {
        let waker = Arc::new(AtomicWaker::new());
        let mut watchers = stop.watchers.lock().expect("stop lock");
        // Closed connections leave dead entries; sweep them as the list grows.
        if watchers.len() >= 64 && watchers.len().is_power_of_two() {
            watchers.retain(|w| w.strong_count() > 0);
        }
        watchers.push(Arc::downgrade(&waker));
        drop(watchers);
        Self { stop, waker }
    }

    fn stopping(&self, cx: &mut Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.stop.stopping.load(Ordering::SeqCst)
    }
}
