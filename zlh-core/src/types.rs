//! Domain types shared by every module. Each one validates on construction, so a value of
//! these types is always safe to use as a path segment, key or identifier.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// Why a domain value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidValue {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn invalid(what: &'static str, value: &str, reason: &'static str) -> InvalidValue {
    // Bound what we echo back: hostile input may be huge.
    let value: String = value.chars().take(128).collect();
    InvalidValue { what, value, reason }
}

/// Implements Display, FromStr and string serde for a type with `parse` and `as_str`.
macro_rules! string_newtype {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A container id as the hypervisor numbers them (game 5000–5999, dev 6000–6999).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Vmid(pub u32);

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Vmid {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("vmid", s, "expected 1 to 9 decimal digits"));
        }
        s.parse().map(Vmid).map_err(|_| invalid("vmid", s, "out of range"))
    }
}

/// Id of a runtime, addon, game or variant: `java`, `code-server`, `paper`.
/// Lowercase ASCII letters, digits, `.`, `_`, `-`; starts with a letter or digit; ≤ 64 bytes.
/// It is used as a directory name, so these rules are what keep it one safe path segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuntimeId(String);

impl RuntimeId {
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        const WHAT: &str = "id";
        if s.is_empty() || s.len() > 64 {
            return Err(invalid(WHAT, s, "must be 1 to 64 characters"));
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(invalid(WHAT, s, "must start with a letter or digit"));
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
            return Err(invalid(WHAT, s, "allowed: a-z 0-9 . _ -"));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype!(RuntimeId);

/// A version such as `21.0.5`, `1.21.4`, `17.0.13+11` or `4.96.2`.
///
/// Ordering is by components (split on `.`, `-`, `+`, `_`): two numeric components compare as
/// numbers (so 1.9 < 1.21), two text components as text, a number ranks above text
/// (`1.0.rc1` < `1.0.1`), and a version that is a prefix of another ranks below it.
/// Equal ordering implies equal text, so `Ord` agrees with `Eq`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

#[derive(Debug, PartialEq, Eq)]
enum Component<'a> {
    Num(u64),
    Text(&'a str),
}

impl Version {
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        const WHAT: &str = "version";
        if s.is_empty() || s.len() > 64 {
            return Err(invalid(WHAT, s, "must be 1 to 64 characters"));
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(invalid(WHAT, s, "must start with a letter or digit"));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)) {
            return Err(invalid(WHAT, s, "allowed: letters, digits, . _ - +"));
        }
        if s.split(Self::is_separator).any(str::is_empty) {
            return Err(invalid(WHAT, s, "empty component"));
        }
        if s.split(Self::is_separator).any(|c| c.bytes().all(|b| b.is_ascii_digit()) && c.parse::<u64>().is_err()) {
            return Err(invalid(WHAT, s, "numeric component too large"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn is_separator(c: char) -> bool {
        matches!(c, '.' | '-' | '+' | '_')
    }

    fn components(&self) -> impl Iterator<Item = Component<'_>> {
        self.0.split(Self::is_separator).map(|c| match c.parse::<u64>() {
            Ok(n) if c.bytes().all(|b| b.is_ascii_digit()) => Component::Num(n),
            _ => Component::Text(c),
        })
    }

    /// True when `prefix` names this version or a family it belongs to, by whole components:
    /// `21` matches `21.0.5` but not `210.1`; `21.0` matches `21.0.5`.
    pub fn matches_prefix(&self, prefix: &str) -> bool {
        let mut mine = self.0.split(Self::is_separator);
        prefix.split(Self::is_separator).all(|p| mine.next() == Some(p))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let mut a = self.components();
        let mut b = other.components();
        loop {
            let ord = match (a.next(), b.next()) {
                (None, None) => return self.0.cmp(&other.0),
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some(Component::Num(x)), Some(Component::Num(y))) => x.cmp(&y),
                (Some(Component::Text(x)), Some(Component::Text(y))) => x.cmp(y),
                (Some(Component::Num(_)), Some(Component::Text(_))) => Ordering::Greater,
                (Some(Component::Text(_)), Some(Component::Num(_))) => Ordering::Less,
            };
            if ord != Ordering::Equal {
                return ord;
            }
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
string_newtype!(Version);

/// A SHA-256 digest, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("sha256 digest", s, "expected 64 hex characters"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| invalid("sha256 digest", s, "bad hex"))?;
        Ok(Self(out))
    }
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Digest of a whole buffer; streaming callers use `sha2::Sha256` and [`Digest::from_hasher`].
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }
    pub fn from_hasher(h: sha2::Sha256) -> Self {
        Self(h.finalize().into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}
impl FromStr for Digest {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}
impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Key of an object in an [`crate::artifact::ArtifactStore`], relative to the store's root:
/// `runtimes/java/21.0.5/java-21.0.5-linux-x64.tar.zst`.
///
/// Refused: empty, longer than 1024 bytes, leading or trailing `/`, empty segments, `.` or `..`
/// segments, backslashes, control characters. A key therefore never leaves the store's root when
/// joined onto a directory or URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactKey(String);

impl ArtifactKey {
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        const WHAT: &str = "artifact key";
        if s.is_empty() || s.len() > 1024 {
            return Err(invalid(WHAT, s, "must be 1 to 1024 bytes"));
        }
        if s.chars().any(|c| c.is_control() || c == '\\') {
            return Err(invalid(WHAT, s, "control characters and backslashes are not allowed"));
        }
        for segment in s.split('/') {
            match segment {
                "" => return Err(invalid(WHAT, s, "empty segment (leading, trailing or double '/')")),
                "." | ".." => return Err(invalid(WHAT, s, "'.' and '..' segments are not allowed")),
                _ => {}
            }
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The last segment: the file name.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
    /// This key with a suffix appended to its last segment (`catalog.json` → `catalog.json.minisig`).
    pub fn with_suffix(&self, suffix: &str) -> Result<Self, InvalidValue> {
        Self::parse(&format!("{}{}", self.0, suffix))
    }
    /// True when the key lies under `prefix` (by whole segments, or the prefix ends in `/`).
    pub fn starts_with(&self, prefix: &str) -> bool {
        prefix.is_empty()
            || self.0 == prefix
            || (self.0.starts_with(prefix) && (prefix.ends_with('/') || self.0[prefix.len()..].starts_with('/')))
    }
}
string_newtype!(ArtifactKey);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_order_numerically_not_as_strings() {
        assert!(v("1.9") < v("1.21"));
        assert!(v("1.21.4") > v("1.21"));
        assert!(v("21.0.5") > v("17.0.13"));
        assert!(v("2.0") > v("1.99"));
        assert!(v("10.0-rc1") > v("2.0"));
        assert!(v("1.0.rc1") < v("1.0.1"));
        let mut vs = [v("1.10"), v("1.2"), v("1.9.1"), v("1.21.4"), v("1.9")];
        vs.sort();
        let sorted: Vec<_> = vs.iter().map(Version::as_str).collect();
        assert_eq!(sorted, ["1.2", "1.9", "1.9.1", "1.10", "1.21.4"]);
    }

    #[test]
    fn version_prefix_matches_whole_components() {
        assert!(v("21.0.5").matches_prefix("21"));
        assert!(v("21.0.5").matches_prefix("21.0"));
        assert!(!v("210.1").matches_prefix("21"));
        assert!(!v("21.0.5").matches_prefix("21.0.5.1"));
    }

    #[test]
    fn bad_versions_and_ids_are_refused() {
        for bad in ["", "../1", "1..2", "1.2.", "a b", "1/2", "99999999999999999999999"] {
            assert!(Version::parse(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["", "Java", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(RuntimeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RuntimeId::parse("code-server").is_ok());
    }

    #[test]
    fn artifact_keys_cannot_escape() {
        for bad in ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "a\0b", "a\nb"] {
            assert!(ArtifactKey::parse(bad).is_err(), "{bad:?} accepted");
        }
        let k = ArtifactKey::parse("runtimes/java/21.0.5/java.tar.zst").unwrap();
        assert_eq!(k.file_name(), "java.tar.zst");
        assert!(k.starts_with("runtimes/java"));
        assert!(k.starts_with("runtimes/"));
        assert!(!k.starts_with("runtimes/ja"));
    }

    #[test]
    fn digest_round_trips_hex() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Digest::parse(&d.to_hex()).unwrap(), d);
        assert!(Digest::parse("zz").is_err());
        assert!(Digest::parse(&"g".repeat(64)).is_err());
    }

    proptest! {
        #[test]
        fn version_order_is_total_and_consistent(a in "[0-9a-z]{1,3}([.+-][0-9a-z]{1,3}){0,3}", b in "[0-9a-z]{1,3}([.+-][0-9a-z]{1,3}){0,3}") {
            let (a, b) = (v(&a), v(&b));
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
            prop_assert_eq!(a.cmp(&b) == Ordering::Equal, a == b);
        }

        #[test]
        fn accepted_keys_never_contain_dot_segments(s in "[a-z./]{0,12}") {
            if let Ok(k) = ArtifactKey::parse(&s) {
                prop_assert!(k.as_str().split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
            }
        }
    }
}
