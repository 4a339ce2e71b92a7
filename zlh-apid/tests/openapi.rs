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

/// The fields `schema` (a `$ref`, `allOf` of them, or an object schema) makes required, and that
/// each object property with a plain JSON type has it (`null` where the schema allows it).
fn assert_conforms(doc: &Value, schema: &Value, value: &Value, at: &str) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return assert_conforms(doc, &doc["components"]["schemas"][name], value, at);
    }
    if let Some(parts) = schema["allOf"].as_array() {
        return parts.iter().for_each(|p| assert_conforms(doc, p, value, at));
    }
    for field in schema["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        assert!(value.get(field).is_some(), "{at}: {field} missing in {value}");
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        let Some(v) = value.get(name) else { continue };
        let types: Vec<&str> = match &property["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        let kind = match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        assert!(types.contains(&kind), "{at}.{name}: {v} is not {types:?}");
    }
}

/// The answers of a running dev server's routes, which the fuzzing (no running servers) does not
/// reach, have the fields and types the document gives.
async fn a_running_servers_answers_are_as_documented(api: TestApi) {
    let doc = zlh_apid::http::openapi::document();
    let user = api.register("runner").await;
    let id = api.create_dev(&user, "node").await;
    api.wait_running(&user, &id).await;
    let ok = |path: &str, method: &str, status: &str| {
        doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"].clone()
    };
    for (method, template, status) in [
        (Method::GET, "/api/servers/{id}/status", "200"),
        (Method::GET, "/api/servers/{id}", "200"),
        (Method::GET, "/api/servers", "200"),
        (Method::POST, "/api/dev/{id}/ide-token", "200"),
        (Method::POST, "/api/servers/{id}/codeserver/{action}", "200"),
    ] {
        let path = concrete(template, &id);
        let (got, body) = api.send(method.clone(), &path, Some(&user.token), None).await;
        assert_eq!(got.as_str(), status, "[{}] {method} {path}: {body}", api.backend);
        let schema = ok(template, &method.as_str().to_lowercase(), status);
        assert!(schema.is_object(), "{method} {template}: no schema");
        assert_conforms(&doc, &schema, &body, &format!("{method} {path}"));
        if template == "/api/servers" {
            let item = json!({ "$ref": "#/components/schemas/Server" });
            body["servers"].as_array().unwrap().iter().for_each(|s| assert_conforms(&doc, &item, s, "servers[]"));
        }
        if template == "/api/servers/{id}/status" {
            assert_conforms(&doc, &json!({ "$ref": "#/components/schemas/Job" }), &body["job"], "job");
        }
    }
}

on_both_backends!(tokio::test;
    a_running_servers_answers_are_as_documented,
    every_documented_operation_reaches_a_route,
    unrouted_requests_answer_the_json_error_body,
    an_ide_request_without_a_session_says_how_to_get_one,
);
