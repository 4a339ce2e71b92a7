//! An in-memory container host with real behaviour (conflicts, not-found, idempotent stop and
//! destroy), for the simulator and for tests of the control plane: it records every call, can be
//! told to fail a step, and points every agent at a configurable URL (or one per vmid).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{AgentEndpoint, Container, ContainerError, ContainerHost, ContainerSpec, ContainerState};

/// The operations, for recorded calls and injected failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MockStep {
    Create,
    Start,
    Stop,
    Destroy,
    Status,
    Endpoint,
}

struct Failure {
    message: String,
    /// `None`: every call fails until cleared.
    remaining: Option<usize>,
}

struct Inner {
    containers: BTreeMap<u32, (ContainerSpec, bool)>,
    calls: Vec<(MockStep, u32)>,
    failures: HashMap<MockStep, Failure>,
    default_url: url::Url,
    endpoints: HashMap<u32, AgentEndpoint>,
}

pub struct MockHost {
    inner: Mutex<Inner>,
}

impl Default for MockHost {
    fn default() -> Self {
        Self::new("http://127.0.0.1:18888/".parse().expect("a valid URL"))
    }
}

impl MockHost {
    /// Every container's agent is at `agent_url` unless [`Self::set_endpoint`] says otherwise.
    pub fn new(agent_url: url::Url) -> Self {
        Self {
            inner: Mutex::new(Inner {
                containers: BTreeMap::new(),
                calls: Vec::new(),
                failures: HashMap::new(),
                default_url: agent_url,
                endpoints: HashMap::new(),
            }),
        }
    }

    pub fn set_endpoint(&self, vmid: u32, endpoint: AgentEndpoint) {
        self.inner.lock().unwrap().endpoints.insert(vmid, endpoint);
    }

    /// Every `step` fails with `message` (a backend error) until [`Self::clear_failures`].
    pub fn fail(&self, step: MockStep, message: impl Into<String>) {
        let failure = Failure { message: message.into(), remaining: None };
        self.inner.lock().unwrap().failures.insert(step, failure);
    }

    /// The next `step` fails with `message`; later ones succeed.
    pub fn fail_once(&self, step: MockStep, message: impl Into<String>) {
        let failure = Failure { message: message.into(), remaining: Some(1) };
        self.inner.lock().unwrap().failures.insert(step, failure);
    }

    pub fn clear_failures(&self) {
        self.inner.lock().unwrap().failures.clear();
    }

    /// Every call so far, in order, failed ones included.
    pub fn calls(&self) -> Vec<(MockStep, u32)> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The spec a container was created with.
    pub fn spec(&self, vmid: u32) -> Option<ContainerSpec> {
        self.inner.lock().unwrap().containers.get(&vmid).map(|(s, _)| s.clone())
    }

    pub fn vmids(&self) -> Vec<u32> {
        self.inner.lock().unwrap().containers.keys().copied().collect()
    }

    /// Records the call and applies an injected failure; then runs `op` on the state.
    fn step<T>(
        &self,
        step: MockStep,
        vmid: u32,
        op: impl FnOnce(&mut Inner) -> Result<T, ContainerError>,
    ) -> Result<T, ContainerError> {
        let mut inner = self.inner.lock().unwrap();
        inner.calls.push((step, vmid));
        if let Some(f) = inner.failures.get_mut(&step) {
            let message = f.message.clone();
            if let Some(n) = &mut f.remaining {
                *n -= 1;
                if *n == 0 {
                    inner.failures.remove(&step);
                }
            }
            return Err(ContainerError::backend(message));
        }
        op(&mut inner)
    }
}

impl Inner {
    fn endpoint(&self, vmid: u32) -> AgentEndpoint {
        self.endpoints
            .get(&vmid)
            .cloned()
            .unwrap_or_else(|| AgentEndpoint { agent_url: self.default_url.clone(), code_server: None })
    }
}

#[async_trait]
impl ContainerHost for MockHost {
    async fn create(&self, spec: &ContainerSpec) -> Result<Container, ContainerError> {
        spec.validate()?;
        self.step(MockStep::Create, spec.vmid, |inner| {
            if inner.containers.contains_key(&spec.vmid) {
                return Err(ContainerError::Conflict(format!("container {} already exists", spec.vmid)));
            }
            inner.containers.insert(spec.vmid, (spec.clone(), false));
            Ok(Container { vmid: spec.vmid, endpoint: inner.endpoint(spec.vmid) })
        })
    }

    async fn start(&self, vmid: u32) -> Result<(), ContainerError> {
        self.step(MockStep::Start, vmid, |inner| match inner.containers.get_mut(&vmid) {
            Some((_, running)) => {
                *running = true;
                Ok(())
            }
            None => Err(ContainerError::NotFound(vmid)),
        })
    }

    async fn stop(&self, vmid: u32) -> Result<(), ContainerError> {
        self.step(MockStep::Stop, vmid, |inner| match inner.containers.get_mut(&vmid) {
            Some((_, running)) => {
                *running = false;
                Ok(())
            }
            None => Err(ContainerError::NotFound(vmid)),
        })
    }

    async fn destroy(&self, vmid: u32) -> Result<(), ContainerError> {
        self.step(MockStep::Destroy, vmid, |inner| {
            inner.containers.remove(&vmid);
            Ok(())
        })
    }

    async fn status(&self, vmid: u32) -> Result<ContainerState, ContainerError> {
        self.step(MockStep::Status, vmid, |inner| {
            Ok(match inner.containers.get(&vmid) {
                None => ContainerState::Missing,
                Some((_, true)) => ContainerState::Running,
                Some((_, false)) => ContainerState::Stopped,
            })
        })
    }

    async fn agent_endpoint(&self, vmid: u32) -> Result<AgentEndpoint, ContainerError> {
        self.step(MockStep::Endpoint, vmid, |inner| {
            if !inner.containers.contains_key(&vmid) {
                return Err(ContainerError::NotFound(vmid));
            }
            Ok(inner.endpoint(vmid))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::ContainerKind;

    fn spec(vmid: u32) -> ContainerSpec {
        ContainerSpec {
            vmid,
            kind: ContainerKind::Game,
            hostname: format!("game-{vmid}"),
            memory_mb: 512,
            disk_gb: 4,
            cores: 1,
            agent_token: "t".repeat(40),
            ports: vec![25565],
        }
    }

    #[tokio::test]
    async fn lifecycle_conflicts_and_idempotent_destroy() {
        let host = MockHost::default();
        assert_eq!(host.status(5001).await.unwrap(), ContainerState::Missing);
        let c = host.create(&spec(5001)).await.unwrap();
        assert_eq!(c.endpoint.agent_url.as_str(), "http://127.0.0.1:18888/");
        assert!(matches!(host.create(&spec(5001)).await, Err(ContainerError::Conflict(_))));
        assert_eq!(host.status(5001).await.unwrap(), ContainerState::Stopped);
        host.start(5001).await.unwrap();
        assert_eq!(host.status(5001).await.unwrap(), ContainerState::Running);
        host.stop(5001).await.unwrap();
        host.destroy(5001).await.unwrap();
        host.destroy(5001).await.unwrap();
        assert!(matches!(host.start(5001).await, Err(ContainerError::NotFound(5001))));
        assert_eq!(host.calls().iter().filter(|(s, _)| *s == MockStep::Destroy).count(), 2);
    }

    #[tokio::test]
    async fn injected_failures_and_per_vmid_endpoints() {
        let host = MockHost::default();
        host.fail_once(MockStep::Create, "clone failed: no space");
        let err = host.create(&spec(5002)).await.unwrap_err();
        assert!(err.to_string().contains("no space"), "{err}");
        assert_eq!(host.vmids(), Vec::<u32>::new(), "a failed create leaves nothing");
        host.create(&spec(5002)).await.unwrap();
        host.fail(MockStep::Start, "boom");
        assert!(host.start(5002).await.is_err());
        assert!(host.start(5002).await.is_err());
        host.clear_failures();
        host.start(5002).await.unwrap();
        let ep = AgentEndpoint { agent_url: "http://127.0.0.1:9/".parse().unwrap(), code_server: None };
        host.set_endpoint(5002, ep.clone());
        assert_eq!(host.agent_endpoint(5002).await.unwrap(), ep);
        assert_eq!(host.spec(5002).unwrap().ports, vec![25565]);
    }
}
