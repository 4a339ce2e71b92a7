//! Safe tar extraction (placeholder; the real module lands from the extraction work).
use std::io::Read;
use std::path::Path;

use super::layout::ManifestEntry;
use crate::catalog::ArchiveFormat;

pub struct Limits {
    pub max_unpacked_bytes: u64,
    pub max_entries: u64,
}
pub struct Extracted {
    pub entries: Vec<ManifestEntry>,
    pub unpacked_bytes: u64,
}
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{0}")]
    Unsafe(String),
}
pub fn decoder<'a>(_format: ArchiveFormat, _reader: impl Read + 'a) -> Result<Box<dyn Read + 'a>, ExtractError> {
    unimplemented!()
}
pub fn extract_tar(_reader: impl Read, _dest: &Path, _limits: &Limits) -> Result<Extracted, ExtractError> {
    unimplemented!()
}
pub fn extract_file(_reader: impl Read, _dest: &Path, _file_name: &str, _limits: &Limits) -> Result<Extracted, ExtractError> {
    unimplemented!()
}
pub fn inspect(_format: ArchiveFormat, _reader: impl Read) -> Result<(u64, u64), ExtractError> {
    unimplemented!()
}
