//! Short-lived signed tokens bound to one purpose and one container: console tickets today, IDE
//! tokens and sessions later.
//!
//! A token is an HS256 JWT (`jsonwebtoken` does the signing; nothing here touches HMAC by hand).
//! Verification pins the algorithm, checks the signature before reading any claim, then the
//! purpose (`aud`), the container (`vmid`) and the expiry against a caller-supplied clock, so a
//! token minted for one use or one container is worthless for any other, and tests control time.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Shortest secret accepted: the HS256 key should carry as much entropy as its output.
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest token looked at; anything larger is refused before parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Clock skew forgiven on expiry, in seconds.
pub const LEEWAY_SECS: i64 = 5;
/// Purpose (`aud`) of the ticket that opens an agent's console WebSocket.
pub const CONSOLE_PURPOSE: &str = "zlh-console";
/// Longest lifetime (`exp` − `iat`) a console ticket may claim: long enough to open a socket.
pub const MAX_CONSOLE_TICKET_SECS: i64 = 60;

/// Domain separation for [`console_ticket_key`]: a key derived for console tickets can never
/// verify anything signed for another use of the same agent token.
const CONSOLE_TICKET_CONTEXT: &[u8] = b"zlh console ticket v1";

/// An HS256 signing and verification key. `Debug` never shows the secret.
#[derive(Clone)]
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenKey {
    /// Refuses secrets shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::WeakKey { len: secret.len() });
        }
        Ok(Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret) })
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// The key an agent's console tickets are signed with: HMAC-SHA256 keyed by the agent's bearer
/// token over a fixed context string.
///
/// Why derived from the agent token: the API already holds every agent's token, so it can mint
/// tickets without any further key distribution; a ticket signed for agent A fails at agent B,
/// whose token differs; and the bearer token itself never serves as a JWT key (the context string
/// keeps this key apart from any other key derived from the same token later).
pub fn console_ticket_key(agent_token: &str) -> TokenKey {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(agent_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(CONSOLE_TICKET_CONTEXT);
    let derived = mac.finalize().into_bytes();
    TokenKey::new(&derived).expect("HMAC-SHA256 output is 32 bytes")
}

/// What a token says. `aud` is the purpose, `sub` the user id, `vmid` the container it is for;
/// `iat` and `exp` are unix seconds; `jti` is a random id that is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub aud: String,
    pub sub: String,
    pub vmid: u32,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

impl Claims {
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.exp, 0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is for another purpose")]
    WrongPurpose,
    #[error("token is for another container")]
    WrongTarget,
    #[error("token has expired")]
    Expired,
    #[error("token lives longer than {max_secs} s")]
    TooLong { max_secs: i64 },
    #[error("token is issued in the future")]
    IssuedInFuture,
    #[error("signing key too short: {len} bytes, need at least {MIN_SECRET_BYTES}")]
    WeakKey { len: usize },
    #[error("cannot sign token: {0}")]
    Signing(String),
}

/// Signs a token for `purpose`, user `sub` and container `vmid`, valid from `now` for `ttl`.
pub fn issue(
    key: &TokenKey,
    purpose: &str,
    sub: &str,
    vmid: u32,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<String, TokenError> {
    let iat = now.timestamp();
    let ttl = i64::try_from(ttl.as_secs()).map_err(|_| TokenError::Signing("ttl out of range".into()))?;
    let claims = Claims {
        aud: purpose.to_owned(),
        sub: sub.to_owned(),
        vmid,
        iat,
        exp: iat.saturating_add(ttl),
        jti: random_id().map_err(|e| TokenError::Signing(format!("random id: {e}")))?,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key.encoding)
        .map_err(|e| TokenError::Signing(e.to_string()))
}

/// Checks `token` was signed with `key` (HS256 only), is for `purpose` and `expected_vmid`, and has
/// not expired at `now` (give or take [`LEEWAY_SECS`]). The signature is checked before any claim.
pub fn verify(
    key: &TokenKey,
    token: &str,
    purpose: &str,
    expected_vmid: u32,
    now: DateTime<Utc>,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked below against the caller's clock; the library would read the wall clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    validation.set_audience(&[purpose]);
    let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => TokenError::BadSignature,
        ErrorKind::InvalidAudience => TokenError::WrongPurpose,
        _ => TokenError::Malformed,
    })?;
    let claims = data.claims;
    if claims.vmid != expected_vmid {
        return Err(TokenError::WrongTarget);
    }
    if claims.exp.saturating_add(LEEWAY_SECS) <= now.timestamp() {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// [`verify`], and the rules for a ticket that opens one thing once: it names itself (`jti`, so
/// the verifier can remember it), it was not issued in the future (beyond [`LEEWAY_SECS`]), and it
/// claims to live at most `max_secs`. A lifetime the signer chose is trusted no further than that:
/// a ticket that leaked is worthless within a minute, whatever its `exp` says.
pub fn verify_ticket(
    key: &TokenKey,
    token: &str,
    purpose: &str,
    expected_vmid: u32,
    max_secs: i64,
    now: DateTime<Utc>,
) -> Result<Claims, TokenError> {
    let claims = verify(key, token, purpose, expected_vmid, now)?;
    if claims.jti.is_empty() {
        return Err(TokenError::Malformed);
    }
    if claims.iat > now.timestamp().saturating_add(LEEWAY_SECS) {
        return Err(TokenError::IssuedInFuture);
    }
    if claims.exp.saturating_sub(claims.iat) > max_secs {
        return Err(TokenError::TooLong { max_secs });
    }
    Ok(claims)
}

/// 128 random bits, hex.
fn random_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn key(byte: u8) -> TokenKey {
        TokenKey::new(&[byte; 32]).unwrap()
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn ticket(key: &TokenKey) -> String {
        issue(key, CONSOLE_PURPOSE, "user-7", 105, Duration::from_secs(60), now()).unwrap()
    }

    #[test]
    fn round_trip_returns_the_claims() {
        let k = key(1);
        let claims = verify(&k, &ticket(&k), CONSOLE_PURPOSE, 105, now()).unwrap();
        assert_eq!(claims.aud, CONSOLE_PURPOSE);
        assert_eq!(claims.sub, "user-7");
        assert_eq!(claims.vmid, 105);
        assert_eq!(claims.iat, now().timestamp());
        assert_eq!(claims.exp, now().timestamp() + 60);
        assert_eq!(claims.jti.len(), 32);
        let again = verify(&k, &ticket(&k), CONSOLE_PURPOSE, 105, now()).unwrap();
        assert_ne!(claims.jti, again.jti, "every token gets its own id");
    }

    #[test]
    fn short_secrets_are_refused_and_debug_hides_the_secret() {
        assert!(matches!(TokenKey::new(&[7; 31]), Err(TokenError::WeakKey { len: 31 })));
        let k = TokenKey::new(b"super-secret-value-that-is-long-enough").unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(!shown.contains("115"), "no byte dump either: {shown}");
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let t = ticket(&key(1));
        assert!(matches!(verify(&key(2), &t, CONSOLE_PURPOSE, 105, now()), Err(TokenError::BadSignature)));
    }

    #[test]
    fn a_token_for_another_container_is_refused() {
        let k = key(1);
        assert!(matches!(verify(&k, &ticket(&k), CONSOLE_PURPOSE, 106, now()), Err(TokenError::WrongTarget)));
    }

    #[test]
    fn a_token_for_another_purpose_is_refused() {
        let k = key(1);
        let ide = issue(&k, "zlh-ide", "user-7", 105, Duration::from_secs(60), now()).unwrap();
        assert!(matches!(verify(&k, &ide, CONSOLE_PURPOSE, 105, now()), Err(TokenError::WrongPurpose)));
    }

    #[test]
    fn expiry_allows_a_few_seconds_of_skew_and_no_more() {
        let k = key(1);
        let t = ticket(&k);
        let at = |secs: i64| now() + chrono::Duration::seconds(secs);
        assert!(verify(&k, &t, CONSOLE_PURPOSE, 105, at(59)).is_ok());
        assert!(verify(&k, &t, CONSOLE_PURPOSE, 105, at(60 + LEEWAY_SECS - 1)).is_ok());
        assert!(matches!(verify(&k, &t, CONSOLE_PURPOSE, 105, at(60 + LEEWAY_SECS)), Err(TokenError::Expired)));
        assert!(matches!(verify(&k, &t, CONSOLE_PURPOSE, 105, at(3600)), Err(TokenError::Expired)));
    }

    #[test]
    fn an_unsigned_alg_none_token_is_refused() {
        let k = key(1);
        let t = ticket(&k);
        let payload = t.split('.').nth(1).unwrap();
        let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        for forged in [format!("{header}.{payload}."), format!("{header}.{payload}")] {
            let err = verify(&k, &forged, CONSOLE_PURPOSE, 105, now()).unwrap_err();
            assert!(matches!(err, TokenError::Malformed | TokenError::BadSignature), "{err:?}");
        }
    }

    #[test]
    fn another_hmac_algorithm_is_refused() {
        let k = key(1);
        let claims = verify(&k, &ticket(&k), CONSOLE_PURPOSE, 105, now()).unwrap();
        let hs512 = jsonwebtoken::encode(&Header::new(Algorithm::HS512), &claims, &k.encoding).unwrap();
        assert!(matches!(verify(&k, &hs512, CONSOLE_PURPOSE, 105, now()), Err(TokenError::BadSignature)));
    }

    #[test]
    fn oversize_tokens_are_refused_before_parsing() {
        let k = key(1);
        let claims = Claims {
            aud: CONSOLE_PURPOSE.into(),
            sub: "x".repeat(MAX_TOKEN_BYTES),
            vmid: 105,
            iat: now().timestamp(),
            exp: now().timestamp() + 60,
            jti: "j".into(),
        };
        let big = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap();
        assert!(big.len() > MAX_TOKEN_BYTES);
        assert!(matches!(verify(&k, &big, CONSOLE_PURPOSE, 105, now()), Err(TokenError::Malformed)));
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let k = key(1);
        let t = ticket(&k);
        let parts: Vec<&str> = t.split('.').collect();
        let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims["vmid"] = 106.into();
        claims["exp"] = (now().timestamp() + 86_400).into();
        let forged = format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2]);
        assert!(matches!(verify(&k, &forged, CONSOLE_PURPOSE, 106, now()), Err(TokenError::BadSignature)));
    }

    #[test]
    fn garbage_is_malformed() {
        let k = key(1);
        for junk in ["", "abc", "a.b.c", "...."] {
            assert!(verify(&k, junk, CONSOLE_PURPOSE, 105, now()).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn console_keys_are_per_agent_and_separate_from_the_token() {
        let a = console_ticket_key("agent-a-token-0123456789abcdef0123456789");
        let a_again = console_ticket_key("agent-a-token-0123456789abcdef0123456789");
        let b = console_ticket_key("agent-b-token-0123456789abcdef0123456789");
        let t = ticket(&a);
        assert!(verify(&a_again, &t, CONSOLE_PURPOSE, 105, now()).is_ok());
        assert!(matches!(verify(&b, &t, CONSOLE_PURPOSE, 105, now()), Err(TokenError::BadSignature)));
        // The raw agent token is not the signing key.
        let raw = TokenKey::new(b"agent-a-token-0123456789abcdef0123456789").unwrap();
        assert!(matches!(verify(&raw, &t, CONSOLE_PURPOSE, 105, now()), Err(TokenError::BadSignature)));
    }

    fn signed(k: &TokenKey, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap()
    }

    #[test]
    fn tickets_live_sixty_seconds_at_most_whatever_they_claim() {
        let k = key(1);
        let check = |t: &str| verify_ticket(&k, t, CONSOLE_PURPOSE, 105, MAX_CONSOLE_TICKET_SECS, now());
        assert!(check(&ticket(&k)).is_ok(), "a 60 s ticket works");
        let ten_years =
            issue(&k, CONSOLE_PURPOSE, "user-7", 105, Duration::from_secs(10 * 365 * 86_400), now()).unwrap();
        assert!(verify(&k, &ten_years, CONSOLE_PURPOSE, 105, now()).is_ok(), "a good signature and a far expiry");
        assert!(matches!(check(&ten_years), Err(TokenError::TooLong { max_secs: 60 })));
        let one_more = issue(&k, CONSOLE_PURPOSE, "user-7", 105, Duration::from_secs(61), now()).unwrap();
        assert!(matches!(check(&one_more), Err(TokenError::TooLong { .. })));
    }

    #[test]
    fn tickets_from_the_future_are_refused_beyond_the_skew() {
        let k = key(1);
        let at = |secs: i64| now() + chrono::Duration::seconds(secs);
        let check = |t: &str| verify_ticket(&k, t, CONSOLE_PURPOSE, 105, MAX_CONSOLE_TICKET_SECS, now());
        let slightly = issue(&k, CONSOLE_PURPOSE, "u", 105, Duration::from_secs(30), at(LEEWAY_SECS)).unwrap();
        assert!(check(&slightly).is_ok());
        let ahead = issue(&k, CONSOLE_PURPOSE, "u", 105, Duration::from_secs(30), at(LEEWAY_SECS + 1)).unwrap();
        assert!(matches!(check(&ahead), Err(TokenError::IssuedInFuture)));
        // Issued a day ahead so that it would be valid for a day from now: refused as well.
        let tomorrow = issue(&k, CONSOLE_PURPOSE, "u", 105, Duration::from_secs(60), at(86_400)).unwrap();
        assert!(matches!(check(&tomorrow), Err(TokenError::IssuedInFuture)));
    }

    #[test]
    fn tickets_without_iat_or_jti_are_refused() {
        let k = key(1);
        let t = now().timestamp();
        let base = serde_json::json!({ "aud": CONSOLE_PURPOSE, "sub": "u", "vmid": 105, "iat": t, "exp": t + 30, "jti": "j1" });
        let check = |c: &serde_json::Value| verify_ticket(&k, &signed(&k, c.clone()), CONSOLE_PURPOSE, 105, 60, now());
        assert!(check(&base).is_ok());
        for field in ["iat", "jti"] {
            let mut c = base.clone();
            c.as_object_mut().unwrap().remove(field);
            assert!(matches!(check(&c), Err(TokenError::Malformed)), "without {field}");
        }
        let mut empty_jti = base.clone();
        empty_jti["jti"] = "".into();
        assert!(matches!(check(&empty_jti), Err(TokenError::Malformed)));
    }
}
