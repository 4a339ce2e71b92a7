//! The OCI container host with the real agent binary under runc, as a hostile tenant would try
//! it: a dev container is created, started and provisioned; inside, the dev user's shell cannot
//! read the agent's token, see host processes, reach the host's services or another container,
//! or write the system; then stop and destroy leave nothing behind (counted: netns, links,
//! runc containers, files).
//!
//! Needs root, runc and the CNI plugins (`.ci/run` installs them); without them it says so and
//! passes, as on a developer's machine without an OCI runtime.

mod support;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde_json::json;
use support::*;
use zlh_core::agent_client::{AgentClient, AgentClientConfig, ConfigureOutcome};
use zlh_core::container::oci::host::AGENT_PORT;
use zlh_core::container::oci::network::NetworkConfig;
use zlh_core::container::oci::{OciHost, OciHostConfig};
use zlh_core::container::{AgentEndpoint, ContainerHost, ContainerKind, ContainerSpec, ContainerState};

const A: u32 = 6201;
const B: u32 = 6202;
const C: u32 = 6203;
const D: u32 = 6204;

/// A game server that answers TCP on its port.
const LISTENER: &str = "#!/bin/bash\necho 'Done (0.1s)!'\nexec python3 -c 'import socket,sys\ns=socket.create_server((\"0.0.0.0\", int(sys.argv[1])))\nwhile True:\n  c,_=s.accept(); c.sendall(b\"game\\n\"); c.close()' \"$SERVER_PORT\"\n";

/// A game server that allocates until the memory limit ends it.
const HOG: &str =
    "#!/bin/bash\necho 'Done (0.1s)!'\nexec python3 -c 'x = []\nwhile True: x.append(bytearray(16 << 20))'\n";

fn spec(vmid: u32) -> ContainerSpec {
    ContainerSpec {
        vmid,
        kind: ContainerKind::Dev,
        hostname: format!("dev-{vmid}"),
        memory_mb: 512,
        disk_gb: 1,
        cores: 1,
        agent_token: TOKEN.into(),
        ports: vec![],
    }
}

/// One test at a time: they count the machine's links and mounts before and after.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why this machine cannot run OCI containers, if it cannot.
fn unsupported() -> Option<&'static str> {
    if !is_root() {
        return Some("not root");
    }
    if !["/usr/sbin/runc", "/usr/bin/runc"].iter().any(|p| Path::new(p).exists()) {
        return Some("runc is not installed");
    }
    if !Path::new("/usr/lib/cni/ptp").exists() {
        return Some("the CNI plugins are not installed");
    }
    None
}

/// Runs `script` in the container's console shell (a PTY shell as the dev user, opened with a
/// console ticket as the API opens it for a tenant); whether it succeeded, and what it printed.
async fn as_dev(ep: &AgentEndpoint, vmid: u32, script: &str) -> (bool, Vec<String>) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let key = zlh_core::token::console_ticket_key(TOKEN);
    let ticket = zlh_core::token::issue(
        &key,
        zlh_core::token::CONSOLE_PURPOSE,
        "tenant",
        vmid,
        Duration::from_secs(30),
        chrono::Utc::now(),
    )
    .unwrap();
    let url = format!("ws://{}:{AGENT_PORT}/console/stream?mode=shell", ep.agent_url.host_str().unwrap());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", format!("zlh-console, zlh-ticket.{ticket}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    // The typed line is echoed by the terminal: the markers are split with "" so only the real
    // output carries them whole.
    let line = format!(
        "( {script} ) 2>&1 | while IFS= read -r l; do echo \"__o\"\"ut:$l\"; done; echo \"__r\"\"c=${{PIPESTATUS[0]}}__\"\n"
    );
    ws.send(Message::binary(line.into_bytes())).await.unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !seen.contains("__rc=") || !seen[seen.find("__rc=").unwrap()..].contains("__\r") {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("shell answered").unwrap().unwrap();
        match msg {
            Message::Text(t) => seen.push_str(&t),
            Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Message::Close(c) => panic!("shell closed {c:?}: {seen}"),
            _ => {}
        }
    }
    let rc = seen.split("__rc=").nth(1).and_then(|r| r.split("__").next()).unwrap_or("?").to_string();
    let out = seen.split(['\r', '\n']).filter_map(|l| l.strip_prefix("__out:")).map(str::to_string).collect();
    (rc == "0", out)
}

fn count_netns(prefix: &str) -> usize {
    std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).count())
        .unwrap_or(0)
}

/// The host's own non-loopback address (where players reach published ports).
fn host_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and its source address.
    probe.connect("192.0.2.1:9").unwrap();
    probe.local_addr().unwrap().ip()
}

fn count_mounts(dir: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table.lines().filter(|l| l.contains(&*dir.to_string_lossy())).count()
}

fn count_links() -> usize {
    std::fs::read_dir("/sys/class/net").map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_in_an_oci_container_reaches_only_its_own() {
    if let Some(why) = unsupported() {
        eprintln!("skipped: {why}");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fx = Fixture::new().await;
    fx.add_game("testgame", "hog", "1.0.0", &[("server.sh", HOG.as_bytes(), 0o755)]).await;
    fx.add_game("testgame", "listener", "1.0.0", &[("server.sh", LISTENER.as_bytes(), 0o755)]).await;
    fx.publish().await;
    // The containers' own ids must be able to reach their bundles and the store.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let host_dir = fx.path("oci");
    let mut cfg =
        OciHostConfig::new(&host_dir, env!("CARGO_BIN_EXE_zlh-agentd"), fx.store_url(), fx.path("catalog.pub"));
    cfg.network = NetworkConfig {
        name: "zlhocitest".into(),
        subnet: Ipv4Net::new(Ipv4Addr::new(10, 89, 240, 0), 24).unwrap(),
        netns_prefix: "zlhocit-".into(),
        ..NetworkConfig::new(host_dir.join("network"))
    };
    cfg.extra_env = vec![("ZLH_LOG".into(), "debug,hyper=info".into())];
    cfg.stop_timeout = Duration::from_secs(2);
    let host = OciHost::new(cfg).unwrap();
    // What an earlier run that was killed left behind goes first, as at the API's start.
    host.recover().await.unwrap();
    let (netns_before, links_before) = (count_netns("zlhocit-"), count_links());
    let logs =
        |vmid: u32| std::fs::read_to_string(host.container_dir(vmid).join("fs/log/agent.log")).unwrap_or_default();

    // A disk the host cannot hold is refused before anything is made.
    let err = host.create(&ContainerSpec { disk_gb: 1 << 20, ..spec(A) }).await.unwrap_err();
    assert!(err.to_string().contains("no room for a 1048576 GB disk"), "{err}");
    assert!(!host.container_dir(A).exists() && count_netns("zlhocit-") == netns_before);

    let began = Instant::now();
    let a = host.create(&spec(A)).await.unwrap();
    host.start(A).await.unwrap_or_else(|e| panic!("start: {e}\n{}", logs(A)));
    eprintln!("create → agent healthy: {:?}", began.elapsed());
    assert_eq!(host.status(A).await.unwrap(), ContainerState::Running);
    let b = host.create(&spec(B)).await.unwrap();
    host.start(B).await.unwrap_or_else(|e| panic!("start: {e}\n{}", logs(B)));

    // The API's view: the agent at the container's own address, provisioned as usual.
    let ep = a.endpoint.clone();
    assert_ne!(ep.agent_url.host_str(), Some("127.0.0.1"));
    let client = AgentClient::new(AgentClientConfig::default()).unwrap();
    let payload = json!({"vmid": A, "container_type": "dev", "runtime": "zrt", "version": "1",
                         "memory_mb": 512, "enable_code_server": true});
    let outcome = client.configure(&ep, TOKEN, &payload).await.unwrap();
    assert!(matches!(outcome, ConfigureOutcome::Started(_)), "{outcome:?}");
    let s = wait_status(&client, &ep, |s| {
        s.provisioning_complete && s.code_server.as_ref().is_some_and(|c| c.state == "running") || s.state == "error"
    })
    .await;
    assert_eq!(s.state, "running", "{s:?}\n{}", logs(A));
    // Inside, paths are the real ones.
    assert_eq!(s.workspace.as_deref(), Some("/home/dev/workspace"));
    let code_server = ep.code_server.unwrap();
    let page = wait_http(&format!("http://{code_server}/")).await;
    assert!(page.starts_with("code-server stand-in"), "{page}");
    // Only the control plane (root) reaches the agent and the IDE: another user of the host is
    // refused, as root is not.
    for target in [code_server, format!("{}:{AGENT_PORT}", ep.agent_url.host_str().unwrap()).parse().unwrap()] {
        let connect = |user: &[&str]| {
            let script = format!("import socket; socket.create_connection(('{}', {}), 2)", target.ip(), target.port());
            std::process::Command::new("setpriv")
                .args(user)
                .args(["python3", "-c", &script])
                .status()
                .unwrap()
                .success()
        };
        assert!(connect(&[]), "root reaches {target}");
        assert!(!connect(&["--reuid=65534", "--regid=65534", "--clear-groups"]), "another host user reached {target}");
    }

    // The tenant's own things work.
    let (ok, out) =
        as_dev(&ep, A, "id -u; echo mine > /home/dev/workspace/f && cat /home/dev/workspace/f; echo $HOME").await;
    assert!(ok, "{out:?}");
    assert_eq!(out, ["1000", "mine", "/home/dev"]);

    // What it must not do. Each line prints `crossed` only if the attempt worked.
    // The host's side of every container's link: the subnet's first address.
    let gateway = Ipv4Addr::new(10, 89, 240, 1);
    let b_addr = b.endpoint.agent_url.host_str().unwrap().to_string();
    // A service of the host's on every address; the host itself reaches it (the control).
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    std::net::TcpStream::connect((host_address(), service_port)).unwrap();
    let attempts = [
        ("read the agent token", "cat /.zlh/etc/agent.token".to_string()),
        ("read the host's data", format!("ls {}", fx.dir.path().display())),
        ("see a host process", format!("test -e /proc/{}", std::process::id())),
        ("write the agent binary", "echo x > /.zlh/zlh-agentd".to_string()),
        ("write the system", "echo x > /usr/bin/zlh-x".to_string()),
        ("write /etc", "echo x >> /etc/passwd".to_string()),
        ("reach the host's PostgreSQL", "timeout 2 bash -c 'echo > /dev/tcp/127.0.0.1/5432'".to_string()),
        ("reach the host at the gateway", format!("timeout 2 bash -c 'echo > /dev/tcp/{gateway}/5432'")),
        ("reach another container's agent", format!("timeout 2 bash -c 'echo > /dev/tcp/{b_addr}/{AGENT_PORT}'")),
        ("reach a host service at the gateway", format!("timeout 2 bash -c 'echo > /dev/tcp/{gateway}/{service_port}'")),
        ("reach a host service at its address", format!("timeout 2 bash -c 'echo > /dev/tcp/{}/{service_port}'", host_address())),
        ("stand in for its agent", format!("python3 -c 'import socket; socket.create_server((\"0.0.0.0\", {AGENT_PORT}))'")),
        (
            "make a user namespace of its own",
            "python3 -c 'import ctypes,os,sys; r=ctypes.CDLL(None).syscall(56, 0x10000000 | 17, 0, 0, 0, 0); r == 0 and os._exit(0); sys.exit(0 if r > 0 else 1)'"
                .to_string(),
        ),
        ("mount", "mount -t tmpfs none /tmp".to_string()),
        ("become root", "su -c id root </dev/null".to_string()),
        // The plan's disk is 1 GB: writing 1.1 GB fills it and fails.
        ("write past the disk quota", "dd if=/dev/zero of=/home/dev/big bs=1M count=1100 && sync".to_string()),
    ];
    // The same kinds of command on its own things work, so a refusal above is the boundary's.
    let controls = [
        "cat /home/dev/workspace/f",
        "test -e /proc/1",
        "echo x > /tmp/x",
        "timeout 2 bash -c 'echo > /dev/tcp/127.0.0.1/18888'",
        "python3 -c 'import socket; socket.create_server((\"0.0.0.0\", 8888))'",
        "python3 -c 'import ctypes,os,sys; r=ctypes.CDLL(None).syscall(56, 17, 0, 0, 0, 0); r == 0 and os._exit(0); sys.exit(0 if r > 0 else 1)'",
        "ls /opt/zlh",
    ];
    for script in controls {
        let (_, out) = as_dev(&ep, A, &format!("{script} >/dev/null 2>&1 && echo crossed")).await;
        assert!(out.iter().any(|l| l == "crossed"), "{script} failed on the tenant's own things: {out:?}");
    }
    for (what, script) in attempts {
        let (_, out) = as_dev(&ep, A, &format!("{script} >/dev/null 2>&1 && echo crossed")).await;
        assert!(!out.iter().any(|l| l == "crossed"), "a tenant could {what}: {out:?}");
    }
    // Its agent sees only the container's processes.
    let (_, out) = as_dev(&ep, A, "ls /proc | grep -c '^[0-9]'").await;
    let count: usize = out.first().and_then(|n| n.trim().parse().ok()).unwrap_or(usize::MAX);
    assert!(count < 30, "{count} processes visible");

    // The disk is free again for what fits.
    let (ok, out) = as_dev(&ep, A, "rm -f /home/dev/big && df -k /home/dev | tail -1").await;
    assert!(ok, "{out:?}");

    // A game server that goes past the plan's memory is killed, and its crash is `oom`.
    let c = host
        .create(&ContainerSpec { kind: ContainerKind::Game, hostname: format!("game-{C}"), ..spec(C) })
        .await
        .unwrap();
    host.start(C).await.unwrap_or_else(|e| panic!("start: {e}\n{}", logs(C)));
    let game = json!({"vmid": C, "container_type": "game", "game": "testgame", "variant": "hog",
                      "version": "1.0.0", "world": "world", "ports": [25565], "memory_mb": 256});
    client.configure(&c.endpoint, TOKEN, &game).await.unwrap();
    let s = wait_status(&client, &c.endpoint, |s| s.last_crash.is_some() || s.state == "error").await;
    let crash = s.last_crash.clone().unwrap_or_else(|| panic!("{s:?}\n{}", logs(C)));
    assert_eq!(crash.classification.as_deref(), Some("oom"), "{crash:?}");
    assert_eq!(host.status(C).await.unwrap(), ContainerState::Running, "the container outlives its game");

    // A game port is published on the host: a player connects to the host's address.
    let port = free_port();
    let d = host
        .create(&ContainerSpec {
            kind: ContainerKind::Game,
            hostname: format!("game-{D}"),
            ports: vec![port],
            ..spec(D)
        })
        .await
        .unwrap();
    host.start(D).await.unwrap_or_else(|e| panic!("start: {e}\n{}", logs(D)));
    let game = json!({"vmid": D, "container_type": "game", "game": "testgame", "variant": "listener",
                      "version": "1.0.0", "world": "world", "ports": [port], "memory_mb": 256});
    client.configure(&d.endpoint, TOKEN, &game).await.unwrap();
    wait_status(&client, &d.endpoint, |s| {
        s.game.as_ref().is_some_and(|g| g.process == "running") || s.state == "error"
    })
    .await;
    let host_addr = host_address();
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        use tokio::io::AsyncReadExt;
        if let Ok(mut conn) = tokio::net::TcpStream::connect((host_addr, port)).await {
            let mut text = String::new();
            let _ = conn.read_to_string(&mut text).await;
            if !text.is_empty() {
                break text;
            }
        }
        assert!(Instant::now() < deadline, "the game port {port} is not published on {host_addr}\n{}", logs(D));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer, "game\n");

    // The agent dies inside the container: its init starts it again, and the new agent adopts
    // the game server still running under its shim (same pid).
    let before = client.status(&d.endpoint, TOKEN).await.unwrap();
    let game_pid = before.game.as_ref().and_then(|g| g.pid).expect("the game's pid");
    let ps = std::process::Command::new("runc")
        .arg("--root")
        .arg(host_dir.join("runc"))
        .args(["ps", "--format", "json", &format!("zlh-{D}")])
        .output()
        .unwrap();
    let pids: Vec<u32> = serde_json::from_slice(&ps.stdout).unwrap();
    let agent = pids
        .into_iter()
        .find(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"/.zlh/zlh-agentd\0serve")))
        .expect("the agent's host pid");
    rustix::process::kill_process(rustix::process::Pid::from_raw(agent as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    let killed = Instant::now();
    let after = loop {
        if let Ok(s) = client.status(&d.endpoint, TOKEN).await {
            if s.game.as_ref().is_some_and(|g| g.process == "running") {
                break s;
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "no agent again within 10 s\n{}", logs(D));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(after.game.as_ref().and_then(|g| g.pid), Some(game_pid), "the same game server, adopted");

    // Files through the agent's API land in the container's own workspace, on its disk.
    let put = reqwest::Client::new()
        .put(format!("{}files/write?path=uploaded.txt", a.endpoint.agent_url))
        .bearer_auth(TOKEN)
        .body("through the file API")
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let (ok, out) =
        as_dev(&ep, A, "cat /home/dev/workspace/uploaded.txt; echo; stat -c %U /home/dev/workspace/uploaded.txt").await;
    assert!(ok && out == ["through the file API", "dev"], "{out:?}");

    // Stop: nothing answers; destroy: nothing is left.
    host.stop(A).await.unwrap();
    assert_eq!(host.status(A).await.unwrap(), ContainerState::Stopped);
    assert!(client.health(&ep).await.is_err());
    // A firewall reload elsewhere on the machine flushes our rules while A is stopped.
    let iptables = |args: &[&str]| {
        let out = std::process::Command::new("iptables").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    iptables(&["-t", "raw", "-F", "ZLHOCITEST-ANTISPOOF"]);
    iptables(&["-F", "ZLHOCITEST-ISOLATE-IN"]);
    // A stopped container starts again with its files, and its rules are back.
    host.start(A).await.unwrap_or_else(|e| panic!("restart: {e}\n{}", logs(A)));
    let (ok, out) = as_dev(&ep, A, "cat /home/dev/workspace/f").await;
    assert!(ok && out == ["mine"], "{out:?}");
    assert!(iptables(&["-t", "raw", "-S", "ZLHOCITEST-ANTISPOOF"]).contains(&format!("zlhocit-{A}")));
    let probe = format!("timeout 2 bash -c 'echo > /dev/tcp/{gateway}/{service_port}' >/dev/null 2>&1 && echo crossed");
    let (_, out) = as_dev(&ep, A, &probe).await;
    assert!(!out.iter().any(|l| l == "crossed"), "the host is reachable after a rules flush: {out:?}");
    for vmid in [A, B, C, D] {
        host.destroy(vmid).await.unwrap();
        assert_eq!(host.status(vmid).await.unwrap(), ContainerState::Missing);
        assert!(!host.container_dir(vmid).exists());
    }
    assert_eq!(count_netns("zlhocit-"), netns_before, "network namespaces left");
    assert_eq!(count_links(), links_before, "links left");
    assert_eq!(count_mounts(&host_dir), 0, "mounts left");
    let left = std::process::Command::new("runc")
        .arg("--root")
        .arg(host_dir.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&left.stdout).trim().is_empty(), "runc containers left");
    host.destroy(A).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_new_host_removes_what_was_left_half_made_and_keeps_the_rest() {
    if let Some(why) = unsupported() {
        eprintln!("skipped: {why}");
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    const KEPT: u32 = 6301;
    const HALF: u32 = 6302;
    let fx = Fixture::new().await;
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let host_dir = fx.path("oci");
    // A network of its own: the other test's namespaces are not this host's to clean.
    let config = || {
        let mut cfg =
            OciHostConfig::new(&host_dir, env!("CARGO_BIN_EXE_zlh-agentd"), fx.store_url(), fx.path("catalog.pub"));
        cfg.network = NetworkConfig {
            name: "zlhocirec".into(),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 89, 241, 0), 24).unwrap(),
            netns_prefix: "zlhocir-".into(),
            ..NetworkConfig::new(host_dir.join("network"))
        };
        cfg.stop_timeout = Duration::from_secs(2);
        cfg
    };
    let first = OciHost::new(config()).unwrap();
    first.recover().await.unwrap();
    let kept = first.create(&spec(KEPT)).await.unwrap();
    first.start(KEPT).await.unwrap();
    first.create(&spec(HALF)).await.unwrap();
    first.start(HALF).await.unwrap();
    // The API dies while making HALF: its files are still aside, its runc container and network
    // namespace exist.
    std::fs::rename(host_dir.join(HALF.to_string()), host_dir.join(format!(".{HALF}.creating"))).unwrap();
    drop(first);

    let second = OciHost::new(config()).unwrap();
    assert_eq!(second.recover().await.unwrap(), [HALF]);
    assert!(!host_dir.join(format!(".{HALF}.creating")).exists());
    assert_eq!(count_netns(&format!("zlhocir-{HALF}")), 0, "HALF's network namespace is gone");
    let runc = std::process::Command::new("runc")
        .arg("--root")
        .arg(host_dir.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&runc.stdout).trim(),
        format!("zlh-{KEPT}"),
        "only KEPT's runc container is left"
    );
    assert_eq!(count_mounts(&host_dir.join(format!(".{HALF}.creating"))), 0);
    // KEPT was not touched.
    assert_eq!(second.status(KEPT).await.unwrap(), ContainerState::Running);
    AgentClient::new(AgentClientConfig::default()).unwrap().health(&kept.endpoint).await.unwrap();
    second.destroy(KEPT).await.unwrap();
    assert_eq!(count_netns("zlhocir-"), 0);
    assert_eq!(count_mounts(&host_dir), 0);
}
