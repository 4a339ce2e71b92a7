//! The local container host with the real agent binary: a dev container is created and started
//! through `LocalHost`, provisioned through `AgentClient`, then stopped (the agent and the
//! code-server it supervises are gone) and destroyed (its directory is gone). An agent killed
//! with SIGKILL is replaced by a new one within 5 s.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use zlh_core::agent_client::{AgentClient, AgentClientConfig, AgentError, ConfigureOutcome};
use zlh_core::container::{ContainerHost, ContainerKind, ContainerSpec, ContainerState, LocalHost, LocalHostConfig};
use zlh_core::supervisor::shim::ShimState;

const VMID: u32 = 6101;

fn spec() -> ContainerSpec {
    ContainerSpec {
        vmid: VMID,
        kind: ContainerKind::Dev,
        hostname: format!("dev-{VMID}"),
        memory_mb: 1024,
        disk_gb: 4,
        cores: 1,
        agent_token: TOKEN.into(),
        ports: vec![],
    }
}

#[tokio::test]
async fn a_dev_container_from_create_to_destroy() {
    let fx = Fixture::new().await;
    let mut cfg =
        LocalHostConfig::new(fx.path("host"), env!("CARGO_BIN_EXE_zlh-agentd"), fx.store_url(), fx.path("catalog.pub"));
    cfg.extra_env = vec![("ZLH_LOG".into(), "debug,hyper=info".into())];
    let host = LocalHost::new(cfg).unwrap();
    let container = host.create(&spec()).await.unwrap();
    let ep = container.endpoint.clone();
    let code_server = ep.code_server.expect("a dev container has a code-server address");
    let logs = || std::fs::read_to_string(host.container_dir(VMID).join("agent.log")).unwrap_or_default();

    host.start(VMID).await.unwrap_or_else(|e| panic!("start: {e}\n{}", logs()));
    assert_eq!(host.status(VMID).await.unwrap(), ContainerState::Running);
    let client = AgentClient::new(AgentClientConfig::default()).unwrap();
    client.health(&ep).await.unwrap();
    let idle = client.status(&ep, TOKEN).await.unwrap();
    assert_eq!((idle.state.as_str(), idle.provisioning_complete), ("idle", false));
    let err = client.status(&ep, "another-token-0123456789abcdef0123456789").await.unwrap_err();
    assert!(matches!(err, AgentError::Unauthorized), "the agent reads its token from the token file: {err:?}");

    // The agent knows its vmid from the config the host wrote.
    let foreign = json!({"vmid": VMID + 1, "container_type": "dev", "runtime": "zrt", "version": "1",
                         "memory_mb": 1024, "enable_code_server": true});
    let err = client.configure(&ep, TOKEN, &foreign).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Refused { status, message } if *status < 500 && message.contains("vmid")),
        "{err:?}"
    );

    let payload = json!({"vmid": VMID, "container_type": "dev", "runtime": "zrt", "version": "1",
                         "memory_mb": 1024, "enable_code_server": true});
    let outcome = client.configure(&ep, TOKEN, &payload).await.unwrap();
    assert!(matches!(outcome, ConfigureOutcome::Started(_)), "{outcome:?}");
    let s = wait_status(&client, &ep, |s| {
        s.provisioning_complete && s.code_server.as_ref().is_some_and(|c| c.state == "running") || s.state == "error"
    })
    .await;
    assert_eq!(s.state, "running", "{s:?}\n{}", logs());
    assert_eq!(s.runtime.as_ref().unwrap().id, "zrt");
    // The workspace as this container's code-server sees it (the API sends the IDE there).
    let workspace = host.container_dir(VMID).join("root/home/dev/workspace");
    assert_eq!(s.workspace.as_deref(), Some(workspace.to_str().unwrap()));
    assert!(workspace.is_dir());
    assert_eq!(s.code_server.as_ref().unwrap().port, Some(code_server.port()), "code-server on its own port");
    let body = wait_http(&format!("http://{code_server}/")).await;
    assert!(body.starts_with("code-server stand-in"), "{body}");
    assert!(matches!(client.configure(&ep, TOKEN, &payload).await.unwrap(), ConfigureOutcome::AlreadyApplied(_)));

    // kill -9 of the agent: the host starts a new one within 5 s, which finds its provisioned
    // state and the code-server it supervised still running.
    let killed = host.record(VMID).unwrap().unwrap().pid.unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(killed as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let killed_at = Instant::now();
    while !(client.health(&ep).await.is_ok() && host.record(VMID).unwrap().unwrap().pid != Some(killed)) {
        assert!(killed_at.elapsed() < Duration::from_secs(5), "no new agent within 5 s\n{}", logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(killed));
    let again = client.status(&ep, TOKEN).await.unwrap();
    assert!(again.provisioning_complete, "{again:?}");
    assert_eq!(again.code_server.as_ref().map(|c| c.state.as_str()), Some("running"), "{again:?}");

    // Stop: the agent and everything it supervised are gone.
    let agent_pid = host.record(VMID).unwrap().unwrap().pid.unwrap();
    let shim_state = host.container_dir(VMID).join("root/var/lib/zlh/supervisor/code-server/shim.json");
    let shim: ShimState = serde_json::from_str(&read(&shim_state)).unwrap();
    assert!(alive(shim.child_pid) && alive(shim.shim_pid));
    // The stand-in ignores SIGTERM, as a busy code-server does: it is killed after a short grace.
    let stopping = Instant::now();
    host.stop(VMID).await.unwrap();
    let took = stopping.elapsed();
    assert!(!alive(shim.child_pid), "code-server still runs after stop");
    assert!(took <= Duration::from_secs(2), "stopping the container waited {took:?} for code-server");
    assert_eq!(host.status(VMID).await.unwrap(), ContainerState::Stopped);
    for (what, pid) in [("agent", agent_pid), ("code-server", shim.child_pid), ("shim", shim.shim_pid)] {
        assert!(!alive(pid), "{what} ({pid}) still runs after stop");
    }
    let err = client.health(&ep).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(reqwest::get(format!("http://{code_server}/")).await.is_err(), "code-server no longer answers");

    host.destroy(VMID).await.unwrap();
    assert!(!host.container_dir(VMID).exists());
    assert_eq!(host.status(VMID).await.unwrap(), ContainerState::Missing);
}
