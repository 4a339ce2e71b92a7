//! `LocalHost` with stand-in agent executables (real processes on real ports): the container's
//! files, start waiting for `/health`, a start that fails with the agent's own words, stop of
//! the agent and of the processes it supervises, re-discovery by a new host, and destroy; an
//! agent that dies is started again (with a backoff when it keeps dying), unless it was stopped.
//! The real `zlh-agentd` is driven through `LocalHost` in zlh-agentd's tests.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zlh_core::container::local::RestartBackoff;
use zlh_core::container::{
    ContainerError, ContainerHost, ContainerKind, ContainerSpec, ContainerState, LocalHost, LocalHostConfig,
};

const TOKEN: &str = "local-agent-token-0123456789abcdef0123";

/// Serves `GET /health` on the port from its agent.toml, like the agent does. `trap` decides
/// whether it honours SIGTERM. Every start appends a line to `<dir>/<name>.starts`.
fn fake_agent(dir: &Path, name: &str, trap: &str) -> PathBuf {
    let path = dir.join(name);
    let starts = dir.join(format!("{name}.starts"));
    let script = format!(
        r#"#!/bin/bash
date +%s%N >> '{starts}'
{trap}
cfg="$ZLH_AGENT_ROOT/etc/zlh/agent.toml"
port=$(sed -n 's/^port = //p' "$cfg")
echo "fake agent on $port with root $ZLH_AGENT_ROOT" >&2
exec python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"{{\"ok\": true}}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$port"
"#,
        starts = starts.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn broken_agent(dir: &Path) -> PathBuf {
    let path = dir.join("broken-agent");
    std::fs::write(&path, "#!/bin/sh\necho 'error: no artifact store: set ZLH_STORE' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn config(data: &Path, agent: PathBuf) -> LocalHostConfig {
    let mut c = LocalHostConfig::new(data, agent, "file:///srv/store", "/etc/zlh/catalog.pub");
    c.catalog_key = Some("catalog.json".into());
    c.start_timeout = Duration::from_secs(20);
    c.stop_timeout = Duration::from_secs(5);
    c
}

fn spec(vmid: u32, kind: ContainerKind) -> ContainerSpec {
    ContainerSpec {
        vmid,
        kind,
        hostname: format!("{}-{vmid}", kind.as_str()),
        memory_mb: 1024,
        disk_gb: 4,
        cores: 1,
        agent_token: TOKEN.into(),
        ports: vec![25565],
    }
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn health(port: u16) -> bool {
    reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn create_writes_a_private_token_and_the_agent_config() {
    let dir = tempfile::tempdir().unwrap();
    let host = LocalHost::new(config(dir.path(), fake_agent(dir.path(), "agent", ""))).unwrap();
    let dev = host.create(&spec(6001, ContainerKind::Dev)).await.unwrap();
    let game = host.create(&spec(5001, ContainerKind::Game)).await.unwrap();

    let rec = host.record(6001).unwrap().unwrap();
    let cdir = host.container_dir(6001);
    assert_eq!(dev.endpoint.agent_url.as_str(), format!("http://127.0.0.1:{}/", rec.agent_port));
    assert_eq!(dev.endpoint.code_server, Some(([127, 0, 0, 1], rec.code_server_port).into()));
    assert_eq!(game.endpoint.code_server, None, "no code-server in a game container");
    let other = host.record(5001).unwrap().unwrap();
    let ports = [rec.agent_port, rec.code_server_port, other.agent_port, other.code_server_port];
    assert!(ports.iter().enumerate().all(|(i, p)| !ports[i + 1..].contains(p)), "every port is its own: {ports:?}");

    let token = cdir.join("agent.token");
    assert_eq!(std::fs::read_to_string(&token).unwrap(), TOKEN);
    assert_eq!(std::fs::metadata(&token).unwrap().permissions().mode() & 0o777, 0o600);
    let toml: toml::Table = std::fs::read_to_string(cdir.join("root/etc/zlh/agent.toml")).unwrap().parse().unwrap();
    assert_eq!(toml["listen"].as_str(), Some("127.0.0.1"));
    assert_eq!(toml["port"].as_integer(), Some(rec.agent_port as i64));
    assert_eq!(toml["vmid"].as_integer(), Some(6001));
    assert_eq!(toml["token_file"].as_str(), Some(token.to_str().unwrap()));
    assert_eq!(toml["store"].as_str(), Some("file:///srv/store"));
    assert_eq!(toml["trusted_key"].as_str(), Some("/etc/zlh/catalog.pub"));
    assert_eq!(toml["catalog_key"].as_str(), Some("catalog.json"));
    assert_eq!(toml["dev"]["code_server_bind"].as_str(), Some(format!("127.0.0.1:{}", rec.code_server_port).as_str()));
    assert_eq!(toml["dev"]["create_user"].as_bool(), Some(false), "no OS users unless asked");
    assert!(!toml.to_string().contains(TOKEN), "the token is only in its own file");

    assert_eq!(host.list().unwrap(), vec![5001, 6001]);
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Stopped);
    assert_eq!(host.status(7000).await.unwrap(), ContainerState::Missing);
    let err = host.create(&spec(6001, ContainerKind::Dev)).await.unwrap_err();
    assert!(matches!(err, ContainerError::Conflict(_)), "{err:?}");
    let mut bad = spec(6002, ContainerKind::Dev);
    bad.agent_token = "short".into();
    assert!(matches!(host.create(&bad).await, Err(ContainerError::InvalidSpec(_))));
    assert!(!host.container_dir(6002).exists(), "a refused spec leaves nothing");
    assert!(matches!(host.start(7000).await, Err(ContainerError::NotFound(7000))));
}

#[tokio::test]
async fn start_stop_rediscover_and_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), fake_agent(dir.path(), "agent", ""));
    let host = LocalHost::new(cfg.clone()).unwrap();
    let c = host.create(&spec(6001, ContainerKind::Dev)).await.unwrap();
    host.start(6001).await.unwrap();
    let port = c.endpoint.agent_url.port().unwrap();
    assert!(health(port).await, "start returns once the agent answers");
    let pid = host.record(6001).unwrap().unwrap().pid.unwrap();
    assert!(alive(pid));
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Running);
    host.start(6001).await.unwrap();
    assert_eq!(host.record(6001).unwrap().unwrap().pid, Some(pid), "starting a running container changes nothing");
    let log = std::fs::read_to_string(host.container_dir(6001).join("agent.log")).unwrap();
    assert!(
        log.contains(&format!("fake agent on {port} with root {}", host.container_dir(6001).join("root").display())),
        "{log}"
    );

    // A supervised process the agent left running under its shim, in its own process group.
    let mut game = std::process::Command::new("sleep").arg("1000").process_group(0).spawn().unwrap();
    let shim_dir = host.container_dir(6001).join("root/var/lib/zlh/supervisor/game");
    std::fs::create_dir_all(&shim_dir).unwrap();
    let state = serde_json::json!({"shim_pid": game.id(), "child_pid": game.id(), "started_at": chrono::Utc::now()});
    std::fs::write(shim_dir.join("shim.json"), state.to_string()).unwrap();

    // A new host on the same data dir finds the running container and can stop it.
    drop(host);
    assert!(alive(pid), "dropping the host stops nothing");
    let host = LocalHost::new(cfg).unwrap();
    assert_eq!(host.list().unwrap(), vec![6001]);
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Running);
    assert_eq!(host.agent_endpoint(6001).await.unwrap(), c.endpoint);
    host.stop(6001).await.unwrap();
    assert!(!alive(pid), "the agent is gone");
    let exit = game.wait().unwrap();
    assert!(exit.code().is_none(), "the supervised process was signalled: {exit}");
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Stopped);
    assert!(!health(port).await);
    host.stop(6001).await.unwrap();

    // Started again on the same port; then destroyed with everything in it.
    host.start(6001).await.unwrap();
    assert!(health(port).await);
    let pid = host.record(6001).unwrap().unwrap().pid.unwrap();
    host.destroy(6001).await.unwrap();
    assert!(!alive(pid));
    assert!(!host.container_dir(6001).exists());
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Missing);
    host.destroy(6001).await.unwrap();
}

#[tokio::test]
async fn an_agent_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), fake_agent(dir.path(), "stubborn", "trap '' TERM"));
    cfg.stop_timeout = Duration::from_millis(300);
    let host = LocalHost::new(cfg).unwrap();
    host.create(&spec(6001, ContainerKind::Game)).await.unwrap();
    host.start(6001).await.unwrap();
    let pid = host.record(6001).unwrap().unwrap().pid.unwrap();
    let started = std::time::Instant::now();
    host.stop(6001).await.unwrap();
    assert!(!alive(pid));
    assert!(started.elapsed() >= Duration::from_millis(300), "SIGTERM was given its time first");
}

#[tokio::test]
async fn a_failing_agent_fails_start_with_its_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let host = LocalHost::new(config(dir.path(), broken_agent(dir.path()))).unwrap();
    host.create(&spec(6001, ContainerKind::Dev)).await.unwrap();
    let err = host.start(6001).await.unwrap_err();
    assert!(err.to_string().contains("no artifact store"), "{err}");
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Stopped);
    assert_eq!(host.record(6001).unwrap().unwrap().pid, None);
}

/// The start times (ns since the epoch) the fake agent `name` in `dir` recorded.
fn starts(dir: &Path, name: &str) -> Vec<u128> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.starts"))).unwrap_or_default();
    text.lines().map(|l| l.trim().parse().unwrap()).collect()
}

/// Polls `cond` every 20 ms until it holds; false once `within` has passed.
async fn eventually(within: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond().await
}

fn kill9(pid: u32) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
}

#[tokio::test]
async fn a_killed_agent_answers_again_within_five_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // The default backoff: what a real install gets.
    let host = LocalHost::new(config(dir.path(), fake_agent(dir.path(), "agent", ""))).unwrap();
    let c = host.create(&spec(6001, ContainerKind::Dev)).await.unwrap();
    host.start(6001).await.unwrap();
    let port = c.endpoint.agent_url.port().unwrap();
    let pid = host.record(6001).unwrap().unwrap().pid.unwrap();

    kill9(pid);
    assert!(eventually(Duration::from_secs(2), async || !alive(pid)).await);
    assert!(eventually(Duration::from_secs(5), async || health(port).await).await, "no agent answers /health");
    let rec = host.record(6001).unwrap().unwrap();
    assert_ne!(rec.pid, Some(pid), "a new agent process");
    assert_eq!(rec.restarts, 1);
    assert_eq!(host.status(6001).await.unwrap(), ContainerState::Running);

    // A new host on the same data dir keeps watching it.
    drop(host);
    let host = LocalHost::new(config(dir.path(), fake_agent(dir.path(), "agent", ""))).unwrap();
    let pid = rec.pid.unwrap();
    kill9(pid);
    assert!(eventually(Duration::from_secs(2), async || !alive(pid)).await);
    assert!(eventually(Duration::from_secs(5), async || health(port).await).await, "the new host restarts it too");
    assert_eq!(host.record(6001).unwrap().unwrap().restarts, 2);
    host.destroy(6001).await.unwrap();
}

#[tokio::test]
async fn a_stopped_or_destroyed_agent_is_not_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), fake_agent(dir.path(), "agent", ""));
    let first = Duration::from_millis(50);
    cfg.restart = RestartBackoff { first, max: first, stable_after: Duration::from_secs(60) };
    let host = LocalHost::new(cfg).unwrap();
    let c = host.create(&spec(6001, ContainerKind::Dev)).await.unwrap();
    let port = c.endpoint.agent_url.port().unwrap();

    host.start(6001).await.unwrap();
    host.stop(6001).await.unwrap();
    host.start(6001).await.unwrap();
    host.destroy(6001).await.unwrap();
    assert_eq!(starts(dir.path(), "agent").len(), 2);
    // Twenty times the restart delay: a restart would have happened by now.
    let restarted = eventually(first * 20, async || health(port).await || starts(dir.path(), "agent").len() > 2).await;
    assert!(!restarted, "an agent came back after stop and destroy");
    assert!(!host.container_dir(6001).exists());
}

#[tokio::test]
async fn a_crash_looping_agent_is_started_again_ever_more_slowly() {
    let dir = tempfile::tempdir().unwrap();
    // Healthy at its first start; every later start dies at once.
    let agent = fake_agent(dir.path(), "agent", "[ -e \"$ZLH_AGENT_ROOT/../crashed\" ] && exit 3");
    let mut cfg = config(dir.path(), agent);
    let first = Duration::from_millis(50);
    cfg.restart = RestartBackoff { first, max: first * 8, stable_after: Duration::from_secs(60) };
    let host = LocalHost::new(cfg).unwrap();
    host.create(&spec(6001, ContainerKind::Game)).await.unwrap();
    host.start(6001).await.unwrap();
    std::fs::write(host.container_dir(6001).join("crashed"), "").unwrap();
    kill9(host.record(6001).unwrap().unwrap().pid.unwrap());

    assert!(eventually(Duration::from_secs(20), async || starts(dir.path(), "agent").len() >= 7).await);
    let t = starts(dir.path(), "agent");
    // Start 2 came `first` after the kill; each later one after a doubled delay, capped at 8x.
    let gaps_ms: Vec<u128> = t[1..7].windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    let floors_ms: Vec<u128> = [2, 4, 8, 8, 8].iter().map(|k| k * first.as_millis()).collect();
    assert!(
        gaps_ms.iter().zip(&floors_ms).all(|(gap, floor)| gap >= floor),
        "gaps {gaps_ms:?} ms, floors {floors_ms:?}"
    );
    assert!(host.record(6001).unwrap().unwrap().restarts >= 6);

    // Stopping ends the loop.
    host.stop(6001).await.unwrap();
    let n = starts(dir.path(), "agent").len();
    let restarted = eventually(first * 20, async || starts(dir.path(), "agent").len() > n).await;
    assert!(!restarted, "restarted after stop");
}
