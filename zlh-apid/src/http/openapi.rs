//! `/api/openapi.json`: the API's contract (OpenAPI 3.1), kept beside the routes it describes.

use serde_json::{json, Value};

fn body(schema: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema } } })
}

fn ok(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "type": "object" } } } })
}

fn errors(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        m.insert((*c).into(), json!({ "$ref": "#/components/responses/Error" }));
    }
    Value::Object(m)
}

fn op(summary: &str, auth: bool, request: Option<Value>, success: (&str, &str), codes: &[&str]) -> Value {
    let mut responses = errors(codes);
    responses[success.0] = ok(success.1);
    let mut o = json!({ "summary": summary, "responses": responses });
    if let Some(r) = request {
        o["requestBody"] = body(r);
    }
    if !auth {
        o["security"] = json!([]);
    }
    o
}

fn id_param() -> Value {
    json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }])
}

pub fn document() -> Value {
    let string = json!({ "type": "string" });
    let register = json!({ "type": "object", "required": ["email", "username", "password"], "additionalProperties": false,
        "properties": { "email": string, "username": string, "password": string } });
    let login = json!({ "type": "object", "required": ["identifier", "password"], "additionalProperties": false,
        "properties": { "identifier": string, "password": string } });
    let game = json!({ "type": "object", "required": ["game", "variant"], "additionalProperties": false,
        "properties": { "name": string, "game": string, "variant": string, "version": string, "world": string,
                        "memory_mb": { "type": "integer", "minimum": 128 } } });
    let dev = json!({ "type": "object", "required": ["runtime"], "additionalProperties": false,
        "properties": { "name": string, "runtime": string, "version": string, "enable_code_server": { "type": "boolean" },
                        "memory_mb": { "type": "integer", "minimum": 128 } } });
    let checkout = json!({ "type": "object", "required": ["plan"], "properties": { "plan": { "enum": ["basic", "standard", "pro"] } } });
    let mut paths = serde_json::Map::new();
    let mut add = |path: &str, item: Value| {
        paths.insert(path.into(), item);
    };
    add("/api/health", json!({ "get": op("The API and its database answer", false, None, ("200", "ok"), &["500"]) }));
    add(
        "/api/auth/register",
        json!({ "post": op("Create an account", false, Some(register), ("201", "{ok, token}"), &["400", "409"]) }),
    );
    add(
        "/api/auth/login",
        json!({ "post": op("Sign in by email or username", false, Some(login), ("200", "{token}"), &["400", "401", "429"]) }),
    );
    add(
        "/api/auth/me",
        json!({ "get": op("The signed-in user", true, None, ("200", "{id, email, username, role}"), &["401"]) }),
    );
    add("/api/auth/logout", json!({ "post": op("Revoke this session", true, None, ("200", "{ok}"), &["401"]) }));
    add(
        "/api/servers",
        json!({
            "get": op("The user's servers with their last status", true, None, ("200", "{servers}"), &["401"]),
            "post": op("Provision a game server (returns at once; see status)", true, Some(game), ("202", "{id, state, jobId}"), &["400", "401", "402"]),
        }),
    );
    add(
        "/api/dev",
        json!({ "post": op("Provision a dev container", true, Some(dev), ("202", "{id, state, jobId}"), &["400", "401", "402"]) }),
    );
    let mut server = json!({
        "get": op("One server", true, None, ("200", "server"), &["401", "404"]),
        "delete": op("Stop, destroy and archive a server", true, None, ("202", "{id, state, jobId}"), &["401", "404"]),
    });
    server["parameters"] = id_param();
    add("/api/servers/{id}", server);
    let mut status = json!({ "get": op("Server, provisioning job steps and agent status (live, else the last snapshot with stale and staleSecs)", true, None, ("200", "status"), &["401", "404"]) });
    status["parameters"] = id_param();
    add("/api/servers/{id}/status", status);
    for action in ["start", "stop", "restart", "kill"] {
        let mut p = json!({ "post": op(&format!("Game server {action}"), true, None, ("202", "{accepted, action}"), &["401", "402", "404", "409", "502"]) });
        p["parameters"] = id_param();
        add(&format!("/api/servers/{{id}}/game/{action}"), p);
    }
    let mut console = json!({ "get": op("Console WebSocket (subprotocols zlh-console, zlh-auth.<token>)", true, None, ("101", "switching protocols"), &["401", "404", "409"]) });
    console["parameters"] = id_param();
    add("/api/servers/{id}/console", console);
    add(
        "/api/catalog/dev",
        json!({ "get": op("Dev runtimes and versions for the portal", true, None, ("200", "{runtimes}"), &["401", "502"]) }),
    );
    add(
        "/api/catalog/game",
        json!({ "get": op("Games, variants and versions for the portal", true, None, ("200", "{games}"), &["401", "502"]) }),
    );
    add("/api/billing/plans", json!({ "get": op("Plans and their limits", false, None, ("200", "{plans}"), &[]) }));
    add(
        "/api/billing/subscription",
        json!({ "get": op("The user's subscription", true, None, ("200", "subscription"), &["401"]) }),
    );
    add(
        "/api/billing/checkout",
        json!({ "post": op("Start a checkout", true, Some(checkout), ("200", "{url}"), &["400", "401", "409", "502"]) }),
    );
    add(
        "/api/billing/portal",
        json!({ "post": op("Open the billing portal", true, None, ("200", "{url}"), &["401", "409", "502"]) }),
    );
    add(
        "/api/billing/webhook",
        json!({ "post": op("Payment provider events (Stripe-Signature)", false, Some(json!({"type": "object"})), ("200", "{ok}"), &["400", "503"]) }),
    );
    json!({
        "openapi": "3.1.0",
        "info": { "title": "zlh-apid", "version": env!("CARGO_PKG_VERSION") },
        "paths": paths,
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "responses": { "Error": { "description": "error", "content": { "application/json": {
                "schema": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } } } } } }
        }
    })
}
