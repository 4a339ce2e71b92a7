//! The auth contract over real HTTP, against SQLite and PostgreSQL: register, sign in by email or
//! username, `me`, sign out; duplicates, bad input, bad tokens, revocation, the login rate limit,
//! admins named by config, deleted accounts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use reqwest::StatusCode;
use serde_json::{json, Value};
use zlh_apid::auth::{self, admins, session, users, AdminUser, CurrentUser};
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing::{self, TestDb};
use zlh_apid::db::Db;
use zlh_apid::state::AppState;
use zlh_core::token::{self, TokenKey};

const PASSWORD: &str = "correct horse battery";

struct Api {
    base: String,
    state: Arc<AppState>,
    backend: &'static str,
    /// Keeps the test database alive (its SQLite file is removed on drop).
    _db: Option<TestDb>,
}

/// Serves the auth routes (plus two probes for the extractors) on 127.0.0.1:0 with the peer
/// address available, as the real server does.
async fn serve(backend: &'static str, db: Db, config: ApiConfig) -> Api {
    let state = zlh_apid::state::for_tests(db, config);
    let app = Router::new()
        .merge(auth::routes::router())
        .route("/probe/user", get(|u: CurrentUser| async move { Json(json!({ "id": u.id, "admin": u.is_admin() })) }))
        .route("/probe/admin", get(|a: AdminUser| async move { Json(json!({ "id": a.id })) }))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    Api { base: format!("http://{addr}"), state, backend, _db: None }
}

async fn each_backend(config: impl Fn() -> ApiConfig) -> Vec<Api> {
    let mut apis = Vec::new();
    for (name, t) in testing::both().await {
        let mut api = serve(name, t.db.clone(), config()).await;
        api._db = Some(t);
        apis.push(api);
    }
    apis
}

/// A client whose connections come from `from` (any 127.x address is this machine).
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(from.parse::<IpAddr>().unwrap()).build().unwrap()
}

impl Api {
    async fn post(&self, path: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
        self.post_from("127.0.0.1", path, body, token).await
    }

    async fn post_from(&self, from: &str, path: &str, body: Value, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = client_from(from).post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = client_from("127.0.0.1").get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    async fn register(&self, email: &str, username: &str) -> String {
        let (status, body) = self
            .post("/api/auth/register", json!({ "email": email, "username": username, "password": PASSWORD }), None)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{}: {body}", self.backend);
        assert_eq!(body["ok"], true, "{}", self.backend);
        body["token"].as_str().unwrap().to_owned()
    }

    async fn login(&self, identifier: &str, password: &str) -> (StatusCode, Value) {
        self.post("/api/auth/login", json!({ "identifier": identifier, "password": password }), None).await
    }

    async fn me(&self, token: &str) -> (StatusCode, Value) {
        self.get("/api/auth/me", Some(token)).await
    }

    async fn assert_refused(&self, token: &str, what: &str) {
        let (status, body) = self.me(token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{}: {what}: {body}", self.backend);
        assert_eq!(body, json!({ "error": "not signed in" }), "{}: {what}", self.backend);
    }

    async fn user_id(&self, username: &str) -> String {
        users::find_by_identifier(&self.state.db, username).await.unwrap().unwrap().id
    }
}

#[tokio::test]
async fn register_sign_in_by_email_or_username_and_sign_out() {
    for api in each_backend(ApiConfig::default).await {
        let b = api.backend;
        let first = api.register("  Alice@Example.COM", "Alice_1").await;

        let (status, me) = api.me(&first).await;
        assert_eq!(status, StatusCode::OK, "{b}: {me}");
        let id = me["id"].as_str().unwrap().to_owned();
        assert_eq!(
            me,
            json!({ "id": id, "email": "alice@example.com", "username": "alice_1", "role": "user" }),
            "{b}: stored lowercased, first user is not an admin"
        );

        // The password is stored as an argon2id hash, never as given.
        let hash = users::find_by_id(&api.state.db, &id).await.unwrap().unwrap().password_hash;
        assert!(hash.starts_with("$argon2id$"), "{b}: {hash}");
        assert!(!hash.contains(PASSWORD), "{b}");

        let mut tokens = Vec::new();
        for identifier in ["alice@example.com", "ALICE@example.com", "alice_1", " Alice_1 "] {
            let (status, body) = api.login(identifier, PASSWORD).await;
            assert_eq!(status, StatusCode::OK, "{b}: {identifier}: {body}");
            assert_eq!(body.as_object().unwrap().len(), 1, "{b}: only the token: {body}");
            let token = body["token"].as_str().unwrap().to_owned();
            assert_eq!(api.me(&token).await.1["id"], id.as_str(), "{b}: {identifier}");
            tokens.push(token);
        }

        let (status, body) = api.post("/api/auth/logout", json!({}), Some(&tokens[0])).await;
        assert_eq!((status, body), (StatusCode::OK, json!({ "ok": true })), "{b}");
        api.assert_refused(&tokens[0], "signed-out token").await;
        let (status, _) = api.post("/api/auth/logout", json!({}), Some(&tokens[0])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{b}: cannot sign out twice");
        // Other sessions of the same user are untouched.
        assert_eq!(api.me(&first).await.0, StatusCode::OK, "{b}");
        assert_eq!(api.me(&tokens[1]).await.0, StatusCode::OK, "{b}");

        let (status, body) = api.get("/api/auth/me", None).await;
        assert_eq!((status, body), (StatusCode::UNAUTHORIZED, json!({ "error": "not signed in" })), "{b}");
    }
}

#[tokio::test]
async fn duplicates_are_conflicts_that_name_the_field() {
    for api in each_backend(ApiConfig::default).await {
        let b = api.backend;
        api.register("alice@example.com", "alice").await;
        let register = |email: &str, username: &str| {
            api.post("/api/auth/register", json!({ "email": email, "username": username, "password": PASSWORD }), None)
        };
        let (status, body) = register("ALICE@example.com", "someone").await;
        assert_eq!(status, StatusCode::CONFLICT, "{b}: {body}");
        assert!(body["error"].as_str().unwrap().contains("email"), "{b}: {body}");
        let (status, body) = register("other@example.com", "ALICE").await;
        assert_eq!(status, StatusCode::CONFLICT, "{b}: {body}");
        assert!(body["error"].as_str().unwrap().contains("username"), "{b}: {body}");
        assert!(users::find_by_identifier(&api.state.db, "other@example.com").await.unwrap().is_none(), "{b}");

        // Racing registrations of one email: exactly one wins, the rest are told why.
        let racers = (0..4).map(|i| register("race@example.com", &format!("racer{i}")));
        let results = futures::future::join_all(racers).await;
        let created = results.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
        assert_eq!(created, 1, "{b}: {results:?}");
        for (status, body) in results.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
            assert_eq!(*status, StatusCode::CONFLICT, "{b}: {body}");
            assert!(body["error"].as_str().unwrap().contains("email"), "{b}: {body}");
        }
    }
}

#[tokio::test]
async fn bad_input_is_a_json_400_naming_the_field() {
    for api in each_backend(ApiConfig::default).await {
        let b = api.backend;
        let cases = [
            (json!({ "email": "not-an-email", "username": "alice", "password": PASSWORD }), "email"),
            (json!({ "email": "a b@example.com", "username": "alice", "password": PASSWORD }), "email"),
            (json!({ "email": "alice@example.com", "username": "al", "password": PASSWORD }), "username"),
            (json!({ "email": "alice@example.com", "username": "al!ce", "password": PASSWORD }), "username"),
            (json!({ "email": "alice@example.com", "username": "alice", "password": "short" }), "password"),
            (json!({ "email": "alice@example.com", "username": "alice", "password": "x".repeat(257) }), "password"),
            (json!({ "email": "alice@example.com", "username": "alice", "password": "          " }), "password"),
            (json!({ "email": "alice@example.com", "username": "alice" }), "password"),
            (json!({ "email": "alice@example.com", "username": "alice", "password": 123456789 }), "password"),
            (json!({ "username": "alice", "password": PASSWORD }), "email"),
        ];
        for (body, field) in cases {
            let (status, resp) = api.post("/api/auth/register", body.clone(), None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{b}: {body}: {resp}");
            let error = resp["error"].as_str().unwrap_or_else(|| panic!("{b}: JSON error for {body}: {resp}"));
            assert!(error.contains(field), "{b}: {body}: {error}");
            assert!(!error.contains("123456789") && !error.contains("short"), "{b}: no value echoed: {error}");
        }
        assert!(users::find_by_identifier(&api.state.db, "alice").await.unwrap().is_none(), "{b}: nothing created");

        // Not JSON at all, or not an object: still a JSON error, not a text one.
        for raw in ["{\"email\":", "[1,2]", ""] {
            for path in ["/api/auth/register", "/api/auth/login"] {
                let resp = reqwest::Client::new().post(format!("{}{path}", api.base)).body(raw).send().await.unwrap();
                assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{b}: {path} {raw:?}");
                let body: Value = resp.json().await.unwrap();
                assert!(body["error"].is_string(), "{b}: {path} {raw:?}: {body}");
            }
        }
        let (status, body) = api.post("/api/auth/login", json!({ "identifier": "  ", "password": "x" }), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{b}: {body}");
        assert!(body["error"].as_str().unwrap().contains("identifier"), "{b}: {body}");
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_look_the_same() {
    for api in each_backend(ApiConfig::default).await {
        let b = api.backend;
        api.register("alice@example.com", "alice").await;
        let wrong = api.login("alice", "not the password").await;
        let unknown_name = api.login("nobody", PASSWORD).await;
        let unknown_email = api.login("nobody@example.com", PASSWORD).await;
        let expected = (StatusCode::UNAUTHORIZED, json!({ "error": "invalid credentials" }));
        assert_eq!(wrong, expected, "{b}");
        assert_eq!(unknown_name, expected, "{b}");
        assert_eq!(unknown_email, expected, "{b}");
    }
}

#[tokio::test]
async fn expired_tampered_foreign_and_revoked_tokens_are_refused() {
    for api in each_backend(ApiConfig::default).await {
        let b = api.backend;
        let token = api.register("alice@example.com", "alice").await;
        let id = api.user_id("alice").await;
        assert_eq!(api.me(&token).await.0, StatusCode::OK, "{b}");

        // Issued a full session lifetime (and a minute) ago: expired, although its row exists.
        let long_ago = chrono::Utc::now() - api.state.config.session_ttl - Duration::from_secs(60);
        let (expired, _) = session::issue(&api.state, &id, long_ago).await.unwrap();
        api.assert_refused(&expired, "expired").await;

        // Any change to the payload breaks the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload = parts[1].to_owned();
        let last = payload.pop().unwrap();
        payload.push(if last == 'A' { 'B' } else { 'A' });
        api.assert_refused(&format!("{}.{payload}.{}", parts[0], parts[2]), "tampered payload").await;
        api.assert_refused(&format!("{}.{}.{}x", parts[0], parts[1], parts[2]), "tampered signature").await;

        // Signed with another key, or by the right key for another purpose.
        let now = chrono::Utc::now();
        let other_key = TokenKey::new(&[8u8; 32]).unwrap();
        let foreign = token::issue(&other_key, session::PURPOSE, &id, 0, Duration::from_secs(600), now).unwrap();
        api.assert_refused(&foreign, "other key").await;
        let ide = token::issue(&api.state.session_key, "zlh-ide", &id, 0, Duration::from_secs(600), now).unwrap();
        api.assert_refused(&ide, "other purpose").await;
        // Well signed but never a session (no row): refused.
        let rowless =
            token::issue(&api.state.session_key, session::PURPOSE, &id, 0, Duration::from_secs(600), now).unwrap();
        api.assert_refused(&rowless, "no session row").await;
        api.assert_refused("garbage", "garbage").await;
        let resp = reqwest::Client::new()
            .get(format!("{}/api/auth/me", api.base))
            .header("authorization", format!("Basic {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{b}: only Bearer");

        // Revoking every session of the user ends them all.
        let (_, second) = api.login("alice", PASSWORD).await;
        let second = second["token"].as_str().unwrap().to_owned();
        assert_eq!(api.me(&second).await.0, StatusCode::OK, "{b}");
        let revoked = session::revoke_all_for_user(&api.state.db, &id, zlh_apid::db::now_ms()).await.unwrap();
        assert_eq!(revoked, 2, "{b}: register and login (the expired one was pruned by the login)");
        api.assert_refused(&token, "revoked (register)").await;
        api.assert_refused(&second, "revoked (login)").await;
        // Signing in again works.
        assert_eq!(api.login("alice", PASSWORD).await.0, StatusCode::OK, "{b}");
    }
}

#[tokio::test]
async fn guessing_is_refused_without_checking_the_password_but_strangers_cannot_lock_the_owner_out() {
    // Three failures per address at an account (and per address), so time plays no part here.
    for api in each_backend(|| ApiConfig { login_attempts: 3, ..ApiConfig::default() }).await {
        let b = api.backend;
        api.register("alice@example.com", "alice").await;
        api.register("bob@example.com", "bob").await;
        // The reported attack: wrong passwords for alice from two addresses.
        for from in ["127.0.0.2", "127.0.0.3"] {
            for i in 0..3 {
                let guess = json!({ "identifier": "alice", "password": format!("guess {i}") });
                let (status, body) = api.post_from(from, "/api/auth/login", guess, None).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{b}: {from} failure {i}: {body}");
            }
            for identifier in ["alice", "alice@example.com"] {
                let resp = client_from(from)
                    .post(format!("{}/api/auth/login", api.base))
                    .json(&json!({ "identifier": identifier, "password": PASSWORD }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "{b}: {from} {identifier}, even right");
                let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=15 * 60).contains(&retry), "{b}: Retry-After {retry}");
                let body: Value = resp.json().await.unwrap();
                assert!(body["error"].as_str().unwrap().contains("too many"), "{b}: {body}");
            }
        }
        // Alice, from an address of her own, is not locked out (by username or e-mail).
        for identifier in ["alice", "alice@example.com"] {
            let right = json!({ "identifier": identifier, "password": PASSWORD });
            let (status, body) = api.post_from("127.0.0.4", "/api/auth/login", right, None).await;
            assert_eq!(status, StatusCode::OK, "{b}: the owner was locked out by strangers: {body}");
        }
        // An address that used up its failures is refused at every account.
        let bob = json!({ "identifier": "bob", "password": PASSWORD });
        assert_eq!(
            api.post_from("127.0.0.2", "/api/auth/login", bob.clone(), None).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(api.post_from("127.0.0.5", "/api/auth/login", bob, None).await.0, StatusCode::OK, "{b}");
    }
}

#[tokio::test]
async fn forwarded_for_is_ignored_unless_trusted() {
    let untrusted = each_backend(|| ApiConfig { login_attempts: 2, ..ApiConfig::default() }).await;
    let trusted =
        each_backend(|| ApiConfig { login_attempts: 2, trust_forwarded_for: true, ..ApiConfig::default() }).await;
    for (api, trusts) in untrusted.iter().map(|a| (a, false)).chain(trusted.iter().map(|a| (a, true))) {
        let b = api.backend;
        api.register("carol@example.com", "carol").await;
        let login = |who: &'static str, forwarded: &'static str| async move {
            client_from("127.0.0.1")
                .post(format!("{}/api/auth/login", api.base))
                .header("x-forwarded-for", forwarded)
                .json(&json!({ "identifier": who, "password": PASSWORD }))
                .send()
                .await
                .unwrap()
                .status()
        };
        // Two failures for unknown names, claiming different client addresses.
        assert_eq!(login("ghost1", "10.9.9.1").await, StatusCode::UNAUTHORIZED, "{b}");
        assert_eq!(login("ghost2", "10.9.9.2").await, StatusCode::UNAUTHORIZED, "{b}");
        // The header decides the address only when trusted; otherwise both came from 127.0.0.1.
        let expected = if trusts { StatusCode::OK } else { StatusCode::TOO_MANY_REQUESTS };
        assert_eq!(login("carol", "10.9.9.3").await, expected, "{b}: trusted={trusts}");
    }
}

#[tokio::test]
async fn registering_never_makes_an_admin_the_operator_does_and_roles_apply_at_once() {
    for (name, t) in testing::both().await {
        let api = serve(name, t.db.clone(), ApiConfig::default()).await;
        // Whoever registers first, and whatever address: a plain user, before and after signing in.
        let boss = api.register("Boss@Example.com", "boss").await;
        let user = api.register("user@example.com", "user").await;
        assert_eq!(api.me(&boss).await.1["role"], "user", "{name}");
        let (_, body) = api.login("boss", PASSWORD).await;
        let boss = body["token"].as_str().unwrap().to_owned();
        assert_eq!(api.me(&boss).await.1["role"], "user", "{name}: signing in grants nothing");
        assert_eq!(api.get("/probe/admin", Some(&boss)).await.0, StatusCode::FORBIDDEN, "{name}");

        // The operator grants it (`zlh-apid admin grant`): the existing session is an admin's now.
        assert_eq!(admins::grant(&api.state.db, "BOSS@example.com").await.unwrap(), admins::Change::Changed);
        assert_eq!(admins::grant(&api.state.db, "boss@example.com").await.unwrap(), admins::Change::AlreadySo);
        assert!(matches!(
            admins::grant(&api.state.db, "nobody@example.com").await,
            Err(admins::AdminError::NoSuchAccount(_))
        ));
        assert_eq!(admins::list(&api.state.db).await.unwrap(), ["boss@example.com"], "{name}");

        // AdminUser: 401 without a session, 403 for a user, through for an admin.
        assert_eq!(api.get("/probe/admin", None).await.0, StatusCode::UNAUTHORIZED, "{name}");
        let (status, body) = api.get("/probe/admin", Some(&user)).await;
        assert_eq!((status, body), (StatusCode::FORBIDDEN, json!({ "error": "admins only" })), "{name}");
        assert_eq!(api.get("/probe/admin", Some(&boss)).await.0, StatusCode::OK, "{name}");
        assert_eq!(api.get("/probe/user", Some(&boss)).await.1["admin"], true, "{name}");

        // A revocation is seen by the very next request on an existing session.
        assert_eq!(admins::revoke(&api.state.db, "boss@example.com").await.unwrap(), admins::Change::Changed);
        assert_eq!(api.get("/probe/admin", Some(&boss)).await.0, StatusCode::FORBIDDEN, "{name}");
        assert_eq!(api.me(&boss).await.1["role"], "user", "{name}");
        assert!(admins::list(&api.state.db).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_deleted_users_token_is_refused() {
    for api in each_backend(ApiConfig::default).await {
        let b = api.backend;
        let token = api.register("alice@example.com", "alice").await;
        let id = api.user_id("alice").await;
        assert_eq!(api.get("/probe/user", Some(&token)).await.0, StatusCode::OK, "{b}");
        sqlx::query("DELETE FROM users WHERE id = $1").bind(&id).execute(api.state.db.pool()).await.unwrap();
        api.assert_refused(&token, "deleted user").await;
        let (status, _) = api.get("/probe/user", Some(&token)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{b}");
        assert_eq!(api.login("alice", PASSWORD).await.0, StatusCode::UNAUTHORIZED, "{b}");
    }
}

#[tokio::test]
async fn sign_ups_from_one_address_are_limited_and_tokens_are_never_cached() {
    let config = || ApiConfig { register_attempts: 3, ..ApiConfig::default() };
    for api in each_backend(config).await {
        let backend = api.backend;
        let url = format!("{}/api/auth/register", api.base);
        let body = |i: usize| json!({ "email": format!("u{i}@example.com"), "username": format!("user{i}"), "password": PASSWORD });
        let first = client_from("127.0.0.7").post(&url).json(&body(0)).send().await.unwrap();
        assert_eq!(first.status(), StatusCode::CREATED, "{backend}");
        assert_eq!(first.headers()["cache-control"], "no-store", "{backend}: a session token in the answer");
        // A refused sign-up counts as well: a flood of bad requests is a flood.
        let bad = client_from("127.0.0.7").post(&url).json(&json!({ "email": "nope" })).send().await.unwrap();
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "{backend}");
        let (status, _) = api.post_from("127.0.0.7", "/api/auth/register", body(1), None).await;
        assert_eq!(status, StatusCode::CREATED, "{backend}");

        let limited = client_from("127.0.0.7").post(&url).json(&body(2)).send().await.unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS, "{backend}");
        let retry: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{backend}: Retry-After {retry}");
        assert!(
            users::find_by_identifier(&api.state.db, "user2").await.unwrap().is_none(),
            "{backend}: nothing stored"
        );

        // Another address is not affected; signing in is not a sign-up.
        let (status, _) = api.post_from("127.0.0.8", "/api/auth/register", body(2), None).await;
        assert_eq!(status, StatusCode::CREATED, "{backend}");
        let login = client_from("127.0.0.7")
            .post(format!("{}/api/auth/login", api.base))
            .json(&json!({ "identifier": "user0", "password": PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), StatusCode::OK, "{backend}");
        assert_eq!(login.headers()["cache-control"], "no-store", "{backend}");
    }
}
