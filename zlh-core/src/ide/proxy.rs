//! The reverse proxy between a browser and one container's code-server: HTTP/1.1 and WebSocket.
//!
//! The caller (zlh-apid) authorises the request and resolves the target from the route table;
//! this module only forwards. What code-server sees:
//! - `Host` and `Origin` as the browser sent them, so its own origin check passes;
//! - no `Authorization` and none of zlh's session cookies (its own cookies pass untouched);
//! - `X-Forwarded-For` (the client appended), `X-Forwarded-Proto` and `X-Forwarded-Host` set by
//!   the proxy, never taken from the client;
//! - no hop-by-hop headers.
//!
//! Bodies stream both ways in constant memory. The request body is capped
//! ([`ProxyConfig::body_limit`]); code-server must start answering within
//! [`ProxyConfig::response_timeout`] of the request body's end. Upstream failures become short
//! plain-text pages (502, 504) that say nothing about the container. A WebSocket upgrade is
//! forwarded as it is (`Sec-WebSocket-*` included); on `101` the two upgraded connections are
//! joined byte for byte until either side closes or the caller's `closed` future resolves —
//! access revoked, route removed — whichever comes first. A WebSocket opened over HTTP/2
//! (RFC 8441: `CONNECT` with `:protocol websocket`, as the server in front advertises) reaches
//! code-server as the HTTP/1.1 upgrade it understands, and its `101` goes back as `200`.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::forwarding;
use super::pool::{Conn, Pool, Returning};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of proxied requests and responses: streamed, never collected.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest request body forwarded; bigger ones get 413.
    pub body_limit: u64,
    /// How long code-server may take to start its answer once the request is sent (504 after).
    pub response_timeout: Duration,
    /// How long connecting to code-server may take (502 after).
    pub connect_timeout: Duration,
    /// Cookies that are zlh's own: removed from requests, and code-server may not set them.
    pub session_cookies: Vec<String>,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` are passed on (appended to); anyone else's
    /// are replaced by the peer's address.
    pub trusted_proxies: forwarding::TrustedProxies,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            body_limit: 100 * 1024 * 1024,
            response_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            session_cookies: Vec::new(),
            trusted_proxies: Default::default(),
        }
    }
}

/// One request's destination and what code-server is told about where it came from.
#[derive(Debug, Clone)]
pub struct Forward {
    /// From the route table, never from the request.
    pub target: SocketAddr,
    /// The `Host` the browser used (`dev-6001.example.com`, or the API host for the path proxy).
    pub host: String,
    /// The peer address: `X-Forwarded-For` and `X-Real-IP` (see [`ProxyConfig::trusted_proxies`]).
    pub client_ip: Option<IpAddr>,
    /// `X-Forwarded-Proto`: the scheme the browser used (`https` behind the edge).
    pub proto: String,
    /// Path and query to ask code-server for, when not the request's own (the path proxy strips
    /// its prefix). Must start with `/`.
    pub path_and_query: Option<String>,
}

/// Forwards requests to code-servers over pooled keep-alive HTTP/1.1 connections.
#[derive(Debug, Clone)]
pub struct Proxy {
    pool: Arc<Pool>,
    config: ProxyConfig,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Self {
        // Node (code-server) closes connections idle for 5 s; reusing one near that moment races
        // its close, so idle connections are given up a second earlier.
        let pool = Arc::new(Pool::new(config.connect_timeout, Duration::from_secs(4), 64));
        Self { pool, config }
    }

    /// Idle keep-alive connections to `target` now.
    pub fn idle_connections(&self, target: SocketAddr) -> usize {
        self.pool.idle(target)
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Forwards `req` to `fwd.target` and returns code-server's answer (or a plain error page).
    /// For a WebSocket upgrade, the joined connection lives until either side closes or the
    /// future `closed` makes resolves; `closed` is only called for an upgrade, so plain requests
    /// pay nothing for watching access.
    pub async fn forward<B, C>(&self, req: Request<B>, fwd: Forward, closed: C) -> Response<ProxyBody>
    where
        C: FnOnce() -> BoxFuture<'static, ()>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        let h2_websocket = is_h2_websocket(&parts);
        // Any other tunnel is never what an IDE request is; the HTTP client would open one to
        // code-server.
        if parts.method == Method::CONNECT && !h2_websocket {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
        }
        let upgrade = h2_websocket || is_websocket_upgrade(&parts.method, &parts.headers);
        if content_length(&parts.headers).is_some_and(|n| n > self.config.body_limit) {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "The request body is too large.");
        }
        // Origin-form (`/path?query`): code-server is asked for a path, never for an address.
        let path = match &fwd.path_and_query {
            Some(p) => p.parse::<PathAndQuery>().ok(),
            None => Some(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"))),
        };
        let (Some(path), Ok(host)) = (path, HeaderValue::from_str(&fwd.host)) else {
            return plain(StatusCode::BAD_REQUEST, "Bad request.");
        };
        let uri = Uri::from(path);
        let mut headers = std::mem::take(&mut parts.headers);
        rewrite_request_headers(&mut headers, &fwd, &self.config);
        headers.insert(header::HOST, host);
        // The response timeout runs once the request body is sent: at once when it has none.
        let (sent_tx, sent_rx) = oneshot::channel();
        let (body, client_upgrade) = if upgrade {
            // Present when the server in front supports upgrades (hyper over HTTP/1.1, or over
            // HTTP/2 with extended CONNECT).
            let Some(on) = parts.extensions.remove::<OnUpgrade>() else {
                return plain(StatusCode::BAD_REQUEST, "This WebSocket request cannot be upgraded.");
            };
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if h2_websocket {
                // RFC 8441 §5: HTTP/2 has no key; code-server's HTTP/1.1 handshake needs one.
                parts.method = Method::GET;
                headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
            }
            let _ = sent_tx.send(());
            (Empty::new().map_err(|never| match never {}).boxed_unsync(), Some(on))
        } else if body.is_end_stream() {
            let _ = sent_tx.send(());
            (Empty::new().map_err(|never| match never {}).boxed_unsync(), None)
        } else {
            let limit = usize::try_from(self.config.body_limit).unwrap_or(usize::MAX);
            (EndSignal::new(Limited::new(body, limit).boxed_unsync(), sent_tx).boxed_unsync(), None)
        };
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = headers;

        let timeout = self.config.response_timeout;
        let deadline = async move {
            let _ = sent_rx.await;
            tokio::time::sleep(timeout).await;
        };
        let mut resp = tokio::select! {
            biased;
            r = self.send(out, fwd.target) => match r {
                Ok(resp) => resp,
                Err(e) => return upstream_error(&e, fwd.target),
            },
            () = deadline => {
                debug!(target = %fwd.target, "code-server did not answer in time");
                return plain(StatusCode::GATEWAY_TIMEOUT, "The IDE did not answer in time.");
            }
        };
        let mut headers = std::mem::take(resp.headers_mut());
        rewrite_response_headers(&mut headers, &self.config.session_cookies);
        if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status()) {
            let upstream = hyper::upgrade::on(&mut resp);
            let status = if h2_websocket {
                // The accept answers the key this proxy made up, not anything the client sent.
                headers.remove(header::SEC_WEBSOCKET_ACCEPT);
                StatusCode::OK
            } else {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                StatusCode::SWITCHING_PROTOCOLS
            };
            tokio::spawn(join(client, upstream, closed(), fwd.target));
            let mut switching = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
            *switching.status_mut() = status;
            *switching.headers_mut() = headers;
            return switching;
        }
        let status = resp.status();
        let mut answer = Response::new(resp.into_body());
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        answer
    }

    /// Sends `req` on a pooled connection to `target`; the answer's body gives the connection
    /// back once read. A reused connection found closed before the request went out is replaced
    /// by a fresh one, once.
    async fn send(&self, req: Request<ProxyBody>, target: SocketAddr) -> Result<Response<ProxyBody>, SendError> {
        let upgrade = req.headers().contains_key(header::UPGRADE);
        let Conn { mut upstream, reused } = self.pool.checkout(target).await?;
        if upgrade {
            // The tunnel outlives this request: the connection gets a task of its own.
            upstream.spawn_with_upgrades(target);
        }
        let resp = match upstream.send(req).await {
            Ok(resp) => resp,
            Err(mut e) => match (reused, e.take_message()) {
                (true, Some(req)) => {
                    debug!(%target, error = %e.error(), "pooled connection closed; opening a new one");
                    upstream = Box::pin(self.pool.connect(target)).await?.upstream;
                    if upgrade {
                        upstream.spawn_with_upgrades(target);
                    }
                    upstream.send(req).await.map_err(|e| SendError::Http(e.into_error()))?
                }
                _ => return Err(SendError::Http(e.into_error())),
            },
        };
        let (parts, body) = resp.into_parts();
        let body = if upgrade {
            // An upgraded connection belongs to the WebSocket from now on.
            body.map_err(BoxError::from).boxed_unsync()
        } else {
            Returning::new(body, self.pool.clone(), target, upstream).map_err(BoxError::from).boxed_unsync()
        };
        Ok(Response::from_parts(parts, body))
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Connect(#[from] super::pool::ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Joins the browser's and code-server's upgraded connections until one ends or `closed` fires.
async fn join(client: OnUpgrade, upstream: OnUpgrade, closed: BoxFuture<'static, ()>, target: SocketAddr) {
    let pipe = async {
        let (client, upstream) = tokio::try_join!(client, upstream)?;
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        Ok::<_, BoxError>(())
    };
    tokio::select! {
        r = pipe => match r {
            Ok(()) => debug!(%target, "IDE WebSocket ended"),
            Err(e) => debug!(%target, error = %e, "IDE WebSocket ended with an error"),
        },
        // Dropping both connections closes them.
        () = closed => debug!(%target, "IDE WebSocket closed: access ended"),
    }
}

fn upstream_error(e: &SendError, target: SocketAddr) -> Response<ProxyBody> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<LengthLimitError>() {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "The request body is too large.");
        }
        source = err.source();
    }
    if matches!(e, SendError::Connect(_)) {
        debug!(%target, error = %e, "code-server unreachable");
    } else {
        warn!(%target, error = %e, "proxying to code-server failed");
    }
    plain(StatusCode::BAD_GATEWAY, "The IDE is not reachable.")
}

/// A short plain-text page: what a browser shows when the IDE cannot be reached.
pub fn plain(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    let mut r =
        Response::new(Full::new(Bytes::from_static(message.as_bytes())).map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A `GET` asking for `Connection: upgrade` to `Upgrade: websocket`.
pub fn is_websocket_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && has_token(headers, &header::CONNECTION, "upgrade")
        && has_token(headers, &header::UPGRADE, "websocket")
}

/// An HTTP/2 extended `CONNECT` for a WebSocket (RFC 8441).
fn is_h2_websocket(parts: &http::request::Parts) -> bool {
    parts.method == Method::CONNECT
        && parts.version == Version::HTTP_2
        && parts.extensions.get::<hyper::ext::Protocol>().is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
fn websocket_key() -> HeaderValue {
    use base64::Engine as _;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source");
    HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(nonce)).expect("base64 is a valid header")
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| forwarding::tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(token.as_bytes())))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Turns the browser's headers into what code-server gets, in place: the ones that stay behind
/// removed (see [`forwarding`]), zlh's own cookies taken out of `Cookie`, then the proxy's
/// forwarding headers.
fn rewrite_request_headers(headers: &mut HeaderMap, fwd: &Forward, config: &ProxyConfig) {
    let values = |name: &HeaderName| headers.get_all(name).iter().map(HeaderValue::as_bytes);
    let cookies = forwarding::cookies_without(values(&header::COOKIE), &config.session_cookies);
    let trusted = fwd.client_ip.is_some_and(|ip| config.trusted_proxies.contains(ip));
    let chain = forwarding::forwarded_for(values(&X_FORWARDED_FOR), fwd.client_ip, trusted);
    let real_ip = forwarding::real_ip(values(&X_REAL_IP), fwd.client_ip, trusted);
    remove_headers(headers, |name, connection| {
        forwarding::request_header_stays_behind(name, connection.iter().map(Vec::as_slice))
    });
    for (name, value) in [(header::COOKIE, cookies), (X_FORWARDED_FOR, chain), (X_REAL_IP, real_ip)] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
            headers.insert(name, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&fwd.proto) {
        headers.insert(X_FORWARDED_PROTO, v);
    }
    if let Ok(v) = HeaderValue::from_str(&fwd.host) {
        headers.insert(X_FORWARDED_HOST, v);
    }
}

/// Removes every header that `goes` (given its name and the message's `Connection` values) says
/// must not pass.
fn remove_headers(headers: &mut HeaderMap, goes: impl Fn(&str, &[Vec<u8>]) -> bool) {
    let connection: Vec<Vec<u8>> = headers.get_all(header::CONNECTION).iter().map(|v| v.as_bytes().to_vec()).collect();
    let gone: Vec<HeaderName> = headers.keys().filter(|n| goes(n.as_str(), &connection)).cloned().collect();
    for name in gone {
        headers.remove(name);
    }
}

/// Takes hop-by-hop headers and any attempt to set zlh's session cookies out of code-server's
/// answer, in place.
fn rewrite_response_headers(headers: &mut HeaderMap, session_cookies: &[String]) {
    remove_headers(headers, |name, connection| forwarding::is_hop_by_hop(name, connection.iter().map(Vec::as_slice)));
    let sets_zlh_cookie = |value: &HeaderValue| forwarding::sets_session_cookie(value.as_bytes(), session_cookies);
    if headers.get_all(header::SET_COOKIE).iter().any(sets_zlh_cookie) {
        let kept: Vec<HeaderValue> =
            headers.get_all(header::SET_COOKIE).iter().filter(|v| !sets_zlh_cookie(v)).cloned().collect();
        headers.remove(header::SET_COOKIE);
        for v in kept {
            headers.append(header::SET_COOKIE, v);
        }
    }
}

/// A request body that says when it has been sent completely (or dropped), which is when the
/// response timeout starts.
struct EndSignal {
    inner: ProxyBody,
    sent: Option<oneshot::Sender<()>>,
}

impl EndSignal {
    fn new(inner: ProxyBody, sent: oneshot::Sender<()>) -> Self {
        let mut body = Self { inner, sent: Some(sent) };
        // An empty body is never polled.
        if body.inner.is_end_stream() {
            body.signal();
        }
        body
    }

    fn signal(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for EndSignal {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.inner.is_end_stream() {
            self.signal();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn fwd() -> Forward {
        Forward {
            target: "127.0.0.1:6000".parse().unwrap(),
            host: "dev-6001.localhost:4000".into(),
            client_ip: Some("10.0.0.9".parse().unwrap()),
            proto: "https".into(),
            path_and_query: None,
        }
    }

    #[test]
    fn credentials_hop_by_hop_and_made_up_forwarding_headers_stay_behind() {
        let src = map(&[
            ("host", "evil.example"),
            ("authorization", "Bearer zlh-session"),
            ("proxy-authorization", "Basic x"),
            ("cookie", "zlh_ide=secret; code-server-session=keep; other=1"),
            ("cookie", "__Host-zlh_ide=secret2;vscode-tkn=x"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "gopher"),
            ("forwarded", "for=6.6.6.6"),
            ("origin", "https://dev-6001.localhost:4000"),
            ("sec-websocket-key", "abc"),
            ("accept", "text/html"),
        ]);
        let config = ProxyConfig {
            session_cookies: vec!["zlh_ide".to_owned(), "__Host-zlh_ide".to_owned()],
            trusted_proxies: forwarding::TrustedProxies::parse(&["10.0.0.9"]).unwrap(),
            ..Default::default()
        };
        let mut out = src.clone();
        rewrite_request_headers(&mut out, &fwd(), &config);
        assert_eq!(out.get("cookie").unwrap(), "code-server-session=keep; other=1; vscode-tkn=x");
        assert_eq!(out.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.9", "the peer is a trusted proxy");
        assert_eq!(out.get("x-forwarded-host").unwrap(), "dev-6001.localhost:4000");
        assert_eq!(out.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(out.get("origin").unwrap(), "https://dev-6001.localhost:4000");
        assert_eq!(out.get("sec-websocket-key").unwrap(), "abc");
        assert_eq!(out.get("accept").unwrap(), "text/html");
        for gone in [
            "host",
            "authorization",
            "proxy-authorization",
            "connection",
            "x-private",
            "keep-alive",
            "transfer-encoding",
            "forwarded",
        ] {
            assert!(out.get(gone).is_none(), "{gone} must not be forwarded");
        }
    }

    #[test]
    fn code_server_cannot_set_zlh_cookies() {
        let src = map(&[
            ("set-cookie", "zlh_ide=forged; Domain=localhost"),
            ("set-cookie", "ZLH_IDE=forged"),
            ("set-cookie", "code-server-session=ok; Path=/"),
            ("connection", "close"),
            ("content-type", "text/html"),
        ]);
        let mut out = src;
        rewrite_response_headers(&mut out, &["zlh_ide".to_owned()]);
        let cookies: Vec<_> = out.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["code-server-session=ok; Path=/"]);
        assert!(out.get("connection").is_none());
        assert_eq!(out.get("content-type").unwrap(), "text/html");
    }

    #[test]
    fn websocket_upgrades_are_recognised_by_their_tokens() {
        let ws = map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "WebSocket")]);
        assert!(is_websocket_upgrade(&Method::GET, &ws));
        assert!(!is_websocket_upgrade(&Method::POST, &ws));
        assert!(!is_websocket_upgrade(&Method::GET, &map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&Method::GET, &map(&[("connection", "upgrade"), ("upgrade", "h2c")])));
    }
}
