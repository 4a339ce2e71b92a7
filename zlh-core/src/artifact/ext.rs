//! Conveniences over [`ArtifactStore`], written once for every backend.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{stream, StreamExt};

use super::{ArtifactError, ArtifactStore, ByteRange, ByteStream, ObjectMeta};
use crate::types::ArtifactKey;

#[async_trait]
pub trait ArtifactStoreExt: ArtifactStore {
    /// The whole object as a stream.
    async fn get(&self, key: &ArtifactKey) -> Result<ByteStream, ArtifactError> {
        Ok(self.get_range(key, ByteRange::All).await?.stream)
    }

    /// The whole object in memory; refuses objects larger than `max_bytes` (catalogs, signatures).
    async fn get_bytes(&self, key: &ArtifactKey, max_bytes: u64) -> Result<Bytes, ArtifactError> {
        let got = self.get_range(key, ByteRange::All).await?;
        if got.meta.size > max_bytes {
            return Err(ArtifactError::Backend {
                store: self.describe(),
                message: format!("{key} is {} bytes, more than the {max_bytes} allowed", got.meta.size),
            });
        }
        let mut buf = BytesMut::with_capacity(got.meta.size as usize);
        let mut s = got.stream;
        while let Some(chunk) = s.next().await {
            buf.extend_from_slice(&chunk?);
            if buf.len() as u64 > max_bytes {
                return Err(ArtifactError::Backend {
                    store: self.describe(),
                    message: format!("{key} is larger than the {max_bytes} bytes allowed"),
                });
            }
        }
        Ok(buf.freeze())
    }

    /// Stores a buffer.
    async fn put_bytes(&self, key: &ArtifactKey, data: Bytes) -> Result<ObjectMeta, ArtifactError> {
        self.put(key, stream::once(async move { Ok(data) }).boxed()).await
    }
}

impl<T: ArtifactStore + ?Sized> ArtifactStoreExt for T {}
