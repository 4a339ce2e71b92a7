//! The real-process supervisor against real child processes: small `sh`, `python3`, `node` and
//! `java` programs that fail the way real servers do. Backoff delays are measured on paused tokio
//! time, from the timestamps of the state events.

mod supervisor_common;

use std::path::Path;
use std::time::Duration;

use supervisor_common::{spec, supervisor, supervisor_with, until};
use tokio::sync::broadcast;
use zlh_core::supervisor::process::{MemoryLimit, ProcessOptions, StateEvent};
use zlh_core::supervisor::{CrashClass, CrashRecord, ProcessSpec, ProcessState, RestartPolicy, Supervisor};

fn have(program: &str) -> bool {
    Path::new(program).exists()
}

/// Runs `script` once (no restart) and returns its crash record.
async fn crash_of(mut spec: ProcessSpec) -> CrashRecord {
    spec.restart = RestartPolicy::Never;
    let sup = supervisor(spec);
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), until(&mut events, ProcessState::Stopped))
        .await
        .expect("process ended");
    let history = sup.crash_history().await;
    assert_eq!(history.len(), 1, "one crash on record");
    assert_eq!(sup.status().await.last_crash.as_ref(), history.last());
    history.into_iter().next().unwrap()
}

#[tokio::test]
async fn java_out_of_memory_is_oom() {
    if !have("/usr/bin/java") {
        // Same text and exit code as the JVM, when no JVM is installed.
        let c = crash_of(spec(
            "echo 'Exception in thread \"main\" java.lang.OutOfMemoryError: Java heap space' >&2; exit 1",
        ))
        .await;
        assert_eq!((c.classification, c.exit_code), (CrashClass::Oom, Some(1)));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Oom.java"),
        "public class Oom { public static void main(String[] a) { java.util.List<long[]> l = new java.util.ArrayList<>(); \
         System.out.println(\"allocating\"); while (true) l.add(new long[1 << 20]); } }",
    )
    .unwrap();
    let mut s = spec("exec java -Xmx32m Oom.java");
    s.cwd = dir.path().to_path_buf();
    let c = crash_of(s).await;
    assert!(c.log_tail.iter().any(|l| l.contains("java.lang.OutOfMemoryError")), "{:?}", c.log_tail);
    assert_eq!((c.classification, c.exit_code, c.signal), (CrashClass::Oom, Some(1), None));
}

#[tokio::test]
async fn sigkill_and_exit_137_under_a_memory_limit_are_oom() {
    // Which mechanism this machine gives decides what a SIGKILL means: a cgroup counts real OOM
    // kills, so a kill by someone else stays a nonzero exit; under RLIMIT_AS no kernel OOM kill
    // can be seen, so a SIGKILL while a limit is set is taken as the limit.
    let probe = supervisor({
        let mut s = spec("read never");
        s.memory_limit_bytes = Some(1 << 30);
        s
    });
    probe.start().await.unwrap();
    let cgroup = matches!(probe.memory_limit(), MemoryLimit::Cgroup { .. });
    probe.stop().await.unwrap();
    let expected = if cgroup { CrashClass::NonzeroExit } else { CrashClass::Oom };

    let mut s = spec("echo started; kill -9 $$");
    s.memory_limit_bytes = Some(1 << 30);
    let c = crash_of(s).await;
    assert_eq!((c.classification, c.exit_code, c.signal), (expected, None, Some(9)));

    let mut s = spec("sh -c 'kill -9 $$'; exit $?");
    s.memory_limit_bytes = Some(1 << 30);
    let c = crash_of(s).await;
    assert_eq!((c.classification, c.exit_code), (expected, Some(137)));

    // Without a limit the same kill is only a nonzero exit.
    let c = crash_of(spec("kill -9 $$")).await;
    assert_eq!((c.classification, c.signal), (CrashClass::NonzeroExit, Some(9)));
}

#[tokio::test]
async fn real_oom_under_a_memory_limit_is_oom() {
    let mut s = spec("exec python3 -c 'x = bytearray(4 * 1024 ** 3)'");
    s.memory_limit_bytes = Some(256 << 20);
    let sup = supervisor({
        let mut s = s.clone();
        s.restart = RestartPolicy::Never;
        s
    });
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    let mode = sup.memory_limit();
    println!("memory limit mechanism: {mode:?}");
    assert!(matches!(mode, MemoryLimit::Cgroup { .. } | MemoryLimit::Rlimit { .. }));
    tokio::time::timeout(Duration::from_secs(60), until(&mut events, ProcessState::Stopped)).await.unwrap();
    let c = sup.crash_history().await.pop().unwrap();
    if matches!(mode, MemoryLimit::Cgroup { .. }) {
        // A cgroup limit means a real kernel OOM kill, seen in the cgroup's counter.
        assert_eq!(c.signal, Some(9), "{c:?}");
    } else {
        assert!(c.log_tail.iter().any(|l| l.contains("MemoryError")) || c.signal == Some(9), "{c:?}");
    }
    assert_eq!(c.classification, CrashClass::Oom, "{c:?}");
}

#[tokio::test]
async fn missing_shared_library_is_missing_dependency() {
    let c = crash_of(spec(
        "echo './bedrock_server: error while loading shared libraries: libssl.so.1.1: cannot open shared object file: No such file or directory' >&2; exit 127",
    ))
    .await;
    assert_eq!((c.classification, c.exit_code), (CrashClass::MissingDependency, Some(127)));
}

#[tokio::test]
async fn bukkit_plugin_failure_is_mod_or_plugin_error() {
    let c = crash_of(spec(
        "echo \"[12:00:01] [Server thread/ERROR]: Could not load 'plugins/Essentials.jar' in folder 'plugins'\"; \
         echo 'org.bukkit.plugin.InvalidPluginException: java.lang.NullPointerException'; exit 1",
    ))
    .await;
    assert_eq!(c.classification, CrashClass::ModOrPluginError);
}

#[tokio::test]
async fn node_cannot_find_module_is_missing_dependency() {
    let script = if have("/usr/bin/node") {
        "exec node -e \"require('zlh-no-such-module')\""
    } else {
        "echo \"Error: Cannot find module 'zlh-no-such-module'\" >&2; exit 1"
    };
    let c = crash_of(spec(script)).await;
    assert!(c.log_tail.iter().any(|l| l.contains("Cannot find module")), "{:?}", c.log_tail);
    assert_eq!((c.classification, c.exit_code), (CrashClass::MissingDependency, Some(1)));
}

#[tokio::test]
async fn python_module_not_found_is_missing_dependency() {
    let c = crash_of(spec("exec python3 -c 'import zlh_no_such_module'")).await;
    assert!(c.log_tail.iter().any(|l| l.contains("ModuleNotFoundError")), "{:?}", c.log_tail);
    assert_eq!((c.classification, c.exit_code), (CrashClass::MissingDependency, Some(1)));
}

#[tokio::test]
async fn plain_nonzero_and_unexpected_zero_exits() {
    let c = crash_of(spec("echo working; exit 3")).await;
    assert_eq!((c.classification, c.exit_code), (CrashClass::NonzeroExit, Some(3)));
    assert_eq!(c.log_tail, vec!["working"]);
    let c = crash_of(spec("exit 0")).await;
    assert_eq!((c.classification, c.exit_code), (CrashClass::UnexpectedExit, Some(0)));
}

/// The delays between each `backoff` event and the next `starting`, until `error`.
async fn delays_until_error(events: &mut broadcast::Receiver<StateEvent>) -> Vec<Duration> {
    let mut delays = Vec::new();
    loop {
        let e = events.recv().await.unwrap();
        match e.state {
            ProcessState::Error => return delays,
            ProcessState::Backoff => {
                let next = until(events, ProcessState::Starting).await;
                assert_eq!(Some(next.at - e.at), e.delay);
                delays.push(next.at - e.at);
            }
            _ => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_is_30_60_120_then_error() {
    let sup = supervisor(spec("echo crash; exit 1"));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    let secs = |s| Duration::from_secs(s);
    assert_eq!(delays_until_error(&mut events).await, vec![secs(30), secs(60), secs(120), secs(120)]);
    let status = sup.status().await;
    assert_eq!((status.state, status.crash_count, status.pid), (ProcessState::Error, 5, None));
    assert_eq!(sup.crash_history().await.len(), 5);
    // Nothing starts again by itself.
    tokio::time::sleep(secs(3600)).await;
    assert!(events.try_recv().is_err());
    // A start from `error` begins a new streak.
    sup.start().await.unwrap();
    let e = until(&mut events, ProcessState::Backoff).await;
    assert_eq!(e.delay, Some(secs(30)));
    sup.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn backoff_resets_after_a_stable_run() {
    let sup = supervisor(spec("read go; exit 1"));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    let mut delays = Vec::new();
    for run in 0..3 {
        until(&mut events, ProcessState::Running).await;
        if run == 2 {
            tokio::time::sleep(Duration::from_secs(40)).await; // a stable run
        }
        sup.send_line("go").await.unwrap();
        delays.push(until(&mut events, ProcessState::Backoff).await.delay.unwrap());
    }
    assert_eq!(delays, [30, 60, 30].map(Duration::from_secs));
    assert!(sup.crash_history().await[2].uptime >= Duration::from_secs(40));
    sup.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn no_restart_after_stop_during_backoff() {
    let sup = supervisor(spec("exit 1"));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Backoff).await;
    sup.stop().await.unwrap();
    assert_eq!(until(&mut events, ProcessState::Stopped).await.state, ProcessState::Stopped);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(events.try_recv().is_err(), "nothing restarted");
    assert_eq!(sup.status().await.state, ProcessState::Stopped);
}

#[tokio::test]
async fn no_restart_and_no_crash_after_a_requested_stop() {
    let sup = supervisor(spec("read never"));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Running).await;
    sup.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).map(|e| e.state).collect();
    assert_eq!(seen, vec![ProcessState::Stopping, ProcessState::Stopped]);
    assert!(sup.crash_history().await.is_empty());
}

fn gone(pid: u32) -> bool {
    // Absent, or a zombie waiting for whoever inherited it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn sigterm_ignored_means_sigkill_for_the_whole_group() {
    let mut s = spec("trap '' TERM; sleep 1000 & echo \"grandchild $!\"; wait; wait");
    s.stop.term_timeout = Duration::from_millis(500);
    let sup = supervisor(s);
    let (_, mut output) = sup.subscribe_output();
    sup.start().await.unwrap();
    let grandchild: u32 = loop {
        let l = output.next_line().await.unwrap();
        if let Some(pid) = l.line.strip_prefix("grandchild ") {
            break pid.parse().unwrap();
        }
    };
    let pid = sup.status().await.pid.unwrap();
    let began = std::time::Instant::now();
    sup.stop().await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(500), "waited for the TERM timeout");
    assert!(gone_soon(pid) && gone_soon(grandchild), "process {pid} and its child {grandchild} are killed");
    assert_eq!(sup.status().await.state, ProcessState::Stopped);
}

/// A SIGKILLed process is torn down by the kernel shortly after the signal: wait for it, bounded.
fn gone_soon(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[tokio::test]
async fn stop_command_on_stdin_is_honoured() {
    let mut s = spec("while read l; do if [ \"$l\" = stop ]; then echo 'Stopping the server'; exit 0; fi; done");
    s.stop.stdin_command = Some("stop".into());
    s.stop.command_timeout = Duration::from_secs(30);
    let sup = supervisor(s);
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Running).await;
    let began = std::time::Instant::now();
    sup.stop().await.unwrap();
    assert!(began.elapsed() < Duration::from_secs(10), "no signal timeout was needed");
    let (recent, _) = sup.subscribe_output();
    assert_eq!(recent.last().map(|l| l.line.as_str()), Some("Stopping the server"));
    assert!(sup.crash_history().await.is_empty());
}

#[tokio::test]
async fn ready_pattern_moves_starting_to_running() {
    let mut s = spec("echo Loading; read go; echo 'Done (1.234s)! For help, type \"help\"'; read never");
    s.ready_pattern = Some("Done (".into());
    let sup = supervisor(s);
    let mut events = sup.subscribe_states();
    let (_, mut output) = sup.subscribe_output();
    sup.start().await.unwrap();
    let starting = until(&mut events, ProcessState::Starting).await;
    assert!(starting.pid.is_some());
    while output.next_line().await.unwrap().line != "Loading" {}
    assert_eq!(sup.status().await.state, ProcessState::Starting);
    sup.send_line("go").await.unwrap();
    let running =
        tokio::time::timeout(Duration::from_secs(10), until(&mut events, ProcessState::Running)).await.unwrap();
    assert_eq!(running.pid, starting.pid);
    sup.stop().await.unwrap();
}

#[test]
fn detects_a_running_code_server_by_its_cmdline() {
    use std::io::BufRead;
    use zlh_core::supervisor::detect::{find_processes, is_code_server};
    // `sh -c '…' <$0> <args…>`: the shell's own cmdline carries a code-server's arguments.
    let args = ["-c", "echo up; read x", "/opt/code-server/bin/code-server", "--bind-addr", "127.0.0.1:6000"];
    let mut child = std::process::Command::new("/bin/sh")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its first line says it runs (so the scan does not race its exec).
    let mut up = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut up).unwrap();
    let pid = child.id();
    let found = find_processes(is_code_server);
    let ours = found.iter().find(|(p, _)| *p == pid).expect("the running code-server is found");
    assert_eq!(ours.1[0], "/bin/sh");
    assert_eq!(ours.1[1..], args);
    assert!(find_processes(|args| args.iter().any(|a| a == "zlh-nothing-runs-this")).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!find_processes(is_code_server).iter().any(|(p, _)| *p == pid), "gone after it ended");
}

/// The first line starting with `ids ` the process prints, started from `s`.
async fn ids_line(s: ProcessSpec) -> String {
    let sup = supervisor(s);
    let (_, mut output) = sup.subscribe_output();
    sup.start().await.unwrap();
    let line = loop {
        let l = output.next_line().await.unwrap().line;
        if l.starts_with("ids ") {
            break l;
        }
    };
    sup.stop().await.unwrap();
    line
}

fn passwd_entry(user: &str) -> Vec<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd.lines().find(|l| l.starts_with(&format!("{user}:"))).unwrap().split(':').map(str::to_owned).collect()
}

/// The process runs as the spec's user with that user's group and no supplementary groups of
/// the agent (as root, dropping to `nobody`); a configured group replaces the primary group.
/// Elsewhere the test says why it does nothing.
#[tokio::test]
async fn runs_as_the_configured_user_and_group_without_root_groups() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let nobody = passwd_entry("nobody");
    let mut s = spec("echo \"ids $(id -u) $(id -g) $(id -G)\"; read never");
    s.user = Some("nobody".into());
    assert_eq!(ids_line(s.clone()).await, format!("ids {} {} {}", nobody[2], nobody[3], nobody[3]));
    s.group = Some("0".into());
    assert_eq!(ids_line(s).await, format!("ids {} 0 0", nobody[2]));
}

#[tokio::test]
async fn kill_ends_a_stuck_stop_at_once_without_a_crash() {
    let mut s = spec("trap '' TERM; echo up; while :; do sleep 1; done");
    s.stop.term_timeout = Duration::from_secs(600);
    let sup = std::sync::Arc::new(supervisor(s));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    let pid = until(&mut events, ProcessState::Running).await.pid.unwrap();
    // The graceful stop waits ten minutes for a process that ignores SIGTERM...
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { sup.stop().await }
    });
    until(&mut events, ProcessState::Stopping).await;
    // ...and a kill does not queue behind it.
    let began = std::time::Instant::now();
    sup.kill().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), stopping).await.expect("stop returned").unwrap().unwrap();
    assert!(began.elapsed() < Duration::from_secs(30));
    assert!(gone(pid), "process {pid} is killed");
    assert_eq!(sup.status().await.state, ProcessState::Stopped);
    assert!(sup.crash_history().await.is_empty(), "a requested kill is no crash");
}

#[tokio::test]
async fn kill_of_a_running_process_is_a_stop_not_a_crash() {
    let sup = supervisor(spec("echo up; while :; do sleep 1; done"));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Running).await;
    sup.kill().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), until(&mut events, ProcessState::Stopped)).await.expect("stopped");
    assert!(sup.crash_history().await.is_empty());
    assert_eq!(sup.status().await.state, ProcessState::Stopped, "no restart after a kill");
}

#[tokio::test]
async fn kill_during_a_restart_leaves_the_process_down() {
    let mut s = spec("trap '' TERM; echo up; while :; do sleep 1; done");
    s.stop.term_timeout = Duration::from_secs(600);
    let sup = std::sync::Arc::new(supervisor(s));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Running).await;
    let restarting = tokio::spawn({
        let sup = sup.clone();
        async move { sup.restart().await }
    });
    until(&mut events, ProcessState::Stopping).await;
    sup.kill().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), restarting).await.expect("restart returned").unwrap();
    assert!(result.is_err(), "the restart reports it was cut short");
    assert_eq!(sup.status().await.state, ProcessState::Stopped, "and nothing was started again");
    assert!(sup.crash_history().await.is_empty());
}

// --- What players write, which run a tail belongs to, and what outlives the supervisor ---

#[tokio::test]
async fn a_player_chatting_an_oom_does_not_make_the_crash_an_oom() {
    let c = crash_of(spec(
        "echo '[12:00:00] [Server thread/INFO]: <bot> java.lang.OutOfMemoryError: Java heap space'; \
         echo '[12:00:01 INFO]: bot issued server command: /say java.lang.OutOfMemoryError'; exit 1",
    ))
    .await;
    assert_eq!(c.classification, CrashClass::NonzeroExit, "{:?}", c.log_tail);
}

#[tokio::test]
async fn an_oom_text_on_stdout_is_not_the_runtimes_report() {
    // A server that prints what a player typed as a line of its own, on stdout.
    let c = crash_of(spec("echo 'java.lang.OutOfMemoryError: Java heap space'; echo 'MemoryError'; exit 1")).await;
    assert_eq!(c.classification, CrashClass::NonzeroExit, "{:?}", c.log_tail);
    // The same text from the runtime, on stderr.
    let c = crash_of(spec("echo 'java.lang.OutOfMemoryError: Java heap space' >&2; exit 1")).await;
    assert_eq!(c.classification, CrashClass::Oom, "{:?}", c.log_tail);
}

#[tokio::test]
async fn a_game_chat_pattern_from_options_is_honoured() {
    use zlh_core::supervisor::classify::Classifier;
    let mut s = spec("echo '[CHAT] Steve: Error: Cannot find module x'; exit 1");
    s.restart = RestartPolicy::Never;
    let classifier = Classifier::default().with_player_patterns([r"^\[CHAT\] ".to_string()]).unwrap();
    let sup = supervisor_with(s, ProcessOptions { classifier, ..ProcessOptions::default() });
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Stopped).await;
    assert_eq!(sup.status().await.last_crash.unwrap().classification, CrashClass::NonzeroExit);
}

#[tokio::test(start_paused = true)]
async fn tail_and_class_belong_to_the_crashed_run_only() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ran-once");
    let sup = supervisor(spec(&format!(
        "if [ -e {f} ]; then echo 'second run'; exit 1; fi; touch {f}; \
         echo 'Exception in thread \"main\" java.lang.OutOfMemoryError: Java heap space' >&2; exit 1",
        f = flag.display()
    )));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Backoff).await;
    until(&mut events, ProcessState::Backoff).await;
    sup.stop().await.unwrap();
    let history = sup.crash_history().await;
    assert_eq!(history[0].classification, CrashClass::Oom);
    assert_eq!(history[1].log_tail, ["second run"]);
    assert_eq!(history[1].classification, CrashClass::NonzeroExit);
}

#[tokio::test]
async fn crash_tails_have_no_ansi_escapes() {
    let c = crash_of(spec(r"printf '\033[1;31mboom\033[0m and \033[32mmore\033[0m\n'; exit 1")).await;
    assert_eq!(c.log_tail, ["boom and more"]);
}

#[tokio::test(start_paused = true)]
async fn error_says_why_and_a_start_after_a_stop_begins_a_fresh_streak() {
    let sup = supervisor(spec("echo \"Error: Cannot find module 'express'\" >&2; exit 1"));
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    assert_eq!(delays_until_error(&mut events).await.len(), 4);
    let status = sup.status().await;
    assert_eq!(status.error.as_deref(), Some("crashed 5 times in a row; last: missing_dependency (exit 1)"));
    // Out of `error`, the reason goes.
    sup.start().await.unwrap();
    assert_eq!(until(&mut events, ProcessState::Backoff).await.delay, Some(Duration::from_secs(30)));
    assert_eq!(sup.status().await.error, None);
    // Crash 2 of this streak would wait 60 s; a stop and a start begin again at 30 s.
    until(&mut events, ProcessState::Starting).await;
    assert_eq!(until(&mut events, ProcessState::Backoff).await.delay, Some(Duration::from_secs(60)));
    sup.stop().await.unwrap();
    sup.start().await.unwrap();
    assert_eq!(until(&mut events, ProcessState::Backoff).await.delay, Some(Duration::from_secs(30)));
    assert_eq!(sup.status().await.crash_count, 1);
    sup.stop().await.unwrap();
}

fn with_history(path: &Path) -> ProcessOptions {
    ProcessOptions { history_file: Some(path.to_path_buf()), ..ProcessOptions::default() }
}

#[tokio::test(start_paused = true)]
async fn a_new_supervisor_honours_the_saved_streak_and_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crashes.json");
    let first = supervisor_with(spec("exit 1"), with_history(&file));
    let mut events = first.subscribe_states();
    first.start().await.unwrap();
    until(&mut events, ProcessState::Backoff).await;
    until(&mut events, ProcessState::Starting).await;
    assert_eq!(until(&mut events, ProcessState::Backoff).await.delay, Some(Duration::from_secs(60)));
    // The agent goes away during the 60 s backoff.
    drop(first);

    let second = supervisor_with(spec("exit 1"), with_history(&file));
    let mut events = second.subscribe_states();
    let resumed = until(&mut events, ProcessState::Backoff).await;
    let left = resumed.delay.unwrap();
    assert!(left > Duration::from_secs(55) && left <= Duration::from_secs(60), "{left:?}");
    let status = second.status().await;
    assert_eq!((status.state, status.crash_count), (ProcessState::Backoff, 2));
    assert_eq!(status.last_crash.as_ref().map(|c| c.exit_code), Some(Some(1)));
    assert_eq!(second.crash_history().await.len(), 2);
    // Nothing starts before the deadline, and the streak goes on: the next wait is 120 s.
    let started = until(&mut events, ProcessState::Starting).await;
    // (Paused tokio time fires timers on whole milliseconds.)
    let waited = started.at - resumed.at;
    assert!(waited.abs_diff(left) <= Duration::from_millis(1), "waited {waited:?} of {left:?}");
    assert_eq!(until(&mut events, ProcessState::Backoff).await.delay, Some(Duration::from_secs(120)));
    assert_eq!(second.status().await.crash_count, 3);
    second.stop().await.unwrap();
    drop(second);

    // After a requested stop nothing is pending: the next supervisor stays stopped.
    let third = supervisor_with(spec("exit 1"), with_history(&file));
    let status = third.status().await;
    assert_eq!((status.state, status.crash_count), (ProcessState::Stopped, 3));
    assert_eq!(third.crash_history().await.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_new_supervisor_stays_in_error_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crashes.json");
    let first = supervisor_with(spec("exit 3"), with_history(&file));
    let mut events = first.subscribe_states();
    first.start().await.unwrap();
    delays_until_error(&mut events).await;
    drop(first);
    let second = supervisor_with(spec("exit 3"), with_history(&file));
    let mut events = second.subscribe_states();
    until(&mut events, ProcessState::Error).await;
    let status = second.status().await;
    assert_eq!(status.error.as_deref(), Some("crashed 5 times in a row; last: nonzero_exit (exit 3)"));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(events.try_recv().is_err(), "nothing restarts by itself");
}

#[tokio::test]
async fn an_unreadable_history_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crashes.json");
    std::fs::write(&file, b"{torn").unwrap();
    let mut s = spec("exit 1");
    s.restart = RestartPolicy::Never;
    let sup = supervisor_with(s, with_history(&file));
    let mut events = sup.subscribe_states();
    assert_eq!(sup.status().await.crash_count, 0);
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Stopped).await;
    // Replaced with a good one.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["crashes"].as_array().map(Vec::len), Some(1));
}
