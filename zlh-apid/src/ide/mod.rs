//! Browser IDE access: IDE tokens, the cookie bootstrap on the dev host, and the code-server
//! proxies (host-based `dev-<vmid>.<domain>` and the legacy path `/__ide/<vmid>/…`).
//!
//! # Flow
//! 1. The portal calls `POST /api/dev/{id}/ide-token` (bearer session; the caller's own running
//!    dev server, or any for an admin) and gets `{token, url, expiresAt}`: a token bound to the
//!    user and the vmid, valid for about a minute, and `url`, the bootstrap on the server's own
//!    host: `{scheme}://dev-<vmid>.<domain>[:port]/api/dev/{id}/ide?token=…`.
//! 2. The browser opens `url`. On the dev host, [`Front`] routes everything to the IDE and
//!    nothing to the API. The bootstrap accepts the token once on any replica ([`ledger`]), sets a session cookie that only
//!    this host gets back (no `Domain`; `HttpOnly`; `SameSite=Lax`; `Secure` unless plain-HTTP
//!    local use, then also the `__Host-` name prefix; `Max-Age` the session lifetime), and answers
//!    303 to `/?folder=/home/dev/workspace` — a URL without the token, with no referrer sent on.
//!    The same path on the API host (`GET /api/dev/{id}/ide?token=…`) redirects to the dev host,
//!    since only the dev host itself can set its cookie.
//! 3. Every later request on the dev host, HTTP or WebSocket, is authorised afresh: the cookie
//!    verifies (signature, expiry, not revoked), names this vmid, the database says the session
//!    was not logged out on any replica and the API sign-in it was opened from (the one that got
//!    the token) is still signed in, and the server exists, belongs to the cookie's user (or
//!    the user is an admin), is running and its code-server was not stopped. The database's
//!    answer is memoised per session for at most `ide_access_cache_ms` ([`access_cache`]);
//!    changes this process makes forget it at once. The target is the route table's entry for the vmid, kept in step with the server row's code-server address
//!    — never anything from the request. State-changing requests and WebSocket upgrades that
//!    carry an `Origin` must come from the dev host itself.
//! 4. An open WebSocket closes when its route is removed or moves, its session is revoked
//!    (`POST /__zlh/logout` on the dev host, or `POST /api/auth/logout` of its sign-in), or a periodic re-check (`ide_recheck_every`) finds
//!    access gone — logged out, ownership lost, server stopped, suspended or deleted — on
//!    whichever replica changed it: the re-check reads the database.
//!
//! # Legacy path proxy
//! `/__ide/<vmid>/…` on the API host, when `ide_path_proxy` is on. Its cookie comes from
//! `GET /api/dev/{id}/ide?token=…&mode=path`, scoped to `Path=/__ide/<vmid>`. The prefix is
//! stripped before forwarding. Code-server's pages then share the API's origin, so only a server's owner is let in there (admins use the hosted IDE).

pub mod access_cache;
pub mod ledger;
pub mod request;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use futures::future::BoxFuture;
use futures::FutureExt;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::{json, Value};
use zlh_core::ide::h1;
use zlh_core::ide::proxy::{self, Forward, Proxy, ProxyBody, ProxyConfig};
use zlh_core::ide::{workspace_query, IdeConfig, IdeError, IdeGrant, IdeRouter, IdeSession, LocalIdeRouter};
use zlh_core::token::TokenKey;
use zlh_core::Vmid;

use crate::auth::CurrentUser;
use crate::config::ApiConfig;
use crate::http::{ApiError, ApiResult};
use crate::servers::repo::{self, state, Kind, Server};
use crate::state::AppState;
use request::Seen;

/// The hosted session cookie over HTTPS: `__Host-` makes browsers refuse it unless it is
/// `Secure`, host-only and `Path=/`, so no sibling host can plant or shadow it.
pub const SECURE_COOKIE: &str = "__Host-zlh_ide";
/// The session cookie in plain-HTTP local use, and the path proxy's cookie.
pub const PLAIN_COOKIE: &str = "zlh_ide";
/// Logs out of one hosted IDE (revokes its session).
const LOGOUT_PATH: &str = "/__zlh/logout";
/// The answer to a request without a session: how to get one (the API's link, not a page).
pub const NO_SESSION: &str =
    "Not signed in to this IDE. Get a link with POST /api/dev/<id>/ide-token and open its url.";
/// Where the legacy path proxy lives on the API host.
const PATH_PREFIX: &str = "/__ide/";

/// Everything the IDE routes share: the router (tokens, sessions, routes) and the proxy.
pub struct IdeState {
    pub router: Arc<LocalIdeRouter>,
    proxy: Proxy,
    access: access_cache::AccessCache,
    secure_cookies: bool,
    recheck_every: Duration,
    path_proxy: bool,
}

impl std::fmt::Debug for IdeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdeState").field("config", self.router.config()).finish_non_exhaustive()
    }
}

impl IdeState {
    /// The IDE key derives from the API's master secret, so every replica verifies every
    /// replica's tokens and cookies. `api_port` is the port the API listens on: the hosted URLs'
    /// port in plain-HTTP local use unless `ide_public_port` says otherwise.
    pub fn new(config: &ApiConfig, master_secret: &[u8], api_port: u16) -> anyhow::Result<Arc<Self>> {
        let domain = config.ide_domain.clone();
        let scheme = config.ide_scheme.clone().unwrap_or_else(|| {
            let local = domain.eq_ignore_ascii_case("localhost") || domain.to_ascii_lowercase().ends_with(".localhost");
            if local { "http" } else { "https" }.to_owned()
        });
        let public_port = config.ide_public_port.or((scheme == "http").then_some(api_port));
        let ide = IdeConfig {
            domain,
            scheme: scheme.clone(),
            public_port,
            session_ttl: config.ide_session_ttl,
            token_ttl: zlh_core::ide::token::DEFAULT_TOKEN_TTL,
        };
        let key = TokenKey::new(&crate::state::derive(master_secret, "zlh ide key v1"))?;
        let router = LocalIdeRouter::new(ide, key).context("IDE configuration")?;
        let proxy = Proxy::new(ProxyConfig {
            body_limit: config.ide_body_limit,
            response_timeout: config.ide_response_timeout,
            connect_timeout: Duration::from_secs(5),
            session_cookies: vec![SECURE_COOKIE.into(), PLAIN_COOKIE.into()],
            trusted_proxies: zlh_core::ide::forwarding::TrustedProxies::parse(&config.trusted_proxies)
                .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?,
        });
        Ok(Arc::new(Self {
            router: Arc::new(router),
            proxy,
            access: access_cache::AccessCache::new(config.ide_access_cache),
            secure_cookies: !config.ide_insecure_cookies.unwrap_or(scheme == "http"),
            recheck_every: config.ide_recheck_every.max(Duration::from_millis(100)),
            path_proxy: config.ide_path_proxy,
        }))
    }

    /// The hosted session cookie's name.
    pub fn cookie_name(&self) -> &'static str {
        if self.secure_cookies {
            SECURE_COOKIE
        } else {
            PLAIN_COOKIE
        }
    }

    /// Code-server of `vmid` listens at `target` (provisioning done, or it was restarted).
    pub async fn server_started(&self, vmid: u32, target: SocketAddr) {
        self.access.forget(vmid);
        self.router.register(Vmid(vmid), target).await;
    }

    /// `vmid`'s code-server is gone (stopped, suspended, deleted): its open connections close.
    pub async fn server_stopped(&self, vmid: u32) {
        self.access.forget(vmid);
        self.router.unregister(Vmid(vmid)).await;
    }

    /// API session `api_session_id` was signed out: the IDE sessions opened from it end here at
    /// once, closing their open connections. (Other replicas find out from the database, which
    /// refuses them already: see [`ledger::session_revoked`].)
    pub async fn api_session_ended(&self, db: &crate::db::Db, api_session_id: &str) -> sqlx::Result<usize> {
        let opened = ledger::opened_from(db, api_session_id).await?;
        for (id, expires_at) in &opened {
            self.router.revoke_session(id, *expires_at);
        }
        Ok(opened.len())
    }

    fn scheme(&self) -> &str {
        &self.router.config().scheme
    }

    fn cookie(&self, name: &str, value: &str, path: &str, max_age: i64) -> HeaderValue {
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        let v = format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}");
        HeaderValue::from_str(&v).expect("cookie values are base64url and dots")
    }
}

/// The routes on the API host: the token, the bootstrap redirect and the legacy path proxy.
pub fn router(ide: Arc<IdeState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/dev/{id}/ide-token", post(issue_token))
        .route("/api/dev/{id}/ide", get(api_host_bootstrap))
        .route("/__ide/{vmid}", any(path_proxy))
        .route("/__ide/{vmid}/", any(path_proxy))
        .route("/__ide/{vmid}/{*rest}", any(path_proxy))
        .method_not_allowed_fallback(crate::http::error::method_not_allowed)
        .layer(Extension(ide))
}

/// What the IDE side of [`Front`] needs.
#[derive(Clone)]
pub struct IdeDispatch {
    pub app: Arc<AppState>,
    pub ide: Arc<IdeState>,
}

/// The API with the IDE in front of it, as [`crate::http::server::serve`] serves it: a request
/// for `dev-<vmid>.<domain>` goes to that IDE (its bootstrap, logout or proxy) straight from
/// hyper, and never reaches an API route; everything else goes to the API's router, which also
/// holds the IDE's routes on the API host (token, bootstrap redirect, path proxy).
#[derive(Clone)]
pub struct Front {
    api: Router,
    d: IdeDispatch,
}

/// [`Front`] for the API router `api`, with the IDE's API-host routes merged into it.
pub fn front(api: Router, app: Arc<AppState>, ide: Arc<IdeState>) -> Front {
    let _ = app.ide.set(ide.clone());
    let api = api.merge(router(ide.clone()).with_state(app.clone()));
    Front { api, d: IdeDispatch { app, ide } }
}

impl Front {
    /// Serves a new connection from `peer` on the IDE's lean path ([`h1`]) for as long as it
    /// carries plain requests for dev hosts; the rest of it is then for [`Front::handle`].
    /// `stop` ends it between requests.
    pub async fn serve_lean(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        stop: impl std::future::Future<Output = ()>,
    ) -> h1::Served {
        let limits = &self.d.app.config.connections;
        h1::serve(stream, peer, &self.d, &self.d.ide.proxy, self.d.ide.scheme(), limits, stop).await
    }

    /// What the whole API can reach (config, metrics).
    pub fn app(&self) -> &Arc<AppState> {
        &self.d.app
    }

    /// Answers one request that came from `peer`.
    pub async fn handle(&self, req: http::Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let started = std::time::Instant::now();
        match ide_host(&self.d.ide, &req) {
            // The API's own metrics layer counts these.
            Ok(None) => {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                let Ok(response) = tower::ServiceExt::oneshot(self.api.clone(), req).await;
                boxed(response)
            }
            Ok(Some((vmid, host))) => {
                // Boxed: the proxied request's future is large, and would make every API
                // request's future as large.
                let response = Box::pin(hosted(&self.d, vmid, host, req, peer)).await;
                self.d.app.metrics.ide_request(response.status().as_u16(), started.elapsed());
                response
            }
            Err(()) => {
                self.d.app.metrics.ide_request(StatusCode::BAD_REQUEST.as_u16(), started.elapsed());
                proxy::plain(StatusCode::BAD_REQUEST, "Bad host.")
            }
        }
    }
}

/// The vmid and host a request names, if it is for a dev host. Refuses requests whose `Host`
/// headers and URI authority disagree where one of them is a dev host.
fn ide_host<B>(ide: &IdeState, req: &http::Request<B>) -> Result<Option<(Vmid, String)>, ()> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => Some(h.to_str().map_err(|_| ())?),
        (None, _) => None,
        // RFC 9112 §3.2: a request with more than one Host line is refused, even identical ones.
        (Some(_), Some(_)) => return Err(()),
    };
    let authority = req.uri().authority().map(|a| a.as_str());
    let (name, other) = match (host, authority) {
        (Some(h), a) => (h, a),
        (None, Some(a)) => (a, None),
        (None, None) => return Ok(None),
    };
    match (ide.router.parse_host(name), other) {
        // Host and URI authority must agree when either names a dev host.
        (Ok(vmid), None) => Ok(Some((vmid, name.to_owned()))),
        (Ok(vmid), Some(o)) if o.eq_ignore_ascii_case(name) => Ok(Some((vmid, name.to_owned()))),
        (Ok(_), Some(_)) => Err(()),
        (Err(_), Some(o)) if ide.router.parse_host(o).is_ok() => Err(()),
        (Err(_), _) => Ok(None),
    }
}

/// Everything on a dev host, as hyper parsed it.
async fn hosted(
    d: &IdeDispatch,
    vmid: Vmid,
    host: String,
    req: http::Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let (target, grant) = match decide(d, vmid, &host, &parts).await {
        Hosted::Forward(target, grant) => (target, grant),
        Hosted::Answer(response) => return response,
    };
    let fwd =
        Forward { target, host, client_ip: Some(peer.ip()), proto: d.ide.scheme().to_owned(), path_and_query: None };
    let d2 = d.clone();
    let closed = move || access_closed(d2, vmid, target, grant, true);
    d.ide.proxy.forward(http::Request::from_parts(parts, body), fwd, closed).await
}

/// What becomes of a request on a dev host.
enum Hosted {
    /// Authorised: on to this code-server, under this session.
    Forward(SocketAddr, IdeGrant),
    /// Answered here: the bootstrap, a logout, a refusal.
    Answer(Response<ProxyBody>),
}

/// The checks every request on a dev host passes, whichever server parsed it.
async fn decide<R: Seen + Sync>(d: &IdeDispatch, vmid: Vmid, host: &str, req: &R) -> Hosted {
    let path = req.path();
    if let Some(id) = path.strip_prefix("/api/dev/").and_then(|p| p.strip_suffix("/ide")) {
        if req.method() == "GET" && !id.is_empty() && !id.contains('/') {
            let token = query_param(req.query(), "token");
            // Boxed, as the database paths below: the proxied request's future stays small.
            return Hosted::Answer(boxed(Box::pin(hosted_bootstrap(d, vmid, id, token, req)).await));
        }
    }
    if !origin_allowed(req, host) {
        return Hosted::Answer(proxy::plain(StatusCode::FORBIDDEN, "Cross-origin request refused."));
    }
    let Some(grant) = session_from_cookies(&d.ide, req, d.ide.cookie_name(), vmid) else {
        return Hosted::Answer(proxy::plain(StatusCode::UNAUTHORIZED, NO_SESSION));
    };
    if path == LOGOUT_PATH && req.method() == "POST" {
        return Hosted::Answer(Box::pin(logout(d, vmid, grant)).await);
    }
    match authorize(d, vmid, &grant, true).await {
        Ok(target) => Hosted::Forward(target, grant),
        Err(refusal) => Hosted::Answer(boxed(refusal.page())),
    }
}

/// `POST /__zlh/logout` on the dev host: the session ends on every replica.
async fn logout(d: &IdeDispatch, vmid: Vmid, grant: IdeGrant) -> Response<ProxyBody> {
    d.ide.router.revoke_session(&grant.session_id, grant.expires_at);
    if let Err(e) = ledger::revoke_session(&d.app.db, &grant.session_id, grant.expires_at).await {
        tracing::error!(error = %e, "recording an IDE logout failed");
        return proxy::plain(StatusCode::SERVICE_UNAVAILABLE, "Logging out failed. Try again.");
    }
    tracing::info!(vmid = vmid.0, user = %grant.user_id, session = %grant.session_id, "IDE session ended");
    let mut r = boxed(StatusCode::NO_CONTENT.into_response());
    r.headers_mut().insert(header::SET_COOKIE, d.ide.cookie(d.ide.cookie_name(), "", "/", 0));
    r
}

impl h1::Gate for IdeDispatch {
    async fn admit(&self, head: &h1::Head<'_>) -> h1::Admission {
        // Not a dev host: the API's, served in full by hyper.
        let Ok(vmid) = self.ide.router.parse_host(head.host) else { return h1::Admission::Handover };
        match decide(self, vmid, head.host, head).await {
            Hosted::Forward(target, _) => h1::Admission::Forward(target),
            Hosted::Answer(response) => h1::Admission::Answer(response),
        }
    }

    fn answered(&self, status: u16, took: Duration) {
        self.app.metrics.ide_request(status, took);
    }
}

/// An axum answer (the API's, a redirect, a refusal page) as the answer type the server sends.
fn boxed(r: Response) -> Response<ProxyBody> {
    r.map(|b| b.map_err(proxy::BoxError::from).boxed_unsync())
}

/// `GET /api/dev/{id}/ide?token=…` on the dev host: token → session cookie → 303.
async fn hosted_bootstrap<R: Seen + Sync>(
    d: &IdeDispatch,
    vmid: Vmid,
    id: &str,
    token: Option<String>,
    req: &R,
) -> Response {
    let Some(token) = token else {
        return page(StatusCode::BAD_REQUEST, "This IDE link has no token.");
    };
    let grant = match exchange_token(d, &token, vmid).await {
        Ok(g) => g,
        Err(None) => return page(StatusCode::INTERNAL_SERVER_ERROR, "Internal error."),
        Err(Some(e)) => {
            // A second load of the same link (a reload, a double navigation) after the first
            // succeeded: the cookie is there, so go on to the IDE.
            if let Some(g) = session_from_cookies(&d.ide, req, d.ide.cookie_name(), vmid) {
                if authorize_server(d, vmid, &g.user_id, true, Some(id)).await.is_ok() {
                    return see_other(&workspace_of(d, vmid).await, None);
                }
            }
            tracing::info!(vmid = vmid.0, reason = %e, "IDE token refused");
            return link_refused();
        }
    };
    if let Err(refusal) = authorize_server(d, vmid, &grant.user_id, true, Some(id)).await {
        return refusal.page();
    }
    let session = match open_session(d, &grant, vmid).await {
        Ok(s) => s,
        Err(refused) => return refused,
    };
    tracing::info!(vmid = vmid.0, user = %grant.user_id, session = %session.id, "IDE session opened");
    let max_age = d.ide.router.config().session_ttl.as_secs() as i64;
    let cookie = d.ide.cookie(d.ide.cookie_name(), &session.value, "/", max_age);
    see_other(&workspace_of(d, vmid).await, Some(cookie))
}

/// Checks IDE token `token` for `vmid` and uses it up, on every replica: its grant, or why it is
/// refused (`None`: the database failed, logged here).
async fn exchange_token(d: &IdeDispatch, token: &str, vmid: Vmid) -> Result<IdeGrant, Option<IdeError>> {
    let grant = d.ide.router.verify_token(token, vmid).map_err(Some)?;
    match ledger::use_token(&d.app.db, &grant.session_id, grant.expires_at).await {
        Ok(true) => Ok(grant),
        Ok(false) => Err(Some(IdeError::BadToken("already used on another replica"))),
        Err(e) => {
            tracing::error!(error = %e, "recording an IDE token's use failed");
            Err(None)
        }
    }
}

/// The IDE session an exchanged token `grant` opens, tied to the API session the token was issued
/// under; refused if that API session was signed out meanwhile.
async fn open_session(d: &IdeDispatch, grant: &IdeGrant, vmid: Vmid) -> Result<IdeSession, Response> {
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "{what}");
        page(StatusCode::INTERNAL_SERVER_ERROR, "Internal error.")
    };
    let api_session = match ledger::live_origin(&d.app.db, &grant.session_id).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            tracing::info!(vmid = vmid.0, user = %grant.user_id, "IDE token of a signed-out session refused");
            return Err(page(
                StatusCode::UNAUTHORIZED,
                "You signed out. Sign in to the zlh portal and open the IDE again.",
            ));
        }
        Err(e) => return Err(internal("reading an IDE token's origin failed", &e)),
    };
    let session =
        d.ide.router.issue_session(&grant.user_id, vmid).map_err(|e| internal("issuing an IDE session failed", &e))?;
    ledger::record_origin(&d.app.db, &session.id, &api_session, session.expires_at)
        .await
        .map_err(|e| internal("recording an IDE session's origin failed", &e))?;
    Ok(session)
}

/// `POST /api/dev/{id}/ide-token`.
async fn issue_token(
    State(app): State<Arc<AppState>>,
    Extension(ide): Extension<Arc<IdeState>>,
    user: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let s = crate::servers::routes::owned(&app, &id, &user).await?;
    if s.kind != Kind::Dev {
        return Err(ApiError::conflict("only dev servers have an IDE"));
    }
    if s.state != state::RUNNING {
        return Err(ApiError::conflict("the server is not running"));
    }
    let (Some(vmid), Some(_)) = (s.vmid, s.code_server_addr.as_deref()) else {
        return Err(ApiError::conflict("this server has no IDE"));
    };
    if s.ide_stopped {
        return Err(ApiError::conflict("the IDE is stopped: start code-server first"));
    }
    let t = ide.router.issue_token(&user.id, Vmid(vmid)).map_err(ApiError::internal)?;
    // The IDE it opens lives only as long as this sign-in.
    ledger::record_origin(&app.db, &t.id, &user.session_id, t.expires_at).await?;
    let url = format!("{}/api/dev/{}/ide?token={}", ide.router.hosted_origin(Vmid(vmid)), s.id, t.token);
    tracing::info!(server = %s.id, user = %user.id, vmid, "IDE token issued");
    let ide_url = format!("{}{}", ide.router.hosted_origin(Vmid(vmid)), workspace_query(reported_workspace(&s)));
    Ok(Json(json!({ "token": t.token, "url": url, "expiresAt": t.expires_at, "ideUrl": ide_url })))
}

/// `GET /api/dev/{id}/ide?token=…` on the API host: on to the dev host, which sets its own
/// cookie; with `mode=path`, the legacy path proxy's cookie is set here instead.
///
/// Without a valid token for that server the answer is the same for every `id` (existing or
/// not, anyone's): the redirect names the server's vmid, which only a token holder may learn.
async fn api_host_bootstrap(
    State(app): State<Arc<AppState>>,
    Extension(ide): Extension<Arc<IdeState>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let Some(token) = query_param(req.uri().query(), "token") else {
        return ApiError::bad_request("token is required").into_response();
    };
    let path_mode = query_param(req.uri().query(), "mode").as_deref() == Some("path");
    if path_mode && !ide.path_proxy {
        return ApiError::not_found("the path proxy is off").into_response();
    }
    let vmid = match repo::get(&app.db, &id).await {
        Ok(Some(Server { vmid: Some(vmid), .. })) => Vmid(vmid),
        // Checked against no container, so it fails as a wrong token does, in the same time.
        Ok(_) => Vmid(0),
        Err(e) => return ApiError::from(e).into_response(),
    };
    if !ide.router.token_valid_at(&token, vmid, chrono::Utc::now()) {
        tracing::info!(server = %id, "IDE link refused on the API host");
        return link_refused();
    }
    if !path_mode {
        let token: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
        let to = format!("{}/api/dev/{id}/ide?token={token}", ide.router.hosted_origin(vmid));
        return see_other(&to, None);
    }
    let d = IdeDispatch { app, ide };
    let grant = match exchange_token(&d, &token, vmid).await {
        Ok(g) => g,
        Err(None) => return page(StatusCode::INTERNAL_SERVER_ERROR, "Internal error."),
        Err(Some(e)) => {
            tracing::info!(vmid = vmid.0, reason = %e, "IDE token refused");
            return link_refused();
        }
    };
    if let Err(refusal) = authorize_server(&d, vmid, &grant.user_id, false, Some(&id)).await {
        return refusal.page();
    }
    let session = match open_session(&d, &grant, vmid).await {
        Ok(s) => s,
        Err(refused) => return refused,
    };
    let prefix = format!("{PATH_PREFIX}{}", vmid.0);
    let max_age = d.ide.router.config().session_ttl.as_secs() as i64;
    let cookie = d.ide.cookie(PLAIN_COOKIE, &session.value, &prefix, max_age);
    see_other(&format!("{prefix}{}", workspace_of(&d, vmid).await), Some(cookie))
}

/// `/__ide/{vmid}/…` on the API host, counted with the dev hosts' traffic.
async fn path_proxy(
    State(app): State<Arc<AppState>>,
    Extension(ide): Extension<Arc<IdeState>>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let started = std::time::Instant::now();
    let metrics = app.metrics.clone();
    let response = Box::pin(path_proxy_request(app, ide, params, req)).await;
    metrics.ide_request(response.status().as_u16(), started.elapsed());
    response
}

async fn path_proxy_request(
    app: Arc<AppState>,
    ide: Arc<IdeState>,
    params: Vec<(String, String)>,
    req: Request,
) -> Response {
    let not_found = || page(StatusCode::NOT_FOUND, "Not found.");
    if !ide.path_proxy {
        return not_found();
    }
    let raw = params.iter().find(|(k, _)| k == "vmid").map(|(_, v)| v.as_str()).unwrap_or_default();
    let Some(vmid) = zlh_core::ide::host::canonical_vmid(raw) else { return not_found() };
    let prefix = format!("{PATH_PREFIX}{}", vmid.0);
    let rest = req.uri().path().strip_prefix(&prefix).unwrap_or_default().to_owned();
    if rest.is_empty() {
        // Code-server's relative URLs need the trailing slash.
        let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
        return (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, format!("{prefix}/{query}"))]).into_response();
    }
    // `Host` over HTTP/1.1; over HTTP/2 the URI's authority (`:authority`) names it.
    let host =
        req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or(req.uri().authority().map(|a| a.as_str()));
    let host = host.unwrap_or_default().to_owned();
    let (parts, body) = req.into_parts();
    if !origin_allowed(&parts, &host) {
        return page(StatusCode::FORBIDDEN, "Cross-origin request refused.");
    }
    let d = IdeDispatch { app, ide };
    let Some(grant) = session_from_cookies(&d.ide, &parts, PLAIN_COOKIE, vmid) else {
        return page(StatusCode::UNAUTHORIZED, NO_SESSION);
    };
    let target = match authorize(&d, vmid, &grant, false).await {
        Ok(t) => t,
        Err(refusal) => return refusal.page(),
    };
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    let req = Request::from_parts(parts, body);
    let fwd = Forward {
        target,
        host,
        client_ip: client_ip(&req),
        proto: d.ide.scheme().to_owned(),
        path_and_query: Some(path_and_query),
    };
    let d2 = d.clone();
    let closed = move || access_closed(d2, vmid, target, grant, false);
    d.ide.proxy.forward(req, fwd, closed).await.map(Body::new)
}

/// Why access is refused; each has a short page for the browser.
#[derive(Debug)]
enum Refusal {
    NoServer,
    NotYours,
    NotRunning,
    NoIde,
    /// The owner stopped code-server.
    Stopped,
    /// The session was logged out (on another replica).
    Ended,
    Internal,
}

impl Refusal {
    fn page(&self) -> Response {
        match self {
            Refusal::NoServer | Refusal::NotYours => page(StatusCode::NOT_FOUND, "No such IDE."),
            Refusal::NotRunning => page(StatusCode::CONFLICT, "This server is not running."),
            Refusal::NoIde => page(StatusCode::BAD_GATEWAY, "This server has no IDE."),
            Refusal::Stopped => page(
                StatusCode::CONFLICT,
                "This IDE is stopped. Start it with POST /api/servers/<id>/codeserver/start, then open a new link.",
            ),
            Refusal::Ended => page(
                StatusCode::UNAUTHORIZED,
                "This IDE session has ended. Get a new link with POST /api/dev/<id>/ide-token and open its url.",
            ),
            Refusal::Internal => page(StatusCode::INTERNAL_SERVER_ERROR, "Internal error."),
        }
    }
}

/// The per-request check: the server of `vmid` exists, `user_id` owns it (or is an admin, where
/// `admins` allows), it is a running dev server with a code-server. `id`, when given, must be
/// the server's id. Returns the server's code-server address.
async fn authorize_server(
    d: &IdeDispatch,
    vmid: Vmid,
    user_id: &str,
    admins: bool,
    id: Option<&str>,
) -> Result<SocketAddr, Refusal> {
    let internal = |e: sqlx::Error| {
        tracing::error!(error = %e, "IDE authorisation: database error");
        Refusal::Internal
    };
    let s = repo::get_by_vmid(&d.app.db, vmid.0).await.map_err(internal)?.ok_or(Refusal::NoServer)?;
    if id.is_some_and(|id| id != s.id) {
        return Err(Refusal::NoServer);
    }
    if s.user_id != user_id {
        let admin = admins
            && crate::auth::users::find_by_id(&d.app.db, user_id)
                .await
                .map_err(internal)?
                .is_some_and(|u| u.role == crate::auth::Role::Admin);
        if !admin {
            return Err(Refusal::NotYours);
        }
    }
    if s.kind != Kind::Dev {
        return Err(Refusal::NoIde);
    }
    if s.state != state::RUNNING {
        return Err(Refusal::NotRunning);
    }
    if s.ide_stopped {
        return Err(Refusal::Stopped);
    }
    s.code_server_addr.as_deref().and_then(|a| a.parse().ok()).ok_or(Refusal::NoIde)
}

/// [`authorize_server`] (or its memoised answer), then the route table brought in step with the
/// server row; the target is the table's. A server found stopped loses its route, closing its
/// open connections here.
async fn authorize(d: &IdeDispatch, vmid: Vmid, grant: &IdeGrant, admins: bool) -> Result<SocketAddr, Refusal> {
    let routes = d.ide.router.routes();
    if let Some(target) = d.ide.access.get(&grant.session_id, vmid.0, admins) {
        // A remembered answer holds only while the route it was given for does.
        if routes.resolve(vmid) == Some(target) {
            return Ok(target);
        }
    }
    // Boxed: the database's futures are large, and this is the rare path.
    match Box::pin(check_session(d, vmid, grant, admins)).await {
        Ok(addr) => {
            if routes.register(vmid, addr) {
                tracing::info!(vmid = vmid.0, target = %addr, "IDE route registered");
                d.ide.access.forget(vmid.0);
            }
            let target = routes.resolve(vmid).ok_or(Refusal::NoIde)?;
            d.ide.access.put(&grant.session_id, vmid.0, admins, target);
            Ok(target)
        }
        Err(Refusal::Ended) => {
            // Ended on another replica: end it here too, closing its open connections.
            d.ide.router.revoke_session(&grant.session_id, grant.expires_at);
            Err(Refusal::Ended)
        }
        Err(refusal) => {
            d.ide.access.forget(vmid.0);
            let gone = matches!(refusal, Refusal::NotRunning | Refusal::NoServer | Refusal::NoIde | Refusal::Stopped);
            if gone && routes.unregister(vmid) {
                tracing::info!(vmid = vmid.0, "IDE route removed");
            }
            Err(refusal)
        }
    }
}

/// What the database says about session `grant` on `vmid`: not logged out on any replica, and
/// [`authorize_server`] for its user.
async fn check_session(d: &IdeDispatch, vmid: Vmid, grant: &IdeGrant, admins: bool) -> Result<SocketAddr, Refusal> {
    match ledger::session_revoked(&d.app.db, &grant.session_id).await {
        Ok(true) => return Err(Refusal::Ended),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "IDE authorisation: database error");
            return Err(Refusal::Internal);
        }
    }
    authorize_server(d, vmid, &grant.user_id, admins, None).await
}

/// Resolves when an open connection must close: the route is removed or moved, the session is
/// revoked or expires, or the periodic re-check against the database refuses.
fn access_closed(
    d: IdeDispatch,
    vmid: Vmid,
    target: SocketAddr,
    grant: IdeGrant,
    admins: bool,
) -> BoxFuture<'static, ()> {
    let route = d.ide.router.route_closed(vmid, target);
    let revoked = d.ide.router.session_revoked(&grant.session_id);
    let until_expiry = (grant.expires_at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
    let recheck = async move {
        let mut tick = tokio::time::interval(d.ide.recheck_every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match authorize(&d, vmid, &grant, admins).await {
                Ok(now) if now == target => {}
                Ok(_) => return,
                Err(why) => {
                    tracing::info!(vmid = vmid.0, user = %grant.user_id, reason = ?why, "IDE access ended");
                    return;
                }
            }
        }
    };
    async move {
        tokio::select! {
            () = route => {},
            () = revoked => {},
            () = tokio::time::sleep(until_expiry) => {},
            () = recheck => {},
        }
    }
    .boxed()
}

/// The first of `name`'s cookies that is a valid session for `vmid`.
fn session_from_cookies(ide: &IdeState, req: &impl Seen, name: &str, vmid: Vmid) -> Option<IdeGrant> {
    req.header_strs("cookie")
        .flatten()
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .find_map(|(_, value)| ide.router.verify_session(value, vmid).ok())
}

/// State-changing requests and WebSocket upgrades must not come from another origin: when they
/// name one, its `host[:port]` must be the request's `Host`. (Browsers always send `Origin` with
/// both; other clients may leave it out.)
fn origin_allowed(req: &impl Seen, host: &str) -> bool {
    let guarded = !matches!(req.method(), "GET" | "HEAD" | "OPTIONS") || req.is_websocket_upgrade();
    if !guarded {
        return true;
    }
    let mut origins = req.header_strs("origin");
    let (Some(origin), None) = (origins.next(), origins.next()) else {
        return req.header_strs("origin").next().is_none();
    };
    let Some(authority) = origin.and_then(|o| o.split_once("://")).map(|(_, a)| a) else {
        return false;
    };
    !host.is_empty() && authority.eq_ignore_ascii_case(host)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn client_ip(req: &Request) -> Option<IpAddr> {
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

fn see_other(location: &str, cookie: Option<HeaderValue>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    if let Some(c) = cookie {
        h.insert(header::SET_COOKIE, c);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The URL that brought the browser here held a token: never pass it on.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// The workspace `s`'s agent last reported: where its code-server finds the project.
fn reported_workspace(s: &Server) -> Option<&str> {
    s.last_status.as_ref()?.get("workspace")?.as_str()
}

/// `/?folder=…` for the workspace of `vmid`'s container (the default where it is not known).
async fn workspace_of(d: &IdeDispatch, vmid: Vmid) -> String {
    let server = repo::get_by_vmid(&d.app.db, vmid.0).await.ok().flatten();
    workspace_query(server.as_ref().and_then(reported_workspace))
}

/// The one answer to an IDE link that is not (or no longer) valid, whatever it names.
fn link_refused() -> Response {
    page(StatusCode::UNAUTHORIZED, "This IDE link has expired or was already used. Open the IDE again.")
}

fn page(status: StatusCode, message: &'static str) -> Response {
    proxy::plain(status, message).map(Body::new)
}
