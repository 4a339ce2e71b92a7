//! The systemd units shipped for real hosts (`deploy/systemd/`): each runs its daemon's `serve`
//! with arguments the daemon accepts, is restarted whatever ended it, and is hardened.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// `section -> key -> values` (a key may repeat); comments and blank lines skipped.
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn unit(name: &str) -> Unit {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut unit = Unit::new();
    let mut section = None;
    for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            unit.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{name}:{n}: not key=value: {line}"));
        let section = section.as_ref().unwrap_or_else(|| panic!("{name}:{n}: outside a section"));
        unit.get_mut(section).unwrap().entry(key.trim().into()).or_default().push(value.trim().into());
    }
    unit
}

/// The one value of `section.key`.
fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let values = unit.get(section).and_then(|s| s.get(key)).unwrap_or_else(|| panic!("no {section}.{key}"));
    assert_eq!(values.len(), 1, "{section}.{key} is set once: {values:?}");
    &values[0]
}

fn common(name: &str, binary: &str) -> Unit {
    let u = unit(name);
    let exec: Vec<&str> = one(&u, "Service", "ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], format!("/usr/local/bin/{binary}"), "{name}");
    assert_eq!(exec.get(1), Some(&"serve"), "{name} runs the daemon");
    assert_eq!(one(&u, "Service", "Restart"), "always", "{name}");
    assert_eq!(one(&u, "Unit", "StartLimitIntervalSec"), "0", "{name} never stops restarting");
    assert_eq!(one(&u, "Service", "NoNewPrivileges"), "yes", "{name}");
    let nofile: u64 = one(&u, "Service", "LimitNOFILE").parse().unwrap();
    assert!(nofile >= 65_536, "{name}: LimitNOFILE {nofile}");
    assert_eq!(one(&u, "Install", "WantedBy"), "multi-user.target", "{name}");
    // Both daemons leave processes that must outlive their restart (local agents, game servers).
    assert_eq!(one(&u, "Service", "KillMode"), "process", "{name}");
    u
}

#[test]
fn the_api_unit_runs_serve_restarts_always_and_is_sandboxed() {
    let u = common("zlh-apid.service", "zlh-apid");
    for (key, value) in [("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("ProtectHome", "yes"), ("User", "zlh")] {
        assert_eq!(one(&u, "Service", key), value, "{key}");
    }
    // Its data dir is the one place ProtectSystem=strict lets it write.
    let exec = one(&u, "Service", "ExecStart");
    assert!(exec.contains("--data-dir /var/lib/zlh"), "{exec}");
    assert_eq!(one(&u, "Service", "StateDirectory"), "zlh");

    // The real binary accepts the unit's arguments.
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zlh-apid")).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_agent_unit_runs_serve_restarts_always_and_keeps_what_it_supervises() {
    let u = common("zlh-agentd.service", "zlh-agentd");
    assert_eq!(one(&u, "Service", "ExecStart"), "/usr/local/bin/zlh-agentd serve", "config from /etc/zlh/agent.toml");
    // It installs into /opt, adds users and serves /home: a read-only system would break it.
    for key in ["ProtectSystem", "ProtectHome", "User"] {
        assert!(!u["Service"].contains_key(key), "{key} would break the agent");
    }
}
