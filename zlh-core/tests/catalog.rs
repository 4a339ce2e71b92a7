//! The signed catalog end to end: signatures, anti-rollback across restarts, validation,
//! resolution and the publishing edits.

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};
use zlh_core::artifact::{ArtifactStoreExt, MemoryStore};
use zlh_core::catalog::{verify_catalog, Catalog, CatalogError, CatalogKeeper, Channel, ItemKind, TrustedKey};
use zlh_core::{ArtifactKey, Digest, RuntimeId};

// ---------------------------------------------------------------- fixtures

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

fn sha(seed: &str) -> String {
    Digest::of(seed.as_bytes()).to_hex()
}

fn artifact(key: &str) -> Value {
    json!({ "key": key, "sha256": sha(key), "size": 1000, "format": "tar.zst",
            "unpacked_size": 5000, "entries": 10 })
}

fn jar(key: &str) -> Value {
    json!({ "key": key, "sha256": sha(key), "size": 1000, "format": "file", "unpacked_size": 1000, "entries": 1 })
}

fn runtime_version(id: &str, version: &str, channel: &str) -> Value {
    json!({ "version": version, "channel": channel,
            "artifact": artifact(&format!("runtimes/{id}/{version}/{id}.tar.zst")),
            "bin": ["bin"], "env": { "JAVA_HOME": "{install}" } })
}

fn game_version(version: &str, channel: &str) -> Value {
    json!({ "version": version, "channel": channel,
            "artifact": jar(&format!("games/minecraft/paper/{version}/paper.jar")),
            "runtime": { "id": "java", "version": "21" } })
}

/// A valid catalog document with the given serial, expiring a year after [`now`].
fn doc(serial: u64) -> Value {
    json!({
        "schema": 1, "serial": serial, "expires": "2027-01-01T00:00:00Z",
        "runtimes": [ { "id": "java", "versions": [
            runtime_version("java", "17.0.13", "stable"),
            runtime_version("java", "21.0.4", "stable"),
            runtime_version("java", "21.0.5", "stable"),
            runtime_version("java", "21.0.6", "beta"),
            runtime_version("java", "22.0.1", "dev"),
        ] } ],
        "addons": [ { "id": "code-server", "versions": [ runtime_version("code-server", "4.96.2", "stable") ] } ],
        "games": [ { "id": "minecraft", "variants": [ { "id": "paper", "versions": [
            game_version("1.9", "stable"), game_version("1.21", "stable"), game_version("1.21.4", "stable"),
        ] } ] } ]
    })
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn catalog() -> Catalog {
    Catalog::parse(&bytes(&doc(1))).unwrap()
}

struct Signer(minisign::KeyPair);

impl Signer {
    fn new() -> Self {
        Signer(minisign::KeyPair::generate_unencrypted_keypair().unwrap())
    }
    fn sign(&self, data: &[u8]) -> String {
        minisign::sign(Some(&self.0.pk), &self.0.sk, Cursor::new(data), Some("timestamp:0\tfile:catalog.json"), None)
            .unwrap()
            .into_string()
    }
    fn trusted(&self) -> TrustedKey {
        TrustedKey::parse(&self.0.pk.to_box().unwrap().into_string()).unwrap()
    }
}

fn signed(signer: &Signer, v: &Value) -> (Vec<u8>, String) {
    let json = bytes(v);
    let sig = signer.sign(&json);
    (json, sig)
}

// ---------------------------------------------------------------- signatures and the keeper

#[test]
fn valid_catalog_is_accepted_and_kept_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    let (json, sig) = signed(&signer, &doc(5));
    let mut keeper = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    assert!(keeper.current().is_none());
    assert_eq!(keeper.accept(&json, &sig, now()).unwrap().serial, 5);
    assert_eq!(std::fs::read(dir.path().join("catalog.json")).unwrap(), json);
    assert_eq!(std::fs::read_to_string(dir.path().join("catalog.json.minisig")).unwrap(), sig);

    let reopened = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    assert_eq!(reopened.current(), Some(&Catalog::parse(&json).unwrap()));
    assert_eq!(reopened.accepted_serial(), Some(5));
}

#[test]
fn refused_catalogs_leave_the_previous_one_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    let other = Signer::new();
    let (json5, sig5) = signed(&signer, &doc(5));
    let mut keeper = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    keeper.accept(&json5, &sig5, now()).unwrap();
    let before = keeper.current().unwrap().clone();

    let json6 = bytes(&doc(6));
    let mut expired = doc(7);
    expired["expires"] = json!("2025-12-31T23:59:59Z");
    let mut reused = doc(5);
    reused["runtimes"][0]["versions"][0]["channel"] = json!("beta");
    let mut tampered = json6.clone();
    *tampered.last_mut().unwrap() = b' ';
    tampered.push(b'}');

    type Check = fn(&CatalogError) -> bool;
    let cases: Vec<(&str, Vec<u8>, String, Check)> = vec![
        (
            "unsigned",
            json6.clone(),
            String::new(),
            |e| matches!(e, CatalogError::BadSignature(m) if m.contains("no signature")),
        ),
        (
            "malformed",
            json6.clone(),
            "untrusted comment: x\nnot base64\n".into(),
            |e| matches!(e, CatalogError::BadSignature(m) if m.contains("malformed")),
        ),
        (
            "other key",
            json6.clone(),
            other.sign(&json6),
            |e| matches!(e, CatalogError::BadSignature(m) if m.contains("another key")),
        ),
        (
            "tampered",
            tampered,
            signer.sign(&json6),
            |e| matches!(e, CatalogError::BadSignature(m) if m.contains("does not match")),
        ),
        ("expired", bytes(&expired), signer.sign(&bytes(&expired)), |e| matches!(e, CatalogError::Expired { .. })),
        ("older serial", bytes(&doc(4)), signer.sign(&bytes(&doc(4))), |e| {
            matches!(e, CatalogError::Rollback { offered: 4, accepted: 5 })
        }),
        ("reused serial", bytes(&reused), signer.sign(&bytes(&reused)), |e| {
            matches!(e, CatalogError::SerialReused { serial: 5 })
        }),
    ];
    for (name, json, sig, check) in cases {
        let err = keeper.accept(&json, &sig, now()).expect_err(name);
        assert!(check(&err), "{name}: wrong error {err}");
        assert_eq!(keeper.current(), Some(&before), "{name}: memory changed");
        let reopened = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
        assert_eq!(reopened.current(), Some(&before), "{name}: disk changed");
        assert_eq!(reopened.accepted_serial(), Some(5), "{name}: floor changed");
    }
    // Offering the accepted bytes again is a no-op, and a newer catalog still goes through.
    assert_eq!(keeper.accept(&json5, &sig5, now()).unwrap(), &before);
    assert_eq!(keeper.accept(&json6, &signer.sign(&json6), now()).unwrap().serial, 6);
}

#[test]
fn torn_write_does_not_lower_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    let mut keeper = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    for serial in [5, 6] {
        let (json, sig) = signed(&signer, &doc(serial));
        keeper.accept(&json, &sig, now()).unwrap();
    }
    // Crash after the signature of serial 7 was written but before its catalog was.
    let (_, sig7) = signed(&signer, &doc(7));
    std::fs::write(dir.path().join("catalog.json.minisig"), &sig7).unwrap();

    let mut reopened = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    assert_eq!(reopened.accepted_serial(), Some(6));
    assert_eq!(reopened.current().map(|c| c.serial), Some(6), "catalog recovered with the recorded signature");
    let (json5, sig5) = signed(&signer, &doc(5));
    assert!(matches!(reopened.accept(&json5, &sig5, now()), Err(CatalogError::Rollback { accepted: 6, .. })));

    // Even with the catalog itself gone bad, the recorded serial still holds.
    std::fs::write(dir.path().join("catalog.json"), b"{").unwrap();
    let mut damaged = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    assert!(damaged.current().is_none());
    assert_eq!(damaged.accepted_serial(), Some(6));
    assert!(matches!(damaged.accept(&json5, &sig5, now()), Err(CatalogError::Rollback { accepted: 6, .. })));
    let (json6, sig6) = signed(&signer, &doc(6));
    assert_eq!(damaged.accept(&json6, &sig6, now()).unwrap().serial, 6, "the same serial 6 bytes restore it");
}

#[test]
fn crash_before_the_record_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    let mut keeper = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    let (json5, sig5) = signed(&signer, &doc(5));
    keeper.accept(&json5, &sig5, now()).unwrap();
    let record5 = std::fs::read(dir.path().join("accepted.json")).unwrap();
    let (json6, sig6) = signed(&signer, &doc(6));
    keeper.accept(&json6, &sig6, now()).unwrap();
    // Pair of 6 on disk, record still at 5.
    std::fs::write(dir.path().join("accepted.json"), &record5).unwrap();

    let reopened = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    assert_eq!(reopened.accepted_serial(), Some(6));
    // A further torn write (signature of 7, catalog still 6) must not fall back to 5.
    std::fs::write(dir.path().join("catalog.json.minisig"), signed(&signer, &doc(7)).1).unwrap();
    let again = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    assert_eq!(again.accepted_serial(), Some(6));
    assert_eq!(again.current().map(|c| c.serial), Some(6));
}

#[test]
fn expired_catalog_stays_loaded_but_reports_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    let (json, sig) = signed(&signer, &doc(3));
    CatalogKeeper::open(dir.path(), signer.trusted()).unwrap().accept(&json, &sig, now()).unwrap();
    let later = Utc.with_ymd_and_hms(2028, 1, 1, 0, 0, 0).unwrap();
    let keeper = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();
    let current = keeper.current().expect("expired catalog still loaded");
    assert!(current.is_expired(later));
    assert!(!current.is_expired(now()));
    assert!(matches!(verify_catalog(&json, &sig, &signer.trusted(), later), Err(CatalogError::Expired { .. })));
}

#[test]
fn corrupt_record_is_an_error_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    std::fs::write(dir.path().join("accepted.json"), b"garbage").unwrap();
    let err = CatalogKeeper::open(dir.path(), signer.trusted()).err().expect("opened");
    assert!(err.to_string().contains("accepted.json"), "{err}");
}

#[tokio::test]
async fn refresh_fetches_catalog_and_signature_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    let store = MemoryStore::new();
    let key = ArtifactKey::parse("catalog/catalog.json").unwrap();
    let mut keeper = CatalogKeeper::open(dir.path(), signer.trusted()).unwrap();

    let (json, sig) = signed(&signer, &doc(8));
    store.put_bytes(&key, Bytes::from(json)).await.unwrap();
    let err = keeper.refresh(&store, &key, now()).await.unwrap_err();
    assert!(matches!(&err, CatalogError::BadSignature(m) if m.contains("no signature")), "{err}");
    assert!(keeper.current().is_none());

    store.put_bytes(&key.with_suffix(".minisig").unwrap(), Bytes::from(sig)).await.unwrap();
    assert_eq!(keeper.refresh(&store, &key, now()).await.unwrap().serial, 8);
}

#[test]
fn trusted_key_formats() {
    let signer = Signer::new();
    let full = signer.0.pk.to_box().unwrap().into_string();
    let bare = full.lines().nth(1).unwrap();
    assert!(TrustedKey::parse(bare).is_ok());
    assert!(TrustedKey::parse(&full).is_ok());
    for bad in ["", "hello", "untrusted comment: x\nAAAA", "a\nb\nc"] {
        assert!(matches!(TrustedKey::parse(bad), Err(CatalogError::BadTrustedKey(_))), "{bad:?} accepted");
    }
}

#[test]
fn signature_with_extra_lines_is_refused() {
    let signer = Signer::new();
    let (json, sig) = signed(&signer, &doc(1));
    assert!(verify_catalog(&json, &sig, &signer.trusted(), now()).is_ok());
    let err = verify_catalog(&json, &format!("{sig}\nextra\n"), &signer.trusted(), now()).unwrap_err();
    assert!(matches!(err, CatalogError::BadSignature(_)), "{err}");
    // The trusted comment is covered by the global signature.
    let forged = sig.replace("timestamp:0", "timestamp:1");
    assert_ne!(forged, sig);
    assert!(matches!(verify_catalog(&json, &forged, &signer.trusted(), now()), Err(CatalogError::BadSignature(_))));
}

/// Signatures made by the real `minisign` tool, in its default (prehashed) and legacy modes.
#[test]
fn signatures_from_the_minisign_tool_verify() {
    if Command::new("minisign").arg("-v").output().is_err() {
        println!("skipped: the minisign tool is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("minisign").args(args).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "minisign {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["-G", "-W", "-p", "key.pub", "-s", "key.sec"]);
    let json = bytes(&doc(2));
    std::fs::write(dir.path().join("catalog.json"), &json).unwrap();
    let key = TrustedKey::from_file(&dir.path().join("key.pub")).unwrap();
    let read_sig = |p: &Path| std::fs::read_to_string(p).unwrap();

    run(&["-S", "-s", "key.sec", "-m", "catalog.json"]);
    let sig = read_sig(&dir.path().join("catalog.json.minisig"));
    assert_eq!(verify_catalog(&json, &sig, &key, now()).unwrap().serial, 2);
    let mut tampered = json.clone();
    tampered.push(b' ');
    assert!(matches!(verify_catalog(&tampered, &sig, &key, now()), Err(CatalogError::BadSignature(_))));

    run(&["-S", "-l", "-s", "key.sec", "-m", "catalog.json", "-x", "legacy.minisig"]);
    let legacy = read_sig(&dir.path().join("legacy.minisig"));
    assert_ne!(legacy.lines().nth(1).unwrap()[..2], sig.lines().nth(1).unwrap()[..2], "algorithms differ");
    assert_eq!(verify_catalog(&json, &legacy, &key, now()).unwrap().serial, 2);
}

// ---------------------------------------------------------------- validation

fn invalid_message(v: &Value) -> String {
    match Catalog::parse(&bytes(v)) {
        Ok(_) => panic!("accepted: {v}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_catalogs_are_refused_naming_the_culprit() {
    type Mutate = fn(&mut Value);
    let cases: Vec<(&str, Mutate, &[&str])> = vec![
        ("schema", |d| d["schema"] = json!(2), &["schema 2"]),
        (
            "duplicate runtime id",
            |d| {
                let java = d["runtimes"][0].clone();
                d["runtimes"].as_array_mut().unwrap().push(java);
            },
            &["duplicate runtime id java"],
        ),
        (
            "duplicate version",
            |d| {
                let v = d["runtimes"][0]["versions"][1].clone();
                d["runtimes"][0]["versions"].as_array_mut().unwrap().push(v);
            },
            &["java", "21.0.4", "twice"],
        ),
        ("empty versions", |d| d["addons"][0]["versions"] = json!([]), &["addon code-server", "no versions"]),
        (
            "duplicate variant",
            |d| {
                let v = d["games"][0]["variants"][0].clone();
                d["games"][0]["variants"].as_array_mut().unwrap().push(v);
            },
            &["paper", "minecraft"],
        ),
        ("bad digest", |d| d["runtimes"][0]["versions"][0]["artifact"]["sha256"] = json!("abc"), &["sha256", "abc"]),
        (
            "unsafe key",
            |d| d["runtimes"][0]["versions"][0]["artifact"]["key"] = json!("../x"),
            &["artifact key", "../x"],
        ),
        (
            "missing runtime",
            |d| d["games"][0]["variants"][0]["versions"][0]["runtime"]["id"] = json!("dotnet"),
            &["game minecraft/paper 1.9", "dotnet"],
        ),
        (
            "no runtime version",
            |d| d["games"][0]["variants"][0]["versions"][1]["runtime"]["version"] = json!("8"),
            &["game minecraft/paper 1.21", "java", "\"8\""],
        ),
        ("unknown field", |d| d["runtimes"][0]["versions"][0]["artifact"]["mirror"] = json!("x"), &["mirror"]),
        ("unknown top-level field", |d| d["signature"] = json!("x"), &["signature"]),
        ("zero size", |d| d["runtimes"][0]["versions"][2]["artifact"]["size"] = json!(0), &["java 21.0.5", "size"]),
        (
            "file sizes",
            |d| d["games"][0]["variants"][0]["versions"][2]["artifact"]["unpacked_size"] = json!(7),
            &["minecraft/paper 1.21.4", "file"],
        ),
        ("no entries", |d| d["addons"][0]["versions"][0]["artifact"]["entries"] = json!(0), &["code-server 4.96.2"]),
        (
            "unsafe bin",
            |d| d["runtimes"][0]["versions"][0]["bin"] = json!(["../../usr/bin"]),
            &["java 17.0.13", "../../usr/bin"],
        ),
        ("absolute bin", |d| d["runtimes"][0]["versions"][0]["bin"] = json!(["/bin"]), &["java 17.0.13", "/bin"]),
        (
            "bad env",
            |d| d["runtimes"][0]["versions"][0]["env"] = json!({"JAVA-HOME": "x"}),
            &["java 17.0.13", "JAVA-HOME"],
        ),
        (
            "key conflict",
            |d| d["addons"][0]["versions"][0]["artifact"]["key"] = json!("runtimes/java/17.0.13/java.tar.zst"),
            &["addon code-server 4.96.2", "runtimes/java/17.0.13/java.tar.zst", "runtime java 17.0.13"],
        ),
        ("bad channel", |d| d["runtimes"][0]["versions"][0]["channel"] = json!("nightly"), &["nightly"]),
        (
            "bad chat pattern",
            |d| {
                d["games"][0]["variants"][0]["versions"][0]["launch"] =
                    json!({"command": ["java", "-jar", "server.jar"], "chat_pattern": "(unclosed"})
            },
            &["game minecraft/paper 1.9", "chat_pattern"],
        ),
    ];
    for (name, mutate, needles) in cases {
        let mut d = doc(1);
        mutate(&mut d);
        let msg = invalid_message(&d);
        for needle in needles {
            assert!(msg.contains(needle), "{name}: {msg:?} does not mention {needle:?}");
        }
    }
}

#[test]
fn a_game_launch_may_name_its_chat_pattern() {
    let mut d = doc(1);
    d["games"][0]["variants"][0]["versions"][0]["launch"] =
        json!({"command": ["java", "-jar", "server.jar"], "chat_pattern": r"^\[CHAT\] "});
    let catalog = Catalog::parse(&bytes(&d)).unwrap();
    let json = serde_json::to_value(&catalog).unwrap();
    assert_eq!(json["games"][0]["variants"][0]["versions"][0]["launch"]["chat_pattern"], r"^\[CHAT\] ");
}

#[test]
fn shared_artifact_with_same_digest_is_fine() {
    let mut d = doc(1);
    d["addons"][0]["versions"][0]["artifact"] = d["runtimes"][0]["versions"][0]["artifact"].clone();
    Catalog::parse(&bytes(&d)).unwrap();
}

#[test]
fn oversized_catalog_is_refused() {
    let huge = vec![b' '; zlh_core::catalog::MAX_CATALOG_BYTES + 1];
    assert!(matches!(Catalog::parse(&huge), Err(CatalogError::Parse(_))));
}

#[test]
fn published_json_is_sorted_and_stable() {
    let c = catalog();
    let out = c.to_json_pretty();
    let again = Catalog::parse(&out).unwrap();
    assert_eq!(again.to_json_pretty(), out, "stable");
    let java: Vec<&str> = again.runtimes[0].versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(java, ["22.0.1", "21.0.6", "21.0.5", "21.0.4", "17.0.13"]);
    let paper: Vec<&str> = again.games[0].variants[0].versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(paper, ["1.21.4", "1.21", "1.9"]);
}

// ---------------------------------------------------------------- resolution

#[test]
fn prefix_resolves_to_newest_stable() {
    let c = catalog();
    assert_eq!(c.runtime("java", "21", Channel::Stable).unwrap().version.as_str(), "21.0.5");
    assert_eq!(c.runtime("java", "17", Channel::Stable).unwrap().version.as_str(), "17.0.13");
    assert_eq!(c.runtime("java", "", Channel::Stable).unwrap().version.as_str(), "21.0.5");
    assert_eq!(c.runtime("java", "latest", Channel::Dev).unwrap().version.as_str(), "22.0.1");
    let item = c.runtime("java", "21", Channel::Stable).unwrap();
    assert_eq!(item.kind, ItemKind::Runtime);
    assert_eq!(item.bin, ["bin"]);
    assert_eq!(c.addon("code-server", "4", Channel::Stable).unwrap().version.as_str(), "4.96.2");
}

#[test]
fn versions_order_numerically() {
    let c = catalog();
    let g = c.game("minecraft", "paper", "", Channel::Stable).unwrap();
    assert_eq!(g.version.as_str(), "1.21.4", "1.9 < 1.21");
    assert_eq!(g.id.as_str(), "minecraft-paper");
    assert_eq!(g.runtime.unwrap().id.as_str(), "java");
    let vs: Vec<String> =
        c.versions(ItemKind::Game, "minecraft-paper", Channel::Stable).iter().map(|v| v.to_string()).collect();
    assert_eq!(vs, ["1.21.4", "1.21", "1.9"]);
}

#[test]
fn channels_filter_what_is_visible() {
    let c = catalog();
    let stable: Vec<String> =
        c.versions(ItemKind::Runtime, "java", Channel::Stable).iter().map(|v| v.to_string()).collect();
    assert_eq!(stable, ["21.0.5", "21.0.4", "17.0.13"]);
    let beta: Vec<String> =
        c.versions(ItemKind::Runtime, "java", Channel::Beta).iter().map(|v| v.to_string()).collect();
    assert_eq!(beta, ["21.0.6", "21.0.5", "21.0.4", "17.0.13"]);
    assert_eq!(c.runtime("java", "21", Channel::Beta).unwrap().version.as_str(), "21.0.6");
    assert!(matches!(c.runtime("java", "22", Channel::Stable), Err(CatalogError::OnOtherChannel { .. })));
    assert!(matches!(c.runtime("java", "22.0.1", Channel::Beta), Err(CatalogError::OnOtherChannel { .. })));
    assert!(matches!(c.runtime("java", "23", Channel::Stable), Err(CatalogError::NoMatchingVersion { .. })));
    assert_eq!(c.runtime("java", "22", Channel::Dev).unwrap().version.as_str(), "22.0.1");
}

#[test]
fn a_version_only_on_a_less_stable_channel_says_how_to_promote_it() {
    let c = catalog();
    let err = c.runtime("java", "22", Channel::Stable).unwrap_err().to_string();
    assert_eq!(
        err,
        "no stable version of java matches; java 22.0.1 exists on channel dev; promote it with \
         `zlh-agentd publish promote java 22.0.1 stable`; available: 21.0.5, 21.0.4, 17.0.13"
    );
    // The channel named is the one the version is on.
    let err = c.runtime("java", "21.0.6", Channel::Stable).unwrap_err().to_string();
    assert!(err.contains("java 21.0.6 exists on channel beta"), "{err}");
    // A resolution that finds something eligible is not affected.
    assert_eq!(c.runtime("java", "", Channel::Stable).unwrap().version.as_str(), "21.0.5");
}

#[test]
fn exact_version_wins_over_prefix() {
    let c = catalog();
    assert_eq!(c.game("minecraft", "paper", "1.21", Channel::Stable).unwrap().version.as_str(), "1.21");
    assert_eq!(c.runtime("java", "21.0.4", Channel::Stable).unwrap().version.as_str(), "21.0.4");
}

#[test]
fn unknown_ids_and_versions_list_what_exists() {
    let c = catalog();
    let err = c.runtime("node", "20", Channel::Stable).unwrap_err();
    assert!(matches!(&err, CatalogError::UnknownId { available, .. } if available == "java"), "{err}");
    let err = c.runtime("java", "11", Channel::Stable).unwrap_err().to_string();
    assert!(err.contains("21.0.5, 21.0.4, 17.0.13"), "{err}");
    let err = c.game("minecraft", "vanilla", "", Channel::Stable).unwrap_err().to_string();
    assert!(err.contains("paper"), "{err}");
    let err = c.find_exact(ItemKind::Game, "minecraft-vanilla", "1.21").unwrap_err().to_string();
    assert!(err.contains("minecraft-paper"), "{err}");
}

#[test]
fn find_exact_requires_the_exact_version() {
    let c = catalog();
    assert_eq!(c.find_exact(ItemKind::Runtime, "java", "22.0.1").unwrap().channel, Channel::Dev);
    assert!(c.find_exact(ItemKind::Runtime, "java", "21").is_err());
    assert_eq!(c.find_exact(ItemKind::Game, "minecraft-paper", "1.21").unwrap().version.as_str(), "1.21");
    let err = c.find_exact(ItemKind::Game, "minecraft-paper", "1").unwrap_err().to_string();
    assert!(err.contains("1.21.4, 1.21, 1.9"), "{err}");
}

// ---------------------------------------------------------------- publishing edits

fn id(s: &str) -> RuntimeId {
    RuntimeId::parse(s).unwrap()
}

fn package_version(v: Value) -> zlh_core::catalog::PackageVersion {
    serde_json::from_value(v).unwrap()
}

#[test]
fn promote_moves_a_version_between_channels() {
    let mut c = catalog();
    c.promote(ItemKind::Runtime, "java", "22.0.1", Channel::Stable).unwrap();
    assert_eq!(c.runtime("java", "", Channel::Stable).unwrap().version.as_str(), "22.0.1");
    c.promote(ItemKind::Game, "minecraft-paper", "1.21.4", Channel::Dev).unwrap();
    assert_eq!(c.game("minecraft", "paper", "", Channel::Stable).unwrap().version.as_str(), "1.21");

    let before = c.clone();
    let err = c.promote(ItemKind::Runtime, "java", "99", Channel::Stable).unwrap_err().to_string();
    assert!(err.contains("22.0.1") && err.contains("17.0.13"), "{err}");
    let err = c.promote(ItemKind::Addon, "vscode", "1", Channel::Stable).unwrap_err().to_string();
    assert!(err.contains("code-server"), "{err}");
    assert_eq!(c, before);
}

#[test]
fn upsert_adds_and_replaces() {
    let mut c = Catalog::empty(1, now());
    assert!(c.runtimes.is_empty());
    c.upsert_package_version(ItemKind::Runtime, &id("java"), package_version(runtime_version("java", "21.0.5", "dev")))
        .unwrap();
    let mut replacement = runtime_version("java", "21.0.5", "stable");
    replacement["artifact"]["size"] = json!(4242);
    c.upsert_package_version(ItemKind::Runtime, &id("java"), package_version(replacement)).unwrap();
    assert_eq!(c.runtimes[0].versions.len(), 1);
    assert_eq!(c.runtimes[0].versions[0].artifact.size, 4242);
    assert_eq!(c.runtimes[0].versions[0].channel, Channel::Stable);

    let gv = serde_json::from_value(game_version("1.21.4", "stable")).unwrap();
    c.upsert_game_version(&id("minecraft"), &id("paper"), gv).unwrap();
    assert_eq!(c.game("minecraft", "paper", "1.21", Channel::Stable).unwrap().version.as_str(), "1.21.4");
    assert_eq!(c.bump_serial(), 2);
    Catalog::parse(&c.to_json_pretty()).unwrap();
}

#[test]
fn invalid_edits_change_nothing() {
    let mut c = catalog();
    let before = c.clone();
    let mut bad = runtime_version("java", "21.0.7", "stable");
    bad["bin"] = json!(["../escape"]);
    let err = c.upsert_package_version(ItemKind::Runtime, &id("java"), package_version(bad)).unwrap_err();
    assert!(err.to_string().contains("21.0.7"), "{err}");

    let mut needs_dotnet = game_version("1.22", "stable");
    needs_dotnet["runtime"]["id"] = json!("dotnet");
    let err = c
        .upsert_game_version(&id("minecraft"), &id("paper"), serde_json::from_value(needs_dotnet).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("dotnet"), "{err}");

    let pv = package_version(runtime_version("java", "1", "stable"));
    assert!(c.upsert_package_version(ItemKind::Game, &id("java"), pv).is_err());
    assert_eq!(c, before);
}

// ---------------------------------------------------------------- robustness

proptest! {
    #[test]
    fn parse_never_panics_on_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Catalog::parse(&data);
    }

    #[test]
    fn parse_never_panics_on_jsonish(s in r#"[\[\]{}":,0-9a-z .\-]{0,300}"#) {
        let _ = Catalog::parse(s.as_bytes());
    }

    #[test]
    fn parse_never_panics_on_damaged_catalogs(pos in 0usize..4000, byte in any::<u8>()) {
        let mut data = bytes(&doc(1));
        let i = pos % data.len();
        data[i] = byte;
        let _ = Catalog::parse(&data);
    }
}
