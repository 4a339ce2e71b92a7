//! The IDE proxy's lean path: plain HTTP/1.1 requests on a dev host, relayed between the browser
//! and code-server without turning either side's messages into `http` types.
//!
//! Most IDE traffic is plain requests for code-server's assets and API. Through hyper on both
//! legs (a `HeaderMap`, a request, a client dispatch channel and a body channel, each way) one
//! cost more CPU than nginx spends on it (`benches/ide_proxy.rs`). Here a request head is parsed
//! in place with httparse, checked by the caller's [`Gate`], written to code-server as bytes under
//! [`forwarding`]'s rules, and code-server's answer is relayed with its framing checked
//! (RFC 9112 §6.3).
//!
//! Only the unambiguous is taken: HTTP/1.1; an origin-form target of plain URI characters; one
//! `Host`; no `Transfer-Encoding`, `Expect` or `Upgrade`; a `Connection` naming only `keep-alive`
//! or `close`; at most one `Content-Length`, of at most [`MAX_BODY`] bytes. Any other request, and
//! any request the gate does not want (the API's own hosts), is handed with the bytes already read
//! to the full server ([`Served::Handover`]), which serves the connection from that request on. So
//! anything unusual meets hyper's rules, as it did before this path existed.
//!
//! Code-server is held to the same strictness: an answer whose framing is unclear (differing
//! `Content-Length`s, a transfer coding other than `chunked`, a `101` nobody asked for, a head
//! too large) becomes a 502 and its connection is not used again. A browser connection keeps the
//! code-server connection it last used while that stays fresh, as no other request needs it.

use std::future::Future;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use super::forwarding;
use super::proxy::{plain, Proxy, ProxyBody, ProxyConfig};
use crate::net::ConnectionLimits;

/// Largest request head taken here; a larger one is handed to the full server.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body taken here (read whole before forwarding); larger ones are streamed by
/// the full server.
pub const MAX_BODY: usize = 64 * 1024;
/// Most request headers taken here (the full server allows 100).
const MAX_HEADERS: usize = 64;
/// Largest head and most headers code-server's answer may have.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
/// A code-server connection idle this long is not reused: Node closes them at 5 s, and reusing
/// one near that moment races its close.
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);

/// Decides what becomes of each request the lean path takes.
pub trait Gate: Send + Sync {
    /// Checks one request (its body, if any, is already read).
    fn admit(&self, head: &Head<'_>) -> impl Future<Output = Admission> + Send;
    /// The answer's head went out: its status, and the time since the request was read.
    fn answered(&self, status: u16, took: Duration);
}

/// What the [`Gate`] decided.
pub enum Admission {
    /// Forward to this code-server (from the route table, never from the request).
    Forward(SocketAddr),
    /// Answer here: a refusal, a redirect. Its body is sent whole, so it must be small.
    Answer(Response<ProxyBody>),
    /// Not a request for this path: the full server takes the connection from this request on.
    Handover,
}

/// A request head as the browser sent it, checked to be one the lean path takes.
#[derive(Debug)]
pub struct Head<'a> {
    pub method: &'a str,
    /// Origin-form: path and query.
    pub target: &'a str,
    /// The one `Host`, visible ASCII.
    pub host: &'a str,
    pub peer: SocketAddr,
    /// The browser asked to close the connection after this answer.
    pub close: bool,
    headers: &'a [httparse::Header<'a>],
}

impl<'a> Head<'a> {
    pub fn path(&self) -> &'a str {
        self.target.split_once('?').map_or(self.target, |(path, _)| path)
    }

    pub fn query(&self) -> Option<&'a str> {
        self.target.split_once('?').map(|(_, query)| query)
    }

    /// The values of every header called `name` (any case), in order.
    pub fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }
}

/// How a connection the lean path served ended.
#[derive(Debug)]
pub enum Served {
    Closed,
    /// The full server is to serve the connection from here on, starting with the bytes read.
    Handover(Rewind),
}

/// A browser connection with the bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind {
    read: Bytes,
    stream: TcpStream,
}

impl Rewind {
    pub fn new(read: Bytes, stream: TcpStream) -> Self {
        Self { read, stream }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `client` (connected from `peer`) until it closes, times out, `stop` resolves while it
/// is between requests, or a request is not one for this path ([`Served::Handover`]).
/// `forwarded_proto` is the `X-Forwarded-Proto` code-server is told. A request head (with its
/// small body) is due within `limits.head_timeout`: from now for the first, from its first byte
/// for later ones, which may be `limits.idle_timeout` apart.
pub async fn serve<G: Gate>(
    mut client: TcpStream,
    peer: SocketAddr,
    gate: &G,
    proxy: &Proxy,
    forwarded_proto: &str,
    limits: &ConnectionLimits,
    stop: impl Future<Output = ()>,
) -> Served {
    let mut stop = pin!(stop);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut to_client: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut to_upstream: Vec<u8> = Vec::with_capacity(4 * 1024);
    let mut upstream: Option<Upstream> = None;
    // One timer for the connection, moved along: pushing a deadline later costs no timer-wheel
    // work in tokio, where a timer per request would.
    let mut timer = pin!(tokio::time::sleep(limits.head_timeout));
    // A new connection owes its first request head from the moment it was accepted, so one
    // that trickles bytes (or sends none) is closed as soon as one that sends nothing.
    let mut first = true;
    loop {
        if !first {
            let idle = if buf.is_empty() { limits.idle_timeout } else { limits.head_timeout };
            timer.as_mut().reset(Instant::now() + idle);
        }
        let (len, next) = loop {
            // Left uninitialised: httparse writes what it parses, and zeroing 2 KiB per request
            // showed in profiles.
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let wanted = match parse(&buf, &mut headers, peer) {
                Parse::Ready { head, head_len, len } if buf.len() >= len => {
                    // The request's timeouts, idle marks and metrics all count from this one reading.
                    let started = Instant::now();
                    let x = Exchange {
                        client: &mut client,
                        to_client: &mut to_client,
                        to_upstream: &mut to_upstream,
                        upstream: &mut upstream,
                        proxy,
                        gate,
                    };
                    let next = x.run(&head, &buf[head_len..len], forwarded_proto, timer.as_mut(), started).await;
                    break (len, next);
                }
                // The rest of a small body.
                Parse::Ready { len, .. } => len,
                Parse::Partial => MAX_HEAD,
                Parse::Other => return Served::Handover(Rewind::new(buf.freeze(), client)),
            };
            if buf.len() >= wanted {
                // A head larger than this path takes.
                return Served::Handover(Rewind::new(buf.freeze(), client));
            }
            buf.reserve((wanted - buf.len()).clamp(4096, 64 * 1024));
            let was_idle = buf.is_empty() && !first;
            tokio::select! {
                biased;
                read = client.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Served::Closed,
                    // A request has begun: its head is due within the head timeout.
                    Ok(_) if was_idle => timer.as_mut().reset(Instant::now() + limits.head_timeout),
                    Ok(_) => {}
                },
                () = timer.as_mut() => {
                    debug!(%peer, "no request in time: closing the connection");
                    return Served::Closed;
                }
                () = stop.as_mut(), if buf.is_empty() => return Served::Closed,
            }
        };
        first = false;
        match next {
            Next::KeepAlive => buf.advance(len),
            Next::Close => return Served::Closed,
            Next::Handover => return Served::Handover(Rewind::new(buf.freeze(), client)),
        }
    }
}

/// What the bytes read so far hold.
enum Parse<'a> {
    /// A request this path takes: its head's length, and its length with the body.
    Ready { head: Head<'a>, head_len: usize, len: usize },
    /// Not a whole head yet.
    Partial,
    /// Anything else: for the full server.
    Other,
}

/// Methods taken here; others (CONNECT, TRACE, extension methods) go to the full server.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

fn parse<'a>(buf: &'a [u8], headers: &'a mut [MaybeUninit<httparse::Header<'a>>], peer: SocketAddr) -> Parse<'a> {
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Other,
    };
    if head_len > MAX_HEAD {
        return Parse::Other;
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Other;
    };
    if !METHODS.contains(&method) || !plain_target(target) {
        return Parse::Other;
    }
    let mut host = None;
    let mut body = 0usize;
    let mut lengths = 0;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Parse::Other;
            }
            host = visible_ascii(h.value);
            if host.is_none() {
                return Parse::Other;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            match digits(h.value) {
                Some(n) if lengths == 1 && n <= MAX_BODY as u64 => body = n as usize,
                _ => return Parse::Other,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in forwarding::tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Parse::Other;
                }
            }
        } else if ["transfer-encoding", "expect", "upgrade", "http2-settings"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
        {
            return Parse::Other;
        }
    }
    let Some(host) = host else { return Parse::Other };
    let head = Head { method, target, host, peer, close, headers: req.headers };
    Parse::Ready { head, head_len, len: head_len + body }
}

/// Origin-form targets of RFC 3986 characters only (`%` escapes stay escaped). Anything else —
/// `*`, absolute URLs, quotes and brackets, non-ASCII — is the full server's to judge.
fn plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'/'
                        | b'?'
                        | b'%'
                )
        })
}

fn visible_ascii(v: &[u8]) -> Option<&str> {
    v.iter().all(|b| (0x21..0x7f).contains(b)).then(|| std::str::from_utf8(v).ok()).flatten()
}

/// A decimal number of 1 to 19 digits, nothing else (no sign, no spaces, no list).
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
    Handover,
}

/// A kept code-server connection and what has been read from it.
struct Upstream {
    target: SocketAddr,
    stream: TcpStream,
    buf: BytesMut,
    idle_since: Instant,
}

impl Upstream {
    /// Still good for the next request to `target`: the same code-server, not idle too long, and
    /// nothing arrived while idle (a close, or bytes nobody asked for).
    fn reusable_for(&mut self, target: SocketAddr, now: Instant) -> bool {
        if self.target != target || now.duration_since(self.idle_since) > UPSTREAM_IDLE || !self.buf.is_empty() {
            return false;
        }
        // Only a syscall when the reactor saw the socket become readable.
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Why code-server gave no usable answer head.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("no answer in time")]
    Timeout,
    #[error("closed before answering")]
    Closed,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// How code-server's answer body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: HEAD, 1xx, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until code-server closes the connection.
    UntilClose,
}

/// An answer head from code-server, already written out for the browser.
struct Answered {
    status: u16,
    framing: Framing,
    /// The code-server connection may serve another request after this answer.
    reusable: bool,
}

/// One request forwarded and answered.
struct Exchange<'x, G> {
    client: &'x mut TcpStream,
    to_client: &'x mut Vec<u8>,
    to_upstream: &'x mut Vec<u8>,
    upstream: &'x mut Option<Upstream>,
    proxy: &'x Proxy,
    gate: &'x G,
}

impl<G: Gate> Exchange<'_, G> {
    async fn run(
        mut self,
        head: &Head<'_>,
        body: &[u8],
        forwarded_proto: &str,
        timer: Pin<&mut Sleep>,
        started: Instant,
    ) -> Next {
        let target = match self.gate.admit(head).await {
            Admission::Forward(target) => target,
            Admission::Answer(response) => return self.answer(head, response, started).await,
            Admission::Handover => return Next::Handover,
        };
        write_request(self.to_upstream, head, body, forwarded_proto, self.proxy.config());
        // Only requests that change nothing may be sent again on a fresh connection.
        let idempotent = matches!(head.method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE");
        let answered = match self.send(head, target, idempotent, timer, started).await {
            Ok(a) => a,
            Err(e) => {
                *self.upstream = None;
                let page = match e {
                    SendError::Timeout => {
                        debug!(%target, "code-server did not answer in time");
                        plain(StatusCode::GATEWAY_TIMEOUT, "The IDE did not answer in time.")
                    }
                    SendError::Connect(ref why) => {
                        debug!(%target, error = %why, "code-server unreachable");
                        plain(StatusCode::BAD_GATEWAY, "The IDE is not reachable.")
                    }
                    e => {
                        warn!(%target, error = %e, "proxying to code-server failed");
                        plain(StatusCode::BAD_GATEWAY, "The IDE is not reachable.")
                    }
                };
                return self.answer(head, page, started).await;
            }
        };
        let up = self.upstream.as_mut().expect("a connection answered");
        let head_ready = started.elapsed();
        let mut sent_any = false;
        let relayed = relay(answered.framing, self.client, self.to_client, up, &mut sent_any).await;
        if sent_any {
            self.gate.answered(answered.status, head_ready);
        }
        match relayed {
            // Idle from the request's start: a little early, so never reused too late.
            Ok(()) if answered.reusable => up.idle_since = started,
            Ok(()) => *self.upstream = None,
            Err(Relay::Upstream(e)) => {
                warn!(%target, error = %e, "code-server's answer broke off");
                *self.upstream = None;
                if !sent_any {
                    let page = plain(StatusCode::BAD_GATEWAY, "The IDE is not reachable.");
                    return self.answer(head, page, started).await;
                }
                // The browser has a head and part of a body: only closing tells it so.
                return Next::Close;
            }
            Err(Relay::Client) => return Next::Close,
        }
        if head.close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Sends the request in `to_upstream` and reads the answer's head, writing the browser's
    /// version of it into `to_client`. A kept connection found closed before answering is
    /// replaced once, for requests that may be sent twice.
    async fn send(
        &mut self,
        head: &Head<'_>,
        target: SocketAddr,
        idempotent: bool,
        mut timer: Pin<&mut Sleep>,
        started: Instant,
    ) -> Result<Answered, SendError> {
        let config = self.proxy.config();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reused = self.upstream.as_mut().is_some_and(|up| up.reusable_for(target, started));
            if !reused {
                *self.upstream = Some(connect(target, config.connect_timeout).await?);
            }
            let up = self.upstream.as_mut().expect("just set");
            timer.as_mut().reset(started + config.response_timeout);
            let sent = match up.stream.write_all(self.to_upstream).await {
                Ok(()) => read_answer(up, head, self.to_client, &config.session_cookies, timer.as_mut()).await,
                Err(e) => Err(SendError::Io(e)),
            };
            match sent {
                // Closed with nothing said: the connection had died while kept.
                Err(SendError::Closed | SendError::Io(_)) if reused && attempt == 1 && idempotent => {
                    debug!(%target, "kept code-server connection was closed; opening a new one");
                    *self.upstream = None;
                }
                other => return other,
            }
        }
    }

    /// Sends one of zlh's own answers (small: sent whole).
    async fn answer(self, head: &Head<'_>, response: Response<ProxyBody>, started: Instant) -> Next {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let out = &mut *self.to_client;
        out.clear();
        status_line(out, parts.status.as_u16());
        for (name, value) in &parts.headers {
            if matches!(name.as_str(), "content-length" | "transfer-encoding" | "connection") {
                continue;
            }
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        let _ = write!(out, "content-length: {}\r\n", body.len());
        if head.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if head.method != "HEAD" {
            out.extend_from_slice(&body);
        }
        let written = self.client.write_all(out).await;
        out.clear();
        self.gate.answered(parts.status.as_u16(), started.elapsed());
        match written {
            Ok(()) if !head.close => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

async fn connect(target: SocketAddr, timeout: Duration) -> Result<Upstream, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
        Err(_) => return Err(SendError::Connect("timed out".into())),
    };
    let _ = stream.set_nodelay(true);
    Ok(Upstream { target, stream, buf: BytesMut::with_capacity(16 * 1024), idle_since: Instant::now() })
}

/// The request line and headers code-server gets, then the body.
fn write_request(out: &mut Vec<u8>, head: &Head<'_>, body: &[u8], proto: &str, config: &ProxyConfig) {
    out.clear();
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    header_line(out, b"host", head.host.as_bytes());
    let mut has_length = false;
    for h in head.headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            has_length = true;
        } else if !forwarding::request_header_stays_behind(h.name, connection_options(head)) {
            header_line(out, h.name.as_bytes(), h.value);
        }
    }
    if let Some(cookies) = forwarding::cookies_without(head.values("cookie"), &config.session_cookies) {
        header_line(out, b"cookie", &cookies);
    }
    let peer = head.peer.ip();
    let trusted = config.trusted_proxies.contains(peer);
    if let Some(chain) = forwarding::forwarded_for(head.values("x-forwarded-for"), Some(peer), trusted) {
        header_line(out, b"x-forwarded-for", &chain);
    }
    if let Some(ip) = forwarding::real_ip(head.values("x-real-ip"), Some(peer), trusted) {
        header_line(out, b"x-real-ip", &ip);
    }
    header_line(out, b"x-forwarded-proto", proto.as_bytes());
    header_line(out, b"x-forwarded-host", head.host.as_bytes());
    if has_length {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// What the request's `Connection` names: the lean path takes only `keep-alive` (hop-by-hop
/// anyway) and `close`, so no need to read the header again per header.
fn connection_options(head: &Head<'_>) -> impl Iterator<Item = &'static [u8]> {
    head.close.then_some(&b"close"[..]).into_iter()
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: u16) {
    let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
}

/// Reads code-server's answer head (passing over interim 1xx answers) and writes the browser's
/// version of it into `out`.
async fn read_answer(
    up: &mut Upstream,
    head: &Head<'_>,
    out: &mut Vec<u8>,
    session_cookies: &[String],
    mut timer: Pin<&mut Sleep>,
) -> Result<Answered, SendError> {
    let mut interim = false;
    loop {
        {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, &up.buf, &mut headers)
            {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(0);
                    if (100..200).contains(&status) {
                        if status == 101 {
                            return Err(SendError::Malformed("101 without an upgrade"));
                        }
                        interim = true;
                        up.buf.advance(len);
                        continue;
                    }
                    let answered = write_answer_head(out, &resp, head, session_cookies)?;
                    up.buf.advance(len);
                    return Ok(answered);
                }
                Ok(httparse::Status::Partial) if up.buf.len() < MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) => return Err(SendError::Malformed("head too large")),
                Err(_) => return Err(SendError::Malformed("unparsable head")),
            }
        }
        up.buf.reserve(8 * 1024);
        let nothing_yet = up.buf.is_empty() && !interim;
        tokio::select! {
            biased;
            read = up.stream.read_buf(&mut up.buf) => match read {
                Ok(0) if nothing_yet => return Err(SendError::Closed),
                Ok(0) => return Err(SendError::Malformed("closed within the head")),
                Ok(_) => {}
                Err(e) => return Err(SendError::Io(e)),
            },
            () = timer.as_mut() => return Err(SendError::Timeout),
        }
    }
}

/// Writes the browser's answer head for code-server's `resp` into `out`: hop-by-hop headers and
/// attempts to set zlh's cookies left out, the framing restated.
fn write_answer_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    head: &Head<'_>,
    session_cookies: &[String],
) -> Result<Answered, SendError> {
    let status = resp.code.unwrap_or(0);
    let headers = &*resp.headers;
    let values =
        |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let mut length: Option<u64> = None;
    for value in values("content-length") {
        for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            let n = digits(token).ok_or(SendError::Malformed("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Malformed("differing Content-Lengths"));
            }
            length = Some(n);
        }
    }
    let mut codings = values("transfer-encoding").flat_map(forwarding::tokens).peekable();
    let chunked = match codings.next() {
        None => false,
        Some(c) if c.eq_ignore_ascii_case(b"chunked") && codings.peek().is_none() => true,
        Some(_) => return Err(SendError::Malformed("unsupported transfer coding")),
    };
    // Read once, not once per header below.
    let mut connection: [&[u8]; 4] = [&[]; 4];
    let mut listed = 0;
    for value in values("connection") {
        *connection.get_mut(listed).ok_or(SendError::Malformed("too many Connection headers"))? = value;
        listed += 1;
    }
    let connection = &connection[..listed];
    let closes = resp.version != Some(1)
        || connection.iter().flat_map(|v| forwarding::tokens(v)).any(|t| t.eq_ignore_ascii_case(b"close"));
    let framing = if head.method == "HEAD" || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    // Both lengths given: the coding wins (RFC 9112 §6.3), and the connection is not trusted on.
    let reusable = !closes && framing != Framing::UntilClose && !(chunked && length.is_some());

    out.clear();
    status_line(out, status);
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length")
            || forwarding::is_hop_by_hop(name, connection.iter().copied())
            || (name.eq_ignore_ascii_case("set-cookie") && forwarding::sets_session_cookie(h.value, session_cookies))
        {
            continue;
        }
        header_line(out, name.as_bytes(), h.value);
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked | Framing::UntilClose => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A HEAD or 304 answer states the length a GET would have had.
        Framing::Empty => {
            if let (Some(n), false) = (length, status == 204) {
                let _ = write!(out, "content-length: {n}\r\n");
            }
        }
    }
    if head.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Answered { status, framing, reusable })
}

/// Where relaying an answer body broke.
enum Relay {
    /// Code-server's side: it closed early or broke the framing.
    Upstream(std::io::Error),
    /// The browser's side.
    Client,
}

fn malformed(why: &str) -> Relay {
    Relay::Upstream(std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned()))
}

/// Sends the head in `out`, then code-server's body as `framing` delimits it. Small bodies go in
/// the same write as the head.
/// `sent_any` says whether anything has reached the browser yet.
async fn relay(
    framing: Framing,
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    up: &mut Upstream,
    sent_any: &mut bool,
) -> Result<(), Relay> {
    let mut client = Flushing { client, sent_any };
    let client = &mut client;
    match framing {
        Framing::Empty => flush(client, out).await,
        Framing::Length(n) => {
            let mut left = n;
            loop {
                let take = (up.buf.len() as u64).min(left) as usize;
                out.extend_from_slice(&up.buf[..take]);
                up.buf.advance(take);
                left -= take as u64;
                flush(client, out).await?;
                if left == 0 {
                    return Ok(());
                }
                fill(up).await?;
            }
        }
        Framing::Chunked => relay_chunked(client, out, up).await,
        Framing::UntilClose => loop {
            if !up.buf.is_empty() {
                chunk(out, &up.buf);
                up.buf.clear();
            }
            flush(client, out).await?;
            up.buf.reserve(16 * 1024);
            match up.stream.read_buf(&mut up.buf).await {
                Ok(0) => {
                    out.extend_from_slice(b"0\r\n\r\n");
                    return flush(client, out).await;
                }
                Ok(_) => {}
                Err(e) => return Err(Relay::Upstream(e)),
            }
        },
    }
}

/// Re-frames code-server's chunked body for the browser, chunk by chunk; its trailers are
/// dropped.
async fn relay_chunked(client: &mut Flushing<'_>, out: &mut Vec<u8>, up: &mut Upstream) -> Result<(), Relay> {
    loop {
        let size = loop {
            match httparse::parse_chunk_size(&up.buf) {
                Ok(httparse::Status::Complete((used, size))) => {
                    up.buf.advance(used);
                    break size;
                }
                Ok(httparse::Status::Partial) if up.buf.len() < 4096 => {
                    flush(client, out).await?;
                    fill(up).await?;
                }
                _ => return Err(malformed("bad chunk size")),
            }
        };
        if size == 0 {
            // Trailer fields, then the blank line.
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                match httparse::parse_headers(&up.buf, &mut headers) {
                    Ok(httparse::Status::Complete((used, _))) => {
                        up.buf.advance(used);
                        break;
                    }
                    Ok(httparse::Status::Partial) if up.buf.len() < 16 * 1024 => {
                        flush(client, out).await?;
                        fill(up).await?;
                    }
                    _ => return Err(malformed("bad trailers")),
                }
            }
            out.extend_from_slice(b"0\r\n\r\n");
            return flush(client, out).await;
        }
        let _ = write!(out, "{size:x}\r\n");
        let mut left = size;
        while left > 0 {
            if up.buf.is_empty() {
                flush(client, out).await?;
                fill(up).await?;
            }
            let take = (up.buf.len() as u64).min(left) as usize;
            out.extend_from_slice(&up.buf[..take]);
            up.buf.advance(take);
            left -= take as u64;
            if out.len() >= 64 * 1024 {
                flush(client, out).await?;
            }
        }
        while up.buf.len() < 2 {
            flush(client, out).await?;
            fill(up).await?;
        }
        if &up.buf[..2] != b"\r\n" {
            return Err(malformed("chunk without its line end"));
        }
        up.buf.advance(2);
        out.extend_from_slice(b"\r\n");
    }
}

/// One chunk of `data` in chunked framing.
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The browser's connection while an answer is relayed, noting once something went out.
struct Flushing<'c> {
    client: &'c mut TcpStream,
    sent_any: &'c mut bool,
}

/// Writes `out` to the browser and empties it.
async fn flush(client: &mut Flushing<'_>, out: &mut Vec<u8>) -> Result<(), Relay> {
    if out.is_empty() {
        return Ok(());
    }
    *client.sent_any = true;
    let written = client.client.write_all(out).await;
    out.clear();
    written.map_err(|_| Relay::Client)
}

/// Reads more of code-server's answer; its end here is an error (the framing wanted more).
async fn fill(up: &mut Upstream) -> Result<(), Relay> {
    up.buf.reserve(16 * 1024);
    match up.stream.read_buf(&mut up.buf).await {
        Ok(0) => Err(malformed("closed within the body")),
        Ok(_) => Ok(()),
        Err(e) => Err(Relay::Upstream(e)),
    }
}
