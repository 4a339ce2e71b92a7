//! `/api/openapi.json` against the router, on SQLite and PostgreSQL: every `.route(…)` of the
//! API's source is in the document with its methods (a new route without docs fails here), every
//! documented operation reaches a route, and what no route serves (an unknown path, a method a
//! route lacks, a request an extractor rejects) answers the same JSON error as every other error.

#[macro_use]
mod api_support;

use std::collections::BTreeSet;
use std::path::Path;

use api_support::TestApi;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use zlh_apid::servers::repo::{self, Kind};

const METHODS: [&str; 8] = ["get", "post", "put", "delete", "patch", "head", "options", "any"];

/// One `.route(path, methods)` of the source: its path and the methods its method router names.
#[derive(Debug)]
struct Declared {
    file: String,
    path: String,
    methods: BTreeSet<&'static str>,
}

/// The text from `open` (just past a `(`) to its matching `)`.
fn inside_parens(text: &str, open: usize) -> &str {
    let mut depth = 1;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..open + i];
                }
            }
            _ => {}
        }
    }
    &text[open..]
}

/// The methods a method-router expression names: `get(a).post(b)`, `any(c)`, `routing::head(d)`.
fn methods_of(expr: &str) -> BTreeSet<&'static str> {
    METHODS
        .into_iter()
        .filter(|m| {
            expr.match_indices(&format!("{m}(")).any(|(i, _)| {
                let before = expr[..i].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
        .collect()
}

/// Every `.route(…)` in the crate's source outside its unit tests.
fn declared_routes(dir: &Path, out: &mut Vec<Declared>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            declared_routes(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let code = source.split("#[cfg(test)]").next().unwrap();
        for (at, _) in code.match_indices(".route(") {
            let args = inside_parens(code, at + ".route(".len());
            let (literal, expr) = args.split_once(',').unwrap_or_else(|| panic!("{}: {args}", path.display()));
            let route = literal.trim().trim_matches('"').to_string();
            assert!(route.starts_with('/'), "{}: a route path that is not a literal: {literal}", path.display());
            out.push(Declared { file: path.display().to_string(), path: route, methods: methods_of(expr) });
        }
    }
}

#[test]
fn every_route_of_the_router_is_documented_with_its_methods() {
    let mut routes = Vec::new();
    declared_routes(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut routes);
    // The walk finds what it should: a broken parser must not pass vacuously.
    assert!(routes.len() >= 30, "{routes:#?}");
    assert!(routes.iter().any(|r| r.path == "/api/dev/{id}/ide-token" && r.methods.contains("post")));
    let doc = zlh_apid::http::openapi::document();
    let paths = doc["paths"].as_object().unwrap();
    for r in &routes {
        assert!(!r.methods.is_empty(), "{r:?}: no method found");
        match r.path.split_once("{*") {
            // A wildcard route: the paths under it that it serves are documented one by one.
            Some((prefix, _)) => {
                assert!(paths.keys().any(|p| p.starts_with(prefix) && p.len() > prefix.len()), "{r:?} undocumented")
            }
            None if r.methods.contains("any") => {
                let item = paths.get(&r.path).unwrap_or_else(|| panic!("{r:?} undocumented"));
                assert!(METHODS.iter().any(|m| item.get(*m).is_some()), "{r:?}: no method documented");
            }
            None => {
                for m in &r.methods {
                    assert!(doc["paths"][&r.path][*m].is_object(), "{} {} ({}) undocumented", m, r.path, r.file);
                }
            }
        }
    }
    // And every operation has its answers with schemas, errors included.
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.keys().any(|s| s.as_str() < "400"), "{method} {path}: no success answer");
            for (status, r) in responses {
                let documented = r.get("$ref").is_some() || r["description"].is_string();
                assert!(documented, "{method} {path} {status}");
            }
        }
    }
}

fn concrete(path: &str, id: &str) -> String {
    path.split('/')
        .map(|seg| match seg {
            "{id}" => id,
            "{action}" => "start",
            "{vmid}" => "5999",
            s if s.starts_with('{') => "x",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The fallback's answer: no route took the request.
fn unrouted(status: StatusCode, body: &Value) -> bool {
    let text = body["error"].as_str().unwrap_or_default();
    status == StatusCode::METHOD_NOT_ALLOWED || (status == StatusCode::NOT_FOUND && text.starts_with("no such route"))
}

async fn every_documented_operation_reaches_a_route(api: TestApi) {
    let user = api.register("walker").await;
    // Logging out ends a session: that call gets one of its own.
    let leaver = api.register("leaver").await;
    // A server of the user's without a container: its routes answer (409 and the like) instead
    // of 404, so even a bodiless HEAD shows it was routed.
    let game = repo::insert(&api.state.db, &user.id, Kind::Game, "g", "basic", &json!({})).await.unwrap();
    let doomed = repo::insert(&api.state.db, &user.id, Kind::Game, "d", "basic", &json!({})).await.unwrap();
    let doc = zlh_apid::http::openapi::document();
    let mut seen = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys().filter(|k| *k != "parameters") {
            let id = if method == "delete" && path == "/api/servers/{id}" { &doomed.id } else { &game.id };
            let target = concrete(path, id);
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let token = if path == "/api/auth/logout" { &leaver.token } else { &user.token };
            let (status, body) = api.send(method.clone(), &target, Some(token), None).await;
            assert!(!unrouted(status, &body), "[{}] {method} {target}: {status} {body}", api.backend);
            if method == Method::HEAD {
                assert_ne!(status, StatusCode::NOT_FOUND, "{method} {target}");
            }
            seen += 1;
        }
    }
    assert!(seen >= 45, "{seen} operations");
}

async fn unrouted_requests_answer_the_json_error_body(api: TestApi) {
    let user = api.register("stray").await;
    let t = Some(user.token.as_str());
    let error = |body: &Value| body.as_object().map(|o| o.len() == 1 && o["error"].is_string()).unwrap_or(false);
    for (method, path, want) in [
        (Method::GET, "/api/nothing-here", StatusCode::NOT_FOUND),
        (Method::POST, "/", StatusCode::NOT_FOUND),
        (Method::PUT, "/api/servers", StatusCode::METHOD_NOT_ALLOWED),
        (Method::DELETE, "/api/auth/login", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/api/dev/x/ide-token", StatusCode::METHOD_NOT_ALLOWED),
        (Method::POST, "/api/dev/x/ide", StatusCode::METHOD_NOT_ALLOWED),
        // Extractor rejections: a query that does not parse, a console asked without an upgrade.
        (Method::GET, "/api/servers?all=maybe", StatusCode::BAD_REQUEST),
    ] {
        let (status, body) = api.send(method.clone(), path, t, None).await;
        assert_eq!(status, want, "[{}] {method} {path}: {body}", api.backend);
        assert!(error(&body), "[{}] {method} {path}: {body}", api.backend);
    }
    let game = repo::insert(&api.state.db, &user.id, Kind::Game, "g", "basic", &json!({})).await.unwrap();
    let console = format!("/api/servers/{}/console", game.id);
    let (status, body) = api.send(Method::GET, &console, t, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error(&body) && body["error"].as_str().unwrap().contains("WebSocket"), "{body}");
    // Without a session the console says so first, not what the request lacked.
    let (status, body) = api.send(Method::GET, &console, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(error(&body), "{body}");
}

async fn an_ide_request_without_a_session_says_how_to_get_one(api: TestApi) {
    let response = api.http.get(api.url("/")).header("host", "dev-5999.localhost").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let text = response.text().await.unwrap();
    assert!(text.contains("POST /api/dev/<id>/ide-token"), "{text}");
    assert!(!text.to_lowercase().contains("portal"), "{text}");
}

on_both_backends!(tokio::test;
    every_documented_operation_reaches_a_route,
    unrouted_requests_answer_the_json_error_body,
    an_ide_request_without_a_session_says_how_to_get_one,
);
