//! Shared by the billing tests: users in the database, a signed-in user taken from a test
//! header, a recording stand-in for the servers module, webhook signing, and a real server.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;
use zlh_apid::billing::{AuthenticatedUser, BillingState, ServerActions};
use zlh_apid::config::ApiConfig;
use zlh_apid::db::{now_ms, Db};
use zlh_apid::state::AppState;

pub const WEBHOOK_SECRET: &str = "whsec_test_secret";

pub async fn insert_user(db: &Db, id: &str) {
    sqlx::query("INSERT INTO users (id, email, username, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(format!("{id}@example.com"))
        .bind(id)
        .bind("x")
        .bind(now_ms())
        .execute(db.pool())
        .await
        .expect("insert user");
}

/// The signed-in user, from `x-test-user` (email `<id>@example.com`); 401 without it.
pub struct TestUser {
    pub id: String,
    pub email: String,
}

impl AuthenticatedUser for TestUser {
    fn id(&self) -> &str {
        &self.id
    }
    fn email(&self) -> &str {
        &self.email
    }
}

impl FromRequestParts<Arc<AppState>> for TestUser {
    type Rejection = (StatusCode, Json<serde_json::Value>);

    async fn from_request_parts(parts: &mut Parts, _: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get("x-test-user")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| (StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": "sign in first" }))))?;
        Ok(TestUser { id: id.to_string(), email: format!("{id}@example.com") })
    }
}

/// Records what billing asked of the servers module; can be told to fail.
#[derive(Default)]
pub struct RecordingActions {
    pub suspended: Mutex<Vec<String>>,
    /// Why each of `suspended` was suspended, in the same order.
    pub reasons: Mutex<Vec<zlh_apid::billing::Suspension>>,
    pub resumed: Mutex<Vec<String>>,
    pub fail_suspend: Mutex<bool>,
    pub fail_resume: Mutex<bool>,
    pub changed: Notify,
}

impl RecordingActions {
    pub fn suspended(&self) -> Vec<String> {
        self.suspended.lock().unwrap().clone()
    }
    pub fn reasons(&self) -> Vec<zlh_apid::billing::Suspension> {
        self.reasons.lock().unwrap().clone()
    }
    pub fn resumed(&self) -> Vec<String> {
        self.resumed.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl ServerActions for RecordingActions {
    async fn suspend_user_servers(&self, user_id: &str, why: zlh_apid::billing::Suspension) -> anyhow::Result<()> {
        if *self.fail_suspend.lock().unwrap() {
            anyhow::bail!("the host is unreachable");
        }
        self.suspended.lock().unwrap().push(user_id.to_string());
        self.reasons.lock().unwrap().push(why);
        self.changed.notify_waiters();
        Ok(())
    }
    async fn resume_user_servers(&self, user_id: &str) -> anyhow::Result<()> {
        if *self.fail_resume.lock().unwrap() {
            anyhow::bail!("the host is unreachable");
        }
        self.resumed.lock().unwrap().push(user_id.to_string());
        self.changed.notify_waiters();
        Ok(())
    }
}

/// A config with a webhook secret and Stripe prices, on the local provider.
pub fn config() -> ApiConfig {
    use zlh_apid::billing::PlanId;
    ApiConfig {
        stripe_webhook_secret: Some(WEBHOOK_SECRET.to_string().into()),
        stripe_prices: [
            (PlanId::Basic, "price_basic".to_string()),
            (PlanId::Standard, "price_standard".to_string()),
            (PlanId::Pro, "price_pro".to_string()),
        ]
        .into(),
        ..ApiConfig::default()
    }
}

pub fn billing(config: &ApiConfig, db: &Db, actions: Arc<RecordingActions>) -> Arc<BillingState> {
    Arc::new(BillingState::from_config(config, db.clone(), actions).expect("billing state"))
}

/// A `Stripe-Signature` value for `body` at unix time `t`, computed here independently.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hmac_hex(secret, &t.to_string(), body))
}

pub fn hmac_hex(secret: &str, t: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The billing router (with [`TestUser`]) served on 127.0.0.1:0; returns its base URL.
pub async fn serve(db: &Db, config: ApiConfig, billing: Arc<BillingState>) -> String {
    let state = zlh_apid::state::for_tests(db.clone(), config);
    let app = zlh_apid::billing::router::<TestUser>(billing).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// An event as Stripe sends it.
pub fn event(id: &str, kind: &str, object: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "object": "event",
        "type": kind,
        "created": now_secs(),
        "data": { "object": object },
    }))
    .unwrap()
}
