//! Keep-alive HTTP/1.1 connections to code-servers: an idle list per address.
//!
//! Each connection is driven by the request that uses it, in that request's own task: the
//! request future polls the connection while it waits for the answer's head, and the answer's
//! body ([`Returning`]) polls it while it streams, then hands it back to the pool once read to
//! the end. No task per connection and no hand-over between tasks per request: that hand-over
//! (hyper-util's pooled client, or hyper's connection spawned on its own) cost about a fifth of
//! the proxy's requests/s (`benches/ide_proxy.rs`).
//!
//! A connection is reused only after its response was read to the end; one whose body was
//! dropped early or that failed is never put back. A WebSocket upgrade gets its connection
//! spawned on a task of its own, as the joined tunnel outlives the request.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::proxy::ProxyBody;

/// Past this many addresses with idle connections, stale ones are swept out.
const SWEEP_AT: usize = 1024;

/// One HTTP/1.1 connection to a code-server: the request side and the connection's IO state,
/// kept together so whoever uses the one drives the other.
pub struct Upstream {
    sender: SendRequest<ProxyBody>,
    /// `None` once the connection has ended; dropping it fails any request still waiting.
    conn: Option<Connection<TokioIo<TcpStream>, ProxyBody>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("open", &self.conn.is_some()).finish()
    }
}

impl Upstream {
    /// Moves the connection's IO along (writes the request, reads the answer). Returns `false`
    /// once the connection has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else { return false };
        if let Poll::Ready(r) = Pin::new(conn).poll(cx) {
            if let Err(e) = r {
                debug!(error = %e, "code-server connection ended");
            }
            self.conn = None;
            return false;
        }
        true
    }

    /// Waits until the connection can take a request; `false` if it has ended instead.
    async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            if !self.drive(cx) {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Sends `req` and waits for the answer's head, driving the connection meanwhile. A request
    /// that never went out (the connection was found closed) is handed back in the error.
    pub async fn send(
        &mut self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<ProxyBody>>> {
        let mut answer = pin!(self.sender.try_send_request(req));
        poll_fn(|cx| {
            self.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await
    }

    /// From now on the connection runs on a task of its own, with upgrades: for a WebSocket,
    /// whose tunnel outlives the request that opened it.
    pub fn spawn_with_upgrades(&mut self, target: SocketAddr) {
        if let Some(conn) = self.conn.take() {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(%target, error = %e, "code-server connection ended");
                }
            });
        }
    }
}

#[derive(Debug)]
struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// Idle connections by code-server address.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_target: usize,
}

/// A connection checked out for one request.
#[derive(Debug)]
pub struct Conn {
    pub upstream: Upstream,
    /// It served a request before: if it turns out closed, a fresh one may be tried.
    pub reused: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connecting to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle_per_target: usize) -> Self {
        Self { idle: Mutex::new(HashMap::new()), connect_timeout, idle_timeout, max_idle_per_target }
    }

    /// An idle connection to `target` that is still open, else a new one.
    pub async fn checkout(&self, target: SocketAddr) -> Result<Conn, ConnectError> {
        while let Some(mut idle) = self.pop(target) {
            if idle.since.elapsed() > self.idle_timeout {
                continue;
            }
            // Finishes what the last answer left (keep-alive bookkeeping) and notices a close
            // that arrived while it was idle. Nearly always ready at once: no timer then.
            let ready = match futures::FutureExt::now_or_never(idle.upstream.ready()) {
                Some(ready) => ready,
                None => tokio::time::timeout(self.connect_timeout, idle.upstream.ready()).await.unwrap_or(false),
            };
            if ready {
                return Ok(Conn { upstream: idle.upstream, reused: true });
            }
        }
        // Boxed: connecting is the rare path, and would enlarge every request's future.
        Box::pin(self.connect(target)).await
    }

    /// A new connection to `target`.
    pub async fn connect(&self, target: SocketAddr) -> Result<Conn, ConnectError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| ConnectError::Timeout(target))?
            .map_err(|e| ConnectError::Io(target, e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(target, e))?;
        Ok(Conn { upstream: Upstream { sender, conn: Some(conn) }, reused: false })
    }

    fn pop(&self, target: SocketAddr) -> Option<Idle> {
        self.idle.lock().expect("pool lock").get_mut(&target)?.pop()
    }

    /// Puts a connection whose response was read to the end back for the next request.
    fn checkin(&self, target: SocketAddr, upstream: Upstream) {
        if upstream.conn.is_none() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() >= SWEEP_AT && !idle.contains_key(&target) {
            let timeout = self.idle_timeout;
            idle.retain(|_, list| {
                list.retain(|c| now.duration_since(c.since) <= timeout);
                !list.is_empty()
            });
        }
        let list = idle.entry(target).or_default();
        if list.len() < self.max_idle_per_target {
            list.push(Idle { upstream, since: now });
        }
    }

    /// Idle connections kept for `target` now.
    pub fn idle(&self, target: SocketAddr) -> usize {
        self.idle.lock().expect("pool lock").get(&target).map_or(0, Vec::len)
    }
}

/// A response body that drives its connection while it streams and gives it back to the pool
/// once read to the end.
pub struct Returning {
    inner: Incoming,
    back: Option<(Arc<Pool>, SocketAddr, Upstream)>,
}

impl Returning {
    pub fn new(inner: Incoming, pool: Arc<Pool>, target: SocketAddr, upstream: Upstream) -> Self {
        let mut body = Self { inner, back: Some((pool, target, upstream)) };
        // An empty body (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }

    fn give_back(&mut self) {
        if let Some((pool, target, upstream)) = self.back.take() {
            pool.checkin(target, upstream);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some((_, _, upstream)) = this.back.as_mut() {
            // Reads the body off the socket into `inner`.
            upstream.drive(cx);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            // A broken connection is not reused: dropping it closes it.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
