//! Reattachment: a process started under a shim outlives its supervisor (as it outlives an agent
//! restart) and a new supervisor on the same state dir adopts it: same pid, output continues,
//! stdin reaches it, its real exit code is recorded, and no second copy is started.
//!
//! The shim is this test binary re-executed on the ignored test `shim_entry` (the agent binary
//! does the same with its hidden `shim` subcommand).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::broadcast;
use zlh_core::supervisor::detect::find_processes;
use zlh_core::supervisor::output::OutputReceiver;
use zlh_core::supervisor::process::{ProcessOptions, ProcessSupervisor, StateEvent};
use zlh_core::supervisor::shim::{self, ShimCommand, ShimConfig};
use zlh_core::supervisor::{CrashClass, ProcessSpec, ProcessState, RestartPolicy, Supervisor};

const RUN_SHIM: &str = "ZLH_TEST_RUN_SHIM";

/// The shim, when this binary is re-executed as one.
#[test]
#[ignore = "entry point of the re-executed shim"]
fn shim_entry() {
    if std::env::var_os(RUN_SHIM).is_none() {
        return;
    }
    let dir = std::env::var_os(shim::STATE_DIR_ENV).expect("state dir");
    shim::run_shim(Path::new(&dir));
}

fn shim_config(state_dir: PathBuf) -> ShimConfig {
    ShimConfig {
        command: ShimCommand {
            program: std::env::current_exe().unwrap(),
            args: ["--exact", "shim_entry", "--ignored", "--nocapture"].map(String::from).to_vec(),
            env: BTreeMap::from([(RUN_SHIM.to_string(), "1".to_string())]),
        },
        state_dir,
    }
}

fn supervisor(script: &str, state_dir: &Path) -> ProcessSupervisor {
    let spec = ProcessSpec {
        env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
        cwd: std::env::temp_dir(),
        restart: RestartPolicy::Never,
        ..ProcessSpec::shell(script)
    };
    let options = ProcessOptions { shim: Some(shim_config(state_dir.to_path_buf())), ..ProcessOptions::default() };
    ProcessSupervisor::new(spec, options).unwrap()
}

async fn until(events: &mut broadcast::Receiver<StateEvent>, state: ProcessState) -> StateEvent {
    loop {
        let e = events.recv().await.unwrap();
        if e.state == state {
            return e;
        }
    }
}

async fn line(output: &mut OutputReceiver, want: &str) {
    tokio::time::timeout(Duration::from_secs(20), async { while output.next_line().await.unwrap().line != want {} })
        .await
        .unwrap_or_else(|_| panic!("no output line {want:?}"));
}

fn copies(marker: &str) -> Vec<u32> {
    find_processes(|args| args.iter().any(|a| a.contains(marker))).into_iter().map(|(pid, _)| pid).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_supervisor_adopts_the_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let marker = format!("zlh-reattach-{}", std::process::id());
    let script = format!(
        "# {marker}\necho started; while read l; do if [ \"$l\" = quit ]; then echo bye; exit 7; fi; echo \"echo: $l\"; done"
    );

    let first = supervisor(&script, &state);
    let mut events = first.subscribe_states();
    let (_, mut output) = first.subscribe_output();
    first.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), until(&mut events, ProcessState::Running)).await.unwrap();
    let pid = first.status().await.pid.unwrap();
    first.send_line("one").await.unwrap();
    line(&mut output, "echo: one").await;
    assert_eq!(copies(&marker), vec![pid]);

    // The agent goes away; the process does not.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(copies(&marker), vec![pid], "still running after its supervisor is gone");

    let second = supervisor(&script, &state);
    let mut events = second.subscribe_states();
    let (_, mut output) = second.subscribe_output();
    assert!(second.attach().await.unwrap(), "the live shim is adopted");
    let status = second.status().await;
    assert_eq!((status.state, status.pid), (ProcessState::Running, Some(pid)));
    assert!(second.start().await.is_err(), "no second start while it runs");
    second.send_line("two").await.unwrap();
    line(&mut output, "echo: two").await;
    assert_eq!(copies(&marker), vec![pid], "no second copy");

    // Its real exit is recorded by the adopting supervisor.
    second.send_line("quit").await.unwrap();
    line(&mut output, "bye").await;
    tokio::time::timeout(Duration::from_secs(20), until(&mut events, ProcessState::Stopped)).await.unwrap();
    let crash = second.crash_history().await.pop().expect("the unasked exit is on record");
    assert_eq!((crash.exit_code, crash.signal, crash.classification), (Some(7), None, CrashClass::NonzeroExit));
    assert_eq!(crash.log_tail.last().map(String::as_str), Some("bye"));
    assert!(copies(&marker).is_empty());
    assert!(!second.attach().await.unwrap(), "nothing left to adopt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_written_before_an_agent_restart_still_classifies_the_crash() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let marker = format!("zlh-reattach-stderr-{}", std::process::id());
    // The runtime's own out-of-memory report goes to stderr while the first supervisor watches;
    // the process dies only after a new supervisor has adopted it.
    let script = format!(
        "# {marker}\necho 'Exception in thread \"main\" java.lang.OutOfMemoryError: Java heap space' >&2; \
         echo ready; read l; exit 1"
    );
    let first = supervisor(&script, &state);
    let (_, mut output) = first.subscribe_output();
    first.start().await.unwrap();
    line(&mut output, "ready").await;
    drop(first);

    let second = supervisor(&script, &state);
    let mut events = second.subscribe_states();
    assert!(second.attach().await.unwrap(), "the live shim is adopted");
    second.send_line("go").await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), until(&mut events, ProcessState::Stopped)).await.unwrap();
    let crash = second.crash_history().await.pop().expect("the unasked exit is on record");
    assert_eq!((crash.exit_code, crash.classification), (Some(1), CrashClass::Oom), "{:?}", crash.log_tail);
}
