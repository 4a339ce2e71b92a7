//! `GET /metrics` and the [`track`] middleware that counts and times every request by its route
//! template (`/mods/{name}`), never by the raw path: ids and file names in URLs would otherwise
//! make every request a new time series.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::metrics::{Metrics, UNMATCHED_ROUTE};

/// What prometheus-client writes: the OpenMetrics text format, which Prometheus negotiates.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(metrics)
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode()).into_response()
}

/// Records method, matched route template, status and duration of each request. Apply it with
/// `Router::layer(axum::middleware::from_fn_with_state(metrics, track))` on the composed router,
/// so that axum has set [`MatchedPath`] by the time it runs. The duration ends when the response
/// head is ready (a streamed body may continue after).
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    let route = route.as_deref().unwrap_or(UNMATCHED_ROUTE);
    metrics.record_request(&method, route, response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::InstallOutcome;
    use axum::extract::Path;
    use axum::middleware::from_fn_with_state;
    use zlh_core::supervisor::ProcessState;

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// A name with optional `{labels}` and a value that parses as a number.
    fn is_sample(line: &str) -> bool {
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => return false,
        };
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        let labels_ok = name_end == series.len() || series.ends_with('}');
        let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
        name_ok && labels_ok && value.parse::<f64>().is_ok()
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_template_and_exposed_in_text_format() {
        let metrics = Arc::new(Metrics::new("1.2.3"));
        let app = Router::new()
            .route("/items/{id}", get(|Path(id): Path<String>| async move { id }))
            .merge(router(metrics.clone()))
            .layer(from_fn_with_state(metrics.clone(), track));
        let base = serve(app).await;
        let client = reqwest::Client::new();
        for id in ["42", "secret-file.txt", "42"] {
            assert!(client.get(format!("{base}/items/{id}")).send().await.unwrap().status().is_success());
        }
        assert_eq!(client.get(format!("{base}/no/such/path")).send().await.unwrap().status(), 404);
        metrics.record_install("java", InstallOutcome::Ok);
        metrics.set_game_state(ProcessState::Running);
        metrics.add_upload_bytes(1000);
        let session = metrics.console_session();

        let resp = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let text = resp.text().await.unwrap();

        assert!(
            text.contains(r#"zlh_agent_http_requests_total{method="GET",route="/items/{id}",status="200"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"route="unmatched",status="404"} 1"#), "{text}");
        assert!(!text.contains("secret-file") && !text.contains("/items/42") && !text.contains("/no/such"), "{text}");
        assert!(text.contains(r#"zlh_agent_http_request_duration_seconds_count{route="/items/{id}"} 3"#), "{text}");
        assert!(text.contains(r#"zlh_agent_install_total{id="java",outcome="ok"} 1"#), "{text}");
        assert!(text.contains(r#"zlh_agent_game_state{state="running"} 1"#), "{text}");
        assert!(text.contains(r#"zlh_agent_game_state{state="stopped"} 0"#), "{text}");
        assert!(text.contains("zlh_agent_upload_bytes_total 1000"), "{text}");
        assert!(text.contains("zlh_agent_console_sessions 1"), "{text}");
        assert!(text.contains(r#"zlh_agent_build_info{version="1.2.3"} 1"#), "{text}");
        assert!(text.contains("zlh_agent_game_crashes_total 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines() {
            assert!(line.starts_with('#') || is_sample(line), "not a comment or sample: {line:?}");
        }

        drop(session);
        let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("zlh_agent_console_sessions 0"), "{text}");
        // The scrape itself is counted under its own template.
        assert!(text.contains(r#"route="/metrics",status="200"} 1"#), "{text}");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let metrics = Metrics::default();
        let odd = axum::http::Method::from_bytes(b"BREW").unwrap();
        metrics.record_request(&odd, "/x", 405, std::time::Duration::from_millis(1));
        let text = metrics.encode();
        assert!(text.contains(r#"method="other",route="/x",status="405""#), "{text}");
        assert!(!text.contains("BREW"));
    }
}
