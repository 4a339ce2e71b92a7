//! Safe extraction against hostile archives (built header by header) and a JDK-like tree.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tar::{EntryType, Header};
use zlh_core::catalog::ArchiveFormat;
use zlh_core::runtime::extract::{decoder, extract_file, extract_tar, inspect, ExtractError, Extracted, Limits};
use zlh_core::runtime::layout::ManifestEntry;
use zlh_core::Digest;

const LIMITS: Limits = Limits { max_unpacked_bytes: 1 << 30, max_entries: 10_000 };

/// A tar stream written header by header, so that names `tar::Builder` refuses can be used.
#[derive(Default, Clone)]
struct Raw(Vec<u8>);

fn header(name: &str, kind: EntryType, size: u64, mode: u32, link: &str) -> Header {
    let mut h = Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

impl Raw {
    fn entry(mut self, h: &Header, data: &[u8]) -> Self {
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }
    fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.entry(&header(name, EntryType::Regular, data.len() as u64, mode, ""), data)
    }
    fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(&header(name, EntryType::Directory, 0, mode, ""), b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(&header(name, EntryType::Symlink, 0, 0o777, target), b"")
    }
    fn hard_link(self, name: &str, target: &str) -> Self {
        self.entry(&header(name, EntryType::Link, 0, 0o644, target), b"")
    }
    fn special(self, name: &str, kind: EntryType) -> Self {
        self.entry(&header(name, kind, 0, 0o644, ""), b"")
    }
    /// Without the end-of-archive blocks.
    fn unterminated(self) -> Vec<u8> {
        self.0
    }
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
}

/// `tmp/dest` (fresh) plus `tmp/victim/keep`, a directory hostile archives aim at.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("dest")).unwrap();
        fs::create_dir(tmp.path().join("victim")).unwrap();
        fs::write(tmp.path().join("victim/keep"), b"original").unwrap();
        Self { tmp }
    }
    fn dest(&self) -> PathBuf {
        self.tmp.path().join("dest")
    }
    fn victim(&self) -> PathBuf {
        self.tmp.path().join("victim")
    }
    fn extract(&self, archive: &[u8], limits: &Limits) -> Result<Extracted, ExtractError> {
        extract_tar(archive, &self.dest(), limits)
    }
    /// Nothing appeared next to `dest` and the victim is untouched.
    fn assert_contained(&self) {
        let names: BTreeSet<String> =
            fs::read_dir(self.tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, BTreeSet::from(["dest".to_owned(), "victim".to_owned()]));
        let victim: Vec<_> = fs::read_dir(self.victim()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(victim, vec![std::ffi::OsString::from("keep")]);
        assert_eq!(fs::read(self.victim().join("keep")).unwrap(), b"original");
    }
}

/// Extracts `archive` and returns the error, after checking that nothing escaped.
fn refuse(archive: Vec<u8>, limits: &Limits) -> ExtractError {
    let env = Env::new();
    let err = env.extract(&archive, limits).expect_err("archive must be refused");
    env.assert_contained();
    err
}

macro_rules! assert_variant {
    ($err:expr, $pat:pat $(if $guard:expr)?) => {{
        let err = $err;
        assert!(matches!(err, $pat $(if $guard)?), "unexpected error: {err:?}");
    }};
}

#[test]
fn refuses_dotdot_traversal() {
    assert_variant!(
        refuse(Raw::default().file("../victim/pwned", 0o644, b"x").finish(), &LIMITS),
        ExtractError::ParentComponent { .. }
    );
    assert_variant!(
        refuse(Raw::default().file("a/../../pwned", 0o644, b"x").finish(), &LIMITS),
        ExtractError::ParentComponent { .. }
    );
}

#[test]
fn refuses_absolute_path() {
    let env = Env::new();
    let target = format!("{}/pwned", env.victim().display());
    let err = env.extract(&Raw::default().file(&target, 0o644, b"x").finish(), &LIMITS).unwrap_err();
    assert_variant!(err, ExtractError::AbsolutePath { .. });
    env.assert_contained();
}

#[test]
fn refuses_absolute_symlink_then_write_through_it() {
    let env = Env::new();
    let victim = env.victim().display().to_string();
    let archive = Raw::default().symlink("l", &victim).file("l/pwned", 0o644, b"x").finish();
    assert_variant!(env.extract(&archive, &LIMITS).unwrap_err(), ExtractError::AbsoluteSymlink { .. });
    env.assert_contained();
}

#[test]
fn refuses_write_through_relative_symlink() {
    let archive = Raw::default().symlink("l", "../victim").file("l/pwned", 0o644, b"x").finish();
    let err = refuse(archive, &LIMITS);
    assert_variant!(err, ExtractError::ThroughSymlink { ref parent, .. } if parent == "l");
}

#[test]
fn refuses_symlink_climbing_out() {
    let err = refuse(Raw::default().dir("a/", 0o755).symlink("a/etc", "../../etc").finish(), &LIMITS);
    assert_variant!(err, ExtractError::SymlinkEscapes { ref path, .. } if path == "a/etc");
}

#[test]
fn refuses_chained_symlink_escape() {
    // `u` alone stays inside (it is the destination itself); `t` is lexically inside too, but
    // following `u` it climbs out.
    let archive = Raw::default().dir("a/", 0o755).dir("a/b/", 0o755).symlink("a/b/u", "../..");
    let env = Env::new();
    env.extract(&archive.clone().finish(), &LIMITS).expect("u alone resolves to the destination");
    let err = refuse(archive.symlink("t", "a/b/u/../..").finish(), &LIMITS);
    assert_variant!(err, ExtractError::SymlinkEscapes { ref path, .. } if path == "t");
}

#[test]
fn refuses_symlink_loop() {
    let err = refuse(Raw::default().symlink("a", "b").symlink("b", "a").finish(), &LIMITS);
    assert_variant!(err, ExtractError::SymlinkLoop { .. });
}

#[test]
fn refuses_symlink_replaced_by_file() {
    let archive = Raw::default().symlink("x", "../victim/keep").file("x", 0o644, b"pwned").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::Duplicate { ref path } if path == "x");
    let archive = Raw::default().symlink("x", "y").file("./x", 0o644, b"pwned").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::Duplicate { .. });
}

#[test]
fn refuses_file_replaced_by_symlink() {
    let archive = Raw::default().file("x", 0o644, b"ok").symlink("x", "../victim/keep").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::Duplicate { ref path } if path == "x");
}

#[test]
fn refuses_write_through_file() {
    let archive = Raw::default().file("x", 0o644, b"ok").file("x/y", 0o644, b"no").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::NotADirectory { .. });
}

#[test]
fn refuses_bad_hard_links() {
    let outside = Raw::default().hard_link("passwd", "/etc/passwd").finish();
    assert_variant!(refuse(outside, &LIMITS), ExtractError::HardLinkOutside { .. });
    let climbing = Raw::default().hard_link("keep", "../victim/keep").finish();
    assert_variant!(refuse(climbing, &LIMITS), ExtractError::HardLinkOutside { .. });
    let missing = Raw::default().hard_link("x", "missing").finish();
    assert_variant!(refuse(missing, &LIMITS), ExtractError::HardLinkTarget { .. });
    let to_symlink = Raw::default().symlink("s", "t").hard_link("x", "s").finish();
    assert_variant!(refuse(to_symlink, &LIMITS), ExtractError::HardLinkTarget { .. });
    let to_dir = Raw::default().dir("d/", 0o755).hard_link("x", "d").finish();
    assert_variant!(refuse(to_dir, &LIMITS), ExtractError::HardLinkTarget { .. });
    let later = Raw::default().hard_link("x", "f").file("f", 0o644, b"f").finish();
    assert_variant!(refuse(later, &LIMITS), ExtractError::HardLinkTarget { .. });
}

#[test]
fn refuses_special_files() {
    let char_dev = Raw::default().special("null", EntryType::Char).finish();
    assert_variant!(refuse(char_dev, &LIMITS), ExtractError::DeviceNode { .. });
    let block_dev = Raw::default().special("sda", EntryType::Block).finish();
    assert_variant!(refuse(block_dev, &LIMITS), ExtractError::DeviceNode { .. });
    let fifo = Raw::default().special("pipe", EntryType::Fifo).finish();
    assert_variant!(refuse(fifo, &LIMITS), ExtractError::Fifo { .. });
    let unknown = Raw::default().special("what", EntryType::new(b'Z')).finish();
    assert_variant!(refuse(unknown, &LIMITS), ExtractError::UnsupportedType { kind: 'Z', .. });
}

#[test]
fn refuses_setuid_and_setgid() {
    let setuid = Raw::default().file("bin/su", 0o4755, b"x").finish();
    assert_variant!(refuse(setuid, &LIMITS), ExtractError::SetId { mode: 0o4755, .. });
    let setgid = Raw::default().dir("shared/", 0o2755).finish();
    assert_variant!(refuse(setgid, &LIMITS), ExtractError::SetId { mode: 0o2755, .. });
}

#[test]
fn refuses_declared_size_over_limit() {
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 100 };
    let env = Env::new();
    let err = env.extract(&Raw::default().file("big", 0o644, &[7; 2000]).finish(), &limits).unwrap_err();
    assert_variant!(err, ExtractError::TooLarge { limit: 1000, .. });
    assert!(!env.dest().join("big").exists(), "nothing is written for an entry over the limit");
    env.assert_contained();
}

#[test]
fn refuses_total_bytes_over_limit() {
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 100 };
    let mut archive = Raw::default();
    for i in 0..10 {
        archive = archive.file(&format!("f{i}"), 0o644, &[1; 200]);
    }
    assert_variant!(refuse(archive.finish(), &limits), ExtractError::TooLarge { ref path, .. } if path == "f5");
}

#[test]
fn refuses_more_entries_than_limit() {
    let limits = Limits { max_unpacked_bytes: 1 << 20, max_entries: 3 };
    let mut archive = Raw::default();
    for i in 0..5 {
        archive = archive.file(&format!("f{i}"), 0o644, b"x");
    }
    assert_variant!(refuse(archive.finish(), &limits), ExtractError::TooManyEntries { limit: 3, .. });
    // Implied directories are filesystem objects too.
    let implied = Raw::default().file("a/b/c/d", 0o644, b"x").finish();
    assert_variant!(refuse(implied, &limits), ExtractError::TooManyEntries { .. });
}

#[test]
fn refuses_overlong_stream() {
    // A global pax header is not an entry, but its bytes still count against the stream cap.
    let limits = Limits { max_unpacked_bytes: 0, max_entries: 1 };
    let big = vec![b'a'; (limits.max_stream_bytes() + 4096) as usize];
    let archive = Raw::default().entry(&header("pax", EntryType::XGlobalHeader, big.len() as u64, 0o644, ""), &big);
    assert_variant!(refuse(archive.finish(), &limits), ExtractError::StreamTooLarge { .. });
}

#[test]
fn refuses_truncated_stream() {
    let archive = Raw::default().file("a", 0o644, b"a").file("big", 0o644, &[9; 100_000]).finish();
    let cut = archive[..512 * 3 + 50_000].to_vec();
    assert_variant!(refuse(cut, &LIMITS), ExtractError::Truncated { ref path } if path == "big");
    // Cut inside a header.
    let cut = archive[..512 + 512 + 100].to_vec();
    assert_variant!(refuse(cut, &LIMITS), ExtractError::Truncated { .. });
    // Cut exactly at an entry boundary: the end-of-archive blocks are missing.
    let unterminated = Raw::default().file("a", 0o644, b"a").unterminated();
    assert_variant!(refuse(unterminated, &LIMITS), ExtractError::Truncated { .. });
    assert_variant!(refuse(Vec::new(), &LIMITS), ExtractError::Truncated { .. });
}

#[test]
fn refuses_truncated_zstd_stream() {
    let archive = Raw::default().file("big", 0o644, &pseudo_random(300_000)).finish();
    let compressed = zstd::encode_all(&archive[..], 3).unwrap();
    let cut = &compressed[..compressed.len() / 2];
    let env = Env::new();
    let err = extract_tar(decoder(ArchiveFormat::TarZst, cut).unwrap(), &env.dest(), &LIMITS).unwrap_err();
    assert_variant!(err, ExtractError::Truncated { .. });
    env.assert_contained();
    // Cut after the tar end but before the zstd frame end.
    let cut = &compressed[..compressed.len() - 2];
    let env = Env::new();
    let err = extract_tar(decoder(ArchiveFormat::TarZst, cut).unwrap(), &env.dest(), &LIMITS).unwrap_err();
    assert_variant!(err, ExtractError::Truncated { .. });
}

#[test]
fn refuses_truncated_gzip_stream() {
    let archive = Raw::default().file("big", 0o644, &pseudo_random(300_000)).finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&archive).unwrap();
    let gz = gz.finish().unwrap();
    for cut in [gz.len() / 2, gz.len() - 4] {
        let env = Env::new();
        let err = extract_tar(decoder(ArchiveFormat::TarGz, &gz[..cut]).unwrap(), &env.dest(), &LIMITS).unwrap_err();
        assert_variant!(err, ExtractError::Truncated { .. });
        env.assert_contained();
    }
}

#[test]
fn refuses_reserved_manifest_name() {
    let top = Raw::default().file(".zlh-manifest.json", 0o644, b"{}").finish();
    assert_variant!(refuse(top, &LIMITS), ExtractError::ReservedName { .. });
    let dotted = Raw::default().symlink("./.zlh-manifest.json", "x").finish();
    assert_variant!(refuse(dotted, &LIMITS), ExtractError::ReservedName { .. });
    let as_dir = Raw::default().file(".zlh-manifest.json/x", 0o644, b"{}").finish();
    assert_variant!(refuse(as_dir, &LIMITS), ExtractError::ReservedName { .. });
    // Only the top level is reserved.
    let env = Env::new();
    env.extract(&Raw::default().file("sub/.zlh-manifest.json", 0o644, b"{}").finish(), &LIMITS).unwrap();
}

#[test]
fn refuses_bad_names() {
    assert_variant!(refuse(Raw::default().file("./", 0o644, b"").finish(), &LIMITS), ExtractError::EmptyPath { .. });
    let long = "a/".repeat(2100) + "f";
    let mut h = header("x", EntryType::Regular, 0, 0o644, "");
    h.set_cksum();
    // A GNU long-name entry carries the over-long path.
    let mut long_name = header("././@LongLink", EntryType::GNULongName, long.len() as u64 + 1, 0o644, "");
    long_name.set_cksum();
    let archive = Raw::default().entry(&long_name, format!("{long}\0").as_bytes()).entry(&h, b"").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::PathTooLong { .. });
    let component = "c".repeat(256);
    let mut long_name = header("././@LongLink", EntryType::GNULongName, component.len() as u64, 0o644, "");
    long_name.set_cksum();
    let archive = Raw::default().entry(&long_name, component.as_bytes()).entry(&h, b"").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::PathTooLong { .. });
    let archive = Raw::default().symlink("l", "").finish();
    assert_variant!(refuse(archive, &LIMITS), ExtractError::EmptyLinkTarget { .. });
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A JDK-like tree: nested dirs, an executable, a relative symlink into `lib`, a hard link, an
/// implied directory, a read-only directory and a large file.
fn jdk() -> (Vec<u8>, Vec<u8>) {
    let java = b"#!/bin/sh\necho java\n".to_vec();
    let big = pseudo_random(1_000_000);
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        b.append_data(&mut h, path, &b""[..]).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        let mut h = Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let link = |b: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &str, target: &str| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, path, target).unwrap();
    };
    dir(&mut b, "./", 0o755);
    dir(&mut b, "jdk/", 0o755);
    dir(&mut b, "jdk/bin/", 0o755);
    dir(&mut b, "jdk/lib/", 0o755);
    dir(&mut b, "jdk/lib/jvm/", 0o755);
    file(&mut b, "jdk/lib/jvm/java", 0o755, &java);
    link(&mut b, EntryType::Symlink, "jdk/bin/java", "../lib/jvm/java");
    file(&mut b, "jdk/lib/modules", 0o644, &big);
    link(&mut b, EntryType::Link, "jdk/lib/modules.link", "jdk/lib/modules");
    file(&mut b, "jdk/conf/security/java.security", 0o640, b"policy");
    dir(&mut b, "jdk/legal/", 0o555);
    file(&mut b, "jdk/legal/LICENSE", 0o444, b"GPL");
    link(&mut b, EntryType::Symlink, "jdk/dangling", "lib/not-there");
    (b.into_inner().unwrap(), big)
}

fn expected_jdk_manifest(big: &[u8]) -> Vec<ManifestEntry> {
    let java = b"#!/bin/sh\necho java\n";
    let dir = |p: &str, mode| ManifestEntry::Dir { path: p.into(), mode };
    let file = |p: &str, data: &[u8], mode| ManifestEntry::File {
        path: p.into(),
        size: data.len() as u64,
        sha256: Digest::of(data),
        mode,
    };
    let link = |p: &str, t: &str| ManifestEntry::Symlink { path: p.into(), target: t.into() };
    vec![
        dir("jdk", 0o755),
        dir("jdk/bin", 0o755),
        dir("jdk/lib", 0o755),
        dir("jdk/lib/jvm", 0o755),
        file("jdk/lib/jvm/java", java, 0o755),
        link("jdk/bin/java", "../lib/jvm/java"),
        file("jdk/lib/modules", big, 0o644),
        file("jdk/lib/modules.link", big, 0o644),
        dir("jdk/conf", 0o755),
        dir("jdk/conf/security", 0o755),
        file("jdk/conf/security/java.security", b"policy", 0o640),
        dir("jdk/legal", 0o755),
        file("jdk/legal/LICENSE", b"GPL", 0o444),
        link("jdk/dangling", "lib/not-there"),
    ]
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn check_jdk(dest: &Path, extracted: &Extracted, big: &[u8]) {
    assert_eq!(extracted.entries, expected_jdk_manifest(big));
    assert_eq!(extracted.unpacked_bytes, (20 + big.len() + 6 + 3) as u64);
    assert_eq!(fs::read(dest.join("jdk/bin/java")).unwrap(), b"#!/bin/sh\necho java\n");
    assert_eq!(fs::read_link(dest.join("jdk/bin/java")).unwrap(), Path::new("../lib/jvm/java"));
    assert_eq!(mode(&dest.join("jdk/lib/jvm/java")), 0o755);
    assert_eq!(mode(&dest.join("jdk/lib/modules")), 0o644);
    assert_eq!(mode(&dest.join("jdk/conf/security/java.security")), 0o640);
    assert_eq!(mode(&dest.join("jdk/legal")), 0o755, "directories keep owner rwx");
    assert_eq!(mode(&dest.join("jdk/legal/LICENSE")), 0o444);
    assert_eq!(fs::read(dest.join("jdk/lib/modules")).unwrap(), big);
    let ino = |p: &str| fs::metadata(dest.join(p)).unwrap().ino();
    assert_eq!(ino("jdk/lib/modules"), ino("jdk/lib/modules.link"), "hard link shares the inode");
    let top: Vec<_> = fs::read_dir(dest).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, vec![std::ffi::OsString::from("jdk")]);
}

#[test]
fn extracts_jdk_like_tree() {
    let (archive, big) = jdk();
    let env = Env::new();
    let extracted = env.extract(&archive, &LIMITS).unwrap();
    check_jdk(&env.dest(), &extracted, &big);
    env.assert_contained();
}

#[test]
fn extracts_at_exact_limits() {
    let (archive, big) = jdk();
    let expected = expected_jdk_manifest(&big);
    let limits = Limits { max_unpacked_bytes: (29 + big.len()) as u64, max_entries: expected.len() as u64 };
    let env = Env::new();
    env.extract(&archive, &limits).unwrap();
    let env = Env::new();
    let one_less = Limits { max_entries: limits.max_entries - 1, ..limits };
    assert_variant!(env.extract(&archive, &one_less).unwrap_err(), ExtractError::TooManyEntries { .. });
    let env = Env::new();
    let byte_less = Limits { max_unpacked_bytes: limits.max_unpacked_bytes - 1, ..limits };
    assert_variant!(env.extract(&archive, &byte_less).unwrap_err(), ExtractError::TooLarge { .. });
}

#[test]
fn extracts_zstd_and_gzip_through_decoder() {
    let (archive, big) = jdk();
    let zst = zstd::encode_all(&archive[..], 3).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&archive).unwrap();
    let gz = gz.finish().unwrap();
    for (format, data) in [(ArchiveFormat::TarZst, zst), (ArchiveFormat::TarGz, gz)] {
        let env = Env::new();
        let extracted = extract_tar(decoder(format, &data[..]).unwrap(), &env.dest(), &LIMITS).unwrap();
        check_jdk(&env.dest(), &extracted, &big);
        let (bytes, entries) = inspect(format, &data[..]).unwrap();
        assert_eq!(bytes, extracted.unpacked_bytes, "{format:?}");
        assert_eq!(entries, extracted.entries.len() as u64, "{format:?}");
        env.assert_contained();
    }
}

#[test]
fn inspect_applies_the_same_checks() {
    let archive =
        Raw::default().dir("a/", 0o755).dir("a/b/", 0o755).symlink("a/b/u", "../..").symlink("t", "a/b/u/../..");
    assert_variant!(
        inspect(ArchiveFormat::TarZst, &zstd::encode_all(&archive.finish()[..], 1).unwrap()[..]).unwrap_err(),
        ExtractError::SymlinkEscapes { .. }
    );
    assert_eq!(inspect(ArchiveFormat::File, &b"12345"[..]).unwrap(), (5, 1));
}

#[test]
fn extracts_single_file() {
    let env = Env::new();
    let data = pseudo_random(700_000);
    let extracted = extract_file(&data[..], &env.dest(), "server.jar", &LIMITS).unwrap();
    assert_eq!(
        extracted.entries,
        vec![ManifestEntry::File { path: "server.jar".into(), size: 700_000, sha256: Digest::of(&data), mode: 0o644 }]
    );
    assert_eq!(extracted.unpacked_bytes, 700_000);
    assert_eq!(fs::read(env.dest().join("server.jar")).unwrap(), data);
    assert_eq!(mode(&env.dest().join("server.jar")), 0o644);

    let small = Limits { max_unpacked_bytes: 699_999, max_entries: 1 };
    let env = Env::new();
    assert_variant!(
        extract_file(&data[..], &env.dest(), "server.jar", &small).unwrap_err(),
        ExtractError::TooLarge { .. }
    );
    for bad in ["../server.jar", "/tmp/server.jar", "a/b.jar", "", ".zlh-manifest.json"] {
        let env = Env::new();
        assert!(extract_file(&data[..], &env.dest(), bad, &LIMITS).is_err(), "{bad:?}");
        env.assert_contained();
    }
}

/// Runs an arbitrary stream through extraction: it may fail, but never panics or escapes.
fn extract_anything(data: &[u8]) {
    let env = Env::new();
    let _ = env.extract(data, &Limits { max_unpacked_bytes: 4 << 20, max_entries: 1000 });
    env.assert_contained();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_escape(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        extract_anything(&data);
    }

    #[test]
    fn mutated_archives_never_escape(
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let env = Env::new();
        let victim = env.victim().display().to_string();
        let mut archive = Raw::default()
            .dir("d/", 0o755)
            .file("d/f", 0o755, b"hello")
            .symlink("d/up", "..")
            .symlink("abs", &victim)
            .symlink("rel", "../victim")
            .hard_link("d/h", "d/f")
            .file("d/up/g", 0o644, b"world")
            .finish();
        // Mutations aim mostly at headers, where the interesting bytes are.
        for (at, byte) in mutations {
            let i = at.index(archive.len());
            archive[i] = byte;
        }
        if truncate {
            archive.truncate(cut.index(archive.len()));
        }
        extract_anything(&archive);
    }
}
