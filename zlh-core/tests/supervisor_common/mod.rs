//! What the supervisor tests share: a spec with a small environment, a supervisor with its own
//! name (hence its own memory cgroup), and waiting for a state.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::broadcast;
use zlh_core::supervisor::process::{ProcessOptions, ProcessSupervisor, StateEvent};
use zlh_core::supervisor::{ProcessSpec, ProcessState, StopStrategy};

pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub fn spec(script: &str) -> ProcessSpec {
    ProcessSpec {
        env: BTreeMap::from([("PATH".into(), PATH.into()), ("HOME".into(), "/tmp".into())]),
        cwd: std::env::temp_dir(),
        stop: StopStrategy {
            stdin_command: None,
            command_timeout: Duration::from_secs(5),
            term_timeout: Duration::from_secs(5),
        },
        ..ProcessSpec::shell(script)
    }
}

/// Each supervisor gets its own name, hence its own memory cgroup: tests run concurrently and
/// must not see each other's OOM kills.
pub fn supervisor(spec: ProcessSpec) -> ProcessSupervisor {
    supervisor_with(spec, ProcessOptions::default())
}

/// [`supervisor`] with other options (its name is still its own).
pub fn supervisor_with(spec: ProcessSpec, options: ProcessOptions) -> ProcessSupervisor {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("test-{}-{n}", std::process::id());
    ProcessSupervisor::new(spec, ProcessOptions { name, ..options }).unwrap()
}

/// The next event in `state` (no timeout: paused-time tests must not race a timer).
pub async fn until(events: &mut broadcast::Receiver<StateEvent>, state: ProcessState) -> StateEvent {
    loop {
        let e = events.recv().await.expect("state events");
        if e.state == state {
            return e;
        }
    }
}
