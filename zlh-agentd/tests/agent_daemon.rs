//! The agent daemon as the real binary, driven over HTTP: provisioning of dev and game
//! containers from a local store, the game's lifecycle with a crash, agent restarts that adopt the
//! running game server, and shutdown.

mod support;

use serde_json::json;
use support::*;

fn dev_payload(vmid: u32, code_server: bool) -> serde_json::Value {
    json!({"vmid": vmid, "container_type": "dev", "runtime": "zrt", "version": "1",
           "memory_mb": 1024, "enable_code_server": code_server})
}

fn game_payload(vmid: u32) -> serde_json::Value {
    json!({"vmid": vmid, "container_type": "game", "game": "testgame", "variant": "vanilla",
           "version": "1.0.0", "world": "world", "ports": [25565], "memory_mb": 512})
}

#[tokio::test]
async fn dev_provisioning_end_to_end_with_code_server() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("dev");
    agent.ready().await;
    let idle = agent.status().await;
    assert_eq!((idle["state"].as_str(), idle["provisioningComplete"].as_bool()), (Some("idle"), Some(false)));

    let r = agent.post("/config", dev_payload(6001, true)).await;
    assert_eq!(r.status(), 202);
    let s = agent.wait_status("provisioning", |s| s["provisioningComplete"] == true || s["state"] == "error").await;
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["runtime"]["id"], "zrt");
    assert_eq!(s["runtime"]["version"], "1.0.0");
    assert_eq!(s["codeServer"]["port"], agent.code_server_port);

    // Repeating the payload changes nothing.
    assert_eq!(agent.post("/config", dev_payload(6001, true)).await.status(), 200);

    // code-server answers on its port, as the dev user, in the workspace, with the runtime on PATH.
    let s = agent.wait_status("code-server running", |s| s["codeServer"]["state"] == "running").await;
    assert!(s["codeServer"]["pid"].as_u64().is_some());
    let body = wait_http(&format!("http://127.0.0.1:{}/", agent.code_server_port)).await;
    let user = if is_root() { DEV_USER.to_string() } else { whoami() };
    assert!(body.contains(&format!("user={user} ")), "{body}");
    assert!(body.contains(&format!("workspace={}", agent.root.join("home/dev/workspace").display())), "{body}");
    assert!(body.contains(&format!("path={}/opt/zlh/runtimes/zrt/current/bin:", agent.root.display())), "{body}");

    // Login and non-login shells get the same runtime PATH from the profile script.
    let profile = read(&agent.root.join("etc/profile.d/zlh-runtime.sh"));
    assert!(profile.contains("zrt/current/bin"), "{profile}");
    for rc in [".profile", ".bashrc"] {
        assert!(read(&agent.root.join("home/dev").join(rc)).contains("zlh-runtime.sh"));
    }
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(". {}; zrt", agent.root.join("home/dev/.bashrc").display()))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "zrt-1.0.0\n");

    // code-server lifecycle routes.
    let r = agent.post("/dev/codeserver/stop", json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(agent.status().await["codeServer"]["state"], "stopped");
    assert_eq!(agent.post("/dev/codeserver/start", json!({})).await.status(), 200);
    agent.wait_status("code-server back", |s| s["codeServer"]["state"] == "running").await;
}

fn whoami() -> String {
    let out = std::process::Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn game_lifecycle_with_a_crash_on_record() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("game");
    agent.ready().await;
    assert_eq!(agent.post("/config", game_payload(5001)).await.status(), 202);
    let s = agent.wait_status("game running", |s| s["state"] == "running" || s["state"] == "error").await;
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["provisioningComplete"], true);
    assert_eq!(s["game"]["id"], "testgame-vanilla");
    let pid = s["game"]["pid"].as_u64().unwrap() as u32;
    assert!(alive(pid));

    // The server crashes: the crash is on record, classified, with its log tail.
    std::fs::write(agent.root.join("opt/zlh/server/crash.flag"), "").unwrap();
    let s = agent.wait_status("crash", |s| s["crashCount"] == 1).await;
    assert_eq!(s["state"], "crashed", "{s}");
    let crash = &s["lastCrash"];
    assert_eq!(crash["exitCode"], 3);
    assert_eq!(crash["classification"], "nonzero_exit");
    let tail: Vec<&str> = crash["logTail"].as_array().unwrap().iter().filter_map(|l| l.as_str()).collect();
    assert!(tail.contains(&"Exception in server tick loop"), "{tail:?}");
    assert!(tail.iter().any(|l| l.starts_with("Starting test server on port 25565 with 512 MB")), "{tail:?}");
    assert!(tail.contains(&"runtime: zrt-1.0.0"), "the runtime is on the server's PATH: {tail:?}");
    let metrics = agent.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("zlh_agent_game_crashes_total 1"), "{metrics}");
    assert!(metrics.contains("zlh_agent_install_total{id=\"testgame-vanilla\",outcome=\"ok\"} 1"), "{metrics}");

    // JSON log lines for Loki carry the vmid and the component.
    let logs = agent.logs();
    let crash_line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "process exited unasked")
        .unwrap_or_else(|| panic!("no JSON crash line in {logs}"));
    assert_eq!((crash_line["vmid"].as_u64(), crash_line["component"].as_str()), (Some(5001), Some("supervisor")));

    // Start during the backoff wait starts at once; stop is graceful (the `stop` console line).
    assert_eq!(agent.post("/start", json!({})).await.status(), 202);
    agent.wait_status("running again", |s| s["state"] == "running").await;
    assert_eq!(agent.post("/stop", json!({})).await.status(), 202);
    agent.wait_status("stopped", |s| s["state"] == "stopped").await;
    assert_eq!(agent.status().await["crashCount"], 1, "a requested stop is no crash");
    assert_eq!(agent.post("/restart", json!({})).await.status(), 202);
    let s = agent.wait_status("restarted", |s| s["state"] == "running").await;
    assert_ne!(s["game"]["pid"].as_u64().unwrap() as u32, pid);
}

#[tokio::test]
async fn agent_restart_adopts_the_running_game_server() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("reattach");
    agent.ready().await;
    agent.post("/config", game_payload(5002)).await;
    let s = agent.wait_status("game running", |s| s["state"] == "running" || s["state"] == "error").await;
    let pid = s["game"]["pid"].as_u64().expect("pid") as u32;

    let exit = agent.terminate();
    assert!(exit.success(), "SIGTERM is a clean exit: {exit}");
    assert!(alive(pid), "the game server outlives the agent");

    agent.restart().await;
    let s = agent.wait_status("adopted", |s| s["state"] == "running").await;
    assert_eq!(s["game"]["pid"].as_u64().unwrap() as u32, pid, "the same process, adopted");
    assert_eq!(s["provisioningComplete"], true);
    assert_eq!(agent.post("/stop", json!({})).await.status(), 202);
    agent.wait_status("stopped", |s| s["state"] == "stopped").await;
    assert!(!alive(pid), "the adopted server was stopped");
}

#[tokio::test]
async fn agent_restart_keeps_the_crash_record_and_the_backoff() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("backoff");
    agent.ready().await;
    agent.post("/config", game_payload(5004)).await;
    agent.wait_status("game running", |s| s["state"] == "running" || s["state"] == "error").await;
    std::fs::write(agent.root.join("opt/zlh/server/crash.flag"), "").unwrap();
    let crashed = agent.wait_status("crash", |s| s["crashCount"] == 1).await;
    assert_eq!(crashed["state"], "crashed", "{crashed}");

    // The agent restarts during the 30 s backoff: the wait goes on, the record stays.
    assert!(agent.terminate().success());
    agent.restart().await;
    let s = agent.wait_status("restored", |s| s["provisioningComplete"] == true).await;
    assert_eq!(s["state"], "crashed", "not started at once: {s}");
    assert_eq!(s["crashCount"], 1, "{s}");
    assert_eq!(s["lastCrash"], crashed["lastCrash"], "{s}");
    assert!(s["game"]["pid"].is_null(), "{s}");
    // A user's start during the backoff still starts at once.
    assert_eq!(agent.post("/start", json!({})).await.status(), 202);
    agent.wait_status("running again", |s| s["state"] == "running").await;
}

#[tokio::test]
async fn shutdown_can_stop_the_game_server_first() {
    let fx = Fixture::new().await;
    let mut agent = Agent::start(&fx, "stopfirst", &[("ZLH_STOP_GAME_ON_SHUTDOWN", "true")]);
    agent.ready().await;
    agent.post("/config", game_payload(5003)).await;
    let s = agent.wait_status("game running", |s| s["state"] == "running" || s["state"] == "error").await;
    let pid = s["game"]["pid"].as_u64().expect("pid") as u32;
    assert!(agent.terminate().success());
    assert!(!alive(pid), "stopped before the agent exited");
    assert!(agent.logs().contains("Stopping the server") || agent.logs().contains("stop_on_shutdown"));
}

#[tokio::test]
async fn bad_payloads_are_refused_and_change_nothing() {
    let fx = Fixture::new().await;
    let mut agent = Agent::start(&fx, "bad", &[("ZLH_VMID", "6100")]);
    agent.ready().await;
    for body in [
        json!({"vmid": 6100, "container_type": "vm"}),
        json!({"vmid": 6100, "container_type": "dev", "runtime": "../etc"}),
        json!({"vmid": 6101, "container_type": "dev", "runtime": "zrt"}),
    ] {
        let r = agent.post("/config", body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let err: serde_json::Value = r.json().await.unwrap();
        assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert!(!agent.root.join("var/lib/zlh/config.json").exists());
    assert_eq!(agent.status().await["state"], "idle");

    // An unknown runtime fails provisioning, visibly, at once.
    let r = agent.post("/config", json!({"vmid": 6100, "container_type": "dev", "runtime": "cobol"})).await;
    assert_eq!(r.status(), 202);
    let s = agent.wait_status("error", |s| s["state"] == "error").await;
    assert!(s["error"].as_str().unwrap().contains("cobol"), "{s}");
}

#[tokio::test]
async fn mods_install_from_the_store_with_a_hash_check() {
    let fx = Fixture::new().await;
    let jar = b"PK\x03\x04 not really a jar";
    let sha = fx.put_raw("mods/worldedit/7.3/worldedit-7.3.jar", jar).await;
    let mut agent = fx.agent("mods");
    agent.ready().await;
    assert_eq!(agent.get("/mods").await.status(), 409, "no server provisioned yet");
    agent.post("/config", game_payload(5004)).await;
    agent.wait_status("game running", |s| s["state"] == "running").await;

    let bad = json!({"key": "mods/worldedit/7.3/worldedit-7.3.jar", "sha256": "0".repeat(64)});
    assert_eq!(agent.post("/mods", bad).await.status(), 422);
    let mods_dir = agent.root.join("opt/zlh/server/mods");
    assert_eq!(std::fs::read_dir(&mods_dir).unwrap().count(), 0, "a refused mod leaves nothing");

    let r = agent.post("/mods", json!({"key": "mods/worldedit/7.3/worldedit-7.3.jar", "sha256": sha})).await;
    assert_eq!(r.status(), 201);
    assert_eq!(std::fs::read(mods_dir.join("worldedit-7.3.jar")).unwrap(), jar);
    assert_eq!(agent.post("/mods/worldedit-7.3.jar/disable", json!({})).await.status(), 200);
    assert!(mods_dir.join("worldedit-7.3.jar.disabled").exists());
    let list: serde_json::Value = agent.get("/mods").await.json().await.unwrap();
    assert_eq!(list[0]["enabled"], false, "{list}");
    let r = agent.http.delete(agent.url("/mods/worldedit-7.3.jar")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(!mods_dir.join("worldedit-7.3.jar.disabled").exists());
}

#[tokio::test]
async fn one_power_action_at_a_time_and_kill_ends_a_stuck_one() {
    let fx = Fixture::new().await;
    let mut agent = fx.agent("stuck");
    agent.ready().await;
    let payload = json!({"vmid": 5005, "container_type": "game", "game": "testgame", "variant": "stubborn",
                         "memory_mb": 512});
    agent.post("/config", payload).await;
    let s = agent.wait_status("running", |s| s["state"] == "running" || s["state"] == "error").await;
    let pid = s["game"]["pid"].as_u64().expect("pid") as u32;

    // The restart's graceful stop hangs (stop command and SIGTERM ignored, 60 s + 30 s timeouts).
    assert_eq!(agent.post("/restart", json!({})).await.status(), 202);
    agent.wait_status("stopping", |s| s["state"] == "stopping").await;
    let r = agent.post("/start", json!({})).await;
    assert_eq!(r.status(), 409, "a second start/restart is refused while one runs");
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].as_str().unwrap().contains("restart"));
    // Kill is never blocked by it.
    let began = std::time::Instant::now();
    assert_eq!(agent.post("/kill", json!({})).await.status(), 202);
    agent.wait_status("stopped", |s| s["state"] == "stopped").await;
    assert!(began.elapsed() < std::time::Duration::from_secs(20), "kill took {:?}", began.elapsed());
    assert!(!alive(pid));
    assert_eq!(agent.status().await["crashCount"], 0, "a kill is no crash");
}
