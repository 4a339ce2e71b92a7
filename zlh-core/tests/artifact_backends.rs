//! One behaviour suite for every writable artifact store (memory, local directory, S3), plus
//! the backend-specific checks: atomic local puts, S3 multipart uploads against a real S3
//! protocol server (s3s-fs, in process), credentials refused, and resumable downloads.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{stream, StreamExt};
use sha2::{Digest as _, Sha256};
use zlh_core::artifact::{
    ArtifactError, ArtifactStore, ArtifactStoreExt, ByteRange, ByteStream, GetResult, LocalStore, MemoryStore,
    ObjectMeta, RetryPolicy, S3Store, S3StoreBuilder,
};
use zlh_core::catalog::{CatalogError, CatalogSource, TrustedKey};
use zlh_core::ArtifactKey;

fn key(s: &str) -> ArtifactKey {
    ArtifactKey::parse(s).unwrap()
}

/// Deterministic, non-repeating-looking content.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed as usize * 7) % 251) as u8).collect()
}

fn body_of(data: &[u8], chunk: usize) -> ByteStream {
    let chunks: Vec<_> = data.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    stream::iter(chunks).boxed()
}

/// `good` bytes in chunks, then an I/O error: an upload that breaks off.
fn failing_body(good: usize) -> ByteStream {
    let mut items: Vec<Result<Bytes, ArtifactError>> =
        pattern(good, 9).chunks(1 << 20).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    items.push(Err(ArtifactError::Io {
        store: "test".into(),
        key: "body".into(),
        source: std::io::Error::other("connection reset by test"),
    }));
    stream::iter(items).boxed()
}

async fn read_all(got: GetResult) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = got.stream;
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

async fn get(store: &dyn ArtifactStore, k: &str, range: ByteRange) -> (std::ops::Range<u64>, Vec<u8>) {
    let got = store.get_range(&key(k), range).await.unwrap_or_else(|e| panic!("get {k} {range:?}: {e}"));
    (got.range.clone(), read_all(got).await)
}

fn keys(list: &[ObjectMeta]) -> Vec<&str> {
    list.iter().map(|m| m.key.as_str()).collect()
}

/// The contract of [`ArtifactStore`], for every writable backend. Starts from an empty store.
async fn behaviour_suite(store: &dyn ArtifactStore) {
    let name = store.describe();

    // Missing objects.
    let missing = key("nothing/here.tar");
    assert!(store.head(&missing).await.unwrap_err().is_not_found(), "{name}: head of a missing key");
    assert!(store.get_range(&missing, ByteRange::All).await.unwrap_err().is_not_found(), "{name}: get");
    assert!(store.delete(&missing).await.unwrap_err().is_not_found(), "{name}: delete");

    // Put, head, get.
    let data = pattern(300_000, 1);
    let len = data.len() as u64;
    let k = "runtimes/java/21.0.5/java.tar.zst";
    let meta = store.put(&key(k), body_of(&data, 70_000)).await.unwrap();
    assert_eq!(meta.size, len, "{name}: put reports the size");
    assert_eq!(meta.key.as_str(), k);
    assert_eq!(store.head(&key(k)).await.unwrap().size, len, "{name}: head");
    assert_eq!(get(store, k, ByteRange::All).await, (0..len, data.clone()), "{name}: full get");

    // Ranges.
    assert_eq!(get(store, k, ByteRange::From(1000)).await, (1000..len, data[1000..].to_vec()), "{name}: From");
    assert_eq!(
        get(store, k, ByteRange::Bounded { start: 10, end: 20 }).await,
        (10..20, data[10..20].to_vec()),
        "{name}: Bounded"
    );
    assert_eq!(
        get(store, k, ByteRange::Bounded { start: len - 5, end: len + 100 }).await,
        (len - 5..len, data[data.len() - 5..].to_vec()),
        "{name}: Bounded past the end is clipped"
    );
    assert_eq!(get(store, k, ByteRange::From(len)).await, (len..len, vec![]), "{name}: From(size) is empty");
    for bad in [
        ByteRange::From(len + 1),
        ByteRange::Bounded { start: 5, end: 5 },
        ByteRange::Bounded { start: len + 3, end: len + 9 },
    ] {
        match store.get_range(&key(k), bad).await {
            Err(ArtifactError::InvalidRange { start, .. }) => assert_eq!(start, bad.start(), "{name}: {bad:?}"),
            other => panic!("{name}: {bad:?} gave {other:?}"),
        }
    }

    // Overwrite.
    store.put_bytes(&key(k), Bytes::from_static(b"second version")).await.unwrap();
    assert_eq!(get(store, k, ByteRange::All).await.1, b"second version", "{name}: overwrite");
    assert_eq!(store.head(&key(k)).await.unwrap().size, 14);

    // List: sorted by key, prefixes match whole segments.
    for other in
        ["runtimes/java/17.0.13/java.tar.zst", "runtimes/javascript/x", "runtimes/node/22/node.tar.gz", "a-b", "zz"]
    {
        store.put_bytes(&key(other), Bytes::from(other.to_owned())).await.unwrap();
    }
    let all = store.list("").await.unwrap();
    assert_eq!(
        keys(&all),
        [
            "a-b",
            "runtimes/java/17.0.13/java.tar.zst",
            "runtimes/java/21.0.5/java.tar.zst",
            "runtimes/javascript/x",
            "runtimes/node/22/node.tar.gz",
            "zz"
        ],
        "{name}: list all"
    );
    assert_eq!(all.iter().find(|m| m.key.as_str() == "zz").unwrap().size, 2, "{name}: listed size");
    let java = ["runtimes/java/17.0.13/java.tar.zst", "runtimes/java/21.0.5/java.tar.zst"];
    assert_eq!(keys(&store.list("runtimes/java").await.unwrap()), java, "{name}: prefix by segment");
    assert_eq!(keys(&store.list("runtimes/java/").await.unwrap()), java, "{name}: prefix with slash");
    assert!(store.list("runtimes/ja").await.unwrap().is_empty(), "{name}: partial segment matches nothing");
    assert_eq!(keys(&store.list(k).await.unwrap()), [k], "{name}: a whole key as prefix");
    assert!(store.list("nope").await.unwrap().is_empty());

    // A body that fails mid-way leaves nothing behind, and keeps what was there. 6 MiB: large
    // enough for a multipart upload with a 5 MiB part size.
    let err = store.put(&key("broken/upload.bin"), failing_body(6 << 20)).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Io { .. }), "{name}: the body's error is returned, got {err:?}");
    assert!(store.head(&key("broken/upload.bin")).await.unwrap_err().is_not_found(), "{name}: no partial object");
    assert!(store.list("broken").await.unwrap().is_empty(), "{name}: nothing listed");
    store.put(&key("zz"), failing_body(6 << 20)).await.unwrap_err();
    assert_eq!(get(store, "zz", ByteRange::All).await.1, b"zz", "{name}: failed overwrite keeps the old object");

    // Delete.
    store.delete(&key(k)).await.unwrap();
    assert!(store.head(&key(k)).await.unwrap_err().is_not_found(), "{name}: deleted");
    assert!(store.delete(&key(k)).await.unwrap_err().is_not_found(), "{name}: delete twice");
    assert_eq!(keys(&store.list("runtimes/java").await.unwrap()), ["runtimes/java/17.0.13/java.tar.zst"]);
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    behaviour_suite(&MemoryStore::new()).await;
}

#[tokio::test]
async fn local_store_keeps_the_contract_and_leaves_no_aside_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    behaviour_suite(&store).await;
    let partial = dir.path().join(".partial");
    let leftovers: Vec<_> =
        std::fs::read_dir(&partial).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "aside files left: {leftovers:?}");
    // Keys are plain files under the root.
    assert_eq!(std::fs::read(dir.path().join("zz")).unwrap(), b"zz");
}

#[tokio::test]
async fn local_put_dropped_mid_way_removes_its_aside_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(dir.path()).unwrap());
    // One chunk, then a body that never ends.
    let body = stream::once(async { Ok(Bytes::from(vec![7u8; 1 << 20])) }).chain(stream::pending()).boxed();
    let task = tokio::spawn({
        let store = store.clone();
        async move { store.put(&key("slow/upload.bin"), body).await }
    });
    let partial = dir.path().join(".partial");
    let aside_written = || {
        std::fs::read_dir(&partial)
            .map(|d| d.flatten().any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false)))
            .unwrap_or(false)
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while !aside_written() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the upload started writing");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0, "aside file removed");
    assert!(store.head(&key("slow/upload.bin")).await.unwrap_err().is_not_found());
    assert!(store.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn local_store_refuses_symlinks_out_of_the_root_and_the_aside_dir() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"x").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
    let store = LocalStore::new(dir.path()).unwrap();
    let err = store.head(&key("escape/secret")).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Forbidden { .. }), "{err:?}");
    let err = store.put_bytes(&key("escape/new"), Bytes::from_static(b"y")).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Forbidden { .. }), "{err:?}");
    assert!(!outside.path().join("new").exists());
    let err = store.put_bytes(&key(".partial/x"), Bytes::from_static(b"y")).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Forbidden { .. }), "{err:?}");
}

#[tokio::test]
async fn put_file_streams_a_local_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let data = pattern(1 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    let store = MemoryStore::new();
    assert_eq!(store.put_file(&key("up/src.bin"), &src).await.unwrap().size, data.len() as u64);
    assert_eq!(store.get_bytes(&key("up/src.bin"), 2 << 20).await.unwrap(), data);
    let err = store.put_file(&key("up/none"), &dir.path().join("missing")).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Io { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// S3, against s3s-fs served in process.

const ACCESS_KEY: &str = "AKIAZLHTEST";
const SECRET_KEY: &str = "zlh-test-secret-key";
const BUCKET: &str = "artifacts";

/// An S3 protocol server over a temp directory; the bucket is a directory under its root.
struct S3Server {
    endpoint: String,
    root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn s3_server() -> S3Server {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use s3s::auth::SimpleAuth;
    use s3s::service::S3ServiceBuilder;

    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(BUCKET)).unwrap();
    let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    S3Server { endpoint, root, task }
}

/// A builder for the test bucket; fast retries so failures show quickly.
fn s3_builder(server: &S3Server) -> S3StoreBuilder {
    S3StoreBuilder::from_url(&format!("s3://{BUCKET}?endpoint={}&region=us-east-1", server.endpoint))
        .unwrap()
        .credentials(ACCESS_KEY, SECRET_KEY)
        .part_size(5 * 1024 * 1024)
        .retry(RetryPolicy { attempts: 2, base_delay: Duration::from_millis(10) })
}

fn s3_store(server: &S3Server) -> S3Store {
    s3_builder(server).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_keeps_the_contract() {
    let server = s3_server().await;
    behaviour_suite(&s3_store(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_keeps_the_contract_under_a_key_prefix() {
    let server = s3_server().await;
    let store = s3_builder(&server).prefix("team/zlh").build().unwrap();
    assert_eq!(store.describe(), "s3://artifacts/team/zlh");
    behaviour_suite(&store).await;
    // The objects really are under the prefix inside the bucket.
    assert!(server.root.path().join(BUCKET).join("team/zlh/zz").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_multipart_upload_of_64_mib_reads_back_identical() {
    let server = s3_server().await;
    let store = s3_builder(&server).part_size(8 * 1024 * 1024).build().unwrap();
    let k = key("runtimes/big/big.tar.zst");
    // 64 MiB + a tail, in uneven chunks, so the parts are cut across chunk boundaries.
    let total = (64 << 20) + 12_345;
    let data: Arc<Vec<u8>> = Arc::new((0..total).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect());
    let expected = hex::encode(Sha256::digest(&*data));
    let chunks = {
        let data = data.clone();
        stream::iter((0..total).step_by(777_777))
            .map(move |at| Ok(Bytes::copy_from_slice(&data[at..(at + 777_777).min(total)])))
    };
    let meta = store.put(&k, chunks.boxed()).await.unwrap();
    assert_eq!(meta.size, total as u64);

    let mut hasher = Sha256::new();
    let mut got = store.get(&k).await.unwrap();
    while let Some(chunk) = got.next().await {
        hasher.update(chunk.unwrap());
    }
    assert_eq!(hex::encode(hasher.finalize()), expected);

    // A range across a part boundary.
    let at = (8 << 20) - 100;
    let (range, bytes) = get(&store, k.as_str(), ByteRange::Bounded { start: at as u64, end: at as u64 + 200 }).await;
    assert_eq!(range, at as u64..at as u64 + 200);
    assert_eq!(bytes, data[at..at + 200]);
}

/// Upload bookkeeping the S3 server keeps for unfinished multipart uploads (`.upload…` files).
fn unfinished_uploads(server: &S3Server) -> Vec<String> {
    std::fs::read_dir(server.root.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".upload"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_put_given_up_half_way_leaves_no_parts_behind() {
    let server = s3_server().await;
    let store = Arc::new(s3_store(&server));
    let k = key("runtimes/abandoned/a.tar.zst");
    // Two parts' worth, then a stream that never ends: the caller gives up waiting.
    let data = Bytes::from(vec![7u8; 11 << 20]);
    let body = stream::iter([Ok(data)]).chain(stream::pending());
    let put = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move { store.put(&k, body.boxed()).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !unfinished_uploads(&server).iter().any(|n| n.contains(".part-")) {
        assert!(std::time::Instant::now() < deadline, "no part was ever uploaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    put.abort();
    assert!(put.await.unwrap_err().is_cancelled());
    // A bound of its own: on a busy machine the first part alone may take most of the one above.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !unfinished_uploads(&server).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned upload was not aborted: {:?}",
            unfinished_uploads(&server)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(store.head(&k).await, Err(ArtifactError::NotFound { .. })), "nothing became visible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_credentials_are_forbidden_and_never_shown() {
    let server = s3_server().await;
    s3_store(&server).put_bytes(&key("a/b"), Bytes::from_static(b"x")).await.unwrap();
    let store = s3_builder(&server).credentials(ACCESS_KEY, "not-the-secret").build().unwrap();
    for err in [
        store.head(&key("a/b")).await.unwrap_err(),
        store.get_range(&key("a/b"), ByteRange::All).await.unwrap_err(),
        store.put_bytes(&key("a/c"), Bytes::from_static(b"y")).await.unwrap_err(),
        store.list("").await.unwrap_err(),
    ] {
        assert!(matches!(err, ArtifactError::Forbidden { .. }), "{err:?}");
        assert!(!format!("{err} {err:?}").contains("not-the-secret"));
    }
    let shown = format!("{:?} {:?} {}", s3_builder(&server), store, store.describe());
    assert!(!shown.contains(SECRET_KEY) && !shown.contains("not-the-secret"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_endpoint_is_unavailable() {
    // A port nobody listens on: connection refused, retried, then reported as transient.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let store = S3StoreBuilder::new(BUCKET)
        .endpoint(endpoint)
        .credentials(ACCESS_KEY, SECRET_KEY)
        .retry(RetryPolicy { attempts: 2, base_delay: Duration::from_millis(1) })
        .build()
        .unwrap();
    let err = store.head(&key("a/b")).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_http_endpoint_works_without_extra_flags() {
    // The URL as an operator writes it for a local S3 server: no opt-in for plain HTTP.
    let server = s3_server().await;
    let url = format!("s3://{BUCKET}?endpoint={}&region=us-east-1", server.endpoint);
    let store = S3StoreBuilder::from_url(&url).unwrap().credentials(ACCESS_KEY, SECRET_KEY).build().unwrap();
    store.put_bytes(&key("a/b"), Bytes::from_static(b"over http")).await.unwrap();
    assert_eq!(store.get_bytes(&key("a/b"), 100).await.unwrap(), &b"over http"[..]);
}

/// A TCP server that accepts every connection and never answers: a store stopped mid-way
/// (SIGSTOP), or one too overloaded to say anything.
async fn hung_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (endpoint, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_s3_store_fails_within_the_retry_budget_naming_the_key() {
    let (endpoint, server) = hung_server().await;
    let budget = Duration::from_secs(2);
    // The default read timeout is far longer than the budget: the budget alone must end it.
    let store = S3StoreBuilder::from_url(&format!("s3://{BUCKET}?endpoint={endpoint}&region=us-east-1"))
        .unwrap()
        .credentials(ACCESS_KEY, SECRET_KEY)
        .retry_budget(budget)
        .build()
        .unwrap();
    let k = key("catalog.json");
    let started = std::time::Instant::now();
    let errors = [
        store.head(&k).await.unwrap_err(),
        store.get_range(&k, ByteRange::All).await.unwrap_err(),
        store.put_bytes(&k, Bytes::from_static(b"x")).await.unwrap_err(),
    ];
    let elapsed = started.elapsed();
    for err in &errors {
        assert!(matches!(err, ArtifactError::TimedOut { .. }), "{err:?}");
        assert!(err.to_string().contains("catalog.json"), "the error names the artifact: {err}");
        assert!(!err.is_transient(), "the budget included the retries: {err:?}");
    }
    assert!(elapsed < budget * 3 + Duration::from_secs(3), "three requests took {elapsed:?}");
    let err = store.list("runtimes").await.unwrap_err();
    assert!(matches!(err, ArtifactError::TimedOut { .. }) && err.to_string().contains("runtimes"), "{err}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_named_as_such() {
    let server = s3_server().await;
    let store = S3StoreBuilder::from_url(&format!("s3://no-such-bucket?endpoint={}&region=us-east-1", server.endpoint))
        .unwrap()
        .credentials(ACCESS_KEY, SECRET_KEY)
        .build()
        .unwrap();
    let k = key("catalog.json.minisig");
    for err in [
        store.head(&k).await.unwrap_err(),
        store.get_range(&k, ByteRange::All).await.unwrap_err(),
        store.list("").await.unwrap_err(),
        store.delete(&k).await.unwrap_err(),
    ] {
        assert!(matches!(&err, ArtifactError::NoSuchBucket { bucket, .. } if bucket == "no-such-bucket"), "{err:?}");
        assert!(err.to_string().contains("bucket \"no-such-bucket\" does not exist"), "{err}");
    }
    // A missing object in a bucket that exists is still just missing.
    assert!(s3_store(&server).head(&k).await.unwrap_err().is_not_found());

    // Loading the catalog from it says the bucket is missing, not that the signature is.
    let keypair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let trusted = TrustedKey::parse(&keypair.pk.to_box().unwrap().to_string()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let source = CatalogSource::new(Arc::new(store), key("catalog.json"), trusted, state.path());
    let err = source.load().await.unwrap_err();
    assert!(matches!(err, CatalogError::Store(ArtifactError::NoSuchBucket { .. })), "{err:?}");
    assert!(err.to_string().contains("does not exist") && !err.to_string().contains("signature"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Resumable downloads, over a store whose bodies break off.

/// Serves the inner store's objects, but the first `failures` bodies break off after `cut` bytes.
struct BreakingStore {
    inner: MemoryStore,
    cut: usize,
    failures: AtomicU32,
    gets: AtomicU32,
}

#[async_trait]
impl ArtifactStore for BreakingStore {
    fn describe(&self) -> String {
        "breaking://".into()
    }
    async fn head(&self, key: &ArtifactKey) -> Result<ObjectMeta, ArtifactError> {
        self.inner.head(key).await
    }
    async fn get_range(&self, key: &ArtifactKey, range: ByteRange) -> Result<GetResult, ArtifactError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let mut got = self.inner.get_range(key, range).await?;
        let breaks = self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if breaks {
            let mut left = self.cut;
            let head = got.stream.map(move |c| {
                let c = c.unwrap();
                let n = c.len().min(left);
                left -= n;
                c.slice(..n)
            });
            let error = ArtifactError::Unavailable {
                store: "breaking://".into(),
                key: "a/obj".into(),
                attempts: 1,
                message: "reset".into(),
            };
            got.stream = head
                .take_while(|c| futures::future::ready(!c.is_empty()))
                .map(Ok)
                .chain(stream::once(async { Err(error) }))
                .boxed();
        }
        Ok(got)
    }
    async fn put(&self, key: &ArtifactKey, body: ByteStream) -> Result<ObjectMeta, ArtifactError> {
        self.inner.put(key, body).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ArtifactError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &ArtifactKey) -> Result<(), ArtifactError> {
        self.inner.delete(key).await
    }
}

async fn breaking(data: &[u8], cut: usize, failures: u32) -> BreakingStore {
    let inner = MemoryStore::new();
    inner.put_bytes(&key("a/obj"), Bytes::copy_from_slice(data)).await.unwrap();
    BreakingStore { inner, cut, failures: AtomicU32::new(failures), gets: AtomicU32::new(0) }
}

async fn collect(
    mut s: futures::stream::BoxStream<'_, Result<Bytes, ArtifactError>>,
) -> Result<Vec<u8>, ArtifactError> {
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test(start_paused = true)]
async fn resumable_get_continues_where_the_body_broke_off() {
    let data = pattern(1_000_000, 5);
    // Every body breaks after 150 000 bytes, five times: progress each time, so it never gives up.
    let store = breaking(&data, 150_000, 5).await;
    let got = collect(store.get_resumable(&key("a/obj"))).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "resumed bytes differ");
    assert_eq!(store.gets.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn resumable_get_gives_up_after_failures_without_progress() {
    let data = pattern(100_000, 5);
    let store = breaking(&data, 0, 100).await;
    let started = tokio::time::Instant::now();
    let policy = RetryPolicy { attempts: 3, base_delay: Duration::from_millis(200) };
    let err = collect(store.get_resumable_with(&key("a/obj"), policy)).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(store.gets.load(Ordering::SeqCst), 3);
    // Backoff: 200 ms then 400 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(600));
}

#[tokio::test(start_paused = true)]
async fn resumable_get_does_not_retry_a_missing_object() {
    let store = breaking(b"x", 0, 0).await;
    let err = collect(store.get_resumable(&key("a/none"))).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(store.gets.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn resumable_get_refuses_an_object_replaced_mid_download() {
    let store = breaking(&pattern(200_000, 1), 100_000, 1).await;
    let k = key("a/obj");
    let mut s = store.get_resumable(&k);
    let mut got = 0;
    // Read until the break, replace the object, then read on.
    while got < 100_000 {
        got += s.next().await.unwrap().unwrap().len();
    }
    store.inner.put_bytes(&key("a/obj"), Bytes::from(pattern(300_000, 2))).await.unwrap();
    let err = collect(s).await.unwrap_err();
    assert!(err.to_string().contains("changed while it was being downloaded"), "{err}");
}
