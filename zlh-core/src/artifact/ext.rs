//! Conveniences over [`ArtifactStore`], written once for every backend.

use std::path::Path;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{stream, StreamExt, TryStreamExt};
use tokio_util::io::ReaderStream;

use super::{ArtifactError, ArtifactStore, ByteRange, ByteStream, ObjectMeta, RetryPolicy};
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

    /// Stores a local file, streamed (large files are never held in memory).
    async fn put_file(&self, key: &ArtifactKey, path: &Path) -> Result<ObjectMeta, ArtifactError> {
        let io = |source| ArtifactError::Io { store: format!("file {}", path.display()), key: key.to_string(), source };
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        let (store, key_s) = (format!("file {}", path.display()), key.to_string());
        let body = ReaderStream::with_capacity(file, 256 * 1024)
            .map_err(move |source| ArtifactError::Io { store: store.clone(), key: key_s.clone(), source })
            .boxed();
        self.put(key, body).await
    }

    /// The whole object as a stream that survives interruptions: when the body fails with a
    /// transient error (or ends early), the rest is asked for again with [`ByteRange::From`] and
    /// the stream goes on where it stopped, with the default [`RetryPolicy`].
    fn get_resumable<'a>(&'a self, key: &'a ArtifactKey) -> BoxStream<'a, Result<Bytes, ArtifactError>> {
        self.get_resumable_with(key, RetryPolicy::default())
    }

    /// [`Self::get_resumable`] with an explicit policy: up to `retry.attempts` tries in a row
    /// without progress; every byte received resets the count. Refuses to stitch together two
    /// versions of an object (the ETag changed or the size did).
    fn get_resumable_with<'a>(
        &'a self,
        key: &'a ArtifactKey,
        retry: RetryPolicy,
    ) -> BoxStream<'a, Result<Bytes, ArtifactError>> {
        let state = Resume { offset: 0, first: None, body: None, failures: 0, done: false };
        stream::unfold(state, move |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                // Open (or reopen) the body at the current offset.
                if st.body.is_none() {
                    let range = if st.first.is_none() { ByteRange::All } else { ByteRange::From(st.offset) };
                    match self.get_range(key, range).await {
                        Ok(got) => {
                            if let Some(first) = &st.first {
                                if let Err(e) = same_object(&self.describe(), first, &got.meta, got.range.start, st.offset) {
                                    st.done = true;
                                    return Some((Err(e), st));
                                }
                            }
                            st.first.get_or_insert(got.meta);
                            st.body = Some(got.stream);
                        }
                        Err(e) => match st.retry_after(e, &retry) {
                            Ok(wait) => {
                                tokio::time::sleep(wait).await;
                                continue;
                            }
                            Err(e) => return Some((Err(e), st)),
                        },
                    }
                }
                let size = st.first.as_ref().map_or(0, |m| m.size);
                let next = st.body.as_mut().expect("opened above").next().await;
                let failure = match next {
                    Some(Ok(chunk)) => {
                        st.offset += chunk.len() as u64;
                        st.failures = 0;
                        return Some((Ok(chunk), st));
                    }
                    None if st.offset >= size => return None,
                    None => ArtifactError::Unavailable {
                        store: self.describe(),
                        key: key.to_string(),
                        attempts: 1,
                        message: format!("body ended at byte {} of {size}", st.offset),
                    },
                    Some(Err(e)) => e,
                };
                st.body = None;
                match st.retry_after(failure, &retry) {
                    Ok(wait) => {
                        tracing::warn!(store = %self.describe(), %key, offset = st.offset, "download interrupted, resuming");
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => return Some((Err(e), st)),
                }
            }
        })
        .boxed()
    }
}

/// State of a resumable download.
struct Resume {
    offset: u64,
    /// Metadata from the first answer: later answers must be of the same object.
    first: Option<ObjectMeta>,
    body: Option<ByteStream>,
    /// Failures in a row without a byte of progress.
    failures: u32,
    done: bool,
}

impl Resume {
    /// How long to wait before trying again after `e`, or the error to end the stream with.
    fn retry_after(&mut self, e: ArtifactError, retry: &RetryPolicy) -> Result<std::time::Duration, ArtifactError> {
        self.failures += 1;
        if e.is_transient() && self.failures < retry.attempts {
            Ok(retry.delay(self.failures))
        } else {
            self.done = true;
            Err(e)
        }
    }
}

fn same_object(
    store: &str,
    first: &ObjectMeta,
    now: &ObjectMeta,
    served_from: u64,
    offset: u64,
) -> Result<(), ArtifactError> {
    let changed = first.size != now.size || (first.etag.is_some() && now.etag.is_some() && first.etag != now.etag);
    if changed || served_from != offset {
        return Err(ArtifactError::Backend {
            store: store.to_owned(),
            message: format!("{} changed while it was being downloaded; start again", first.key),
        });
    }
    Ok(())
}

impl<T: ArtifactStore + ?Sized> ArtifactStoreExt for T {}
