//! Property tests on the two parsers an attacker reaches first: the `Host` parser that decides
//! whose IDE a request goes to, and the signed IDE tokens and session cookies that open it.
//!
//! Hosts are compared with an oracle written independently of the parser (a byte regex plus range
//! checks): any input, valid or a mutation of a valid host, is accepted exactly when the oracle
//! accepts it, and then names the oracle's vmid. Tokens: arbitrary input and every mutation of a
//! valid token or session never verify, for any purpose. Nothing may panic.

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use proptest::sample::Index;
use regex::bytes::{Regex, RegexBuilder};
use serde_json::Value;
use zlh_core::ide::host::{canonical_vmid, hosted_host, parse_host};
use zlh_core::ide::token::{IDE_PURPOSE, SESSION_PURPOSE};
use zlh_core::ide::{IdeConfig, LocalIdeRouter};
use zlh_core::token::{self, TokenKey};
use zlh_core::Vmid;

const CASES: u32 = 512;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

// ---------------------------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------------------------

/// The host grammar, independent of the parser: `dev-<vmid>.<domain>[:<port>]`, case-insensitive
/// in ASCII only (a byte regex without Unicode, so neither `ſ` nor the Kelvin sign folds into a
/// letter of `localhost`), the vmid `1..=u32::MAX` and the port `1..=65535`, both plain digits
/// without a leading zero. Port 0 names no listener: the parser refuses it, and so does this.
struct Oracle {
    re: Regex,
}

impl Oracle {
    fn new(domain: &str) -> Self {
        let pattern = format!(r"^dev-([1-9][0-9]{{0,9}})\.{}(?::([1-9][0-9]{{0,4}}))?$", regex::escape(domain));
        let re = RegexBuilder::new(&pattern).case_insensitive(true).unicode(false).build().expect("oracle regex");
        Self { re }
    }

    fn vmid(&self, host: &str) -> Option<Vmid> {
        let caps = self.re.captures(host.as_bytes())?;
        let vmid: u64 = std::str::from_utf8(&caps[1]).ok()?.parse().ok()?;
        if let Some(port) = caps.get(2) {
            let port: u32 = std::str::from_utf8(port.as_bytes()).ok()?.parse().ok()?;
            if port > u32::from(u16::MAX) {
                return None;
            }
        }
        u32::try_from(vmid).ok().map(Vmid)
    }
}

static LOCALHOST: LazyLock<Oracle> = LazyLock::new(|| Oracle::new("localhost"));
static EXAMPLE: LazyLock<Oracle> = LazyLock::new(|| Oracle::new("ide.example.com"));
/// A vmid alone, as in the legacy path `/__ide/<vmid>/`.
static VMID_DIGITS: LazyLock<Regex> =
    LazyLock::new(|| RegexBuilder::new("^[1-9][0-9]{0,9}$").unicode(false).build().expect("vmid regex"));

fn oracle(domain: &str) -> &'static Oracle {
    match domain {
        "localhost" => &LOCALHOST,
        "ide.example.com" => &EXAMPLE,
        other => panic!("no oracle for {other}"),
    }
}

/// The parser and the oracle agree on `host`.
fn agree(host: &str, domain: &str) -> Result<(), TestCaseError> {
    let parsed = parse_host(host, domain).ok();
    prop_assert_eq!(parsed, oracle(domain).vmid(host), "host {:?} under {}", host, domain);
    Ok(())
}

/// Characters that have broken host parsers elsewhere: separators, userinfo and IPv6 brackets,
/// percent-encoding, whitespace and controls, signs and digits, Unicode that folds or maps to
/// ASCII (`ſ`→s, Kelvin→k, dotless i, fullwidth and ideographic dots, non-ASCII digits), and
/// invisible characters.
fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::sample::select(vec![
            '%', '@', '[', ']', ' ', '\t', '\n', '\r', '\0', '.', ':', '-', '+', '_', '0', '1', '9', '/', '\\', '#',
            '?', '*', '~', ',', ';', '=', 'x', 'D', 'L', 'ſ', '\u{212a}', 'ı', 'İ', '\u{ff0e}', '\u{3002}', '\u{661}',
            '\u{ff11}', 'é', '\u{200b}', '\u{feff}', '\u{7f}',
        ]),
        1 => any::<char>(),
    ]
}

/// One edit of a host string.
#[derive(Debug, Clone)]
enum HostEdit {
    Insert(Index, char),
    Delete(Index),
    Replace(Index, char),
    FlipCase(Index),
    /// Percent-encodes one character (`.` → `%2e`).
    Percent(Index),
    Prefix(String),
    Suffix(String),
}

fn host_edit() -> impl Strategy<Value = HostEdit> {
    let label = prop_oneof![
        Just("a.".to_owned()),
        Just("dev-1.".to_owned()),
        Just("x@".to_owned()),
        Just("[::1]".to_owned()),
        Just(" ".to_owned()),
        "[a-z0-9.:@%-]{1,6}",
    ];
    let suffix = prop_oneof![
        Just(".".to_owned()),
        Just(".evil.com".to_owned()),
        Just(":".to_owned()),
        Just(":80".to_owned()),
        Just(":0".to_owned()),
        Just("%00".to_owned()),
        Just("/x".to_owned()),
        Just("#x".to_owned()),
        Just("\u{3002}".to_owned()),
        "[a-z0-9.:@%-]{1,6}",
    ];
    prop_oneof![
        3 => (any::<Index>(), tricky_char()).prop_map(|(i, c)| HostEdit::Insert(i, c)),
        2 => any::<Index>().prop_map(HostEdit::Delete),
        3 => (any::<Index>(), tricky_char()).prop_map(|(i, c)| HostEdit::Replace(i, c)),
        2 => any::<Index>().prop_map(HostEdit::FlipCase),
        1 => any::<Index>().prop_map(HostEdit::Percent),
        1 => label.prop_map(HostEdit::Prefix),
        1 => suffix.prop_map(HostEdit::Suffix),
    ]
}

fn apply_host_edit(host: &str, edit: &HostEdit) -> String {
    let mut chars: Vec<char> = host.chars().collect();
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    match edit {
        HostEdit::Insert(i, c) => {
            let pos = at(i, chars.len() + 1);
            chars.insert(pos, *c);
        }
        HostEdit::Delete(i) if !chars.is_empty() => {
            let pos = at(i, chars.len());
            chars.remove(pos);
        }
        HostEdit::Replace(i, c) if !chars.is_empty() => {
            let pos = at(i, chars.len());
            chars[pos] = *c;
        }
        HostEdit::FlipCase(i) if !chars.is_empty() => {
            let pos = at(i, chars.len());
            let c = chars[pos];
            chars[pos] = if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() };
        }
        HostEdit::Percent(i) if !chars.is_empty() => {
            let pos = at(i, chars.len());
            let mut buf = [0u8; 4];
            let encoded: String = chars[pos].encode_utf8(&mut buf).bytes().map(|b| format!("%{b:02x}")).collect();
            chars.splice(pos..=pos, encoded.chars());
        }
        HostEdit::Prefix(p) => return format!("{p}{}", chars.iter().collect::<String>()),
        HostEdit::Suffix(s) => return format!("{}{s}", chars.iter().collect::<String>()),
        _ => {}
    }
    chars.into_iter().collect()
}

/// A valid hosted name for `domain`, with or without a port, in random letter case.
fn valid_host(domain: &'static str) -> impl Strategy<Value = String> {
    (1u32.., prop::option::of(1u16..), any::<u64>()).prop_map(move |(vmid, port, case)| {
        let mut host = hosted_host(Vmid(vmid), domain);
        if let Some(p) = port {
            host.push_str(&format!(":{p}"));
        }
        host.chars()
            .enumerate()
            .map(|(i, c)| if case >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

fn domain() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["localhost", "ide.example.com"])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Positive control: every spelling the grammar allows is accepted, with its own vmid.
    #[test]
    fn every_valid_host_is_accepted_as_its_own_vmid(host in valid_host("localhost")) {
        prop_assert!(LOCALHOST.vmid(&host).is_some(), "the oracle accepts {host:?}");
        agree(&host, "localhost")?;
    }

    #[test]
    fn mutated_hosts_are_accepted_only_where_the_grammar_allows(
        (domain, host, edits) in domain().prop_flat_map(|d| {
            (Just(d), valid_host(d), prop::collection::vec(host_edit(), 1..4))
        })
    ) {
        let mut mutated = host;
        for edit in &edits {
            mutated = apply_host_edit(&mutated, edit);
        }
        agree(&mutated, domain)?;
    }

    /// Around the edges of the numbers: vmids past `u32::MAX`, ports past 65535, zero, leading
    /// zeros, signs.
    #[test]
    fn numbers_at_the_edges_follow_the_grammar(
        vmid in prop_oneof![
            Just(0u64), Just(1), Just(u64::from(u32::MAX)), Just(u64::from(u32::MAX) + 1),
            Just(9_999_999_999), Just(10_000_000_000), 0u64..=u64::from(u32::MAX) + 10,
        ],
        port in prop::option::of(prop_oneof![Just(0u32), Just(1), Just(65_535), Just(65_536), Just(99_999), 0u32..100_000]),
        vmid_prefix in prop::sample::select(vec!["", "0", "00", "+", "-", " "]),
        port_prefix in prop::sample::select(vec!["", "0", "+", "-", " "]),
    ) {
        let port = port.map(|p| format!(":{port_prefix}{p}")).unwrap_or_default();
        agree(&format!("dev-{vmid_prefix}{vmid}.localhost{port}"), "localhost")?;
    }

    /// Near misses built from the grammar's own pieces.
    #[test]
    fn near_miss_hosts_follow_the_grammar(
        host in "(dev|DEV|Dev|de|ev|dev_|xdev|dev-dev|dev[.])-[0-9+-]{0,12}([.]|[.][.]|:)?(localhost|LOCALHOST|localhost[.]|localhos|localhost[.]localhost|x[.]localhost|localhost[.]evil[.]com)(:[0-9+ -]{0,7})?"
    ) {
        agree(&host, "localhost")?;
    }

    #[test]
    fn arbitrary_text_never_panics_and_follows_the_grammar(
        host in prop_oneof![
            any::<String>(),
            "[ -~]{0,64}",
            prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ".{250,300}",
        ],
        domain in domain(),
    ) {
        agree(&host, domain)?;
    }

    /// The legacy path proxy's `/__ide/<vmid>/`: the vmid's one spelling only.
    #[test]
    fn path_vmids_have_one_spelling(
        digits in prop_oneof![
            "[0-9+ a-]{0,12}",
            any::<String>(),
            (1u32..).prop_map(|v| v.to_string()),
            (u64::from(u32::MAX)..).prop_map(|v| v.to_string()),
        ]
    ) {
        let expected = VMID_DIGITS
            .is_match(digits.as_bytes())
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .and_then(|v| u32::try_from(v).ok())
            .map(Vmid);
        prop_assert_eq!(canonical_vmid(&digits), expected, "{:?}", digits);
    }
}

/// Fixed cases the oracle and the parser must agree on, and do, decided by hand: a guard that the
/// oracle itself is right and the property tests above can fail.
#[test]
fn the_oracle_agrees_with_hand_decided_cases() {
    for (host, want) in [
        ("dev-6001.localhost", Some(6001)),
        ("DEV-6001.LOCALHOST:65535", Some(6001)),
        ("dev-4294967295.localhost:1", Some(u32::MAX)),
        ("dev-4294967296.localhost", None),
        ("dev-6001.localhost:0", None),
        ("dev-6001.localhost:65536", None),
        ("dev-6001.localhost:080", None),
        ("dev-06001.localhost", None),
        ("dev-6001.localho\u{17f}t", None),
        ("dev-6001.localhost\u{3002}", None),
        ("dev-6001.loca%6chost", None),
        ("dev-6001.localhost\n", None),
    ] {
        assert_eq!(LOCALHOST.vmid(host), want.map(Vmid), "oracle on {host:?}");
        assert_eq!(parse_host(host, "localhost").ok(), want.map(Vmid), "parser on {host:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

const SECRET: [u8; 32] = [7; 32];
const VMID: u32 = 6001;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn key() -> TokenKey {
    TokenKey::new(&SECRET).unwrap()
}

/// A valid IDE token or IDE session value for user-1 and vmid 6001, and its claims.
fn credential(session: bool) -> (String, Value) {
    let (purpose, ttl) = if session { (SESSION_PURPOSE, 3600) } else { (IDE_PURPOSE, 60) };
    let t = token::issue(&key(), purpose, "user-1", VMID, Duration::from_secs(ttl), now()).unwrap();
    let claims = serde_json::from_slice(&B64.decode(t.split('.').nth(1).unwrap()).unwrap()).unwrap();
    (t, claims)
}

/// `value` verifies nowhere: not as an IDE token, not as a session, for no purpose, through the
/// generic verifier and the IDE router alike.
fn never_verifies(value: &str) -> Result<(), TestCaseError> {
    let k = key();
    for purpose in [IDE_PURPOSE, SESSION_PURPOSE, token::CONSOLE_PURPOSE] {
        let r = token::verify(&k, value, purpose, VMID, now());
        prop_assert!(r.is_err(), "{:?} verified for {}: {:?}", value, purpose, r);
    }
    let router = LocalIdeRouter::new(IdeConfig::default(), key()).unwrap();
    prop_assert!(router.verify_token_at(value, Vmid(VMID), now()).is_err(), "{:?} opened an IDE", value);
    prop_assert!(router.verify_session_at(value, Vmid(VMID), now()).is_err(), "{:?} is a session", value);
    Ok(())
}

/// The unmutated credential does verify for its purpose: the mutations below are what fails.
fn verifies(value: &str, session: bool) -> Result<(), TestCaseError> {
    let purpose = if session { SESSION_PURPOSE } else { IDE_PURPOSE };
    prop_assert!(token::verify(&key(), value, purpose, VMID, now()).is_ok());
    Ok(())
}

#[derive(Debug, Clone)]
enum TokenEdit {
    /// Flips one of the low seven bits of one byte (ASCII stays ASCII).
    FlipBit(Index, u8),
    Truncate(Index),
    Pad(String),
    Insert(Index, char),
    /// Reorders the three segments (never the identity).
    Permute(usize),
    DropSegment(usize),
    DuplicateSegment(usize),
    /// A new header (`alg` none, another HMAC, an asymmetric one …), the signature kept or emptied.
    Header(&'static str, bool),
    /// Re-signed with the same secret under another HMAC algorithm.
    Resign(Algorithm),
    /// Signed with another secret.
    OtherKey([u8; 32]),
    /// One claim changed, the signature kept.
    Claim(&'static str, Value),
    /// Base64 `=` padding or the standard alphabet, which the URL-safe unpadded form excludes.
    Repad(usize),
    StandardAlphabet,
    Whitespace(&'static str, bool),
}

fn token_edit() -> impl Strategy<Value = TokenEdit> {
    let headers = prop::sample::select(vec![
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None"}"#,
        r#"{"alg":"NONE"}"#,
        r#"{"alg":"HS512","typ":"JWT"}"#,
        r#"{"alg":"HS384"}"#,
        r#"{"alg":"RS256"}"#,
        r#"{"alg":"ES256"}"#,
        r#"{"alg":"EdDSA"}"#,
        r#"{"alg":""}"#,
        r#"{"typ":"JWT"}"#,
        r#"{"alg":"HS256","alg":"none"}"#,
        r#"{"alg":"HS256","typ":"JWT","kid":"../../dev/null"}"#,
        r#"{"alg":"HS256","typ":"JWT","jku":"http://evil.example/jwks"}"#,
        "null",
        "[]",
        "",
    ]);
    let claims = prop_oneof![
        Just(("vmid", Value::from(6002))),
        Just(("vmid", Value::from(u64::from(VMID) + (1u64 << 32)))),
        Just(("vmid", Value::from("6001"))),
        Just(("aud", Value::from(SESSION_PURPOSE))),
        Just(("aud", Value::from(IDE_PURPOSE))),
        Just(("aud", Value::from(vec![IDE_PURPOSE, SESSION_PURPOSE]))),
        Just(("sub", Value::from("admin"))),
        Just(("exp", Value::from(4_000_000_000i64))),
        Just(("exp", Value::from(1_800_000_059i64))),
        Just(("jti", Value::from("x"))),
    ];
    prop_oneof![
        4 => (any::<Index>(), 0u8..7).prop_map(|(i, b)| TokenEdit::FlipBit(i, b)),
        2 => any::<Index>().prop_map(TokenEdit::Truncate),
        2 => prop_oneof!["[A-Za-z0-9_=.+/ -]{1,8}", Just("x".repeat(5000))].prop_map(TokenEdit::Pad),
        2 => (any::<Index>(), prop_oneof![Just('.'), Just('='), Just(' '), Just('A'), any::<char>()])
            .prop_map(|(i, c)| TokenEdit::Insert(i, c)),
        1 => (1usize..6).prop_map(TokenEdit::Permute),
        1 => (0usize..3).prop_map(TokenEdit::DropSegment),
        1 => (0usize..3).prop_map(TokenEdit::DuplicateSegment),
        2 => (headers, any::<bool>()).prop_map(|(h, keep)| TokenEdit::Header(h, keep)),
        1 => prop::sample::select(vec![Algorithm::HS384, Algorithm::HS512]).prop_map(TokenEdit::Resign),
        1 => any::<[u8; 32]>().prop_filter("another secret", |k| *k != SECRET).prop_map(TokenEdit::OtherKey),
        2 => claims.prop_map(|(k, v)| TokenEdit::Claim(k, v)),
        1 => (0usize..3).prop_map(TokenEdit::Repad),
        1 => Just(TokenEdit::StandardAlphabet),
        1 => (prop::sample::select(vec![" ", "\t", "\n", "\r\n", "\0"]), any::<bool>())
            .prop_map(|(w, front)| TokenEdit::Whitespace(w, front)),
    ]
}

fn apply_token_edit(t: &str, claims: &Value, edit: &TokenEdit) -> String {
    let segs: Vec<&str> = t.split('.').collect();
    let mut chars: Vec<char> = t.chars().collect();
    let structural = matches!(
        edit,
        TokenEdit::Permute(_)
            | TokenEdit::DropSegment(_)
            | TokenEdit::DuplicateSegment(_)
            | TokenEdit::Header(..)
            | TokenEdit::Claim(..)
            | TokenEdit::Repad(_)
    );
    if structural && segs.len() != 3 {
        // An earlier edit already broke the shape; these edits need three segments.
        return t.to_owned();
    }
    let join = |v: Vec<&str>| v.join(".");
    match edit {
        TokenEdit::FlipBit(i, bit) => {
            let mut bytes = t.as_bytes().to_vec();
            if bytes.is_empty() {
                return String::new();
            }
            let pos = i.index(bytes.len());
            bytes[pos] ^= 1 << bit;
            String::from_utf8_lossy(&bytes).into_owned()
        }
        TokenEdit::Truncate(i) => {
            chars.truncate(if chars.is_empty() { 0 } else { i.index(chars.len()) });
            chars.into_iter().collect()
        }
        TokenEdit::Pad(p) => format!("{t}{p}"),
        TokenEdit::Insert(i, c) => {
            chars.insert(i.index(chars.len() + 1), *c);
            chars.into_iter().collect()
        }
        TokenEdit::Permute(n) => {
            const PERMS: [[usize; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
            join(PERMS[*n].iter().map(|&i| segs[i]).collect())
        }
        TokenEdit::DropSegment(n) => {
            let mut v = segs.clone();
            v.remove(*n);
            join(v)
        }
        TokenEdit::DuplicateSegment(n) => {
            let mut v = segs.clone();
            v.insert(*n, segs[*n]);
            join(v)
        }
        TokenEdit::Header(h, keep) => {
            let header = B64.encode(h);
            let sig = if *keep { segs[2] } else { "" };
            format!("{header}.{}.{sig}", segs[1])
        }
        TokenEdit::Resign(alg) => {
            jsonwebtoken::encode(&Header::new(*alg), claims, &EncodingKey::from_secret(&SECRET)).unwrap()
        }
        TokenEdit::OtherKey(k) => {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(k)).unwrap()
        }
        TokenEdit::Claim(name, value) => {
            let mut c = claims.clone();
            c[*name] = value.clone();
            format!("{}.{}.{}", segs[0], B64.encode(c.to_string()), segs[2])
        }
        TokenEdit::Repad(n) => {
            let mut v: Vec<String> = segs.iter().map(|s| (*s).to_owned()).collect();
            v[*n].push_str("==");
            v.join(".")
        }
        TokenEdit::StandardAlphabet => t.replace('-', "+").replace('_', "/"),
        TokenEdit::Whitespace(w, front) => {
            if *front {
                format!("{w}{t}")
            } else {
                format!("{t}{w}")
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn mutated_tokens_and_sessions_never_verify(
        session in any::<bool>(),
        edits in prop::collection::vec(token_edit(), 1..3),
    ) {
        let (original, claims) = credential(session);
        verifies(&original, session)?;
        let mut mutated = original.clone();
        for edit in &edits {
            mutated = apply_token_edit(&mutated, &claims, edit);
        }
        prop_assume!(mutated != original);
        never_verifies(&mutated)?;
    }

    #[test]
    fn arbitrary_input_never_verifies(
        value in prop_oneof![
            any::<String>(),
            "[A-Za-z0-9_-]{0,60}[.][A-Za-z0-9_-]{0,200}[.][A-Za-z0-9_-]{0,60}",
            "eyJ[A-Za-z0-9_-]{0,60}[.]eyJ[A-Za-z0-9_-]{0,200}[.][A-Za-z0-9_-]{43}",
            prop::collection::vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            "[.=]{0,10}",
        ]
    ) {
        never_verifies(&value)?;
    }

    /// A token is for one purpose and one vmid: a valid token for any other vmid, or of the other
    /// kind, opens nothing here.
    #[test]
    fn valid_credentials_for_another_vmid_or_purpose_never_verify(other in 1u32.., session in any::<bool>()) {
        prop_assume!(other != VMID);
        let (purpose, ttl) = if session { (SESSION_PURPOSE, 3600) } else { (IDE_PURPOSE, 60) };
        let t = token::issue(&key(), purpose, "user-1", other, Duration::from_secs(ttl), now()).unwrap();
        never_verifies(&t)?;
        let router = LocalIdeRouter::new(IdeConfig::default(), key()).unwrap();
        let other_kind = if session { SESSION_PURPOSE } else { IDE_PURPOSE };
        let right_vmid = token::issue(&key(), other_kind, "user-1", VMID, Duration::from_secs(ttl), now()).unwrap();
        let wrong_kind = if session {
            router.verify_token_at(&right_vmid, Vmid(VMID), now()).is_err()
        } else {
            router.verify_session_at(&right_vmid, Vmid(VMID), now()).is_err()
        };
        prop_assert!(wrong_kind, "a {} opened as the other kind", purpose);
    }
}
