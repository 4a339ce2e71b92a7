//! The dev container's environment: the dev user, its home and workspace, and one computation of
//! the runtime PATH and variables that reaches every shell and service the same way: as a
//! profile script for login shells (sourced from the user's `.profile` and `.bashrc` too, so
//! non-login shells get it) and as the environment of the console and code-server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use zlh_core::atomic;

use crate::paths::AgentPaths;

/// The system part of every PATH, after the runtime bin dirs.
pub const SYSTEM_PATH: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Who the dev user is. `uid`/`gid` are set only when processes must switch to it (the agent
/// runs as root); otherwise the agent's own user is the dev user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub switch: bool,
}

impl DevUser {
    /// `(uid, gid)` to give new files, when the agent is root acting for another user.
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.switch.then_some((self.uid, self.gid))
    }
}

/// A runtime's contribution to the environment: bin dirs and variables, `{install}` expanded to
/// its stable `current` path so upgrades and rollbacks apply without rewriting anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeEnv {
    pub bin_dirs: Vec<PathBuf>,
    pub vars: BTreeMap<String, String>,
}

impl RuntimeEnv {
    pub fn for_install(current: &Path, bin: &[String], env: &BTreeMap<String, String>) -> Self {
        let install = current.display().to_string();
        Self {
            bin_dirs: bin.iter().map(|b| current.join(b)).collect(),
            vars: env.iter().map(|(k, v)| (k.clone(), v.replace("{install}", &install))).collect(),
        }
    }

    /// PATH with the runtime bin dirs first, then the system dirs, without duplicates.
    pub fn path(&self) -> String {
        let mut seen = std::collections::HashSet::new();
        let dirs =
            self.bin_dirs.iter().map(|p| p.display().to_string()).chain(SYSTEM_PATH.iter().map(|s| s.to_string()));
        dirs.filter(|d| seen.insert(d.clone())).collect::<Vec<_>>().join(":")
    }

    /// The environment of a process run as `user` in `home` (console, code-server, services).
    pub fn service_env(&self, user: &str, home: &Path) -> BTreeMap<String, String> {
        let mut env = self.vars.clone();
        env.insert("PATH".into(), self.path());
        env.insert("HOME".into(), home.display().to_string());
        env.insert("USER".into(), user.into());
        env.insert("LOGNAME".into(), user.into());
        env.insert("SHELL".into(), "/bin/bash".into());
        env.insert("TERM".into(), "xterm-256color".into());
        env.insert("LANG".into(), "C.UTF-8".into());
        env
    }

    /// The profile script: prepends the bin dirs unless already there and exports the variables.
    pub fn profile_script(&self) -> String {
        let mut s = String::from("# Written by zlh-agentd: runtime PATH and environment. Changes are overwritten.\n");
        s.push_str(
            "zlh_path_prepend() { case \":$PATH:\" in *\":$1:\"*) ;; *) PATH=\"$1${PATH:+:$PATH}\" ;; esac; }\n",
        );
        for dir in self.bin_dirs.iter().rev() {
            s.push_str(&format!("zlh_path_prepend {}\n", shell_quote(&dir.display().to_string())));
        }
        s.push_str("unset -f zlh_path_prepend\nexport PATH\n");
        for (k, v) in &self.vars {
            s.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        s
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Finds or creates the dev user. As root with `create`, a missing user is added with `useradd`;
/// as any other user, the agent's own user is the dev user.
pub fn ensure_user(name: &str, create: bool, home: &Path) -> anyhow::Result<DevUser> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 || !create {
        let (uname, uid, gid) =
            passwd_by_uid(euid).unwrap_or_else(|| (euid.to_string(), euid, rustix::process::getegid().as_raw()));
        return Ok(DevUser { name: uname, uid, gid, switch: false });
    }
    if passwd_by_name(name).is_none() {
        let shell = if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
        let out = std::process::Command::new("useradd")
            .args(["--home-dir"])
            .arg(home)
            .args(["--no-create-home", "--user-group", "--shell", shell, name])
            .output()
            .context("running useradd")?;
        // A concurrent agent may have added it in between; only a still missing user is an error.
        if !out.status.success() && passwd_by_name(name).is_none() {
            bail!("useradd {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        tracing::info!(user = name, "created the dev user");
    }
    let (uid, gid) = passwd_by_name(name).with_context(|| format!("user {name} not found after useradd"))?;
    Ok(DevUser { name: name.into(), uid, gid, switch: uid != 0 })
}

fn passwd_entries() -> Vec<(String, u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .collect()
}

/// `(uid, gid)` of a user name or numeric uid.
pub fn passwd_by_name(name: &str) -> Option<(u32, u32)> {
    if let Some(e) = passwd_entries().into_iter().find(|(_, u, _)| u.to_string() == name) {
        return Some((e.1, e.2));
    }
    passwd_entries().into_iter().find(|(n, _, _)| n == name).map(|(_, u, g)| (u, g))
}

fn passwd_by_uid(uid: u32) -> Option<(String, u32, u32)> {
    passwd_entries().into_iter().find(|(_, u, _)| *u == uid)
}

/// Home, workspace, profile script and the shell rc hooks, owned by the dev user.
pub fn prepare_home(paths: &AgentPaths, user: &DevUser, env: &RuntimeEnv) -> anyhow::Result<()> {
    for dir in [&paths.home, &paths.workspace] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        chown(dir, user)?;
    }
    let script = &paths.profile_script;
    if let Some(parent) = script.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    atomic::write_file(script, env.profile_script().as_bytes())
        .with_context(|| format!("writing {}", script.display()))?;
    // Login shells read .profile after /etc/profile (which may reset PATH); interactive non-login
    // shells read .bashrc. Both source the same script.
    let hook =
        format!("[ -r {q} ] && . {q}  # zlh runtime environment\n", q = shell_quote(&script.display().to_string()));
    for rc in [".profile", ".bashrc"] {
        let path = paths.home.join(rc);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if !old.contains(&hook) {
            atomic::write_file(&path, format!("{old}{hook}").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            chown(&path, user)?;
        }
    }
    Ok(())
}

fn chown(path: &Path, user: &DevUser) -> anyhow::Result<()> {
    if let Some((uid, gid)) = user.owner() {
        rustix::fs::chown(path, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn java() -> RuntimeEnv {
        RuntimeEnv::for_install(
            Path::new("/opt/zlh/runtimes/java/current"),
            &["bin".into()],
            &BTreeMap::from([("JAVA_HOME".into(), "{install}".into())]),
        )
    }

    #[test]
    fn path_puts_runtime_first_without_duplicates() {
        let env = java();
        assert_eq!(
            env.path(),
            "/opt/zlh/runtimes/java/current/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
        assert_eq!(env.vars["JAVA_HOME"], "/opt/zlh/runtimes/java/current");
        let svc = env.service_env("dev", Path::new("/home/dev"));
        assert_eq!((svc["HOME"].as_str(), svc["USER"].as_str(), svc["LOGNAME"].as_str()), ("/home/dev", "dev", "dev"));
        assert_eq!(svc["TERM"], "xterm-256color");
    }

    #[test]
    fn profile_script_gives_the_same_path_in_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("p.sh");
        std::fs::write(&script, java().profile_script()).unwrap();
        // Sourced twice (profile then bashrc): still one entry.
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(". {0}; . {0}; echo \"$PATH|$JAVA_HOME\"", script.display()))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "/opt/zlh/runtimes/java/current/bin:/usr/bin:/bin|/opt/zlh/runtimes/java/current"
        );
    }

    #[test]
    fn hooks_are_added_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = AgentPaths::new(dir.path());
        let me = DevUser { name: "me".into(), uid: 0, gid: 0, switch: false };
        prepare_home(&paths, &me, &java()).unwrap();
        prepare_home(&paths, &me, &java()).unwrap();
        let profile = std::fs::read_to_string(paths.home.join(".profile")).unwrap();
        assert_eq!(profile.matches("zlh runtime environment").count(), 1);
        assert!(paths.workspace.is_dir() && paths.profile_script.is_file());
    }
}
