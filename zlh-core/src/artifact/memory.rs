//! `memory://`: a store in process memory, for tests and the simulator.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{stream, StreamExt};

use super::{ArtifactError, ArtifactStore, ByteRange, ByteStream, GetResult, ObjectMeta};
use crate::types::ArtifactKey;

/// Objects kept in a map; `put` collects the whole body before inserting, so it is atomic.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<ArtifactKey, (Bytes, chrono::DateTime<chrono::Utc>)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn meta(key: &ArtifactKey, data: &Bytes, at: chrono::DateTime<chrono::Utc>) -> ObjectMeta {
        ObjectMeta { key: key.clone(), size: data.len() as u64, last_modified: Some(at), etag: None }
    }

    fn not_found(key: &ArtifactKey) -> ArtifactError {
        ArtifactError::NotFound { store: "memory://".into(), key: key.to_string() }
    }
}

/// Chunk size of served streams, so consumers see more than one chunk as with real stores.
const CHUNK: usize = 64 * 1024;

#[async_trait]
impl ArtifactStore for MemoryStore {
    fn describe(&self) -> String {
        "memory://".into()
    }

    async fn head(&self, key: &ArtifactKey) -> Result<ObjectMeta, ArtifactError> {
        let objects = self.objects.lock().unwrap();
        let (data, at) = objects.get(key).ok_or_else(|| Self::not_found(key))?;
        Ok(Self::meta(key, data, *at))
    }

    async fn get_range(&self, key: &ArtifactKey, range: ByteRange) -> Result<GetResult, ArtifactError> {
        let (data, at) = self.objects.lock().unwrap().get(key).cloned().ok_or_else(|| Self::not_found(key))?;
        let size = data.len() as u64;
        let r = range.resolve(size).ok_or_else(|| ArtifactError::invalid_range(key, range, size))?;
        let body = data.slice(r.start as usize..r.end as usize);
        let chunks: Vec<Result<Bytes, ArtifactError>> =
            (0..body.len()).step_by(CHUNK).map(|i| Ok(body.slice(i..(i + CHUNK).min(body.len())))).collect();
        Ok(GetResult { meta: Self::meta(key, &data, at), range: r, stream: stream::iter(chunks).boxed() })
    }

    async fn put(&self, key: &ArtifactKey, mut body: ByteStream) -> Result<ObjectMeta, ArtifactError> {
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
        }
        let data = buf.freeze();
        let at = chrono::Utc::now();
        let meta = Self::meta(key, &data, at);
        self.objects.lock().unwrap().insert(key.clone(), (data, at));
        Ok(meta)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ArtifactError> {
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, (data, at))| Self::meta(k, data, *at))
            .collect())
    }

    async fn delete(&self, key: &ArtifactKey) -> Result<(), ArtifactError> {
        self.objects.lock().unwrap().remove(key).map(|_| ()).ok_or_else(|| Self::not_found(key))
    }
}
