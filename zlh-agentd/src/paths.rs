//! Every filesystem location of the agent, under one configurable root (`/` in a container), so
//! tests and a local container host run agents side by side in temp dirs without root.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub root: PathBuf,
    /// Language runtimes (`<runtimes>/<id>/current`).
    pub runtimes: PathBuf,
    /// Addons such as code-server (`<services>/code-server/current`).
    pub services: PathBuf,
    /// Game server artifacts, read-only (`<games>/<game>-<variant>/<version>`).
    pub games: PathBuf,
    /// The game server's working dir: world, configs, mods; the game's file manager root.
    pub server: PathBuf,
    /// The dev user's home and workspace (the dev file manager root).
    pub home: PathBuf,
    pub workspace: PathBuf,
    /// The profile script that puts runtimes on the PATH of login shells.
    pub profile_script: PathBuf,
    /// Agent state: provisioning payload, accepted catalog, supervisor shims, partial uploads.
    pub state: PathBuf,
}

impl AgentPaths {
    pub fn new(root: &Path) -> Self {
        let opt = root.join("opt/zlh");
        let home = root.join("home/dev");
        Self {
            root: root.to_path_buf(),
            runtimes: opt.join("runtimes"),
            services: opt.join("services"),
            games: opt.join("games"),
            server: opt.join("server"),
            workspace: home.join("workspace"),
            home,
            profile_script: root.join("etc/profile.d/zlh-runtime.sh"),
            state: root.join("var/lib/zlh"),
        }
    }

    /// The provisioning payload last accepted.
    pub fn config_file(&self) -> PathBuf {
        self.state.join("config.json")
    }

    /// Written once provisioning of the payload in `config_file` completed.
    pub fn provisioned_file(&self) -> PathBuf {
        self.state.join("provisioned.json")
    }

    /// Whether the game server should be running (survives agent and container restarts).
    pub fn game_desired_file(&self) -> PathBuf {
        self.state.join("game-desired.json")
    }

    pub fn catalog_state(&self) -> PathBuf {
        self.state.join("catalog")
    }

    pub fn shim_dir(&self, name: &str) -> PathBuf {
        self.state.join("supervisor").join(name)
    }
}
