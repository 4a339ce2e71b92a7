//! The output fan-out under a flood, in a test binary of its own: it measures this process's
//! memory, which other tests running alongside in the same process would disturb.

mod supervisor_common;

use std::time::Duration;

use supervisor_common::{spec, supervisor, until};
use zlh_core::supervisor::output::OutputEvent;
use zlh_core::supervisor::{ProcessState, RestartPolicy, Supervisor};

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What the stalled subscriber finds once it reads: lines still held, lines it was told it missed.
#[derive(Debug, Default)]
struct Stalled {
    held: u64,
    skipped: u64,
}

/// Runs the flood once with `active` reading subscribers and optionally one stalled one;
/// returns how long the child took, what the stalled one finds and how many lines each reader saw.
async fn flood(lines: u32, active: usize, stalled: bool) -> (Duration, Stalled, Vec<u64>) {
    let mut s = spec(&format!(
        "exec python3 -c \"import sys\nw = sys.stdout.write\nfor i in range({lines}): w('line %d %s\\n' % (i, 'x' * 80))\""
    ));
    s.restart = RestartPolicy::Never;
    let sup = supervisor(s);
    let mut events = sup.subscribe_states();
    let stall = stalled.then(|| sup.subscribe_output().1);
    let readers: Vec<_> = (0..active)
        .map(|_| {
            let (_, mut rx) = sup.subscribe_output();
            tokio::spawn(async move {
                let mut got = 0u64;
                loop {
                    match rx.recv().await {
                        Some(OutputEvent::Lines(batch)) => got += batch.len() as u64,
                        Some(OutputEvent::Skipped(_)) => {}
                        None => return got,
                    }
                }
            })
        })
        .collect();
    let began = std::time::Instant::now();
    sup.start().await.unwrap();
    until(&mut events, ProcessState::Stopped).await;
    let took = began.elapsed();
    // What the stalled subscriber can still read after skipping what it missed.
    let mut held = Stalled::default();
    if let Some(mut rx) = stall {
        while let Some(event) = rx.try_recv() {
            match event {
                OutputEvent::Lines(batch) => held.held += batch.len() as u64,
                OutputEvent::Skipped(n) => held.skipped += n,
            }
        }
    }
    drop(sup);
    let mut got = Vec::new();
    for r in readers {
        // A reader ends when the hub goes away; one still draining is fine too.
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), r).await {
            got.push(n);
        }
    }
    (took, held, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_flood_to_30_subscribers_with_one_stalled() {
    const LINES: u32 = 300_000;
    let (baseline, _, _) = flood(LINES, 0, false).await;
    // The first flood with readers warms the allocator; the second must not grow memory again.
    let (first, _, _) = flood(LINES, 29, true).await;
    let rss_before = vm_rss_kib();
    let (took, held, got) = flood(LINES, 29, true).await;
    let rss_growth_mib = vm_rss_kib().saturating_sub(rss_before) / 1024;
    println!(
        "flood of {LINES} lines: alone {baseline:?}, with 29 readers + 1 stalled {first:?} / {took:?}, \
         rss +{rss_growth_mib} MiB, stalled subscriber: {held:?}"
    );
    // The stalled subscriber holds at most the channel's capacity (128 reads of at most 64 KiB),
    // not the flood, and is told exactly how many lines it missed.
    const LINE_BYTES: u64 = 88;
    assert!(held.held * LINE_BYTES <= 128 * 64 * 1024, "stalled subscriber holds {held:?}");
    assert!(held.skipped > 0, "{held:?}");
    assert_eq!(held.held + held.skipped, u64::from(LINES), "{held:?}");
    assert!(rss_growth_mib < 64, "memory grew {rss_growth_mib} MiB");
    // The child is not held back by the stalled reader (generous: shared CI machines).
    assert!(took < baseline * 4 + Duration::from_secs(2), "{took:?} vs {baseline:?}");
    // Readers that keep up see every line, in spite of the stalled one.
    assert_eq!(got, vec![u64::from(LINES); 29]);
}
