//! The OCI runtime config (`config.json`) of one container, as a pure function of what the host
//! decided, so every isolation choice is in one place and testable without a runtime.
//!
//! The root filesystem is an empty, read-only directory of mount points. The host's system
//! directories are bound into it read-only, without setuid or device files; the container's own
//! writable directories are bound from its directory on the host; the platform's parts (the
//! agent binary, its config and token, the catalog key, a local artifact store) are bound
//! read-only under `/.zlh`. So inside, paths are the real ones (`/home/dev/workspace`), and
//! nothing of the host is writable.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where the platform's own files appear inside a container.
pub const PLATFORM_DIR: &str = "/.zlh";
/// The agent executable inside.
pub const AGENT_PATH: &str = "/.zlh/zlh-agentd";
/// The agent's config directory inside (agent.toml, agent.token, trusted.pub).
pub const AGENT_ETC: &str = "/.zlh/etc";
/// A local artifact store, when there is one, inside.
pub const STORE_DIR: &str = "/.zlh/store";

/// Host directories bound read-only at the same path.
pub const SYSTEM_DIRS: [&str; 2] = ["/usr", "/etc"];
/// Top-level names that are symlinks into `/usr` on merged-/usr systems (Debian 12 and later);
/// made as the same symlinks in the root filesystem.
pub const USR_LINKS: [(&str, &str); 4] =
    [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")];

/// One bind mount from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub writable: bool,
}

impl Bind {
    pub fn ro(source: impl Into<PathBuf>, destination: &str) -> Self {
        Self { source: source.into(), destination: destination.into(), writable: false }
    }

    pub fn rw(source: impl Into<PathBuf>, destination: &str) -> Self {
        Self { source: source.into(), destination: destination.into(), writable: true }
    }
}

/// A user namespace: container ids `0..size` are host ids `host_base..host_base + size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_base: u32,
    pub size: u32,
}

/// Everything the config depends on.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub hostname: String,
    /// The container's first process and its arguments.
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// `None`: no user namespace (the kernel does not allow one); root inside is root outside,
    /// held in by the dropped capabilities, seccomp and the read-only mounts alone.
    pub id_map: Option<IdMap>,
    /// The network namespace the CNI plugins made.
    pub netns: PathBuf,
    pub memory_bytes: u64,
    pub cpus: u32,
    pub pids: i64,
    /// Relative to runc's cgroup root: `zlh/<id>`.
    pub cgroups_path: String,
    /// In mount order, after the system directories.
    pub binds: Vec<Bind>,
}

/// What the agent needs and nothing more: files of other users (the file API, the workspace),
/// switching to the dev user for the console, code-server and the game, signalling them, and
/// game ports below 1024. Not `SYS_ADMIN`, `NET_ADMIN`, `SYS_PTRACE`, `MKNOD`, `SYS_CHROOT`…
pub const CAPABILITIES: [&str; 9] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_NET_BIND_SERVICE",
    "CAP_AUDIT_WRITE",
];

/// System calls refused with EPERM, on top of the capabilities: those that reach the kernel's
/// global state, load code into it, or open new namespaces and mounts to climb out of this one
/// (the calls Docker's and Podman's default profiles block for an unprivileged container), and
/// io_uring, whose own kernel paths have been a steady source of escapes.
/// `ptrace` stays allowed, as there: a debugger on one's own processes is what a dev box is for,
/// and without `CAP_SYS_PTRACE` it reaches nothing else.
pub const BLOCKED_SYSCALLS: [&str; 45] = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// The `config.json` of a container.
pub fn runtime_config(spec: &BundleSpec) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        // A sysfs of its own needs a network namespace owned by the user namespace; the CNI one
        // is the host's, so the host's sysfs is bound read-only (as rootless Podman does).
        json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "rnosuid", "rnoexec", "rnodev", "rro"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=65536k"]}),
        json!({"destination": "/var/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]}),
    ];
    for dir in SYSTEM_DIRS {
        mounts.push(bind_json(&Bind::ro(dir, dir)));
    }
    mounts.extend(spec.binds.iter().map(bind_json));

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
        json!({"type": "network", "path": spec.netns}),
    ];
    let mut linux = json!({
        "resources": {
            "devices": [{"allow": false, "access": "rwm"}],
            "memory": {"limit": spec.memory_bytes},
            "cpu": {"quota": i64::from(spec.cpus) * 100_000, "period": 100_000u64},
            "pids": {"limit": spec.pids},
        },
        "cgroupsPath": spec.cgroups_path,
        "maskedPaths": [
            "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware", "/sys/devices/virtual/powercap", "/sys/fs/cgroup",
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        "seccomp": seccomp(),
    });
    if let Some(map) = spec.id_map {
        namespaces.push(json!({"type": "user"}));
        let ids = json!([{"containerID": 0, "hostID": map.host_base, "size": map.size}]);
        linux["uidMappings"] = ids.clone();
        linux["gidMappings"] = ids;
    }
    linux["namespaces"] = Value::Array(namespaces);

    json!({
        "ociVersion": "1.0.2",
        "hostname": spec.hostname,
        "root": {"path": "rootfs", "readonly": true},
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": spec.env,
            "cwd": "/",
            "noNewPrivileges": true,
            // No core dumps: a piped core_pattern would run the host's handler for them.
            "rlimits": [{"type": "RLIMIT_CORE", "hard": 0u64, "soft": 0u64}],
            "capabilities": {
                "bounding": CAPABILITIES.as_slice(),
                "effective": CAPABILITIES.as_slice(),
                "permitted": CAPABILITIES.as_slice(),
            },
        },
        "mounts": mounts,
        "linux": linux,
    })
}

/// A bind mount; read-only, nosuid and nodev hold for every mount beneath it too (the `r…`
/// flags: plain `ro` on an rbind would leave the mounts under it writable).
fn bind_json(bind: &Bind) -> Value {
    let mode = if bind.writable { "rw" } else { "rro" };
    json!({
        "destination": bind.destination,
        "type": "bind",
        "source": bind.source,
        "options": ["rbind", mode, "rnosuid", "rnodev"],
    })
}

/// `CLONE_NEWUSER`: a user namespace of one's own would give even the dev user every capability
/// over new network namespaces (nf_tables, packet sockets: the kernel's largest attack surface).
const CLONE_NEWUSER: u64 = 0x1000_0000;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

fn seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [
            {"names": BLOCKED_SYSCALLS.as_slice(), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            // clone(2) with CLONE_NEWUSER in its flags (the first argument on these architectures).
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
             "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}]},
            // clone3 passes its flags in memory, where a filter cannot look: "not implemented"
            // makes the C library fall back to clone(2), which is checked above.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        ],
    })
}

/// The mount points the read-only root filesystem must hold for `spec`'s mounts, and the
/// merged-/usr symlinks. Made once, at create.
pub fn make_rootfs(rootfs: &Path, spec: &BundleSpec) -> std::io::Result<()> {
    for dir in ["proc", "dev", "sys", "run", "tmp", "var/tmp", "usr", "etc"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    for (name, target) in USR_LINKS {
        let link = rootfs.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(target, link)?;
        }
    }
    for bind in &spec.binds {
        let inside = rootfs.join(bind.destination.trim_start_matches('/'));
        // Under a system directory the mount point already exists (it is the host's).
        if SYSTEM_DIRS.iter().any(|d| bind.destination.starts_with(&format!("{d}/"))) {
            continue;
        }
        if bind.source.is_dir() {
            std::fs::create_dir_all(&inside)?;
        } else {
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&inside)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BundleSpec {
        BundleSpec {
            hostname: "dev-6001".into(),
            args: vec![AGENT_PATH.into(), "init".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            id_map: Some(IdMap { host_base: 1 << 20, size: 65536 }),
            netns: "/run/netns/zlh-6001".into(),
            memory_bytes: 1 << 30,
            cpus: 2,
            pids: 1024,
            cgroups_path: "zlh/zlh-6001".into(),
            binds: vec![Bind::rw("/data/6001/home-dev", "/home/dev"), Bind::ro("/data/6001/passwd", "/etc/passwd")],
        }
    }

    fn mount<'a>(config: &'a Value, destination: &str) -> &'a Value {
        config["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == destination).unwrap()
    }

    fn options(m: &Value) -> Vec<&str> {
        m["options"].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect()
    }

    #[test]
    fn root_and_system_dirs_are_read_only_and_only_own_dirs_are_writable() {
        let c = runtime_config(&spec());
        assert_eq!(c["root"]["readonly"], true);
        for dir in SYSTEM_DIRS {
            let o = options(mount(&c, dir));
            assert!(o.contains(&"rro") && o.contains(&"rnosuid") && o.contains(&"rnodev"), "{dir}: {o:?}");
        }
        assert!(options(mount(&c, "/sys")).contains(&"rro"));
        assert!(options(mount(&c, "/home/dev")).contains(&"rw"));
        let passwd = options(mount(&c, "/etc/passwd"));
        assert!(passwd.contains(&"rro") && passwd.contains(&"rnosuid"), "{passwd:?}");
        // Bound after /etc, so it covers the host's file.
        let at = |d: &str| c["mounts"].as_array().unwrap().iter().position(|m| m["destination"] == d).unwrap();
        assert!(at("/etc/passwd") > at("/etc"));
    }

    #[test]
    fn namespaces_ids_and_limits_come_from_the_spec() {
        let c = runtime_config(&spec());
        let ns: Vec<&str> =
            c["linux"]["namespaces"].as_array().unwrap().iter().map(|n| n["type"].as_str().unwrap()).collect();
        for want in ["pid", "ipc", "uts", "mount", "network", "user", "cgroup"] {
            assert!(ns.contains(&want), "{want} missing from {ns:?}");
        }
        let net = c["linux"]["namespaces"].as_array().unwrap().iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(net["path"], "/run/netns/zlh-6001");
        assert_eq!(c["linux"]["uidMappings"][0]["hostID"], 1 << 20);
        assert_eq!(c["linux"]["gidMappings"][0]["size"], 65536);
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 1u64 << 30);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 1024);
        assert_eq!(c["process"]["noNewPrivileges"], true);
        let caps: Vec<&str> =
            c["process"]["capabilities"]["bounding"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(
            !caps.contains(&"CAP_SYS_ADMIN") && !caps.contains(&"CAP_NET_ADMIN") && !caps.contains(&"CAP_SYS_PTRACE")
        );
        let blocked = &c["linux"]["seccomp"]["syscalls"][0]["names"];
        assert!(blocked.as_array().unwrap().iter().any(|n| n == "mount"), "{blocked}");
        let clone = &c["linux"]["seccomp"]["syscalls"][1];
        assert_eq!(
            (clone["names"][0].as_str(), clone["args"][0]["value"].as_u64()),
            (Some("clone"), Some(CLONE_NEWUSER))
        );
    }

    #[test]
    fn without_a_user_namespace_there_are_no_id_maps() {
        let c = runtime_config(&BundleSpec { id_map: None, ..spec() });
        assert!(c["linux"]["uidMappings"].is_null());
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        assert!(!ns.iter().any(|n| n["type"] == "user"));
    }

    #[test]
    fn the_rootfs_holds_every_mount_point_and_the_usr_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("home-dev");
        std::fs::create_dir_all(&src).unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "x").unwrap();
        let s =
            BundleSpec { binds: vec![Bind::rw(&src, "/home/dev"), Bind::ro(&file, "/.zlh/etc/agent.token")], ..spec() };
        let rootfs = dir.path().join("rootfs");
        make_rootfs(&rootfs, &s).unwrap();
        assert!(rootfs.join("home/dev").is_dir());
        assert!(rootfs.join(".zlh/etc/agent.token").is_file());
        assert_eq!(std::fs::read_link(rootfs.join("bin")).unwrap(), Path::new("usr/bin"));
        make_rootfs(&rootfs, &s).unwrap();
    }
}
