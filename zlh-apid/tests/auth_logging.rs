//! Passwords never reach the logs: a whole register / sign-in / sign-out round, with wrong
//! passwords, malformed bodies and wrongly typed fields, under a subscriber recording everything
//! down to TRACE.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use serde_json::{json, Value};
use tracing_subscriber::fmt::MakeWriter;
use zlh_apid::auth;
use zlh_apid::config::ApiConfig;
use zlh_apid::db::testing;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

const SECRETS: [&str; 4] = ["Registered-Secret-1", "Wrong-Guess-Secret-2", "Broken-Body-Secret-3", "9876543210123"];

#[tokio::test]
async fn no_password_is_ever_logged() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    for (name, t) in testing::both().await {
        let state = zlh_apid::state::for_tests(t.db.clone(), ApiConfig::default());
        let app = Router::new().merge(auth::routes::router()).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
        });
        let http = reqwest::Client::new();
        let post = |path: &str, body: String, token: Option<String>| {
            let mut req = http.post(format!("{base}{path}")).header("content-type", "application/json").body(body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            async move {
                let resp = req.send().await.unwrap();
                (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
            }
        };

        let reg = json!({ "email": "alice@example.com", "username": "alice", "password": SECRETS[0] });
        let (status, body) = post("/api/auth/register", reg.to_string(), None).await;
        assert_eq!(status, 201, "{name}: {body}");
        let wrong = json!({ "identifier": "alice", "password": SECRETS[1] });
        assert_eq!(post("/api/auth/login", wrong.to_string(), None).await.0, 401, "{name}");
        let unknown = json!({ "identifier": "nobody", "password": SECRETS[1] });
        assert_eq!(post("/api/auth/login", unknown.to_string(), None).await.0, 401, "{name}");
        let broken = format!(r#"{{"identifier":"alice","password":"{}"#, SECRETS[2]);
        assert_eq!(post("/api/auth/login", broken, None).await.0, 400, "{name}");
        let typed = format!(r#"{{"email":"b@example.com","username":"bob","password":{}}}"#, SECRETS[3]);
        let (status, body) = post("/api/auth/register", typed, None).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(!body.to_string().contains(SECRETS[3]), "{name}: the error echoes no value: {body}");
        let short = json!({ "email": "c@example.com", "username": "carol", "password": "tiny" });
        assert_eq!(post("/api/auth/register", short.to_string(), None).await.0, 400, "{name}");
        let right = json!({ "identifier": "alice", "password": SECRETS[0] });
        let (status, body) = post("/api/auth/login", right.to_string(), None).await;
        assert_eq!(status, 200, "{name}: {body}");
        let token = body["token"].as_str().unwrap().to_owned();
        assert_eq!(post("/api/auth/logout", "{}".into(), Some(token)).await.0, 200, "{name}");
    }

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for expected in ["account registered", "sign-in refused", "request refused", "signed in", "signed out"] {
        assert!(logs.contains(expected), "the log was recorded (missing {expected:?}):\n{logs}");
    }
    for secret in SECRETS.iter().chain(&["tiny"]) {
        assert!(!logs.contains(secret), "{secret:?} appears in the log:\n{logs}");
    }
}
