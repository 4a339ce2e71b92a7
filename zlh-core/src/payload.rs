//! The provisioning payload of the agent's `POST /config`, as the existing portal sends it
//! (checked by the API before it stores a request, and by the agent before it provisions):
//! dev `{vmid, container_type:"dev", runtime, version, memory_mb, enable_code_server}`,
//! game `{vmid, container_type:"game", game, variant, version, world, ports, memory_mb}`.
//! Both may carry the plan's disk, `disk_gb` (what the API sends) or `disk_mb` (finer; wins when
//! both are given): the agent's file manager refuses writes beyond it.
//! Fields the portal adds beyond these are ignored; the ones used here are checked before
//! anything is stored.

use crate::types::RuntimeId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "container_type", rename_all = "lowercase")]
pub enum Payload {
    Dev(DevPayload),
    Game(GamePayload),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevPayload {
    pub vmid: u32,
    pub runtime: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub enable_code_server: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GamePayload {
    pub vmid: u32,
    pub game: String,
    pub variant: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub world: Option<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    pub memory_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// The smallest and largest memory a payload may ask for.
const MEMORY_MB: std::ops::RangeInclusive<u64> = 128..=1024 * 1024;
/// The largest disk a payload may ask for (1 PiB).
const MAX_DISK_MB: u64 = 1 << 30;

impl Payload {
    /// Parses and checks a payload; the message says which field is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid provisioning payload: {e}"))?;
        match value.get("container_type").and_then(|t| t.as_str()) {
            Some("dev" | "game") => {}
            Some(other) => return Err(format!("container_type {other:?} must be \"dev\" or \"game\"")),
            None => return Err("container_type is missing (\"dev\" or \"game\")".into()),
        }
        let p: Payload = serde_json::from_value(value).map_err(|e| format!("invalid provisioning payload: {e}"))?;
        p.validate()?;
        Ok(p)
    }

    pub fn vmid(&self) -> u32 {
        match self {
            Payload::Dev(d) => d.vmid,
            Payload::Game(g) => g.vmid,
        }
    }

    pub fn memory_mb(&self) -> Option<u64> {
        match self {
            Payload::Dev(d) => d.memory_mb,
            Payload::Game(g) => Some(g.memory_mb),
        }
    }

    /// The container's disk in bytes (`disk_mb`, else `disk_gb`), if the payload gives one.
    pub fn disk_bytes(&self) -> Option<u64> {
        let (gb, mb) = match self {
            Payload::Dev(d) => (d.disk_gb, d.disk_mb),
            Payload::Game(g) => (g.disk_gb, g.disk_mb),
        };
        mb.map(|mb| mb << 20).or(gb.map(|gb| gb << 30))
    }

    fn validate(&self) -> Result<(), String> {
        if self.vmid() == 0 {
            return Err("vmid must be a positive number".into());
        }
        let (gb, mb) = match self {
            Payload::Dev(d) => (d.disk_gb, d.disk_mb),
            Payload::Game(g) => (g.disk_gb, g.disk_mb),
        };
        for (field, value, max) in [("disk_gb", gb, MAX_DISK_MB >> 10), ("disk_mb", mb, MAX_DISK_MB)] {
            if value.is_some_and(|v| v == 0 || v > max) {
                return Err(format!("{field} must be 1..={max}"));
            }
        }
        if let Some(mb) = self.memory_mb() {
            if !MEMORY_MB.contains(&mb) {
                return Err(format!("memory_mb {mb} is outside {}..={}", MEMORY_MB.start(), MEMORY_MB.end()));
            }
        }
        let version_ok = |v: &str| v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-+_".contains(c));
        match self {
            Payload::Dev(d) => {
                RuntimeId::parse(&d.runtime).map_err(|e| format!("runtime: {e}"))?;
                if !version_ok(&d.version) {
                    return Err(format!("version {:?} is not a version", d.version));
                }
            }
            Payload::Game(g) => {
                RuntimeId::parse(&g.game).map_err(|e| format!("game: {e}"))?;
                RuntimeId::parse(&g.variant).map_err(|e| format!("variant: {e}"))?;
                if !version_ok(&g.version) {
                    return Err(format!("version {:?} is not a version", g.version));
                }
                if let Some(w) = &g.world {
                    if w.is_empty() || w.len() > 64 || w.starts_with('.') || w.contains(['/', '\\', '\0']) {
                        return Err(format!("world {w:?} must be a plain directory name"));
                    }
                }
                if g.ports.contains(&0) {
                    return Err("ports must be 1..=65535".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_payloads_parse() {
        let dev = Payload::parse(
            br#"{"vmid":6001,"container_type":"dev","runtime":"node","version":"20","memory_mb":2048,
                "enable_code_server":true,"extra":"ignored"}"#,
        )
        .unwrap();
        assert!(matches!(&dev, Payload::Dev(d) if d.enable_code_server && d.runtime == "node"));
        let game = Payload::parse(
            br#"{"vmid":5001,"container_type":"game","game":"minecraft","variant":"paper","version":"1.21.4",
                "world":"world","ports":[25565],"memory_mb":4096}"#,
        )
        .unwrap();
        assert_eq!(game.memory_mb(), Some(4096));
        assert_eq!(game.disk_bytes(), None, "no disk given: no quota from the payload");
    }

    #[test]
    fn the_disk_comes_in_gigabytes_or_megabytes() {
        let game = br#"{"vmid":5001,"container_type":"game","game":"minecraft","variant":"paper","memory_mb":1024,"#;
        let with = |extra: &str| Payload::parse([&game[..], extra.as_bytes()].concat().as_slice());
        assert_eq!(with(r#""disk_gb":10}"#).unwrap().disk_bytes(), Some(10 << 30));
        assert_eq!(with(r#""disk_gb":10,"disk_mb":1}"#).unwrap().disk_bytes(), Some(1 << 20), "the finer one wins");
        let dev = Payload::parse(br#"{"vmid":6001,"container_type":"dev","runtime":"node","disk_mb":512}"#).unwrap();
        assert_eq!(dev.disk_bytes(), Some(512 << 20));
        for bad in [r#""disk_gb":0}"#, r#""disk_mb":0}"#, r#""disk_gb":99999999}"#] {
            assert!(with(bad).unwrap_err().contains("disk_"), "{bad}");
        }
    }

    #[test]
    fn bad_payloads_say_why() {
        for (body, needle) in [
            (&br#"{"vmid":1,"container_type":"vm"}"#[..], "container_type"),
            (br#"{"vmid":0,"container_type":"dev","runtime":"node"}"#, "vmid"),
            (br#"{"vmid":1,"container_type":"dev","runtime":"../x"}"#, "runtime"),
            (br#"{"vmid":1,"container_type":"dev","runtime":"node","memory_mb":1}"#, "memory_mb"),
            (
                br#"{"vmid":1,"container_type":"game","game":"mc","variant":"p","world":"../w","memory_mb":512}"#,
                "world",
            ),
            (br#"{"vmid":1,"container_type":"dev","runtime":"node","version":"1; rm -rf /"}"#, "version"),
            (b"not json", "invalid"),
        ] {
            let err = Payload::parse(body).unwrap_err();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
