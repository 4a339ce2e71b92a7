//! The portal's auth contract:
//!
//! - `POST /api/auth/register` `{email, username, password}` → 201 `{"ok":true,"token":…}`
//! - `POST /api/auth/login` `{identifier, password}` (email or username) → `{"token":…}`
//! - `GET /api/auth/me` → `{id, email, username, role}`
//! - `POST /api/auth/logout` → `{"ok":true}`; the token stops working, and so do the IDE sessions
//!   opened with it (their open WebSockets close).
//!
//! Bodies are read as bytes and parsed here so every bad body gets a JSON 400 naming the field,
//! and no message or log line ever carries a password.

use std::fmt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CACHE_CONTROL, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::ratelimit::{self, Admission, ClientIp, Limits, LoginKeys, LoginLimits};
use super::users::{self, Role};
use super::{password, session, CurrentUser};
use crate::db;
use crate::http::{ApiError, ApiResult};
use crate::state::AppState;

/// Auth bodies are a few short strings.
const BODY_LIMIT: usize = 16 * 1024;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/auth/register", post(register))
        .route("/api/auth/login", post(login))
        .route("/api/auth/me", get(me))
        .route("/api/auth/logout", post(logout))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

/// `POST /api/auth/register`. `Debug` hides the password.
pub struct RegisterRequest {
    pub email: String,
    pub username: String,
    pub password: String,
}

/// `POST /api/auth/login`. `Debug` hides the password.
pub struct LoginRequest {
    pub identifier: String,
    pub password: String,
}

impl RegisterRequest {
    pub fn from_json(body: &[u8]) -> ApiResult<Self> {
        let mut fields = json_object(body)?;
        Ok(Self {
            email: take_string(&mut fields, "email")?,
            username: take_string(&mut fields, "username")?,
            password: take_string(&mut fields, "password")?,
        })
    }
}

impl LoginRequest {
    pub fn from_json(body: &[u8]) -> ApiResult<Self> {
        let mut fields = json_object(body)?;
        Ok(Self {
            identifier: take_string(&mut fields, "identifier")?,
            password: take_string(&mut fields, "password")?,
        })
    }
}

impl fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("email", &self.email)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest").field("identifier", &self.identifier).field("password", &"<redacted>").finish()
    }
}

/// The body as a JSON object. serde's own messages are not passed on: some quote the offending
/// value, which could be a password.
fn json_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
        Err(_) => Err(ApiError::bad_request("request body is not valid JSON")),
    }
}

fn take_string(fields: &mut Map<String, Value>, name: &str) -> ApiResult<String> {
    match fields.remove(name) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("{name} is required"))),
        Some(_) => Err(ApiError::bad_request(format!("{name} must be a string"))),
    }
}

/// A body that could not be read (too large, broken stream) as a JSON error.
fn body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| ApiError::new(e.status(), "request body is too large or could not be read"))
}

async fn register(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    // Counted before anything else, so a flood of bad or duplicate sign-ups is limited too.
    let limits = Limits::registrations(&state.config);
    if let Admission::Limited { retry_after } =
        ratelimit::begin_registration(&state.db, ip, limits, db::now_ms()).await?
    {
        let secs = retry_after.as_secs().max(1);
        tracing::info!(client = ?ip, "registration refused: too many from this address");
        let mut response =
            ApiError::too_many(format!("too many sign-ups from this address; try again in {secs} seconds"))
                .into_response();
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        return Ok(response);
    }
    let req = RegisterRequest::from_json(&body(raw)?)?;
    let email = users::normalize_email(&req.email)?;
    let username = users::normalize_username(&req.username)?;
    password::check_policy(&req.password).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Before hashing: a duplicate should not cost a hash.
    users::check_available(&state.db, &email, &username).await?;
    let hash = password::hash(req.password).await.map_err(ApiError::internal)?;
    // Never an admin: nobody has verified the address (operators use `zlh-apid admin grant`).
    let user = users::create(&state.db, &email, &username, &hash, Role::User).await?;
    let (token, session) = session::issue(&state, &user.id, chrono::Utc::now()).await.map_err(ApiError::internal)?;
    tracing::info!(user_id = %user.id, session_id = %session.id, role = user.role.as_str(), "account registered");
    Ok(no_store((StatusCode::CREATED, Json(json!({ "ok": true, "token": token }))).into_response()))
}

/// A response carrying a session token: no cache along the way may keep it.
fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn login(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req = LoginRequest::from_json(&body(raw)?)?;
    if req.identifier.trim().is_empty() {
        return Err(ApiError::bad_request("identifier is required"));
    }
    let user = users::find_by_identifier(&state.db, &req.identifier).await?;
    // One account, one counter, whether it is named by email or by username.
    let keys = LoginKeys::new(user.as_ref().map_or(req.identifier.as_str(), |u| u.username.as_str()), ip);
    let attempt =
        match ratelimit::begin(&state.db, &keys, LoginLimits::from_config(&state.config), db::now_ms()).await? {
            Admission::Allowed(attempt) => attempt,
            Admission::Limited { retry_after } => {
                let secs = retry_after.as_secs().max(1);
                let mut response = ApiError::too_many(format!("too many failed sign-ins; try again in {secs} seconds"))
                    .into_response();
                response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
                return Ok(response);
            }
        };
    // Unknown users cost a verification too, so timing does not tell which accounts exist.
    let matched = match &user {
        Some(u) => password::verify(req.password, u.password_hash.clone()).await,
        None => password::verify_unknown(req.password).await,
    }
    .map_err(ApiError::internal)?;
    let user = match user {
        Some(user) if matched => user,
        _ => {
            ratelimit::failed(attempt);
            tracing::info!(client = ?ip, "sign-in refused");
            return Err(ApiError::unauthorized("invalid credentials"));
        }
    };
    ratelimit::succeeded(&state.db, attempt).await?;
    let (token, session) = session::issue(&state, &user.id, chrono::Utc::now()).await.map_err(ApiError::internal)?;
    tracing::info!(user_id = %user.id, session_id = %session.id, role = user.role.as_str(), "signed in");
    Ok(no_store(Json(json!({ "token": token })).into_response()))
}

async fn me(user: CurrentUser) -> Json<Value> {
    Json(json!({ "id": user.id, "email": user.email, "username": user.username, "role": user.role }))
}

async fn logout(State(state): State<Arc<AppState>>, user: CurrentUser) -> ApiResult<Json<Value>> {
    session::revoke(&state.db, &user.session_id, db::now_ms()).await?;
    // The IDE sessions opened from this sign-in end with it; other replicas read the session row.
    let ide_sessions = match state.ide.get() {
        Some(ide) => ide.api_session_ended(&state.db, &user.session_id).await?,
        None => 0,
    };
    tracing::info!(user_id = %user.id, session_id = %user.session_id, ide_sessions, "signed out");
    Ok(Json(json!({ "ok": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_debug_never_shows_the_password() {
        let reg =
            RegisterRequest::from_json(br#"{"email":"a@b.c","username":"abc","password":"hunter2-secret"}"#).unwrap();
        let login = LoginRequest::from_json(br#"{"identifier":"abc","password":"hunter2-secret"}"#).unwrap();
        assert_eq!(reg.password, "hunter2-secret");
        for shown in [format!("{reg:?}"), format!("{login:?}"), format!("{reg:#?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn bad_bodies_name_the_field_and_never_echo_a_value() {
        let err = |body: &[u8]| LoginRequest::from_json(body).unwrap_err().message;
        assert_eq!(err(b"{"), "request body is not valid JSON");
        assert_eq!(err(b"[1]"), "request body must be a JSON object");
        assert_eq!(err(br#"{"identifier":"abc"}"#), "password is required");
        assert_eq!(err(br#"{"identifier":"abc","password":12345678}"#), "password must be a string");
        assert_eq!(err(br#"{"identifier":null,"password":"x"}"#), "identifier is required");
    }
}
