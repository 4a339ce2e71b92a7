//! Install throughput against a same-run baseline, and peak memory against artifact size.
//!
//! - `install/baseline`: plain zstd decode + `tar` unpack of the artifact file, no hashing, no
//!   checks: what a naive installer costs.
//! - `install/zlh` and `install/zlh-durable`: the real installer from a `file://` store (sha256 of
//!   the artifact, per-file sha256 for the manifest, safe extraction, commit by rename), without
//!   and with the syncfs that makes the commit survive power loss.
//!
//! Printed after the group: each variant's ratio to the baseline (target ≤ 1.15), from
//! criterion's own mean estimates. Then peak RSS (VmHWM) of a child process installing a 64 MiB
//! and a 1 GiB artifact, to show memory does not grow with size (target ≤ 64 MiB).
//! Size knobs: `ZLH_BENCH_MIB` (unpacked MiB; the default 440 compresses to just over 200 MiB)
//! and `ZLH_BENCH_SKIP_RSS=1`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use criterion::{criterion_group, Criterion};
use zlh_core::artifact::{self, DynStore};
use zlh_core::catalog::CatalogItem;
use zlh_core::runtime::{Installer, InstallerOptions, RuntimeInstaller};

const FILE_SIZE: usize = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    store_root: PathBuf,
    store: DynStore,
    item: CatalogItem,
    work: PathBuf,
}

fn fixture(unpacked_mib: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store_root = dir.path().join("store");
    let item = common::write_large_artifact(&store_root, "java", "21.0.5", unpacked_mib, FILE_SIZE);
    let store = artifact::from_url(&format!("file://{}", store_root.display())).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    Fixture { _dir: dir, store_root, store, item, work }
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}

fn baseline(f: &Fixture) {
    let dest = fresh(&f.work.join("baseline"));
    let file = std::fs::File::open(f.store_root.join(f.item.artifact.key.as_str())).unwrap();
    let dec = zstd::Decoder::new(file).unwrap();
    tar::Archive::new(dec).unpack(&dest).unwrap();
}

async fn install(f: &Fixture, durable: bool) {
    let root = fresh(&f.work.join("root"));
    let mut options = InstallerOptions::new(root, f.store.clone());
    options.durable = durable;
    Installer::open(options).unwrap().install(&f.item, true).await.unwrap();
}

fn mean_ns(group: &str, name: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    let path = target.join("criterion").join(group).join(name).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn bench_install(c: &mut Criterion) {
    let mib: usize = std::env::var("ZLH_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(440);
    let f = fixture(mib);
    eprintln!("artifact: {} MiB compressed, {} MiB unpacked", f.item.artifact.size >> 20, mib);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("install");
    g.sample_size(10);
    g.bench_function("baseline", |b| b.iter(|| baseline(&f)));
    g.bench_function("zlh", |b| b.iter(|| rt.block_on(install(&f, false))));
    g.bench_function("zlh-durable", |b| b.iter(|| rt.block_on(install(&f, true))));
    g.finish();
    if let Some(base) = mean_ns("install", "baseline") {
        for name in ["zlh", "zlh-durable"] {
            if let Some(t) = mean_ns("install", name) {
                println!("ratio install/{name} : baseline = {:.3} (target <= 1.15 for zlh)", t / base);
            }
        }
    }
}

/// Child mode: install the artifact described in the environment and print peak RSS (VmHWM).
/// The parent generates the artifact, so the child's high-water mark is the install's alone.
fn rss_child(store_root: &str, artifact_json: &str) {
    let artifact: zlh_core::catalog::ArtifactRef = serde_json::from_str(artifact_json).unwrap();
    let mib = artifact.unpacked_size >> 20;
    let mut item = common::item("rss", "1.0", b"", artifact.format, 0, 0);
    item.artifact = artifact;
    let store = artifact::from_url(&format!("file://{store_root}")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root = Path::new(store_root).join("root");
    rt.block_on(async {
        let inst = Installer::open(InstallerOptions::new(&root, store)).unwrap();
        inst.install(&item, true).await.unwrap();
    });
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    println!("ZLH-RSS {mib} {hwm_kib}");
}

fn measure_rss() {
    for mib in [64usize, 1024] {
        let dir = tempfile::tempdir().unwrap();
        let item = common::write_large_artifact(dir.path(), "rss", "1.0", mib, FILE_SIZE);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env("ZLH_BENCH_RSS_CHILD", dir.path())
            .env("ZLH_BENCH_RSS_ARTIFACT", serde_json::to_string(&item.artifact).unwrap())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find_map(|l| l.strip_prefix("ZLH-RSS ")) {
            Some(line) => {
                let v: Vec<u64> = line.split_whitespace().filter_map(|s| s.parse().ok()).collect();
                println!(
                    "peak RSS installing {} MiB unpacked ({} MiB compressed): {} MiB (target <= 64)",
                    v[0],
                    item.artifact.size >> 20,
                    v[1] / 1024
                );
            }
            None => println!("rss child failed: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }
}

criterion_group!(benches, bench_install);

fn main() {
    if let (Ok(dir), Ok(artifact)) = (std::env::var("ZLH_BENCH_RSS_CHILD"), std::env::var("ZLH_BENCH_RSS_ARTIFACT")) {
        rss_child(&dir, &artifact);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::var_os("ZLH_BENCH_SKIP_RSS").is_none() {
        measure_rss();
    }
}
