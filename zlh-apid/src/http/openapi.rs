//! `/api/openapi.json`: the API's contract (OpenAPI 3.1), kept beside the routes it describes.
//! Every route of the API's router is here (the `openapi` test walks the router's `.route`
//! calls), and every answer has the schema of what its handler sends.

use serde_json::{json, Map, Value};

/// One operation, built up: its summary, parameters, body and answers.
struct Op(Value);

impl Op {
    /// An operation for a signed-in user (bearer session token); 401 without one.
    fn new(summary: &str) -> Self {
        Op(json!({ "summary": summary, "responses": {} })).errors(&["401"])
    }

    /// An operation anyone may call.
    fn public(summary: &str) -> Self {
        Op(json!({ "summary": summary, "responses": {}, "security": [] }))
    }

    fn describe(mut self, text: &str) -> Self {
        self.0["description"] = json!(text);
        self
    }

    /// A JSON request body.
    fn body(self, schema: Value) -> Self {
        self.body_as("application/json", schema)
    }

    fn body_as(mut self, content_type: &str, schema: Value) -> Self {
        self.0["requestBody"] = json!({ "required": true, "content": { content_type: { "schema": schema } } });
        self
    }

    fn query(mut self, name: &str, schema: Value, required: bool) -> Self {
        let p = json!({ "name": name, "in": "query", "required": required, "schema": schema });
        match self.0["parameters"].as_array_mut() {
            Some(ps) => ps.push(p),
            None => self.0["parameters"] = json!([p]),
        }
        self
    }

    /// A JSON answer with `schema`.
    fn answer(self, status: &str, description: &str, schema: Value) -> Self {
        self.answer_as(status, description, "application/json", schema)
    }

    fn answer_as(mut self, status: &str, description: &str, content_type: &str, schema: Value) -> Self {
        self.0["responses"][status] =
            json!({ "description": description, "content": { content_type: { "schema": schema } } });
        self
    }

    /// An answer without a body (a redirect, 204).
    fn empty(mut self, status: &str, description: &str) -> Self {
        self.0["responses"][status] = json!({ "description": description });
        self
    }

    /// An error answered as JSON `{"error": "..."}` or as a short page for the browser.
    fn either(mut self, status: &str, description: &str) -> Self {
        self.0["responses"][status] = json!({ "description": description, "content": {
            "application/json": { "schema": schema("Error") }, "text/plain": { "schema": string() } } });
        self
    }

    /// Error answers, each `{"error": "..."}`.
    fn errors(mut self, codes: &[&str]) -> Self {
        for c in codes {
            self.0["responses"][*c] = json!({ "$ref": "#/components/responses/Error" });
        }
        self
    }
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "required": required, "properties": properties })
}

fn string() -> Value {
    json!({ "type": "string" })
}

fn nullable(t: &str) -> Value {
    json!({ "type": [t, "null"] })
}

/// The schemas the answers share.
fn schemas() -> Value {
    let int = json!({ "type": "integer" });
    let step = object(
        &["step", "state", "at"],
        json!({ "step": string(), "state": { "enum": ["running", "done", "failed"] }, "at": int, "error": string() }),
    );
    let server = object(
        &[
            "id",
            "kind",
            "name",
            "plan",
            "vmid",
            "spec",
            "state",
            "ideStopped",
            "agentStatus",
            "agentLastSeen",
            "error",
            "createdAt",
            "updatedAt",
            "agentState",
            "crashCount",
        ],
        json!({
            "id": string(), "kind": { "enum": ["game", "dev"] }, "name": string(), "plan": string(),
            "vmid": nullable("integer"), "spec": {}, "state": string(), "ideStopped": { "type": "boolean" },
            "agentStatus": string(), "agentLastSeen": nullable("integer"), "error": nullable("string"),
            "createdAt": int, "updatedAt": int,
            "agentState": { "description": "the agent's last reported state, or null" },
            "crashCount": { "description": "the agent's last reported crash count (0 before any report)" },
            "stale": { "type": "boolean", "description": "the agent does not answer: its fields are the last snapshot" },
            "staleSecs": { "description": "seconds since agentLastSeen while stale, else null" },
        }),
    );
    let job = object(
        &["id", "serverId", "kind", "state", "step", "steps", "error", "attempts", "createdAt", "updatedAt"],
        json!({
            "id": string(), "serverId": string(), "kind": { "enum": ["provision", "delete"] },
            "state": { "enum": ["queued", "running", "done", "failed"] }, "step": nullable("string"),
            "steps": { "type": "array", "items": step }, "error": nullable("string"), "attempts": int,
            "createdAt": int, "updatedAt": int,
        }),
    );
    let plan = object(
        &["id", "name", "memoryMb", "diskGb", "servers", "totalMemoryMb", "totalDiskGb"],
        json!({ "id": { "enum": ["basic", "standard", "pro"] }, "name": string(), "memoryMb": int, "diskGb": int,
                "servers": int, "totalMemoryMb": int, "totalDiskGb": int }),
    );
    let versions = json!({ "type": "array", "items": string() });
    json!({
        "Error": object(&["error"], json!({ "error": string() })),
        "Ok": object(&["ok"], json!({ "ok": { "const": true } })),
        "Health": object(
            &["ok", "containerHost"],
            json!({ "ok": { "const": true }, "containerHost": string(), "warning": string() }),
        ),
        "Token": object(&["token"], json!({ "token": string() })),
        "Registered": object(&["ok", "token"], json!({ "ok": { "const": true }, "token": string() })),
        "Me": object(&["id", "email", "username", "role"],
            json!({ "id": string(), "email": string(), "username": string(), "role": { "enum": ["user", "admin"] } })),
        "Server": server,
        "Servers": object(&["servers"], json!({ "servers": { "type": "array", "items": schema("Server") } })),
        "Job": job,
        "ServerStatus": { "allOf": [schema("Server"), object(&["agentStatus", "agent", "job"], json!({
            "agentStatus": { "type": "string", "description": "online, offline, or unknown before the first poll" },
            "agent": { "description": "the agent's status (asked now, or its last answer), or null" },
            "job": { "oneOf": [schema("Job"), { "type": "null" }] },
        }))] },
        "Accepted": object(&["id", "state"], json!({ "id": string(), "state": string(), "jobId": string() })),
        "PowerAccepted": object(&["accepted", "action"],
            json!({ "accepted": { "const": true }, "action": { "enum": ["start", "stop", "restart", "kill"] } })),
        "CodeServerDone": object(&["ok", "action"],
            json!({ "ok": { "const": true }, "action": { "enum": ["start", "stop", "restart"] } })),
        "DevCatalog": object(&["runtimes", "codeServer"], json!({
            "runtimes": { "type": "array", "items": object(&["id", "versions"], json!({ "id": string(), "versions": versions })) },
            "codeServer": { "type": "boolean" },
        })),
        "GameCatalog": object(&["games"], json!({
            "games": { "type": "array", "items": object(&["id", "variants"], json!({
                "id": string(),
                "variants": { "type": "array", "items": object(&["id", "versions"], json!({ "id": string(), "versions": versions })) },
            })) },
        })),
        "Plan": plan,
        "Plans": object(&["plans"], json!({ "plans": { "type": "array", "items": schema("Plan") } })),
        "Subscription": object(&["plan", "status", "pastDueSince", "hasBillingAccount", "limits", "refusal", "provider"], json!({
            "plan": { "enum": ["basic", "standard", "pro", null] },
            "status": { "enum": ["active", "inactive", "past_due", "canceled", "suspended"] },
            "pastDueSince": nullable("integer"), "hasBillingAccount": { "type": "boolean" },
            "limits": { "oneOf": [schema("Plan"), { "type": "null" }] }, "refusal": nullable("string"),
            "provider": { "enum": ["local", "stripe"] },
        })),
        "Url": object(&["url"], json!({ "url": string() })),
        "WebhookHandled": object(&["ok"], json!({ "ok": { "const": true }, "duplicate": { "type": "boolean" }, "ignored": { "type": "boolean" } })),
        "IdeToken": object(&["token", "url", "expiresAt", "ideUrl"], json!({
            "token": string(), "url": { "type": "string", "description": "the bootstrap link to open in the browser" },
            "expiresAt": { "type": "string", "format": "date-time" }, "ideUrl": string(),
        })),
        "AgentAnswer": { "description": "the server's agent answered this (relayed as it came)" },
    })
}

/// The paths: `(path, method, operation)`.
fn operations() -> Vec<(&'static str, &'static str, Op)> {
    // The checks the handlers make, so generated requests that pass these are accepted.
    let register = json!({ "type": "object", "required": ["email", "username", "password"],
        "properties": {
            "email": { "type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$", "maxLength": 254 },
            "username": { "type": "string", "pattern": "^[a-z0-9_.-]{3,32}$" },
            "password": { "type": "string", "minLength": 8, "maxLength": 256, "pattern": "\\S" } } });
    let login = json!({ "type": "object", "required": ["identifier", "password"],
        "properties": { "identifier": { "type": "string", "description": "email or username", "pattern": "\\S" },
                        "password": string() } });
    let memory = json!({ "type": "integer", "minimum": 128, "maximum": 1048576,
        "description": "at most the plan's memory (402 beyond it)" });
    let id = json!({ "type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$" });
    let version = json!({ "type": "string", "pattern": "^[A-Za-z0-9.+_-]{0,64}$" });
    let name = json!({ "type": "string", "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]{1,64}$",
        "description": "1 to 64 printable characters (bytes of UTF-8)" });
    let world = json!({ "type": "string", "pattern": "^[^./\\\\\\u0000][^/\\\\\\u0000]{0,63}$",
        "description": "a plain directory name, 1 to 64 bytes" });
    let game = json!({ "type": "object", "required": ["game", "variant"], "additionalProperties": false,
        "properties": { "name": name, "game": id, "variant": id, "version": version, "world": world,
                        "memory_mb": memory } });
    let dev = json!({ "type": "object", "required": ["runtime"], "additionalProperties": false,
        "properties": { "name": name, "runtime": id, "version": version, "enable_code_server": { "type": "boolean" },
                        "memory_mb": memory } });
    let checkout = json!({ "type": "object", "required": ["plan"], "additionalProperties": false,
        "properties": { "plan": { "enum": ["basic", "standard", "pro"] } } });
    let channel = json!({ "enum": ["stable", "beta", "dev"] });
    let relay = "Relayed to the server's agent (same path below the server), streamed both ways.";
    // Every relayed route: the server must be the caller's and have a running container.
    let relayed = |summary: &str| {
        Op::new(summary)
            .describe(relay)
            .answer("200", "the agent's answer", schema("AgentAnswer"))
            .errors(&["400", "402", "404", "409", "502"])
    };
    let path_query = |op: Op| op.query("path", string(), true);
    vec![
        (
            "/api/health",
            "get",
            Op::public(
                "The API and its database answer; the container host, and a warning when containers are not isolated",
            )
            .answer("200", "ok", schema("Health"))
            .errors(&["500"]),
        ),
        (
            "/api/openapi.json",
            "get",
            Op::public("This document").answer("200", "OpenAPI 3.1", json!({ "type": "object" })),
        ),
        (
            "/metrics",
            "get",
            Op::new("Prometheus metrics (the `metrics_token` or an admin's session)")
                .answer_as("200", "OpenMetrics text", "application/openmetrics-text", string())
                .errors(&["403"]),
        ),
        (
            "/api/auth/register",
            "post",
            Op::public("Create an account")
                .body(register)
                .answer("201", "the new session", schema("Registered"))
                .errors(&["400", "409", "413", "429"]),
        ),
        (
            "/api/auth/login",
            "post",
            Op::public("Sign in by email or username")
                .body(login)
                .answer("200", "a session token", schema("Token"))
                .errors(&["400", "401", "413", "429"]),
        ),
        ("/api/auth/me", "get", Op::new("The signed-in user").answer("200", "the user", schema("Me"))),
        ("/api/auth/logout", "post", Op::new("Revoke this session").answer("200", "revoked", schema("Ok"))),
        (
            "/api/servers",
            "get",
            Op::new("The user's servers with their last status")
                .query("all", json!({ "type": "boolean" }), false)
                .answer("200", "servers (every user's for an admin with all=true)", schema("Servers"))
                .errors(&["400"]),
        ),
        (
            "/api/servers",
            "post",
            Op::new("Provision a game server (returns at once; poll its status)")
                .body(game)
                .answer("202", "accepted", schema("Accepted"))
                .errors(&["400", "402", "422"]),
        ),
        (
            "/api/dev",
            "post",
            Op::new("Provision a dev container (returns at once; poll its status)")
                .body(dev)
                .answer("202", "accepted", schema("Accepted"))
                .errors(&["400", "402", "422"]),
        ),
        (
            "/api/servers/{id}",
            "get",
            Op::new("One server").answer("200", "the server", schema("Server")).errors(&["404"]),
        ),
        (
            "/api/servers/{id}",
            "delete",
            Op::new("Stop, destroy and archive a server")
                .answer("202", "deleting", schema("Accepted"))
                .errors(&["404"]),
        ),
        (
            "/api/servers/{id}/status",
            "get",
            Op::new("Server, provisioning job steps and live agent status")
                .answer("200", "status", schema("ServerStatus"))
                .errors(&["404"]),
        ),
        (
            "/api/servers/{id}/game/{action}",
            "post",
            Op::new("Game server power action")
                .answer("202", "accepted by the agent", schema("PowerAccepted"))
                .errors(&["400", "402", "404", "409", "502"]),
        ),
        (
            "/api/servers/{id}/codeserver/{action}",
            "post",
            Op::new("Start, stop or restart a dev container's code-server (stop closes its IDE)")
                .answer("200", "done", schema("CodeServerDone"))
                .errors(&["400", "402", "404", "409", "502"]),
        ),
        (
            "/api/servers/{id}/console",
            "get",
            Op::new("Console WebSocket (subprotocols zlh-console, zlh-auth.<token>; ?mode=…)")
                .empty("101", "switching protocols")
                .errors(&["400", "402", "404", "405", "409", "426"]),
        ),
        (
            "/api/servers/{id}/files",
            "delete",
            path_query(relayed("Delete a file or directory")).query("recursive", json!({ "type": "boolean" }), false),
        ),
        ("/api/servers/{id}/files/list", "get", path_query(relayed("List a directory"))),
        (
            "/api/servers/{id}/files/read",
            "get",
            path_query(relayed("Read a file (one Range honoured)"))
                .answer_as("200", "the file", "application/octet-stream", string())
                .answer_as("206", "the range asked for", "application/octet-stream", string()),
        ),
        (
            "/api/servers/{id}/files/write",
            "put",
            path_query(relayed("Write a file atomically")).body_as("application/octet-stream", string()),
        ),
        (
            "/api/servers/{id}/files/mkdir",
            "post",
            relayed("Make a directory").body(object(&["path"], json!({ "path": string() }))),
        ),
        (
            "/api/servers/{id}/files/rename",
            "post",
            relayed("Rename or move").body(object(
                &["from", "to"],
                json!({ "from": string(), "to": string(), "overwrite": { "type": "boolean" } }),
            )),
        ),
        (
            "/api/servers/{id}/files/uploads",
            "post",
            relayed("Start a resumable upload (tus 1.0.0 creation; Upload-Length, Upload-Metadata)")
                .empty("201", "created; Location names the upload"),
        ),
        ("/api/servers/{id}/files/uploads", "options", relayed("tus capabilities").empty("204", "Tus-* headers")),
        (
            "/api/servers/{id}/files/uploads/{upload}",
            "head",
            relayed("An upload's offset").empty("200", "Upload-Offset"),
        ),
        (
            "/api/servers/{id}/files/uploads/{upload}",
            "patch",
            relayed("Append to an upload (application/offset+octet-stream, Upload-Offset)")
                .body_as("application/offset+octet-stream", string())
                .empty("204", "appended; Upload-Offset"),
        ),
        ("/api/servers/{id}/files/uploads/{upload}", "delete", relayed("Abandon an upload").empty("204", "removed")),
        ("/api/servers/{id}/mods", "get", relayed("The installed mods")),
        (
            "/api/servers/{id}/mods",
            "post",
            relayed("Install a mod from the artifact store").body(object(
                &["key", "sha256"],
                json!({ "key": string(), "sha256": string(), "name": string(), "size": { "type": "integer" },
                        "replace": { "type": "boolean" } }),
            )),
        ),
        ("/api/servers/{id}/mods/{name}", "delete", relayed("Remove a mod")),
        ("/api/servers/{id}/mods/{name}/enable", "post", relayed("Enable a mod")),
        ("/api/servers/{id}/mods/{name}/disable", "post", relayed("Disable a mod")),
        ("/api/servers/{id}/runtimes", "get", relayed("The installed runtimes")),
        (
            "/api/servers/{id}/runtimes/install",
            "post",
            relayed("Install a runtime version from the catalog").body(object(
                &["id"],
                json!({ "id": string(), "version": string(), "channel": channel, "activate": { "type": "boolean" } }),
            )),
        ),
        (
            "/api/servers/{id}/runtimes/{runtime}/rollback",
            "post",
            relayed("Make the previous (or a given) version current").body(json!({ "type": "object",
                "properties": { "version": string() } })),
        ),
        (
            "/api/servers/{id}/runtimes/{runtime}/{version}",
            "delete",
            relayed("Remove an installed version").query("force", json!({ "type": "boolean" }), false),
        ),
        ("/api/servers/{id}/runtimes/{runtime}/{version}/verify", "post", relayed("Check an installed version")),
        (
            "/api/catalog/dev",
            "get",
            Op::new("Dev runtimes and their versions, and whether code-server is available")
                .query("channel", channel.clone(), false)
                .answer("200", "runtimes", schema("DevCatalog"))
                .errors(&["400", "502", "503"]),
        ),
        (
            "/api/catalog/game",
            "get",
            Op::new("Games, variants and their versions")
                .query("channel", channel, false)
                .answer("200", "games", schema("GameCatalog"))
                .errors(&["400", "502", "503"]),
        ),
        ("/api/billing/plans", "get", Op::public("Plans and their limits").answer("200", "plans", schema("Plans"))),
        (
            "/api/billing/subscription",
            "get",
            Op::new("The user's subscription").answer("200", "subscription", schema("Subscription")),
        ),
        (
            "/api/billing/checkout",
            "post",
            Op::new("Start a checkout: a page to pay at")
                .body(checkout)
                .answer("200", "the checkout page", schema("Url"))
                .errors(&["400", "409", "502"]),
        ),
        (
            "/api/billing/portal",
            "post",
            Op::new("The payment provider's page to change the plan or payment method")
                .answer("200", "the page", schema("Url"))
                .errors(&["409", "502"]),
        ),
        (
            "/api/billing/webhook",
            "post",
            Op::public("Payment provider events (Stripe-Signature)")
                .body(json!({ "type": "object" }))
                .answer("200", "handled", schema("WebhookHandled"))
                .errors(&["400", "404", "500"]),
        ),
        (
            "/api/dev/{id}/ide-token",
            "post",
            Op::new("A one-use IDE link for a running dev container of the caller's")
                .answer("200", "open `url` in a browser within a minute", schema("IdeToken"))
                .errors(&["404", "409"]),
        ),
        (
            "/api/dev/{id}/ide",
            "get",
            Op::public(
                "The IDE link: on to the dev host, which sets its cookie (mode=path: the path proxy's cookie here)",
            )
            .query("token", string(), true)
            .query("mode", json!({ "enum": ["path"] }), false)
            .empty("303", "on to the IDE")
            .errors(&["400"])
            // The API's JSON before the token is looked at; pages for the browser after.
            .either("404", "no such server, the path proxy is off, or no such IDE")
            .either("500", "internal error")
            .answer_as("401", "the token expired or was used", "text/plain", string())
            .answer_as("409", "the server is not running or its IDE is stopped", "text/plain", string())
            .answer_as("502", "the server has no IDE", "text/plain", string()),
        ),
    ]
}

/// The legacy path proxy (`/__ide/<vmid>/…`, with `ide_path_proxy`): code-server's pages, any
/// method; refusals are short pages for the browser.
fn path_proxy(summary: &str) -> Value {
    let page = |text: &str| json!({ "description": text, "content": { "text/plain": { "schema": string() } } });
    json!({
        "summary": summary,
        "security": [],
        "responses": {
            "200": { "description": "code-server's answer" },
            "308": { "description": "on to the path with a trailing slash" },
            "401": page("no session cookie for this IDE"),
            "403": page("a cross-origin request"),
            "404": page("the path proxy is off, or no such IDE"),
            "409": page("the server is not running or its IDE is stopped"),
            "502": page("the server has no IDE, or code-server does not answer"),
        },
    })
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| {
            let schema = match name {
                "action" if path.contains("/game/") => json!({ "enum": ["start", "stop", "restart", "kill"] }),
                "action" => json!({ "enum": ["start", "stop", "restart"] }),
                "vmid" => json!({ "type": "string", "pattern": "^[0-9]+$" }),
                _ => string(),
            };
            json!({ "name": name, "in": "path", "required": true, "schema": schema })
        })
        .collect()
}

pub fn document() -> Value {
    let mut paths = Map::new();
    for (path, method, op) in operations() {
        let item = paths.entry(path).or_insert_with(|| json!({}));
        item[method] = op.0;
    }
    for (path, summary) in [
        ("/__ide/{vmid}", "The legacy path proxy: on to the trailing slash"),
        ("/__ide/{vmid}/", "The legacy path proxy: code-server's start page"),
        ("/__ide/{vmid}/{path}", "The legacy path proxy: code-server's pages"),
    ] {
        paths.insert(path.into(), json!({ "get": path_proxy(summary) }));
    }
    for (path, item) in paths.iter_mut() {
        let params = path_parameters(path);
        if !params.is_empty() {
            item["parameters"] = Value::Array(params);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "zlh-apid", "version": env!("CARGO_PKG_VERSION") },
        "paths": paths,
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas(),
            "responses": { "Error": { "description": "error", "content": { "application/json": {
                "schema": schema("Error") } } } }
        }
    })
}
