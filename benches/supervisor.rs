//! The real-process supervisor against same-run baselines.
//!
//! - `supervisor_crash/baseline`: a child ends (after a stdin line) and `tokio::process` reaps it.
//!   `supervisor_crash/zlh`: the same child under the supervisor, until its `stopped` state event
//!   arrives (exit, output drain, classification, crash record, broadcast).
//! - `supervisor_output/baseline`: a child prints `LINES` lines, read line by line straight from
//!   its pipe. `supervisor_output/zlh`: the same output through the supervisor's hub to 30
//!   subscribers that keep up, until each has seen the last line; the share of lines each
//!   subscriber got is printed (it must be 100%: one that lags is told how many it missed).
//!
//! Printed after each group: the ratio of zlh to its baseline, from criterion's mean estimates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use zlh_core::supervisor::output::OutputEvent;
use zlh_core::supervisor::process::{ProcessOptions, ProcessSupervisor};
use zlh_core::supervisor::{ProcessSpec, ProcessState, RestartPolicy, Supervisor};

const LINES: u64 = 100_000;
const SUBSCRIBERS: usize = 30;
const CRASH_SCRIPT: &str = "read x; exit 1";

fn output_script() -> String {
    format!("seq 1 {LINES}")
}

fn spec(script: &str) -> ProcessSpec {
    ProcessSpec {
        env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
        cwd: std::env::temp_dir(),
        restart: RestartPolicy::Never,
        ..ProcessSpec::shell(script)
    }
}

fn sh(script: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    cmd
}

/// From the stdin line that makes the child exit to its reaping.
async fn crash_baseline() -> Duration {
    let mut child = sh(CRASH_SCRIPT).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let began = Instant::now();
    stdin.write_all(b"go\n").await.unwrap();
    child.wait().await.unwrap();
    began.elapsed()
}

/// From the stdin line that makes the child exit to the supervisor's `stopped` event.
async fn crash_zlh() -> Duration {
    let sup = ProcessSupervisor::new(spec(CRASH_SCRIPT), ProcessOptions::default()).unwrap();
    let mut events = sup.subscribe_states();
    sup.start().await.unwrap();
    while events.recv().await.unwrap().state != ProcessState::Running {}
    let began = Instant::now();
    sup.send_line("go").await.unwrap();
    while events.recv().await.unwrap().state != ProcessState::Stopped {}
    began.elapsed()
}

/// Reads all lines straight from the pipe.
async fn output_baseline() -> Duration {
    let began = Instant::now();
    let mut child = sh(&output_script()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut n = 0u64;
    while lines.next_line().await.unwrap().is_some() {
        n += 1;
    }
    child.wait().await.unwrap();
    assert_eq!(n, LINES);
    began.elapsed()
}

/// All lines through the hub to `SUBSCRIBERS` readers; returns the time and lines delivered.
async fn output_zlh() -> (Duration, u64) {
    let sup = ProcessSupervisor::new(spec(&output_script()), ProcessOptions::default()).unwrap();
    let last = LINES.to_string();
    let readers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let (_, mut rx) = sup.subscribe_output();
            let last = last.clone();
            tokio::spawn(async move {
                let mut got = 0u64;
                loop {
                    match rx.recv().await {
                        Some(OutputEvent::Lines(batch)) => {
                            // Every line is looked at, as a console does.
                            got += batch.iter().filter(|l| !l.line.is_empty()).count() as u64;
                            if batch.last().is_some_and(|l| l.line == last) {
                                return got;
                            }
                        }
                        Some(OutputEvent::Skipped(_)) => {}
                        None => return got,
                    }
                }
            })
        })
        .collect();
    let began = Instant::now();
    sup.start().await.unwrap();
    let mut delivered = 0;
    for r in readers {
        delivered += r.await.unwrap();
    }
    (began.elapsed(), delivered)
}

fn mean_ns(group: &str, name: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let path = target.join("criterion").join(group).join(name).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn print_ratio(group: &str) {
    if let (Some(base), Some(zlh)) = (mean_ns(group, "baseline"), mean_ns(group, "zlh")) {
        println!("ratio {group}/zlh : baseline = {:.2} ({:.0} µs vs {:.0} µs)", zlh / base, zlh / 1e3, base / 1e3);
    }
}

fn bench_supervisor(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();

    let mut g = c.benchmark_group("supervisor_crash");
    g.sample_size(30);
    g.bench_function("baseline", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += crash_baseline().await;
            }
            total
        })
    });
    g.bench_function("zlh", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += crash_zlh().await;
            }
            total
        })
    });
    g.finish();
    print_ratio("supervisor_crash");

    let mut g = c.benchmark_group("supervisor_output");
    g.sample_size(10);
    g.throughput(Throughput::Elements(LINES));
    g.bench_function("baseline", |b| b.to_async(&rt).iter(output_baseline));
    g.bench_function("zlh", |b| b.to_async(&rt).iter(output_zlh));
    g.finish();
    print_ratio("supervisor_output");
    let (took, delivered) = rt.block_on(output_zlh());
    println!(
        "supervisor_output/zlh: {LINES} lines to {SUBSCRIBERS} subscribers in {took:?}: {:.0} lines/s delivered in all, \
         {:.1}% of lines reached each subscriber on average",
        delivered as f64 / took.as_secs_f64(),
        100.0 * delivered as f64 / (LINES * SUBSCRIBERS as u64) as f64
    );
}

criterion_group!(benches, bench_supervisor);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
