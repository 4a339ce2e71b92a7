//! Fixtures shared by the integration tests: archives built in memory, catalog items that
//! describe them, and stores that hold them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use zlh_core::artifact::{ArtifactStoreExt, MemoryStore};
use zlh_core::catalog::{ArchiveFormat, ArtifactRef, CatalogItem, Channel, ItemKind};
use zlh_core::{ArtifactKey, Digest, RuntimeId, Version};

/// One archive member.
pub enum Member<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

/// A tar stream of the members, in order.
pub fn tar(members: &[Member]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for m in members {
        let mut h = tar::Header::new_gnu();
        match m {
            Member::File(path, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                b.append_data(&mut h, path, *data).unwrap();
            }
            Member::Dir(path) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Member::Symlink(path, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A small JDK-like runtime: an executable, a library, a symlink into the library.
pub fn runtime_tree(version: &str) -> Vec<Member<'static>> {
    let java: &'static str = Box::leak(format!("#!/bin/sh\necho java {version}\n").into_boxed_str());
    vec![
        Member::Dir("bin"),
        Member::Dir("lib"),
        Member::File("lib/libjvm.so", b"\x7fELF not really", 0o644),
        Member::File("lib/java-real", java.as_bytes(), 0o755),
        Member::Symlink("bin/java", "../lib/java-real"),
        Member::File("release", b"JAVA_VERSION=x\n", 0o644),
    ]
}

/// The catalog entry describing `artifact` (already compressed per `format`).
pub fn item(id: &str, version: &str, artifact: &[u8], format: ArchiveFormat, unpacked: u64, entries: u64) -> CatalogItem {
    let key = format!("runtimes/{id}/{version}/{id}-{version}.tar.zst");
    CatalogItem {
        kind: ItemKind::Runtime,
        id: RuntimeId::parse(id).unwrap(),
        version: Version::parse(version).unwrap(),
        channel: Channel::Stable,
        artifact: ArtifactRef {
            key: ArtifactKey::parse(&key).unwrap(),
            sha256: Digest::of(artifact),
            size: artifact.len() as u64,
            format,
            unpacked_size: unpacked,
            entries,
        },
        bin: vec!["bin".into()],
        env: BTreeMap::from([("JAVA_HOME".into(), "{install}".into())]),
        runtime: None,
    }
}

/// A runtime archive of `version` and its catalog entry.
pub fn runtime_artifact(id: &str, version: &str) -> (Vec<u8>, CatalogItem) {
    let members = runtime_tree(version);
    let unpacked: u64 = members.iter().map(|m| if let Member::File(_, d, _) = m { d.len() as u64 } else { 0 }).sum();
    let bytes = zst(&tar(&members));
    let it = item(id, version, &bytes, ArchiveFormat::TarZst, unpacked, members.len() as u64);
    (bytes, it)
}

/// A memory store holding the given artifacts under their catalog keys.
pub async fn memory_store(artifacts: &[(&[u8], &CatalogItem)]) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    for (bytes, it) in artifacts {
        store.put_bytes(&it.artifact.key, Bytes::copy_from_slice(bytes)).await.unwrap();
    }
    store
}
