//! The README's first command, as a fresh machine runs it: `zlh-apid serve` with no config at all
//! (SQLite in a new data dir, a local store seeded with a signed demo catalog, and containers:
//! isolated OCI containers where the machine can run them, as CI's can, else `zlh-agentd`
//! processes) provisions a dev container that a user then reaches only through the API: status,
//! files, the shell console and the IDE; deleting it removes the container.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Api {
    /// The container host `auto` chose (`oci` or `process`), from `/api/health`.
    host: String,
    child: Child,
    base: String,
    data: tempfile::TempDir,
    http: reqwest::Client,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Containers are long-lived by design; stop any this test left behind.
        let oci = self.data.path().join("data/oci");
        for d in std::fs::read_dir(&oci).into_iter().flatten().flatten() {
            let Some(vmid) = d.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let runc = oci.join("runc");
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&runc)
                .args(["delete", "--force", &format!("zlh-{vmid}")])
                .status();
            let _ = Command::new("umount").arg(d.path().join("fs")).stderr(Stdio::null()).status();
            let _ = Command::new("ip").args(["netns", "delete", &format!("zlh-{vmid}")]).stderr(Stdio::null()).status();
        }
        if let Ok(dirs) = std::fs::read_dir(self.data.path().join("data").join("containers")) {
            for d in dirs.flatten() {
                if let Ok(text) = std::fs::read_to_string(d.path().join("container.json")) {
                    if let Some(pid) = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["pid"].as_i64()) {
                        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                        }
                    }
                }
            }
        }
    }
}

fn agent_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_zlh-apid")).with_file_name("zlh-agentd")
}

/// One platform at a time on this machine: isolated containers' network namespaces, addresses and
/// cgroups are the machine's, named by vmid, as two real installs on one host would collide.
static ONE_PLATFORM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start() -> Api {
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(data.path().join("apid.log")).unwrap();
    assert!(agent_binary().exists(), "zlh-agentd is built beside zlh-apid by `cargo test --workspace`");
    // Exactly the README's environment: nothing but where to listen and where the data goes.
    let child = Command::new(env!("CARGO_BIN_EXE_zlh-apid"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ZLH_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("ZLH_DATA_DIR", data.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut api = Api {
        host: String::new(),
        child,
        base: format!("http://127.0.0.1:{port}"),
        data,
        http: reqwest::Client::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = api.http.get(format!("{}/api/health", api.base)).send().await {
            if r.status().is_success() {
                let health: Value = r.json().await.unwrap();
                api.host = health["containerHost"].as_str().unwrap().to_string();
                eprintln!("container host: {}", api.host);
                // Without isolation, the API says so.
                assert_eq!(health["warning"].is_string(), api.host == "process", "{health}");
                return api;
            }
        }
        assert!(Instant::now() < deadline, "API not up: {}", api.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Api {
    /// Where the containers live: `<data dir>/oci/<vmid>` (isolated) or `<data dir>/containers/<vmid>`.
    fn containers(&self) -> PathBuf {
        let dir = if self.host == "oci" { "oci" } else { "containers" };
        self.data.path().join("data").join(dir)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("apid.log")).unwrap_or_default()
    }
    fn url(&self, p: &str) -> String {
        format!("{}{p}", self.base)
    }

    fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `method path` with the session `token`, answered as JSON.
    async fn call(&self, method: reqwest::Method, path: &str, token: &str) -> Value {
        self.http.request(method, self.url(path)).bearer_auth(token).send().await.unwrap().json().await.unwrap()
    }
}

#[tokio::test]
async fn a_fresh_local_platform_provisions_a_dev_container_reached_only_through_the_api() {
    let _one = ONE_PLATFORM.lock().await;
    let api = start().await;
    let token = api.register("ada").await;

    let catalog: Value = api.call(reqwest::Method::GET, "/api/catalog/dev", &token).await;
    assert_eq!(catalog["runtimes"][0]["id"], "hello", "the seeded demo runtime: {catalog}");

    let r = api
        .http
        .post(api.url("/api/dev"))
        .bearer_auth(&token)
        .json(&json!({"runtime": "hello", "enable_code_server": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = api.call(reqwest::Method::GET, &format!("/api/servers/{id}/status"), &token).await;
        if s["state"] == "running" || s["state"] == "failed" {
            break s;
        }
        assert!(Instant::now() < deadline, "not running in time: {s}\n{}", api.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["state"], "running", "{status}\n{}", api.log());
    let vmid = status["vmid"].as_u64().unwrap();
    assert!((6000..=6999).contains(&vmid));
    // The container lives at `<data>/oci/<vmid>` or `<data>/containers/<vmid>` (where cleanup and
    // operators look).
    let record = api.containers().join(vmid.to_string()).join("container.json");
    assert!(record.is_file(), "{} missing", record.display());
    assert_eq!(status["agent"]["runtime"]["id"], "hello");
    let steps: Vec<&str> =
        status["job"]["steps"].as_array().unwrap().iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        steps,
        ["allocate", "create container", "start container", "wait for agent", "send config", "wait running"]
    );

    // Files through the API's relay.
    let put = api
        .http
        .put(api.url(&format!("/api/servers/{id}/files/write?path=hello.txt")))
        .bearer_auth(&token)
        .body("written through the API")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let read = api
        .http
        .get(api.url(&format!("/api/servers/{id}/files/read?path=hello.txt")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "written through the API");

    // The shell console through the API, authenticated with the session token as a subprotocol.
    let seen = api.shell(&id, &token, "hello").await;
    assert!(
        seen.iter().any(|l| l.contains("hello from a zlh runtime")),
        "the runtime is on the shell's PATH: {seen:?}"
    );

    // The hosted IDE: token, bootstrap on the dev host (cookie, 303), then the container's
    // code-server (the demo catalog's stand-in) through the proxy.
    let ide = api.call(reqwest::Method::POST, &format!("/api/dev/{id}/ide-token"), &token).await;
    let bootstrap = ide["url"].as_str().unwrap_or_else(|| panic!("ide-token: {ide}"));
    let port = api.port();
    assert!(bootstrap.starts_with(&format!("http://dev-{vmid}.localhost:{port}/")), "{bootstrap}");
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&format!("dev-{vmid}.localhost"), ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let r = browser.get(bootstrap).send().await.unwrap();
    assert_eq!(r.status(), 303, "{}", api.log());
    // code-server opens the workspace as this container sees it: an isolated container's real
    // path, or a local process's under the data dir.
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let folder = location.strip_prefix("/?folder=").unwrap_or_else(|| panic!("the token leaves the URL: {location}"));
    let container = api.containers().join(vmid.to_string());
    let workspace = if api.host == "oci" {
        assert_eq!(folder, "/home/dev/workspace", "{location}");
        container.join("fs/home-dev/workspace")
    } else {
        let workspace = PathBuf::from(folder);
        assert!(workspace.starts_with(api.data.path()) && workspace.ends_with("home/dev/workspace"), "{location}");
        // `<containers>/<vmid>/root/home/dev/workspace`: the container's own directory.
        assert_eq!(workspace.ancestors().nth(4), Some(container.as_path()), "{location}");
        workspace
    };
    assert!(workspace.is_dir(), "{location} names no directory");
    assert_eq!(std::fs::read_to_string(workspace.join("hello.txt")).unwrap(), "written through the API");
    assert_eq!(ide["ideUrl"], format!("http://dev-{vmid}.localhost:{port}{location}"));
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let page = browser
        .get(format!("http://dev-{vmid}.localhost:{port}{location}"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "{}", api.log());
    assert!(page.text().await.unwrap().contains("zlh demo IDE"));

    // Deleting stops and removes the container and archives the server.
    let r = api.http.delete(api.url(&format!("/api/servers/{id}"))).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(container.exists());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = api.call(reqwest::Method::GET, "/api/servers", &token).await;
        if list["servers"].as_array().is_some_and(|a| a.is_empty()) && !container.exists() {
            break;
        }
        assert!(Instant::now() < deadline, "not deleted: {list}\n{}", api.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Api {
    async fn register(&self, name: &str) -> String {
        let r: Value = self
            .http
            .post(self.url("/api/auth/register"))
            .json(
                &json!({"email": format!("{name}@example.com"), "username": name, "password": "correct horse battery"}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["token"].as_str().unwrap_or_else(|| panic!("register: {r}")).to_string()
    }

    /// A running dev server of the user with `token`: its id and vmid.
    async fn dev_server(&self, token: &str) -> (String, u64) {
        let r = self
            .http
            .post(self.url("/api/dev"))
            .bearer_auth(token)
            .json(&json!({"runtime": "hello", "enable_code_server": true}))
            .send()
            .await
            .unwrap();
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.call(reqwest::Method::GET, &format!("/api/servers/{id}/status"), token).await;
            if s["state"] == "running" {
                return (id, s["vmid"].as_u64().unwrap());
            }
            assert!(s["state"] != "failed" && Instant::now() < deadline, "not running: {s}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `script` in the server's shell console, opened through the API's WebSocket (the
    /// session token as a subprotocol) as the tenant opens it; the lines it printed.
    async fn shell(&self, id: &str, token: &str, script: &str) -> Vec<String> {
        let mut req = format!("ws://127.0.0.1:{}/api/servers/{id}/console?mode=shell", self.port())
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("sec-websocket-protocol", format!("zlh-console, zlh-auth.{token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        // The terminal echoes the typed line: the markers are split with "" so only output has them.
        let line =
            format!("( {script} ) 2>&1 | while IFS= read -r l; do echo \"__o\"\"ut:$l\"; done; echo __d\"\"one__\n");
        ws.send(Message::binary(line.into_bytes())).await.unwrap();
        let mut seen = String::new();
        let wait = async {
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                    Message::Text(t) => seen.push_str(&t),
                    _ => {}
                }
                if seen.contains("__done__") {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait).await.unwrap_or_else(|_| panic!("no shell output: {seen}"));
        seen.split(['\r', '\n']).filter_map(|l| l.strip_prefix("__out:")).map(str::to_string).collect()
    }

    /// A container's own address, from its record (the operator's view).
    fn address(&self, vmid: u64) -> String {
        let record: Value = serde_json::from_slice(
            &std::fs::read(self.containers().join(vmid.to_string()).join("container.json")).unwrap(),
        )
        .unwrap();
        record["address"].as_str().unwrap().to_string()
    }
}

#[tokio::test]
async fn a_tenants_shell_reaches_neither_another_tenant_nor_the_platform() {
    let _one = ONE_PLATFORM.lock().await;
    let api = start().await;
    if api.host != "oci" {
        eprintln!("skipped: containers are not isolated on this machine ({})", api.host);
        return;
    }
    let (alice, bob) = (api.register("alice").await, api.register("bob").await);
    let ((a, a_vmid), (b, _)) = (api.dev_server(&alice).await, api.dev_server(&bob).await);
    assert_eq!(api.shell(&a, &alice, "echo alice-secret > /home/dev/workspace/secret.txt && echo ok").await, ["ok"]);

    let data = api.data.path().join("data");
    let a_addr = api.address(a_vmid);
    let api_port = api.port();
    // The host's side of every container's link.
    let gateway = "10.89.0.1";
    let tcp = |host: &str, port: u16| format!("timeout 2 bash -c 'echo > /dev/tcp/{host}/{port}'");
    // A service of the host's on every address (the API itself listens on loopback only); the
    // host reaches it at its own address (the control).
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    let host_addr = {
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // No packet is sent: connecting a UDP socket only picks the route and its source.
        probe.connect("192.0.2.1:9").unwrap();
        probe.local_addr().unwrap().ip().to_string()
    };
    std::net::TcpStream::connect((host_addr.as_str(), service_port)).unwrap();
    let attempts = [
        ("read A's workspace", format!("cat {}/oci/{a_vmid}/fs/home-dev/workspace/secret.txt", data.display())),
        ("find A's file in its own workspace", "cat /home/dev/workspace/secret.txt".to_string()),
        ("see the API's process", "grep -l zlh-apid /proc/[0-9]*/cmdline".to_string()),
        ("see a host process", format!("test -e /proc/{}", api.child.id())),
        ("connect to A's agent", tcp(&a_addr, 18888)),
        ("connect to a host service at the gateway", tcp(gateway, service_port)),
        ("connect to a host service at the host's address", tcp(&host_addr, service_port)),
        ("connect to A's code-server", tcp(&a_addr, 6000)),
        ("connect to the API through the gateway", tcp(gateway, api_port)),
        ("connect to PostgreSQL through the gateway", tcp(gateway, 5432)),
        ("read the API's secret", format!("cat {}/secret.key", data.display())),
        ("read the API's database", format!("head -c 16 {}/zlh.db", data.display())),
        ("read the catalog signing key", format!("cat {}/keys/catalog.key", data.display())),
        ("read its agent's token", "cat /.zlh/etc/agent.token".to_string()),
        ("write the agent binary", "echo x > /.zlh/zlh-agentd".to_string()),
        ("write the API binary", format!("echo x > {}", env!("CARGO_BIN_EXE_zlh-apid"))),
        ("write the catalog key", format!("echo x > {}/keys/catalog.key", data.display())),
    ];
    for (what, script) in &attempts {
        let out = api.shell(&b, &bob, &format!("{script} >/dev/null 2>&1 && echo crossed")).await;
        assert!(!out.iter().any(|l| l == "crossed"), "tenant B could {what}: {out:?}");
    }
    // The same kinds of command on B's own things work: the refusals above are the boundaries'.
    for script in [
        "echo bob > /home/dev/workspace/mine.txt && cat /home/dev/workspace/mine.txt".to_string(),
        "test -e /proc/1".to_string(),
        tcp("127.0.0.1", 18888),
        "test -r /.zlh/etc/agent.toml".to_string(),
    ] {
        let out = api.shell(&b, &bob, &format!("{script} >/dev/null 2>&1 && echo crossed")).await;
        assert!(out.iter().any(|l| l == "crossed"), "{script} failed on B's own things: {out:?}");
    }
    // And A's file is where A put it.
    assert_eq!(api.shell(&a, &alice, "cat /home/dev/workspace/secret.txt").await, ["alice-secret"]);

    for (id, token) in [(&a, &alice), (&b, &bob)] {
        let r = api.http.delete(api.url(&format!("/api/servers/{id}"))).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(api.containers())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
    {
        assert!(Instant::now() < deadline, "containers not removed\n{}", api.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
