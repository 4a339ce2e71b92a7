//! Keep-alive HTTP/1.1 connections to code-servers: an idle list per address.
//!
//! Why not hyper-util's pooled client: to put a connection back it spawns a task per request
//! that waits for the connection to become idle. Here the response body hands its connection
//! back when it ends ([`Returning`]), which is most of what made the IDE proxy slower than nginx
//! (`benches/ide_proxy.rs`).
//!
//! A connection is reused only after its response was read to the end; one whose body was
//! dropped early, that failed, or that was upgraded to a WebSocket is never put back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use super::proxy::ProxyBody;

/// Past this many addresses with idle connections, closed ones are swept out.
const SWEEP_AT: usize = 1024;

#[derive(Debug)]
struct Idle {
    sender: SendRequest<ProxyBody>,
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
    pub sender: SendRequest<ProxyBody>,
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
            if idle.sender.is_closed() || idle.since.elapsed() > self.idle_timeout {
                continue;
            }
            // Handed back as its body ended; the connection may need a moment to be ready.
            if let Ok(Ok(())) = tokio::time::timeout(self.connect_timeout, idle.sender.ready()).await {
                return Ok(Conn { sender: idle.sender, reused: true });
            }
        }
        // Boxed: connecting is the rare path, and would enlarge every request's future.
        Box::pin(self.connect(target)).await
    }

    /// A new connection to `target`, driven by a task of its own until either side closes it.
    pub async fn connect(&self, target: SocketAddr) -> Result<Conn, ConnectError> {
        let stream = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(target))
            .await
            .map_err(|_| ConnectError::Timeout(target))?
            .map_err(|e| ConnectError::Io(target, e))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(target, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%target, error = %e, "code-server connection ended");
            }
        });
        Ok(Conn { sender, reused: false })
    }

    fn pop(&self, target: SocketAddr) -> Option<Idle> {
        self.idle.lock().expect("pool lock").get_mut(&target)?.pop()
    }

    /// Puts a connection whose response was read to the end back for the next request.
    fn checkin(&self, target: SocketAddr, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() >= SWEEP_AT && !idle.contains_key(&target) {
            idle.retain(|_, list| {
                list.retain(|c| !c.sender.is_closed());
                !list.is_empty()
            });
        }
        let list = idle.entry(target).or_default();
        if list.len() < self.max_idle_per_target {
            list.push(Idle { sender, since: Instant::now() });
        }
    }

    /// Idle connections kept for `target` now.
    pub fn idle(&self, target: SocketAddr) -> usize {
        self.idle.lock().expect("pool lock").get(&target).map_or(0, Vec::len)
    }
}

/// A response body that gives its connection back to the pool once read to the end.
pub struct Returning {
    inner: Incoming,
    back: Option<(Arc<Pool>, SocketAddr, SendRequest<ProxyBody>)>,
}

impl Returning {
    pub fn new(inner: Incoming, pool: Arc<Pool>, target: SocketAddr, sender: SendRequest<ProxyBody>) -> Self {
        let mut body = Self { inner, back: Some((pool, target, sender)) };
        // An empty body (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }

    fn give_back(&mut self) {
        if let Some((pool, target, sender)) = self.back.take() {
            pool.checkin(target, sender);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            // A broken connection is not reused: dropping the sender lets it close.
            Poll::Ready(Some(Err(_))) => self.back = None,
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
