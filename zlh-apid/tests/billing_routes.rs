//! The billing routes on the embedded default (the local provider), and the plan limits that
//! provisioning is held to. On SQLite and PostgreSQL.

mod billing_support;

use std::sync::Arc;

use axum::http::StatusCode;
use billing_support::*;
use serde_json::{json, Value};
use zlh_apid::billing::{
    admit_new_server, check_limits, check_totals, limits_for_user, subscriptions, LimitError, Plan, PlanId, Status,
    Usage,
};
use zlh_apid::config::ApiConfig;

async fn call(base: &str, method: &str, path: &str, user: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = match method {
        "GET" => client.get(format!("{base}{path}")),
        _ => client.post(format!("{base}{path}")),
    };
    if let Some(u) = user {
        req = req.header("x-test-user", u);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[test]
fn plans_and_their_limits() {
    let basic = Plan::parse("basic").unwrap();
    assert_eq!((basic.memory_mb, basic.disk_gb), (1024, 10));
    assert_eq!((PlanId::Standard.plan().memory_mb, PlanId::Standard.plan().disk_gb), (2048, 20));
    assert_eq!((PlanId::Pro.plan().memory_mb, PlanId::Pro.plan().disk_gb), (4096, 50));
    assert_eq!(Plan::parse("gold").unwrap_err().to_string(), "unknown plan \"gold\" (plans: basic, standard, pro)");

    let refused = check_limits(basic, 2048, 10).unwrap_err();
    assert_eq!(refused, LimitError::Memory { plan: PlanId::Basic, allowed: 1024, requested: 2048 });
    assert!(refused.to_string().contains("1024 MB"), "{refused}");
    assert!(matches!(check_limits(basic, 1024, 11), Err(LimitError::Disk { allowed: 10, requested: 11, .. })));
    assert_eq!(check_limits(basic, 1024, 10), Ok(()));
    assert_eq!(check_limits(PlanId::Standard.plan(), 2048, 20), Ok(()));
    assert!(check_limits(PlanId::Pro.plan(), 4097, 1).is_err());

    // What all of a user's servers hold together.
    let two = Usage { servers: 2, memory_mb: 2048, disk_gb: 20 };
    let refused = check_totals(basic, two, 512, 5).unwrap_err();
    assert_eq!(refused.to_string(), "the Basic plan allows 2 servers; you have 2 (delete one or upgrade the plan)");
    let one = Usage { servers: 1, memory_mb: 1536, disk_gb: 10 };
    let refused = check_totals(basic, one, 1024, 10).unwrap_err();
    assert!(matches!(refused, LimitError::TotalMemory { allowed: 2048, used: 1536, requested: 1024, .. }), "{refused}");
    assert!(refused.to_string().contains("2048 MB of memory in all"), "{refused}");
    assert_eq!(check_totals(basic, one, 512, 10), Ok(()));
    assert!(matches!(check_totals(basic, one, 512, 11), Err(LimitError::TotalDisk { allowed: 20, .. })));
    assert_eq!(check_totals(PlanId::Pro.plan(), Usage { servers: 9, ..one }, 4096, 50), Ok(()));
}

#[tokio::test]
async fn local_checkout_activates_at_once() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        insert_user(db, "hana").await;
        let cfg = config();
        let b = billing(&cfg, db, Arc::default());
        assert!(!b.require_subscription, "{name}: the local provider does not require paying");
        let base = serve(db, cfg, b.clone()).await;

        // Public: the plans. Signed in only: the rest.
        let (status, plans) = call(&base, "GET", "/api/billing/plans", None, None).await;
        assert_eq!(status, 200);
        assert_eq!(
            plans,
            json!({ "plans": [
                { "id": "basic", "name": "Basic", "memoryMb": 1024, "diskGb": 10,
                  "servers": 2, "totalMemoryMb": 2048, "totalDiskGb": 20 },
                { "id": "standard", "name": "Standard", "memoryMb": 2048, "diskGb": 20,
                  "servers": 5, "totalMemoryMb": 8192, "totalDiskGb": 100 },
                { "id": "pro", "name": "Pro", "memoryMb": 4096, "diskGb": 50,
                  "servers": 10, "totalMemoryMb": 32768, "totalDiskGb": 500 },
            ]})
        );
        for (method, path) in
            [("GET", "/api/billing/subscription"), ("POST", "/api/billing/checkout"), ("POST", "/api/billing/portal")]
        {
            assert_eq!(call(&base, method, path, None, Some(r#"{"plan":"basic"}"#)).await.0, 401, "{path}");
        }

        // Before subscribing: nothing to manage, basic limits for free.
        let (status, view) = call(&base, "GET", "/api/billing/subscription", Some("hana"), None).await;
        assert_eq!(status, 200);
        assert_eq!(
            view,
            json!({ "plan": null, "status": "inactive", "pastDueSince": null, "hasBillingAccount": false,
                    "limits": { "id": "basic", "name": "Basic", "memoryMb": 1024, "diskGb": 10,
                                "servers": 2, "totalMemoryMb": 2048, "totalDiskGb": 20 },
                    "refusal": null, "provider": "local" })
        );
        let (status, reply) = call(&base, "POST", "/api/billing/portal", Some("hana"), None).await;
        assert_eq!((status, reply), (409, json!({ "error": "no billing account yet: subscribe to a plan first" })));

        // Bad requests lose nothing.
        let (status, reply) =
            call(&base, "POST", "/api/billing/checkout", Some("hana"), Some(r#"{"plan":"gold"}"#)).await;
        assert_eq!((status, reply), (400, json!({ "error": "unknown plan \"gold\" (plans: basic, standard, pro)" })));
        let (status, reply) = call(&base, "POST", "/api/billing/checkout", Some("hana"), Some("{")).await;
        assert_eq!(status, 400, "{reply}");
        assert!(reply["error"].as_str().unwrap().starts_with("expected {\"plan\": \"basic\"}"), "{reply}");
        assert!(subscriptions::get(db, "hana").await.unwrap().is_none(), "{name}");

        let (status, reply) =
            call(&base, "POST", "/api/billing/checkout", Some("hana"), Some(r#"{"plan":"standard"}"#)).await;
        assert_eq!((status, reply), (200, json!({ "url": "/billing?checkout=success&plan=standard" })), "{name}");
        let (_, view) = call(&base, "GET", "/api/billing/subscription", Some("hana"), None).await;
        assert_eq!(view["plan"], "standard");
        assert_eq!(view["status"], "active");
        assert_eq!(view["hasBillingAccount"], true);
        assert_eq!(view["limits"]["memoryMb"], 2048);
        assert_eq!(limits_for_user(db, "hana").await.unwrap(), Some(PlanId::Standard.plan()), "{name}");

        // Switching plans is another checkout; the portal is the billing page.
        let (status, _) = call(&base, "POST", "/api/billing/checkout", Some("hana"), Some(r#"{"plan":"basic"}"#)).await;
        assert_eq!(status, 200);
        assert_eq!(limits_for_user(db, "hana").await.unwrap(), Some(PlanId::Basic.plan()), "{name}");
        let (status, reply) = call(&base, "POST", "/api/billing/portal", Some("hana"), None).await;
        assert_eq!((status, reply), (200, json!({ "url": "/billing?portal=local" })));
    }
}

#[tokio::test]
async fn provisioning_is_held_to_the_plan() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        insert_user(db, "ivan").await;
        let local = billing(&config(), db, Arc::default());
        let strict_cfg = ApiConfig { billing_require_subscription: Some(true), ..config() };
        let strict = billing(&strict_cfg, db, Arc::default());

        // Without a subscription: basic on the embedded default, refused where paying is required.
        assert_eq!(admit_new_server(db, &local, "ivan", 1024, 10).await.unwrap().id, PlanId::Basic, "{name}");
        let e = admit_new_server(db, &local, "ivan", 2048, 10).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYMENT_REQUIRED, "{name}");
        assert!(e.message.contains("basic plan allows 1024 MB"), "{}", e.message);
        let e = admit_new_server(db, &strict, "ivan", 512, 1).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYMENT_REQUIRED);
        assert!(e.message.contains("active subscription is required"), "{}", e.message);
        assert_eq!(limits_for_user(db, "ivan").await.unwrap(), None, "{name}");

        subscriptions::activate(db, "ivan", Some(PlanId::Standard), Some("cus_i"), Some("sub_i"), 1).await.unwrap();
        assert_eq!(admit_new_server(db, &strict, "ivan", 2048, 20).await.unwrap().id, PlanId::Standard);
        assert!(admit_new_server(db, &strict, "ivan", 4096, 20).await.is_err());

        // Past due or suspended: refused in either mode until paid.
        subscriptions::set_status(db, "ivan", Status::PastDue, 2).await.unwrap();
        for b in [&local, &strict] {
            let e = admit_new_server(db, b, "ivan", 512, 1).await.unwrap_err();
            assert_eq!(e.status, StatusCode::PAYMENT_REQUIRED);
            assert!(e.message.contains("past due"), "{}", e.message);
        }
        assert_eq!(limits_for_user(db, "ivan").await.unwrap(), None, "{name}");
        subscriptions::set_status(db, "ivan", Status::Suspended, 3).await.unwrap();
        let e = admit_new_server(db, &local, "ivan", 512, 1).await.unwrap_err();
        assert!(e.message.contains("suspended"), "{}", e.message);
        // Canceled: back to the default rule.
        subscriptions::set_status(db, "ivan", Status::Canceled, 4).await.unwrap();
        assert_eq!(admit_new_server(db, &local, "ivan", 1024, 10).await.unwrap().id, PlanId::Basic);
        assert!(admit_new_server(db, &strict, "ivan", 1024, 10).await.is_err());
    }
}
