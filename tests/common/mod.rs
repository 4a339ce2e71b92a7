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
pub fn item(
    id: &str,
    version: &str,
    artifact: &[u8],
    format: ArchiveFormat,
    unpacked: u64,
    entries: u64,
) -> CatalogItem {
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
        launch: None,
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

/// Deterministic filler: `len` bytes from a xorshift generator seeded by `seed`, made about half
/// compressible (runs of repeated bytes) so zstd has real work, as with a real runtime.
pub fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(4) {
            out.extend(std::iter::repeat_n((x >> 8) as u8, (x >> 16) as usize % 64));
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A runtime with `files` files of `file_size` bytes each (plus the small runtime tree), as a
/// tar.zst with its catalog entry. Deterministic for the same arguments.
pub fn sized_runtime_artifact(id: &str, version: &str, files: usize, file_size: usize) -> (Vec<u8>, CatalogItem) {
    let seed = version.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let names: Vec<String> = (0..files).map(|i| format!("lib/modules/m{i:05}.bin")).collect();
    let datas: Vec<Vec<u8>> = (0..files).map(|i| filler(seed + i as u64, file_size)).collect();
    let mut members = runtime_tree(version);
    members.push(Member::Dir("lib/modules"));
    for (n, d) in names.iter().zip(&datas) {
        members.push(Member::File(n, d, 0o644));
    }
    let unpacked: u64 = members.iter().map(|m| if let Member::File(_, d, _) = m { d.len() as u64 } else { 0 }).sum();
    let bytes = zst(&tar(&members));
    let it = item(id, version, &bytes, ArchiveFormat::TarZst, unpacked, members.len() as u64);
    (bytes, it)
}

/// Writes an artifact where a `file://` store rooted at `store_root` serves it.
pub fn put_in_dir_store(store_root: &std::path::Path, bytes: &[u8], it: &CatalogItem) {
    let path = store_root.join(it.artifact.key.as_str());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Streams a runtime archive of `files` × `file_size` filler bytes straight into a `file://`
/// store at `store_root` (never holding it in memory) and returns its catalog entry. For
/// benchmarks with artifacts of hundreds of MiB.
pub fn write_large_artifact(
    store_root: &std::path::Path,
    id: &str,
    version: &str,
    files: usize,
    file_size: usize,
) -> CatalogItem {
    use sha2::Digest as _;
    use std::io::Write;
    let key = format!("runtimes/{id}/{version}/{id}-{version}.tar.zst");
    let path = store_root.join(&key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let enc = zstd::Encoder::new(std::io::BufWriter::new(file), 1).unwrap();
    let mut b = tar::Builder::new(enc);
    for i in 0..files {
        let data = filler(i as u64 + 1, file_size);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("lib/m{:03}/f{i:05}.bin", i / 256), data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut hasher).unwrap();
    // Counted the way the catalog publisher counts (implied directories are entries too).
    let (unpacked_size, entries) = zlh_core::runtime::extract::inspect(
        ArchiveFormat::TarZst,
        std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
    )
    .unwrap();
    let mut it = item(id, version, b"", ArchiveFormat::TarZst, unpacked_size, entries);
    it.artifact.sha256 = Digest::from_hasher(hasher);
    it.artifact.size = std::fs::metadata(&path).unwrap().len();
    it
}

/// A store that forwards to another, counting downloads and letting a test reshape each one
/// (stall it, cut it) through `on_get`.
pub struct InterceptStore {
    pub inner: zlh_core::artifact::DynStore,
    pub gets: std::sync::atomic::AtomicUsize,
    pub on_get: Option<Box<dyn Fn(zlh_core::artifact::GetResult) -> zlh_core::artifact::GetResult + Send + Sync>>,
}

impl InterceptStore {
    pub fn new(inner: zlh_core::artifact::DynStore) -> Self {
        Self { inner, gets: Default::default(), on_get: None }
    }
}

#[async_trait::async_trait]
impl zlh_core::artifact::ArtifactStore for InterceptStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn head(
        &self,
        key: &ArtifactKey,
    ) -> Result<zlh_core::artifact::ObjectMeta, zlh_core::artifact::ArtifactError> {
        self.inner.head(key).await
    }
    async fn get_range(
        &self,
        key: &ArtifactKey,
        range: zlh_core::artifact::ByteRange,
    ) -> Result<zlh_core::artifact::GetResult, zlh_core::artifact::ArtifactError> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let got = self.inner.get_range(key, range).await?;
        Ok(match &self.on_get {
            Some(f) => f(got),
            None => got,
        })
    }
    async fn put(
        &self,
        key: &ArtifactKey,
        body: zlh_core::artifact::ByteStream,
    ) -> Result<zlh_core::artifact::ObjectMeta, zlh_core::artifact::ArtifactError> {
        self.inner.put(key, body).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<zlh_core::artifact::ObjectMeta>, zlh_core::artifact::ArtifactError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &ArtifactKey) -> Result<(), zlh_core::artifact::ArtifactError> {
        self.inner.delete(key).await
    }
}
