//! Each OCI container's own network: a named network namespace and an address of its own, made
//! by the standard CNI plugins and fenced off by iptables chains of ours.
//!
//! The plugins are invoked as the CNI spec (1.0.0) says: the binary from the plugin dir, the
//! `CNI_*` variables in its environment, the network config JSON on stdin, the result (or an
//! error object `{code, msg, details}`) on stdout. The list runs in order for ADD, each plugin
//! getting the previous one's result as `prevResult`, and in reverse order for DEL:
//! - `ptp` — a veth pair into the netns, the container's address and a /32 route to it on the
//!   host (so the host's side reaches the agent at that address), `ipMasq` for the way out;
//! - `host-local` (ptp's IPAM) — the address, leased under our own state dir;
//! - `portmap` — the published game ports (`portMappings` through `runtimeConfig`);
//! - `tuning` — IPv6 off in the netns: we assign IPv4 only, and a link-local v6 address would be a
//!   path to host services listening on `[::]` that the v4 rules below never see.
//!
//! `loopback` brings `lo` up as a network of its own (as runtimes do): runc joining an existing
//! netns does not, and programs in the container expect 127.0.0.1.
//!
//! Isolation (this module's own rules; the plugins allow everything):
//! - raw `<NAME>-ANTISPOOF`, jumped to from PREROUTING: per container, a packet from its host-side
//!   veth with any source but its own address is dropped. So every packet a container sends
//!   carries its own address, and the source match of the rules below cannot be dodged.
//! - filter `<NAME>-ISOLATE-IN`, jumped to from INPUT for sources in the subnet (not on lo): only
//!   return traffic of connections the host opened (ESTABLISHED,RELATED) reaches the host. Everything
//!   else addressed to the host is dropped: any of its addresses, the gateway on the veths, and
//!   127.0.0.1 (portmap turns `route_localnet` on for the host veth; this is what makes it safe).
//! - filter `<NAME>-ISOLATE-FWD`, jumped to from FORWARD for sources or destinations in the subnet:
//!   return traffic, and published ports (conntrack state DNAT, i.e. portmap's DNAT) pass; other
//!   containers, anything unsolicited from outside and link-local (169.254.0.0/16, the metadata
//!   service) are dropped; the rest of the container's traffic goes out (masqueraded by ptp).
//! - The host-side veth gets IPv6 disabled too, so the kernel drops any v6 packet it receives even
//!   if a container managed to turn v6 back on in its netns.
//!
//! State under `state_dir`: `ipam/` (host-local's leases) and `attachments/<vmid>.json` (what ADD
//! was given and returned, written before the first ADD so DEL can be run after a crash).
//!
//! The host needs iproute2 (`ip netns`), iptables and the CNI plugins (Debian:
//! containernetworking-plugins, in /usr/lib/cni); `.ci/run` must install all three. The plugins
//! turn on `net.ipv4.ip_forward` (ptp) and leave portmap's shared `CNI-HOSTPORT-*` nat chains
//! behind after the last DEL; both are host-wide and harmless.
//!
//! What this does not do, by design or not yet:
//! - The host's own resolver (e.g. a stub on 127.0.0.53) is unreachable like every host service:
//!   a container's resolv.conf must name a resolver outside the host.
//! - A published port is public: another container reaches it too, through the host's address
//!   (hairpin DNAT), as anyone outside does. From the host, published ports answer on its
//!   addresses and on 127.0.0.1 (portmap masquerades that, with route_localnet on the veth).
//! - Beyond link-local, the world includes the host's LAN; and two networks of this kind on one
//!   host (different names and subnets) are not fenced off from each other.
//! - `check` skips portmap (see there).

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex as StdMutex;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

/// Where `ip netns` keeps its named namespaces (iproute2's fixed location).
const NETNS_DIR: &str = "/run/netns";
/// The spec version of every config we send.
const CNI_VERSION: &str = "1.0.0";
/// The interface the container sees.
const IFNAME: &str = "eth0";
/// The plugins [`CniNetwork::new`] requires, in the order a missing one is reported.
const PLUGINS: [&str; 5] = ["loopback", "ptp", "host-local", "portmap", "tuning"];

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network config: {0}")]
    Config(String),
    #[error("CNI plugin `{plugin}` not found at {}", path.display())]
    MissingPlugin { plugin: String, path: PathBuf },
    #[error("CNI plugin `{plugin}` {command} for {container}: {msg} (code {code}){details}")]
    Plugin { plugin: String, command: &'static str, container: String, code: u64, msg: String, details: String },
    #[error("CNI plugin `{plugin}` {command} for {container}: unusable result: {reason}")]
    BadResult { plugin: String, command: &'static str, container: String, reason: String },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("vmid {0} is already attached (or left over from a crash: detach it first)")]
    AlreadyAttached(u32),
    #[error("vmid {0} is not attached")]
    NotAttached(u32),
    #[error("the rules of network `{name}` are still needed by vmids {vmids:?}")]
    InUse { name: String, vmids: Vec<u32> },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NetworkError + '_ {
    move |source| NetworkError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The CNI network name; also names our iptables chains (upper-cased) and host-local's lease dir.
    pub name: String,
    pub plugin_dir: PathBuf,
    /// Ours alone: host-local's leases and the per-container records.
    pub state_dir: PathBuf,
    /// Containers' addresses; the first one is the gateway (the host side of every veth).
    pub subnet: Ipv4Net,
    /// Namespaces are `<netns_prefix><vmid>` under /run/netns; the name is also the CNI container id.
    pub netns_prefix: String,
    /// Container ports only the host's root (the control plane) may connect to, such as the
    /// agent's and code-server's: every other user on the host is refused.
    pub host_only_ports: Vec<u16>,
}

impl NetworkConfig {
    /// The defaults: network `zlh`, Debian's plugin dir, 10.89.0.0/16, namespaces `zlh-<vmid>`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        NetworkConfig {
            name: "zlh".into(),
            plugin_dir: PathBuf::from("/usr/lib/cni"),
            state_dir: state_dir.into(),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 89, 0, 0), 16).expect("valid prefix"),
            netns_prefix: "zlh-".into(),
            host_only_ports: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A published port: `host_port` on every host address goes to `container_port` in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// For runc's `linux.namespaces` `{type: network, path}`.
    pub netns: PathBuf,
    /// The container's address: where the host reaches its agent.
    pub address: Ipv4Addr,
    /// The host side of the container's veth.
    pub gateway: Ipv4Addr,
    /// The host-side veth.
    pub host_ifname: String,
}

/// What ADD was given and what it returned: what DEL and CHECK must be given again.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    container_id: String,
    conflist: Value,
    ports: Vec<PortMapping>,
    /// None until the whole list was added.
    result: Option<Value>,
}

pub struct CniNetwork {
    config: NetworkConfig,
    /// Serializes this process's iptables edits (check-then-insert, list-then-delete).
    rules: Mutex<()>,
    /// Vmids being attached or detached: a second call for one waits for the first, so a failed
    /// attach's undo can never tear down what a concurrent attach made.
    busy: StdMutex<BTreeSet<u32>>,
    released: Notify,
}

/// Holds a vmid in [`CniNetwork::busy`] until dropped.
struct Claim<'a> {
    net: &'a CniNetwork,
    vmid: u32,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.net.busy.lock().expect("not poisoned").remove(&self.vmid);
        self.net.released.notify_waiters();
    }
}

impl CniNetwork {
    /// Checks the config and that every plugin is there (naming the first one missing).
    pub fn new(config: NetworkConfig) -> Result<Self, NetworkError> {
        let name_ok = config.name.len() <= 12
            && config.name.starts_with(|c: char| c.is_ascii_lowercase())
            && config.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            // Chain names are at most 28 characters; `<NAME>-ISOLATE-FWD` must fit.
            return Err(NetworkError::Config(format!(
                "name `{}` must be 1-12 of [a-z0-9-], starting with a letter",
                config.name
            )));
        }
        let prefix_ok = !config.netns_prefix.is_empty()
            && config.netns_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !prefix_ok {
            // The netns name is the CNI container id, which the spec limits to these characters.
            return Err(NetworkError::Config(format!(
                "netns prefix `{}` must be non-empty [A-Za-z0-9-_.]",
                config.netns_prefix
            )));
        }
        if config.subnet.prefix_len() > 30 {
            return Err(NetworkError::Config(format!(
                "subnet {} has no room for a gateway and a container",
                config.subnet
            )));
        }
        if config.subnet != config.subnet.trunc() {
            return Err(NetworkError::Config(format!("subnet {} has host bits set", config.subnet)));
        }
        for plugin in PLUGINS {
            let path = config.plugin_dir.join(plugin);
            if !path.is_file() {
                return Err(NetworkError::MissingPlugin { plugin: plugin.into(), path });
            }
        }
        Ok(CniNetwork { config, rules: Mutex::new(()), busy: StdMutex::default(), released: Notify::new() })
    }

    pub fn netns_path(&self, vmid: u32) -> PathBuf {
        Path::new(NETNS_DIR).join(self.container_id(vmid))
    }

    /// The netns name, which is also the CNI container id (unique on the host, as /run/netns is).
    fn container_id(&self, vmid: u32) -> String {
        format!("{}{vmid}", self.config.netns_prefix)
    }

    async fn claim(&self, vmid: u32) -> Claim<'_> {
        loop {
            let released = self.released.notified();
            if self.busy.lock().expect("not poisoned").insert(vmid) {
                return Claim { net: self, vmid };
            }
            released.await;
        }
    }

    fn record_path(&self, vmid: u32) -> PathBuf {
        self.config.state_dir.join("attachments").join(format!("{vmid}.json"))
    }

    fn chain(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.config.name.to_ascii_uppercase())
    }

    /// Gives `vmid` a netns with an address and `ports` published. On failure, whatever was made
    /// is removed again.
    pub async fn attach(&self, vmid: u32, ports: &[PortMapping]) -> Result<Attachment, NetworkError> {
        let mut seen = BTreeSet::new();
        if let Some(p) = ports.iter().find(|p| !seen.insert((p.host_port, p.protocol))) {
            return Err(NetworkError::Config(format!("host port {} {:?} published twice", p.host_port, p.protocol)));
        }
        let _claim = self.claim(vmid).await;
        let record_path = self.record_path(vmid);
        if exists(&record_path).await? || exists(&self.netns_path(vmid)).await? {
            return Err(NetworkError::AlreadyAttached(vmid));
        }
        self.ensure_rules().await?;
        let mut record = Record {
            container_id: self.container_id(vmid),
            conflist: self.conflist(),
            ports: ports.to_vec(),
            result: None,
        };
        self.write_record(vmid, &record).await?;
        match self.add(vmid, &mut record).await {
            Ok(attachment) => {
                info!(vmid, address = %attachment.address, "container network attached");
                Ok(attachment)
            }
            Err(e) => {
                if let Err(undo) = self.detach_claimed(vmid).await {
                    warn!(vmid, error = %undo, "undoing a failed attach failed; cleanup will retry");
                }
                Err(e)
            }
        }
    }

    async fn add(&self, vmid: u32, record: &mut Record) -> Result<Attachment, NetworkError> {
        let id = record.container_id.clone();
        let netns = self.netns_path(vmid);
        run("ip", &["netns", "add", &id]).await?;
        self.exec("ADD", &id, &netns, "lo", &self.loopback_conf()).await?;
        let mut prev: Option<Value> = None;
        for plugin in plugins(&record.conflist) {
            let conf = plugin_conf(&record.conflist, plugin, &record.ports, prev.as_ref());
            let out = self.exec("ADD", &id, &netns, IFNAME, &conf).await?;
            prev = Some(out.ok_or_else(|| bad_result(plugin, "ADD", &id, "no result on stdout"))?);
        }
        let result = prev.ok_or_else(|| NetworkError::Config("the plugin list is empty".into()))?;
        let attachment =
            parse_result(&result, &netns).map_err(|reason| bad_result(&Value::Null, "ADD", &id, &reason))?;
        disable_ipv6(&attachment.host_ifname).await?;
        self.add_antispoof(&id, &attachment).await?;
        record.result = Some(result);
        self.write_record(vmid, record).await?;
        Ok(attachment)
    }

    /// Removes everything `attach` made for `vmid`. Ok when there is nothing (left) to remove.
    pub async fn detach(&self, vmid: u32) -> Result<(), NetworkError> {
        let _claim = self.claim(vmid).await;
        self.detach_claimed(vmid).await
    }

    async fn detach_claimed(&self, vmid: u32) -> Result<(), NetworkError> {
        let record_path = self.record_path(vmid);
        let netns = self.netns_path(vmid);
        let record = match read_record(&record_path).await? {
            Some(r) => r,
            // The record is written before anything is made and removed after all is gone: with
            // neither, there is nothing. A netns without one was not made by attach, but is ours
            // by name: DEL it with the config we would have used.
            None if !exists(&netns).await? => return Ok(()),
            None => {
                Record { container_id: self.container_id(vmid), conflist: self.conflist(), ports: vec![], result: None }
            }
        };
        let id = &record.container_id;
        // Every step runs even when one fails, so one stuck piece does not keep the rest around.
        let mut first = None;
        let mut keep = |r: Result<(), NetworkError>| {
            if let Err(e) = r {
                warn!(vmid, error = %e, "detach step failed");
                first.get_or_insert(e);
            }
        };
        keep(self.remove_antispoof(id).await);
        for plugin in plugins(&record.conflist).rev() {
            // DEL gets ADD's final result as prevResult (when ADD got that far), not a chain.
            let conf = plugin_conf(&record.conflist, plugin, &record.ports, record.result.as_ref());
            keep(self.exec("DEL", id, &netns, IFNAME, &conf).await.map(drop));
        }
        keep(self.exec("DEL", id, &netns, "lo", &self.loopback_conf()).await.map(drop));
        if exists(&netns).await? {
            keep(run("ip", &["netns", "delete", id]).await.map(drop));
        }
        if let Some(e) = first {
            return Err(e);
        }
        remove_file(&record_path).await?;
        info!(vmid, "container network detached");
        Ok(())
    }

    /// CNI CHECK of `vmid`'s network: the plugins confirm what they set up is still in place
    /// (all but portmap, see below).
    pub async fn check(&self, vmid: u32) -> Result<(), NetworkError> {
        let record = read_record(&self.record_path(vmid)).await?.ok_or(NetworkError::NotAttached(vmid))?;
        let result = record.result.as_ref().ok_or(NetworkError::NotAttached(vmid))?;
        let netns = self.netns_path(vmid);
        for plugin in plugins(&record.conflist) {
            // portmap up to 1.1.1 (Debian's) fails CHECK of an IPv4-only container looking for
            // ip6tables chains it never made (containernetworking/plugins#819).
            if plugin["type"] == "portmap" {
                continue;
            }
            let conf = plugin_conf(&record.conflist, plugin, &record.ports, Some(result));
            self.exec("CHECK", &record.container_id, &netns, IFNAME, &conf).await?;
        }
        Ok(())
    }

    /// `vmid`'s attachment as recorded, for a control plane that restarted.
    pub async fn attachment(&self, vmid: u32) -> Result<Option<Attachment>, NetworkError> {
        let Some(Record { result: Some(result), container_id, .. }) = read_record(&self.record_path(vmid)).await?
        else {
            return Ok(None);
        };
        let netns = self.netns_path(vmid);
        parse_result(&result, &netns)
            .map(Some)
            .map_err(|reason| bad_result(&Value::Null, "ADD", &container_id, &reason))
    }

    /// Vmids with a netns of ours or a record, but not in `live`: what a crash left behind.
    pub async fn leftovers(&self, live: &BTreeSet<u32>) -> Result<Vec<u32>, NetworkError> {
        let mut found = BTreeSet::new();
        for name in list_dir(Path::new(NETNS_DIR)).await? {
            if let Some(vmid) = name.strip_prefix(&self.config.netns_prefix).and_then(parse_vmid) {
                found.insert(vmid);
            }
        }
        for name in list_dir(&self.config.state_dir.join("attachments")).await? {
            if let Some(vmid) = name.strip_suffix(".json").and_then(parse_vmid) {
                found.insert(vmid);
            }
        }
        Ok(found.difference(live).copied().collect())
    }

    /// Detaches every leftover (see [`Self::leftovers`]); returns those removed. Tries them all,
    /// then reports the first failure.
    pub async fn cleanup(&self, live: &BTreeSet<u32>) -> Result<Vec<u32>, NetworkError> {
        let mut removed = vec![];
        let mut first = None;
        for vmid in self.leftovers(live).await? {
            match self.detach(vmid).await {
                Ok(()) => removed.push(vmid),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Removes this network's own chains and the jumps to them. Refused while a container is
    /// attached: it would lose its isolation.
    pub async fn remove_rules(&self) -> Result<(), NetworkError> {
        let attached = self.leftovers(&BTreeSet::new()).await?;
        if !attached.is_empty() {
            return Err(NetworkError::InUse { name: self.config.name.clone(), vmids: attached });
        }
        let _guard = self.rules.lock().await;
        let own = self.own_chains();
        // Every jump into our chains, as listed (not as `jumps` would write it now), so that
        // jumps an older version wrote go too.
        for (table, builtin) in
            [("raw", "PREROUTING"), ("filter", "INPUT"), ("filter", "FORWARD"), ("filter", "OUTPUT")]
        {
            for line in iptables_out(&["-t", table, "-S", builtin]).await?.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let ours = words.windows(2).any(|w| w[0] == "-j" && own.iter().any(|(_, c)| c == w[1]));
                if ours && words.first() == Some(&"-A") {
                    iptables(&[&["-t", table, "-D"], &words[1..]].concat()).await?;
                }
            }
        }
        for (table, chain) in own {
            if iptables_ok(&["-t", table, "-S", &chain]).await {
                iptables(&["-t", table, "-F", &chain]).await?;
                iptables(&["-t", table, "-X", &chain]).await?;
            }
        }
        Ok(())
    }

    fn own_chains(&self) -> [(&'static str, String); 4] {
        [
            ("raw", self.chain("ANTISPOOF")),
            ("filter", self.chain("ISOLATE-IN")),
            ("filter", self.chain("ISOLATE-FWD")),
            ("filter", self.chain("ISOLATE-OUT")),
        ]
    }

    /// (table, built-in chain, rule) of every jump into our chains.
    fn jumps(&self) -> Vec<(&'static str, &'static str, Vec<String>)> {
        let subnet = self.config.subnet.to_string();
        let rule = |m: &str, chain: String| vec![m.to_string(), subnet.clone(), "-j".into(), chain];
        vec![
            ("raw", "PREROUTING", vec!["-j".into(), self.chain("ANTISPOOF")]),
            // Not from lo: the host's own connections to a gateway address have it as source too.
            (
                "filter",
                "INPUT",
                [&["!", "-i", "lo"].map(String::from)[..], &rule("-s", self.chain("ISOLATE-IN"))].concat(),
            ),
            ("filter", "FORWARD", rule("-s", self.chain("ISOLATE-FWD"))),
            ("filter", "FORWARD", rule("-d", self.chain("ISOLATE-FWD"))),
            ("filter", "OUTPUT", rule("-d", self.chain("ISOLATE-OUT"))),
        ]
    }

    /// Installs our chains (contents replaced in one transaction) and the jumps to them (each
    /// once, first in its chain). Idempotent: the host calls it again at every container start,
    /// since a firewall reload elsewhere on the machine may have flushed them.
    pub async fn ensure_rules(&self) -> Result<(), NetworkError> {
        let _guard = self.rules.lock().await;
        let subnet = self.config.subnet;
        let (input, forward, antispoof) =
            (self.chain("ISOLATE-IN"), self.chain("ISOLATE-FWD"), self.chain("ANTISPOOF"));
        // `--noflush` keeps everyone else's rules; declaring our chains empties just them, so the
        // restore replaces their contents atomically and re-running it never duplicates a rule.
        // The antispoof chain keeps its per-container rules: it is only created when missing.
        let mut restore = String::from("*filter\n");
        restore += &format!(":{input} - [0:0]\n:{forward} - [0:0]\n");
        restore += &format!("-A {input} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
        restore += &format!("-A {input} -j DROP\n");
        restore += &format!("-A {forward} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
        restore += &format!("-A {forward} -m conntrack --ctstate INVALID -j DROP\n");
        restore += &format!("-A {forward} -d {subnet} -m conntrack --ctstate DNAT -j ACCEPT\n");
        restore += &format!("-A {forward} -d {subnet} -j DROP\n");
        restore += &format!("-A {forward} -d 169.254.0.0/16 -j DROP\n");
        restore += &format!("-A {forward} -s {subnet} -j ACCEPT\n");
        restore += &format!("-A {forward} -j DROP\n");
        // The host's own users other than root do not reach the containers' control ports.
        let output = self.chain("ISOLATE-OUT");
        restore += &format!(":{output} - [0:0]\n");
        if !self.config.host_only_ports.is_empty() {
            let ports: Vec<String> = self.config.host_only_ports.iter().map(u16::to_string).collect();
            restore += &format!(
                "-A {output} -p tcp -m multiport --dports {} -m owner ! --uid-owner 0 -j REJECT --reject-with tcp-reset\n",
                ports.join(",")
            );
        }
        restore += "COMMIT\n";
        run_stdin("iptables-restore", &["-w", "--noflush"], &restore).await?;
        if !iptables_ok(&["-t", "raw", "-S", &antispoof]).await {
            iptables(&["-t", "raw", "-N", &antispoof]).await?;
        }
        for (table, chain, rule) in self.jumps() {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            if !iptables_ok(&[&["-t", table, "-C", chain], &rule[..]].concat()).await {
                iptables(&[&["-t", table, "-I", chain, "1"], &rule[..]].concat()).await?;
            }
        }
        Ok(())
    }

    async fn add_antispoof(&self, id: &str, a: &Attachment) -> Result<(), NetworkError> {
        let _guard = self.rules.lock().await;
        iptables(&self.antispoof_rule("-A", id, a).iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    /// The per-container antispoof rule, for `-A` (append) or `-C` (check).
    fn antispoof_rule(&self, op: &str, id: &str, a: &Attachment) -> Vec<String> {
        let source = format!("{}/32", a.address);
        let chain = self.chain("ANTISPOOF");
        [
            "-t",
            "raw",
            op,
            &chain,
            "-i",
            &a.host_ifname,
            "!",
            "-s",
            &source,
            "-m",
            "comment",
            "--comment",
            id,
            "-j",
            "DROP",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Puts `vmid`'s own rule back if something flushed it (a firewall reload elsewhere on the
    /// machine), after the network-wide chains ([`Self::ensure_rules`]). Idempotent; a vmid that
    /// is not attached has nothing to restore.
    pub async fn ensure_container_rules(&self, vmid: u32) -> Result<(), NetworkError> {
        self.ensure_rules().await?;
        let Some(a) = self.attachment(vmid).await? else { return Ok(()) };
        let id = self.container_id(vmid);
        let check = self.antispoof_rule("-C", &id, &a);
        if !iptables_ok(&check.iter().map(String::as_str).collect::<Vec<_>>()).await {
            warn!(vmid, "the container's antispoof rule was gone; putting it back");
            self.add_antispoof(&id, &a).await?;
        }
        Ok(())
    }

    /// Removes the antispoof rules carrying `id` as their comment (found by listing, so this
    /// works after a crash that lost the veth's name).
    async fn remove_antispoof(&self, id: &str) -> Result<(), NetworkError> {
        let _guard = self.rules.lock().await;
        let chain = self.chain("ANTISPOOF");
        if !iptables_ok(&["-t", "raw", "-S", &chain]).await {
            return Ok(());
        }
        let listing = iptables_out(&["-t", "raw", "-S", &chain]).await?;
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().map(|w| w.trim_matches('"')).collect();
            let ours = words.windows(2).any(|w| w == ["--comment", id]);
            if ours && words.first() == Some(&"-A") {
                iptables(&[&["-t", "raw", "-D"], &words[1..]].concat()).await?;
            }
        }
        Ok(())
    }

    fn conflist(&self) -> Value {
        let ipam_dir = self.config.state_dir.join("ipam");
        json!({
            "cniVersion": CNI_VERSION,
            "name": self.config.name,
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": self.config.subnet.to_string() }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": ipam_dir,
                    }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
                {
                    "type": "tuning",
                    "sysctl": {
                        "net.ipv6.conf.all.disable_ipv6": "1",
                        "net.ipv6.conf.default.disable_ipv6": "1",
                    },
                    "dataDir": self.config.state_dir.join("tuning"),
                }
            ]
        })
    }

    fn loopback_conf(&self) -> Value {
        json!({ "cniVersion": CNI_VERSION, "name": format!("{}-lo", self.config.name), "type": "loopback" })
    }

    /// Runs one plugin: `conf` on stdin, the result on stdout (None when empty, as for DEL).
    async fn exec(
        &self,
        command: &'static str,
        container: &str,
        netns: &Path,
        ifname: &str,
        conf: &Value,
    ) -> Result<Option<Value>, NetworkError> {
        let plugin = conf["type"].as_str().unwrap_or_default().to_string();
        let path = self.config.plugin_dir.join(&plugin);
        let spawn_err = |e: io::Error| NetworkError::Io { path: path.clone(), source: e };
        let mut child = Command::new(&path)
            .env_clear()
            // Plugins run iptables and the IPAM plugin by name.
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.config.plugin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = serde_json::to_vec(conf).expect("json values serialize");
        let write = async move {
            let r = stdin.write_all(&input).await;
            drop(stdin);
            r
        };
        let (written, output) = tokio::join!(write, child.wait_with_output());
        let output = output.map_err(spawn_err)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let err: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
            let msg = match err["msg"].as_str() {
                Some(m) => m.to_string(),
                None => format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
            };
            let details =
                err["details"].as_str().filter(|d| !d.is_empty()).map(|d| format!(": {d}")).unwrap_or_default();
            return Err(NetworkError::Plugin {
                plugin,
                command,
                container: container.into(),
                code: err["code"].as_u64().unwrap_or(0),
                msg,
                details,
            });
        }
        written.map_err(spawn_err)?;
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&stdout).map(Some).map_err(|e| NetworkError::BadResult {
            plugin,
            command,
            container: container.into(),
            reason: e.to_string(),
        })
    }

    async fn write_record(&self, vmid: u32, record: &Record) -> Result<(), NetworkError> {
        let path = self.record_path(vmid);
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        let dir = path.parent().expect("has a parent").to_path_buf();
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            crate::atomic::write_file(&p, &bytes)
        })
        .await
        .expect("write task does not panic")
        .map_err(io_err(&path))
    }
}

/// A vmid as we write it (so `zlh-007`, which `netns_path(7)` would not name, is not taken for 7).
fn parse_vmid(s: &str) -> Option<u32> {
    s.parse::<u32>().ok().filter(|v| v.to_string() == s)
}

fn plugins(conflist: &Value) -> impl DoubleEndedIterator<Item = &Value> {
    conflist["plugins"].as_array().map(|a| a.as_slice()).unwrap_or_default().iter()
}

/// One plugin's config as the spec builds it from the list: the list's name and version, the
/// capability args it declares in `runtimeConfig`, and `prevResult`.
fn plugin_conf(conflist: &Value, plugin: &Value, ports: &[PortMapping], prev: Option<&Value>) -> Value {
    let mut conf: Map<String, Value> = plugin.as_object().cloned().unwrap_or_default();
    conf.insert("cniVersion".into(), conflist["cniVersion"].clone());
    conf.insert("name".into(), conflist["name"].clone());
    if plugin["capabilities"]["portMappings"] == json!(true) && !ports.is_empty() {
        let mappings: Vec<Value> = ports
            .iter()
            .map(|p| json!({ "hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol }))
            .collect();
        conf.insert("runtimeConfig".into(), json!({ "portMappings": mappings }));
    }
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    Value::Object(conf)
}

fn bad_result(plugin: &Value, command: &'static str, container: &str, reason: &str) -> NetworkError {
    let plugin = plugin["type"].as_str().unwrap_or("(list)").to_string();
    NetworkError::BadResult { plugin, command, container: container.into(), reason: reason.into() }
}

/// The container's IPv4 address and gateway, and the host-side interface, from a 1.0.0 result.
fn parse_result(result: &Value, netns: &Path) -> Result<Attachment, String> {
    let interfaces = result["interfaces"].as_array().ok_or("no interfaces")?;
    let host_ifname = interfaces
        .iter()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .and_then(|i| i["name"].as_str())
        .ok_or("no host-side interface")?;
    // It names a /proc/sys path below; refuse anything that is not a plain interface name.
    if host_ifname.is_empty() || host_ifname.len() > 15 || host_ifname.contains('/') || host_ifname.starts_with('.') {
        return Err(format!("host interface name {host_ifname:?}"));
    }
    let ip = result["ips"]
        .as_array()
        .ok_or("no ips")?
        .iter()
        .find(|ip| ip["address"].as_str().is_some_and(|a| a.parse::<Ipv4Net>().is_ok()))
        .ok_or("no IPv4 address")?;
    let address = ip["address"].as_str().and_then(|a| a.parse::<Ipv4Net>().ok()).ok_or("bad address")?.addr();
    let gateway = ip["gateway"].as_str().and_then(|g| g.parse().ok()).ok_or("no IPv4 gateway")?;
    Ok(Attachment { netns: netns.to_path_buf(), address, gateway, host_ifname: host_ifname.into() })
}

/// IPv6 off on the host-side veth: the kernel then drops every v6 packet arriving on it.
async fn disable_ipv6(ifname: &str) -> Result<(), NetworkError> {
    let path = Path::new("/proc/sys/net/ipv6/conf").join(ifname).join("disable_ipv6");
    match tokio::fs::write(&path, b"1").await {
        // No IPv6 in this kernel at all: nothing to disable.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !exists(Path::new("/proc/sys/net/ipv6")).await? => Ok(()),
        r => r.map_err(io_err(&path)),
    }
}

async fn read_record(path: &Path) -> Result<Option<Record>, NetworkError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NetworkError::Io { path: path.into(), source: io::Error::new(io::ErrorKind::InvalidData, e) }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

async fn remove_file(path: &Path) -> Result<(), NetworkError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => {
            let p = path.to_path_buf();
            // A removed record must stay removed after a power cut, or cleanup would DEL again (harmless).
            let _ = tokio::task::spawn_blocking(move || crate::atomic::sync_parent(&p)).await;
            Ok(())
        }
    }
}

async fn exists(path: &Path) -> Result<bool, NetworkError> {
    tokio::fs::try_exists(path).await.map_err(io_err(path))
}

async fn list_dir(dir: &Path) -> Result<Vec<String>, NetworkError> {
    let mut names = vec![];
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(io_err(dir)(e)),
    };
    while let Some(entry) = entries.next_entry().await.map_err(io_err(dir))? {
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

async fn run(program: &str, args: &[&str]) -> Result<String, NetworkError> {
    run_stdin(program, args, "").await
}

async fn run_stdin(program: &str, args: &[&str], input: &str) -> Result<String, NetworkError> {
    let described = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NetworkError::Command { command: described(), message: e.to_string() })?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.as_bytes().to_vec();
    let write = async move {
        let r = stdin.write_all(&input).await;
        drop(stdin);
        r
    };
    let (_, output) = tokio::join!(write, child.wait_with_output());
    let output = output.map_err(|e| NetworkError::Command { command: described(), message: e.to_string() })?;
    if !output.status.success() {
        let message = format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
        return Err(NetworkError::Command { command: described(), message });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn iptables(args: &[&str]) -> Result<(), NetworkError> {
    iptables_out(args).await.map(drop)
}

async fn iptables_out(args: &[&str]) -> Result<String, NetworkError> {
    // -w: wait for the xtables lock instead of failing when a plugin holds it.
    run("iptables", &[&["-w"], args].concat()).await
}

/// Whether an iptables query (-C, -S) succeeds: a missing rule or chain is a plain "no".
async fn iptables_ok(args: &[&str]) -> bool {
    iptables_out(args).await.is_ok()
}

#[cfg(test)]
mod tests {
    //! Real namespaces, veths and rules. Each test has a network of its own (name, subnet, netns
    //! prefix, chains), so they run in parallel without seeing one another.

    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Why these tests cannot run here, if they cannot.
    fn skip_reason() -> Option<String> {
        if !rustix::process::geteuid().is_root() {
            return Some("not root".into());
        }
        let dir = NetworkConfig::new("unused").plugin_dir;
        if let Some(p) = PLUGINS.iter().find(|p| !dir.join(p).is_file()) {
            return Some(format!("CNI plugin {p} missing from {}", dir.display()));
        }
        for (tool, arg) in [("ip", "-V"), ("iptables", "-V"), ("iptables-save", "-V"), ("python3", "-V")] {
            if std::process::Command::new(tool).arg(arg).output().map(|o| !o.status.success()).unwrap_or(true) {
                return Some(format!("{tool} missing"));
            }
        }
        None
    }

    macro_rules! require_root_and_plugins {
        () => {
            if let Some(why) = skip_reason() {
                eprintln!("skipped: {why}");
                return;
            }
        };
    }

    /// Network `zlht<tag>` on 10.89.<octet>.0/<len>, namespaces `zlht<tag>-<vmid>`.
    fn config(tag: u8, len: u8, state: &Path) -> NetworkConfig {
        NetworkConfig {
            name: format!("zlht{tag}"),
            plugin_dir: PathBuf::from("/usr/lib/cni"),
            state_dir: state.to_path_buf(),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 89, 200 + tag, 0), len).unwrap(),
            netns_prefix: format!("zlht{tag}-"),
            host_only_ports: Vec::new(),
        }
    }

    /// A network with whatever an earlier, aborted run of the same test left removed.
    async fn fresh(tag: u8, len: u8, state: &Path) -> CniNetwork {
        let net = CniNetwork::new(config(tag, len, state)).unwrap();
        net.cleanup(&BTreeSet::new()).await.unwrap();
        net.remove_rules().await.unwrap();
        net
    }

    async fn sh(program: &str, args: &[&str]) -> String {
        run(program, args).await.unwrap_or_else(|e| panic!("{e}"))
    }

    const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall((peer[0] if sys.argv[3] == "peer" else sys.argv[3]).encode() + b"\n")
    c.close()
"#;

    /// A TCP server in `netns` answering every connection with `banner` (or, for "peer", the
    /// client's address); returns once it listens.
    async fn listen_in(netns: &str, port: u16, banner: &str) -> tokio::process::Child {
        let port = port.to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-c", SERVER, "0.0.0.0", &port, banner])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        assert!(matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"), "listener in {netns}: {ready:?}");
        child
    }

    const PROBE: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)
    print("connected " + s.recv(64).decode().strip())
except socket.timeout:
    print("timeout")
except OSError as e:
    print("error " + str(e))
"#;

    /// Connects from inside `netns`: "connected <banner>", "timeout" (dropped) or "error ...".
    async fn probe_from(netns: &str, addr: impl ToString, port: u16) -> String {
        let out =
            sh("ip", &["netns", "exec", netns, "python3", "-c", PROBE, &addr.to_string(), &port.to_string()]).await;
        out.trim().to_string()
    }

    /// Connects from the host and reads the banner.
    async fn host_connect(addr: SocketAddr) -> Result<String, String> {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await?;
            let mut banner = String::new();
            s.read_to_string(&mut banner).await?;
            Ok::<_, io::Error>(banner.trim().to_string())
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timeout".into()),
        }
    }

    /// A host TCP server answering `banner`.
    async fn host_listener(bind: Ipv4Addr, banner: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind((bind, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(format!("{banner}\n").as_bytes()).await;
            }
        });
        (port, task)
    }

    /// A global IPv4 address of the host outside the test subnets, if it has one.
    async fn host_ipv4() -> Option<Ipv4Addr> {
        let out = sh("ip", &["-4", "-o", "addr", "show", "scope", "global"]).await;
        let tests: Ipv4Net = "10.89.0.0/16".parse().unwrap();
        out.lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .filter_map(|a| a.parse::<Ipv4Net>().ok())
            .map(|n| n.addr())
            .find(|a| !tests.contains(a))
    }

    /// Packets counted by the rules of `chain` whose listing contains `needle`.
    async fn dropped(chain: &str, needle: &str) -> u64 {
        let out = sh("iptables", &["-w", "-L", chain, "-n", "-v", "-x"]).await;
        out.lines()
            .filter(|l| l.contains("DROP") && l.contains(needle))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    async fn sysctl_in(netns: &str, path: &str) -> String {
        sh("ip", &["netns", "exec", netns, "cat", path]).await.trim().to_string()
    }

    /// A netns standing for a machine outside, on a veth pair of its own: `<net>.2` in it,
    /// `<net>.1` on the host. Test scaffolding, not a container: the plugins make those.
    struct Outside(&'static str);

    impl Outside {
        async fn new(name: &'static str, net: &str) -> Outside {
            let _ = run("ip", &["netns", "delete", name]).await;
            let (host_if, peer_if) = (format!("{name}h"), format!("{name}p"));
            let _ = run("ip", &["link", "delete", &host_if]).await;
            let (host_ip, peer_ip, gw) = (format!("{net}.1/30"), format!("{net}.2/30"), format!("{net}.1"));
            let in_ns = |args: &[&str]| {
                [&["netns", "exec", name], args].concat().iter().map(|a| a.to_string()).collect::<Vec<_>>()
            };
            for args in [
                vec!["netns".to_string(), "add".into(), name.into()],
                ["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", name]
                    .map(String::from)
                    .to_vec(),
                ["addr", "add", &host_ip, "dev", &host_if].map(String::from).to_vec(),
                ["link", "set", &host_if, "up"].map(String::from).to_vec(),
                in_ns(&["ip", "addr", "add", &peer_ip, "dev", &peer_if]),
                in_ns(&["ip", "link", "set", &peer_if, "up"]),
                in_ns(&["ip", "route", "add", "default", "via", &gw]),
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                sh("ip", &args).await;
            }
            Outside(name)
        }
    }

    impl Drop for Outside {
        fn drop(&mut self) {
            // Deleting the netns deletes the veth pair with it.
            let _ = std::process::Command::new("ip").args(["netns", "delete", self.0]).status();
        }
    }

    fn tcp(host_port: u16, container_port: u16) -> PortMapping {
        PortMapping { host_port, container_port, protocol: Protocol::Tcp }
    }

    #[tokio::test]
    async fn containers_reach_only_the_world_and_the_host_reaches_them() {
        require_root_and_plugins!();
        let state = tempfile::tempdir().unwrap();
        let net = fresh(1, 24, state.path()).await;
        let a = net.attach(101, &[tcp(38101, 8080)]).await.unwrap();
        let b = net.attach(102, &[]).await.unwrap();
        assert_eq!(a.gateway, Ipv4Addr::new(10, 89, 201, 1));
        assert!(net.config.subnet.contains(&a.address) && net.config.subnet.contains(&b.address));
        assert_ne!(a.address, b.address);
        assert_eq!(a.netns, net.netns_path(101));
        assert_eq!(net.attachment(101).await.unwrap(), Some(a.clone()));
        net.check(101).await.unwrap();

        let _in_a = listen_in("zlht1-101", 8080, "A").await;
        let _in_b = listen_in("zlht1-102", 8080, "B").await;
        // The host's side reaches each container's address (as the API reaches an agent).
        assert_eq!(host_connect((a.address, 8080).into()).await, Ok("A".into()));
        assert_eq!(host_connect((b.address, 8080).into()).await, Ok("B".into()));
        // `lo` is up inside: the container's own 127.0.0.1 works.
        assert_eq!(probe_from("zlht1-101", "127.0.0.1", 8080).await, "connected A");

        // Not each other: B listens and the host reaches it, but A's packets are dropped.
        let before = dropped("ZLHT1-ISOLATE-FWD", "10.89.201.0/24").await;
        assert_eq!(probe_from("zlht1-101", b.address, 8080).await, "timeout");
        assert!(dropped("ZLHT1-ISOLATE-FWD", "10.89.201.0/24").await > before);

        // Not the host: a listener on 0.0.0.0 answers the host itself at the gateway address
        // (and at its other address) but not the container.
        let (port, _host) = host_listener(Ipv4Addr::UNSPECIFIED, "host").await;
        assert_eq!(host_connect((a.gateway, port).into()).await, Ok("host".into()));
        assert_eq!(probe_from("zlht1-101", a.gateway, port).await, "timeout");
        let host_ip = host_ipv4().await;
        if let Some(ip) = host_ip {
            assert_eq!(host_connect((ip, port).into()).await, Ok("host".into()));
            assert_eq!(probe_from("zlht1-101", ip, port).await, "timeout");
        } else {
            eprintln!("no global host address: its check skipped");
        }
        // Not the metadata service or anything else link-local.
        let before = dropped("ZLHT1-ISOLATE-FWD", "169.254.0.0/16").await;
        assert_eq!(probe_from("zlht1-101", "169.254.169.254", 80).await, "timeout");
        assert!(dropped("ZLHT1-ISOLATE-FWD", "169.254.0.0/16").await > before);

        // No IPv6 on either end of the veth.
        assert_eq!(sysctl_in("zlht1-101", "/proc/sys/net/ipv6/conf/all/disable_ipv6").await, "1");
        assert_eq!(sysctl_in("zlht1-101", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").await, "1");
        let host_v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", a.host_ifname);
        assert_eq!(tokio::fs::read_to_string(&host_v6).await.unwrap().trim(), "1");

        // The published port, through portmap's DNAT, from the host's own addresses.
        if let Some(ip) = host_ip {
            assert_eq!(host_connect((ip, 38101).into()).await, Ok("A".into()));
        }
        assert_eq!(host_connect((a.gateway, 38101).into()).await, Ok("A".into()));

        // From 127.0.0.1 too: portmap masquerades it and turns route_localnet on for the veth.
        assert_eq!(host_connect((Ipv4Addr::LOCALHOST, 38101).into()).await, Ok("A".into()));

        // Not the host's 127.0.0.1 either, even for a container root that routes it out of eth0:
        // the host veth has route_localnet on (portmap's doing, above), so the host would take
        // the packet; it reaches INPUT and our chain drops it.
        let (lport, _local) = host_listener(Ipv4Addr::LOCALHOST, "local").await;
        let gw = a.gateway.to_string();
        for args in [
            vec!["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
            vec!["sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"],
            vec!["ip", "route", "del", "local", "127.0.0.1", "dev", "lo", "table", "local"],
            vec!["ip", "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local"],
            vec!["ip", "route", "add", "127.0.0.1/32", "via", &gw, "dev", "eth0"],
        ] {
            sh("ip", &[&["netns", "exec", "zlht1-101"], &args[..]].concat()).await;
        }
        let before = dropped("ZLHT1-ISOLATE-IN", "0.0.0.0/0").await;
        assert_eq!(probe_from("zlht1-101", "127.0.0.1", lport).await, "timeout");
        assert!(dropped("ZLHT1-ISOLATE-IN", "0.0.0.0/0").await > before);

        // From outside: a client netns behind a veth of the test's own (the world, to the host).
        let outside = Outside::new("zlht1out", "10.89.250").await;
        sh("ip", &["netns", "exec", "zlht1out", "ip", "route", "add", "10.89.201.0/24", "via", "10.89.250.1"]).await;
        // The published port works from there (through FORWARD, as DNAT)...
        assert_eq!(probe_from("zlht1out", "10.89.250.1", 38101).await, "connected A");
        // ...but nothing else on the container does, even routed straight to its address.
        let before = dropped("ZLHT1-ISOLATE-FWD", "10.89.201.0/24").await;
        assert_eq!(probe_from("zlht1out", b.address, 8080).await, "timeout");
        assert!(dropped("ZLHT1-ISOLATE-FWD", "10.89.201.0/24").await > before);
        // And the container reaches the world, masqueraded behind the host's address.
        let _world = listen_in("zlht1out", 8081, "peer").await;
        assert_eq!(probe_from("zlht1-102", "10.89.250.2", 8081).await, "connected 10.89.250.1");
        drop(outside);

        net.detach(101).await.unwrap();
        net.detach(102).await.unwrap();
        net.remove_rules().await.unwrap();
    }

    /// The lines of `iptables-save` (every table) that belong to one container: the plugins'
    /// comments (`id: \"<id>\"`), ours (`<id>`), its address, its published port.
    async fn rules_of(id: &str, address: Ipv4Addr, host_port: u16) -> Vec<String> {
        let save = sh("iptables-save", &[]).await;
        let (ip, port) = (format!("{address}/32"), format!("--dports {host_port}"));
        save.lines()
            .filter(|l| {
                l.contains(&format!("\"{id}\\\""))
                    || l.contains(&format!(" {id} "))
                    || l.contains(&ip)
                    || l.contains(&port)
            })
            .map(String::from)
            .collect()
    }

    /// host-local's lease files (one per address handed out).
    fn leases(state: &Path, name: &str) -> usize {
        let dir = state.join("ipam").join(name);
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok()).count()
            })
            .unwrap_or(0)
    }

    async fn netns_listed(name: &str) -> bool {
        sh("ip", &["netns", "list"]).await.lines().any(|l| l.split_whitespace().next() == Some(name))
    }

    async fn link_exists(ifname: &str) -> bool {
        run("ip", &["link", "show", "dev", ifname]).await.is_ok()
    }

    #[tokio::test]
    async fn detach_removes_everything_and_is_idempotent() {
        require_root_and_plugins!();
        let state = tempfile::tempdir().unwrap();
        let net = fresh(2, 24, state.path()).await;
        let save_before = sh("iptables-save", &[]).await;
        assert!(!save_before.contains("ZLHT2-"));

        let a = net
            .attach(
                201,
                &[tcp(38201, 8080), PortMapping { host_port: 38202, container_port: 9090, protocol: Protocol::Udp }],
            )
            .await
            .unwrap();
        assert!(netns_listed("zlht2-201").await);
        assert!(link_exists(&a.host_ifname).await);
        assert_eq!(leases(state.path(), "zlht2"), 1);
        // Its antispoof rule, ptp's masquerading, portmap's DNAT.
        let rules = rules_of("zlht2-201", a.address, 38201).await;
        assert!(rules.iter().any(|l| l.contains("ZLHT2-ANTISPOOF") && l.contains(&a.host_ifname)), "{rules:#?}");
        assert!(rules.iter().any(|l| l.contains("MASQUERADE")), "{rules:#?}");
        assert!(rules.iter().any(|l| l.contains("DNAT")), "{rules:#?}");
        assert!(matches!(net.attach(201, &[]).await, Err(NetworkError::AlreadyAttached(201))));
        net.check(201).await.unwrap();

        net.detach(201).await.unwrap();
        assert!(!netns_listed("zlht2-201").await);
        assert!(!net.netns_path(201).exists());
        assert!(!link_exists(&a.host_ifname).await);
        assert_eq!(leases(state.path(), "zlht2"), 0);
        assert_eq!(rules_of("zlht2-201", a.address, 38201).await, Vec::<String>::new());
        assert!(!net.record_path(201).exists());
        assert!(matches!(net.check(201).await, Err(NetworkError::NotAttached(201))));
        assert_eq!(net.attachment(201).await.unwrap(), None);

        // Twice, and one that never was: both fine.
        net.detach(201).await.unwrap();
        net.detach(299).await.unwrap();

        // The network's own chains and jumps go with remove_rules, leaving iptables as it was.
        net.remove_rules().await.unwrap();
        net.remove_rules().await.unwrap();
        let save_after = sh("iptables-save", &[]).await;
        assert!(!save_after.contains("ZLHT2-"), "{save_after}");
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_found_and_removed() {
        require_root_and_plugins!();
        let state = tempfile::tempdir().unwrap();
        let net = fresh(3, 24, state.path()).await;
        let gone = net.attach(301, &[tcp(38301, 8080)]).await.unwrap();
        let kept = net.attach(302, &[]).await.unwrap();
        // A netns of ours the control plane made but never recorded (killed in between).
        sh("ip", &["netns", "add", "zlht3-303"]).await;
        // Not ours: another prefix, and a name that is not a vmid.
        sh("ip", &["netns", "add", "zlht3-x"]).await;
        drop(net);

        let net = CniNetwork::new(config(3, 24, state.path())).unwrap();
        let live = BTreeSet::from([302]);
        assert_eq!(net.leftovers(&live).await.unwrap(), vec![301, 303]);
        assert_eq!(net.cleanup(&live).await.unwrap(), vec![301, 303]);
        assert_eq!(net.leftovers(&live).await.unwrap(), Vec::<u32>::new());
        assert!(!netns_listed("zlht3-301").await && !netns_listed("zlht3-303").await);
        assert!(!link_exists(&gone.host_ifname).await);
        assert_eq!(rules_of("zlht3-301", gone.address, 38301).await, Vec::<String>::new());
        assert_eq!(leases(state.path(), "zlht3"), 1);
        // The live one is untouched and still works.
        assert!(netns_listed("zlht3-302").await && link_exists(&kept.host_ifname).await);
        net.check(302).await.unwrap();
        assert!(matches!(net.remove_rules().await, Err(NetworkError::InUse { vmids, .. }) if vmids == [302]));

        net.detach(302).await.unwrap();
        sh("ip", &["netns", "delete", "zlht3-x"]).await;
        assert_eq!(leases(state.path(), "zlht3"), 0);
        net.remove_rules().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_attach_names_the_plugin_and_leaves_nothing() {
        require_root_and_plugins!();
        let state = tempfile::tempdir().unwrap();
        // A /30: the gateway and one container.
        let net = fresh(4, 30, state.path()).await;
        let first = net.attach(401, &[]).await.unwrap();
        let err = net.attach(402, &[tcp(38401, 80)]).await.unwrap_err();
        match &err {
            NetworkError::Plugin { plugin, command, container, msg, .. } => {
                assert_eq!((plugin.as_str(), *command, container.as_str()), ("ptp", "ADD", "zlht4-402"));
                assert!(msg.contains("no IP addresses available"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("CNI plugin `ptp` ADD for zlht4-402"), "{err}");
        assert!(!netns_listed("zlht4-402").await);
        assert!(!net.record_path(402).exists());
        assert_eq!(net.leftovers(&BTreeSet::from([401])).await.unwrap(), Vec::<u32>::new());
        assert!(!sh("iptables-save", &[]).await.contains("38401"));

        // Published twice: refused before anything is made.
        assert!(matches!(net.attach(403, &[tcp(38402, 80), tcp(38402, 81)]).await, Err(NetworkError::Config(_))));
        assert!(!netns_listed("zlht4-403").await);

        net.detach(401).await.unwrap();
        assert!(!link_exists(&first.host_ifname).await);
        net.remove_rules().await.unwrap();
    }

    /// A plugin dir where every plugin exists (and does nothing).
    fn fake_plugins() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for p in PLUGINS {
            std::fs::write(dir.path().join(p), "").unwrap();
        }
        dir
    }

    #[test]
    fn new_names_the_missing_plugin() {
        let plugins = tempfile::tempdir().unwrap();
        let config = |dir: &Path| NetworkConfig { plugin_dir: dir.to_path_buf(), ..NetworkConfig::new("unused") };
        for present in ["loopback", "ptp", "host-local"] {
            std::fs::write(plugins.path().join(present), "").unwrap();
        }
        match CniNetwork::new(config(plugins.path())) {
            Err(NetworkError::MissingPlugin { plugin, path }) => {
                assert_eq!(plugin, "portmap");
                assert_eq!(path, plugins.path().join("portmap"));
            }
            other => panic!("{:?}", other.err()),
        }
        let bad_name = NetworkConfig { name: "Bad name".into(), ..config(plugins.path()) };
        assert!(matches!(CniNetwork::new(bad_name), Err(NetworkError::Config(_))));
        let bad_prefix = NetworkConfig { netns_prefix: "a/b".into(), ..config(plugins.path()) };
        assert!(matches!(CniNetwork::new(bad_prefix), Err(NetworkError::Config(_))));
    }

    #[tokio::test]
    async fn a_plugin_is_run_as_the_spec_says_and_its_error_is_reported() {
        let dir = fake_plugins();
        // A plugin that records its environment and stdin, then fails as the spec says plugins fail.
        let log = dir.path().join("log");
        let script = format!(
            "#!/bin/sh\nenv | grep ^CNI_ | sort > {log}.env\ncat > {log}.stdin\n\
             echo '{{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"try again later\",\"details\":\"busy\"}}'\nexit 1\n",
            log = log.display()
        );
        let fake = dir.path().join("ptp");
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let net =
            CniNetwork::new(NetworkConfig { plugin_dir: dir.path().into(), ..NetworkConfig::new(dir.path()) }).unwrap();

        let list = net.conflist();
        let prev = json!({ "cniVersion": "1.0.0", "ips": [] });
        let conf = plugin_conf(&list, &list["plugins"][0], &[], Some(&prev));
        let err = net.exec("ADD", "zlh-7", &net.netns_path(7), IFNAME, &conf).await.unwrap_err();
        assert_eq!(err.to_string(), "CNI plugin `ptp` ADD for zlh-7: try again later (code 11): busy");

        let env = std::fs::read_to_string(format!("{}.env", log.display())).unwrap();
        let expected = format!(
            "CNI_COMMAND=ADD\nCNI_CONTAINERID=zlh-7\nCNI_IFNAME=eth0\nCNI_NETNS=/run/netns/zlh-7\nCNI_PATH={}\n",
            dir.path().display()
        );
        assert_eq!(env, expected);
        let stdin: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{}.stdin", log.display())).unwrap()).unwrap();
        assert_eq!(
            (stdin["cniVersion"].as_str(), stdin["name"].as_str(), stdin["type"].as_str()),
            (Some("1.0.0"), Some("zlh"), Some("ptp"))
        );
        assert_eq!(stdin["prevResult"], prev);
        assert_eq!(stdin["ipam"]["dataDir"], json!(dir.path().join("ipam")));
        assert!(stdin.get("runtimeConfig").is_none());
    }

    #[test]
    fn port_mappings_go_to_the_plugins_that_ask_for_them() {
        let net =
            CniNetwork::new(NetworkConfig { plugin_dir: fake_plugins().path().into(), ..NetworkConfig::new("state") })
                .unwrap();
        let list = net.conflist();
        let ports =
            [tcp(25565, 25565), PortMapping { host_port: 19132, container_port: 19132, protocol: Protocol::Udp }];
        let portmap = plugin_conf(&list, &list["plugins"][1], &ports, None);
        assert_eq!(portmap["type"], "portmap");
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"],
            json!([
                { "hostPort": 25565, "containerPort": 25565, "protocol": "tcp" },
                { "hostPort": 19132, "containerPort": 19132, "protocol": "udp" },
            ])
        );
        assert!(portmap.get("prevResult").is_none());
        let ptp = plugin_conf(&list, &list["plugins"][0], &ports, None);
        assert!(ptp.get("runtimeConfig").is_none());
    }
}
