//! The Stripe provider against a stand-in for Stripe's REST API on 127.0.0.1: the form fields
//! and the key it sends, what it makes of Stripe's answers, and the routes on top of it.

mod billing_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use billing_support::*;
use serde_json::{json, Value};
use zlh_apid::billing::stripe::StripeProvider;
use zlh_apid::billing::webhook::handle_event;
use zlh_apid::billing::{
    BillingCustomer, BillingProviderKind, BillingState, PaymentProvider, PlanId, ProviderError, Secret,
};
use zlh_apid::config::ApiConfig;

const KEY: &str = "sk_test_51Secret";

#[derive(Debug, Clone)]
struct Call {
    path: String,
    authorization: String,
    form: HashMap<String, String>,
}

#[derive(Default)]
struct StandIn {
    calls: Mutex<Vec<Call>>,
    /// Answer with this error instead of a session.
    error: Mutex<Option<(StatusCode, String)>>,
}

async fn stand_in() -> (String, Arc<StandIn>) {
    async fn session(
        State(s): State<Arc<StandIn>>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        Form(form): Form<HashMap<String, String>>,
    ) -> (StatusCode, String) {
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        s.calls.lock().unwrap().push(Call { path: uri.path().to_string(), authorization: authorization.into(), form });
        if let Some(e) = s.error.lock().unwrap().clone() {
            return e;
        }
        let (id, url) = if uri.path().contains("checkout") {
            ("cs_test_1", "https://checkout.stripe.com/c/pay/cs_test_1")
        } else {
            ("bps_test_1", "https://billing.stripe.com/p/session/bps_test_1")
        };
        (StatusCode::OK, json!({ "id": id, "object": "session", "url": url }).to_string())
    }
    let state = Arc::new(StandIn::default());
    let app = Router::new()
        .route("/v1/checkout/sessions", post(session))
        .route("/v1/billing_portal/sessions", post(session))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

fn stripe_config(api_base: &str) -> ApiConfig {
    ApiConfig {
        billing_provider: BillingProviderKind::Stripe,
        stripe_secret_key: Some(Secret::new(KEY)),
        stripe_api_base: format!("{api_base}/"),
        billing_return_url: "https://portal.example.com/billing".into(),
        ..config()
    }
}

fn provider(api_base: &str) -> StripeProvider {
    let cfg = stripe_config(api_base);
    StripeProvider::new(&cfg.stripe_api_base, Secret::new(KEY), cfg.stripe_prices)
}

fn customer(customer_id: Option<&str>) -> BillingCustomer {
    BillingCustomer {
        user_id: "u1".into(),
        email: "u1@example.com".into(),
        customer_id: customer_id.map(str::to_string),
    }
}

#[tokio::test]
async fn checkout_posts_a_subscription_session_with_the_key() {
    let (base, stripe) = stand_in().await;
    let p = provider(&base);
    let url = p.checkout(&customer(None), PlanId::Standard.plan(), "https://portal.example.com/billing").await.unwrap();
    assert_eq!(url, "https://checkout.stripe.com/c/pay/cs_test_1");
    let call = stripe.calls.lock().unwrap()[0].clone();
    assert_eq!(call.path, "/v1/checkout/sessions");
    assert_eq!(call.authorization, format!("Bearer {KEY}"));
    let expected: HashMap<String, String> = [
        ("mode", "subscription"),
        ("line_items[0][price]", "price_standard"),
        ("line_items[0][quantity]", "1"),
        ("success_url", "https://portal.example.com/billing?checkout=success&session_id={CHECKOUT_SESSION_ID}"),
        ("cancel_url", "https://portal.example.com/billing?checkout=canceled"),
        ("client_reference_id", "u1"),
        ("customer_email", "u1@example.com"),
        ("metadata[user_id]", "u1"),
        ("metadata[plan]", "standard"),
        ("subscription_data[metadata][user_id]", "u1"),
        ("subscription_data[metadata][plan]", "standard"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(call.form, expected);

    // A returning customer is named instead of their email.
    p.checkout(&customer(Some("cus_9")), PlanId::Pro.plan(), "https://x.example/b?tab=1").await.unwrap();
    let call = stripe.calls.lock().unwrap()[1].clone();
    assert_eq!(call.form.get("customer").map(String::as_str), Some("cus_9"));
    assert!(!call.form.contains_key("customer_email"));
    assert_eq!(call.form["line_items[0][price]"], "price_pro");
    assert_eq!(call.form["cancel_url"], "https://x.example/b?tab=1&checkout=canceled");
}

#[tokio::test]
async fn portal_posts_the_customer_and_return_url() {
    let (base, stripe) = stand_in().await;
    let url = provider(&base).portal("cus_9", "https://portal.example.com/billing").await.unwrap();
    assert_eq!(url, "https://billing.stripe.com/p/session/bps_test_1");
    let call = stripe.calls.lock().unwrap()[0].clone();
    assert_eq!(call.path, "/v1/billing_portal/sessions");
    assert_eq!(call.authorization, format!("Bearer {KEY}"));
    let expected: HashMap<String, String> =
        [("customer", "cus_9"), ("return_url", "https://portal.example.com/billing")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(call.form, expected);
}

#[tokio::test]
async fn stripe_errors_become_clear_failures() {
    let (base, stripe) = stand_in().await;
    let p = provider(&base);
    *stripe.error.lock().unwrap() = Some((
        StatusCode::BAD_REQUEST,
        json!({ "error": { "type": "invalid_request_error", "message": "No such price: 'price_standard'" } })
            .to_string(),
    ));
    let e = p.checkout(&customer(None), PlanId::Standard.plan(), "https://x.example").await.unwrap_err();
    assert!(matches!(&e, ProviderError::Refused(m) if m == "No such price: 'price_standard'"), "{e:?}");
    *stripe.error.lock().unwrap() = Some((StatusCode::INTERNAL_SERVER_ERROR, "<html>oops</html>".into()));
    let e = p.portal("cus_1", "https://x.example").await.unwrap_err();
    assert!(matches!(&e, ProviderError::Refused(m) if m.contains("500")), "{e:?}");
    assert!(!e.to_string().contains(KEY));

    // No price configured for the plan: nothing is sent.
    let before = stripe.calls.lock().unwrap().len();
    let bare = StripeProvider::new(&base, Secret::new(KEY), Default::default());
    let e = bare.checkout(&customer(None), PlanId::Basic.plan(), "https://x.example").await.unwrap_err();
    assert!(matches!(&e, ProviderError::NotConfigured(m) if m.contains("basic")), "{e:?}");
    assert_eq!(stripe.calls.lock().unwrap().len(), before);

    // Nobody listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let e = provider(&format!("http://{closed}")).portal("cus_1", "https://x.example").await.unwrap_err();
    assert!(matches!(e, ProviderError::Unreachable(_)), "{e:?}");
}

async fn call(base: &str, path: &str, user: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(format!("{base}{path}"));
    if let Some(u) = user {
        req = req.header("x-test-user", u);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn routes_on_stripe() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        insert_user(db, "gail").await;
        let (stripe_base, stripe) = stand_in().await;
        let cfg = stripe_config(&stripe_base);
        let actions = Arc::new(RecordingActions::default());
        let b = billing(&cfg, db, actions);
        assert!(b.require_subscription, "{name}: Stripe requires a subscription by default");
        let base = serve(db, cfg, b.clone()).await;

        let (status, reply) = call(&base, "/api/billing/portal", Some("gail"), None).await;
        assert_eq!((status, reply), (409, json!({ "error": "no billing account yet: subscribe to a plan first" })));
        let (status, reply) = call(&base, "/api/billing/checkout", Some("gail"), Some(json!({ "plan": "pro" }))).await;
        assert_eq!((status, reply), (200, json!({ "url": "https://checkout.stripe.com/c/pay/cs_test_1" })), "{name}");
        assert_eq!(stripe.calls.lock().unwrap()[0].form["client_reference_id"], "gail");

        // Stripe refuses: a 502 that says why.
        *stripe.error.lock().unwrap() = Some((
            StatusCode::BAD_REQUEST,
            json!({ "error": { "message": "No such price: 'price_pro'" } }).to_string(),
        ));
        let (status, reply) = call(&base, "/api/billing/checkout", Some("gail"), Some(json!({ "plan": "pro" }))).await;
        assert_eq!((status, reply), (502, json!({ "error": "payment provider refused: No such price: 'price_pro'" })));
        *stripe.error.lock().unwrap() = None;

        // Paid: a second checkout would charge twice; the portal opens for the customer.
        let done = event(
            "evt_done",
            "checkout.session.completed",
            json!({ "mode": "subscription",
            "client_reference_id": "gail", "customer": "cus_gail", "subscription": "sub_gail", "metadata": { "plan": "pro" } }),
        );
        handle_event(db, &b, &done, 1).await.unwrap();
        let (status, reply) =
            call(&base, "/api/billing/checkout", Some("gail"), Some(json!({ "plan": "basic" }))).await;
        assert_eq!(status, 409, "{name}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains("POST /api/billing/portal"), "{reply}");
        let (status, reply) = call(&base, "/api/billing/portal", Some("gail"), None).await;
        assert_eq!((status, reply), (200, json!({ "url": "https://billing.stripe.com/p/session/bps_test_1" })));
        let portal = stripe.calls.lock().unwrap().last().unwrap().clone();
        assert_eq!(portal.form["customer"], "cus_gail");
        assert_eq!(portal.form["return_url"], "https://portal.example.com/billing");
    }
}

#[test]
fn stripe_config_is_checked_and_its_secrets_never_printed() {
    let cfg = stripe_config("https://api.stripe.com");
    let printed = format!("{cfg:?}");
    assert!(!printed.contains(KEY) && !printed.contains(WEBHOOK_SECRET), "{printed}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = rt.block_on(zlh_apid::db::testing::sqlite());
    let build = |cfg: &ApiConfig| BillingState::from_config(cfg, t.db.clone(), Arc::new(RecordingActions::default()));
    let no_key = ApiConfig { stripe_secret_key: None, ..cfg.clone() };
    assert_eq!(build(&no_key).err().unwrap().to_string(), "billing_provider = \"stripe\" needs stripe_secret_key");
    let relative = ApiConfig { billing_return_url: "/billing".into(), ..cfg.clone() };
    assert!(build(&relative).err().unwrap().to_string().contains("absolute"));
    // From TOML, with prices per plan; an unknown plan name is refused.
    let parsed: ApiConfig = toml::from_str(
        "billing_provider = \"stripe\"\nstripe_secret_key = \"sk_x\"\n[stripe_prices]\nbasic = \"price_b\"\n",
    )
    .unwrap();
    assert_eq!(parsed.billing_provider, BillingProviderKind::Stripe);
    assert_eq!(parsed.stripe_prices[&PlanId::Basic], "price_b");
    assert_eq!(parsed.stripe_secret_key.unwrap().expose(), "sk_x");
    assert!(toml::from_str::<ApiConfig>("[stripe_prices]\ngold = \"price_g\"\n").is_err());
}
