//! Operations: `/metrics` only for Prometheus's token or an admin, the OpenAPI document, health,
//! and what billing's suspension does to a user's servers (stopped, marked suspended, refused
//! power actions, started again when paid), on both backends.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use zlh_apid::billing::{ServerActions, Suspension};
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing;
use zlh_apid::servers::actions::ContainerActions;
use zlh_apid::servers::repo::{self, state, Kind};
use zlh_apid::state::AppState;
use zlh_core::container::mock::{MockHost, MockStep};
use zlh_core::container::{ContainerHost, ContainerKind, ContainerSpec};

async fn serve(app: Arc<AppState>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = zlh_apid::http::app(app).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn register(http: &reqwest::Client, base: &str, name: &str) -> String {
    let r: Value = http
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"email": format!("{name}@example.com"), "username": name, "password": "a long password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["token"].as_str().unwrap_or_else(|| panic!("{r}")).to_string()
}

#[tokio::test]
async fn metrics_need_the_scrape_token_or_an_admin_and_the_contract_is_published() {
    for (name, t) in testing::both().await {
        let config =
            ApiConfig { metrics_token: Some("prometheus-scrape-token-0123456789".into()), ..ApiConfig::default() };
        let base = serve(zlh_apid::state::for_tests(t.db.clone(), config)).await;
        let http = reqwest::Client::new();
        let user = register(&http, &base, "plain").await;
        let admin = register(&http, &base, "root").await;
        zlh_apid::auth::admins::grant(&t.db, "root@example.com").await.unwrap();
        let get = |token: Option<String>| {
            let mut r = http.get(format!("{base}/metrics"));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send()
        };
        assert_eq!(get(None).await.unwrap().status(), 401, "{name}");
        assert_eq!(get(Some(user)).await.unwrap().status(), 403, "{name}");
        assert_eq!(get(Some("wrong".into())).await.unwrap().status(), 401, "{name}");
        let body = get(Some(admin)).await.unwrap().text().await.unwrap();
        assert!(
            body.contains("zlh_api_http_requests_total{method=\"POST\",route=\"/api/auth/register\",status=\"201\"}"),
            "{body}"
        );
        let scraped = get(Some("prometheus-scrape-token-0123456789".into())).await.unwrap();
        assert_eq!(scraped.status(), 200);

        let doc: Value = http.get(format!("{base}/api/openapi.json")).send().await.unwrap().json().await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        for path in ["/api/servers", "/api/dev", "/api/servers/{id}/status", "/api/auth/login", "/api/billing/webhook"]
        {
            assert!(doc["paths"][path].is_object(), "{path} documented");
        }
        assert_eq!(http.get(format!("{base}/api/health")).send().await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn suspension_stops_servers_refuses_power_and_payment_resumes_them() {
    for (name, t) in testing::both().await {
        let host = Arc::new(MockHost::default());
        let app = AppState::build(t.db.clone(), ApiConfig::default(), &[9u8; 32], host.clone(), None).unwrap();
        let base = serve(app.clone()).await;
        let http = reqwest::Client::new();
        let token = register(&http, &base, "payer").await;
        let me: Value =
            http.get(format!("{base}/api/auth/me")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        let user_id = me["id"].as_str().unwrap();
        let s = repo::insert(&app.db, user_id, Kind::Game, "mc", "basic", &json!({})).await.unwrap();
        repo::set_vmid(&app.db, &s.id, 5000).await.unwrap();
        let spec = ContainerSpec {
            vmid: 5000,
            kind: ContainerKind::Game,
            hostname: "game-5000".into(),
            memory_mb: 1024,
            disk_gb: 10,
            cores: 1,
            agent_token: app.agent_token(5000),
            ports: vec![],
        };
        host.create(&spec).await.unwrap();
        repo::set_endpoint(&app.db, &s.id, "http://127.0.0.1:9/", None).await.unwrap();
        repo::set_state(&app.db, &s.id, state::RUNNING, None).await.unwrap();

        let actions = ContainerActions { app: OnceLock::new() };
        let _ = actions.app.set(Arc::downgrade(&app));
        actions.suspend_user_servers(user_id, Suspension::PastDue).await.unwrap();
        assert!(host.calls().contains(&(MockStep::Stop, 5000)), "{name}: container stopped");
        let got = repo::get(&app.db, &s.id).await.unwrap().unwrap();
        assert_eq!(got.state, state::SUSPENDED, "{name}");
        assert_eq!(got.error.as_deref(), Some(Suspension::PastDue.reason()), "{name}: the owner sees why");
        let r = http.post(format!("{base}/api/servers/{}/game/start", s.id)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 402, "{name}: a suspended server cannot be started");
        // Suspending twice is harmless; paying resumes.
        actions.suspend_user_servers(user_id, Suspension::PastDue).await.unwrap();
        actions.resume_user_servers(user_id).await.unwrap();
        assert!(host.calls().contains(&(MockStep::Start, 5000)), "{name}: container started again");
        assert_eq!(repo::get(&app.db, &s.id).await.unwrap().unwrap().state, state::RUNNING, "{name}");
    }
}
