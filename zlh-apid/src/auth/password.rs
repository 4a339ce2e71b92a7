//! Passwords: the policy a new password must meet, and argon2id hashing at the OWASP-recommended
//! cost (19 MiB, 2 passes, 1 lane).
//!
//! One hash costs tens of milliseconds of CPU and 19 MiB, so it runs on the blocking pool (never on
//! a request's async thread) and at most a few run at once: a flood of logins queues instead of
//! exhausting memory.

use std::sync::{Arc, LazyLock};

use argon2::password_hash::{self, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

/// Shortest password accepted, in characters.
pub const MIN_LEN: usize = 8;
/// Longest password accepted, in characters.
pub const MAX_LEN: usize = 256;

/// The hash of a random password nobody knows, at the same cost as real hashes. Verified when a
/// login names no existing user, so that answer takes as long as a wrong password and timing does
/// not reveal which emails and usernames exist.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$Ky6ofB4xz60q8newTjDAqw$V7QHGxjXsvVzqP2KKE4eO0RKajKsE63DAIQsBlSAETU";

/// Hashes running at once, beyond which callers wait their turn.
static HASHING: LazyLock<Arc<Semaphore>> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Arc::new(Semaphore::new(cores * 2))
});

/// Why a new password is refused; the message names the field and never echoes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("password must be {MIN_LEN} to {MAX_LEN} characters long")]
    Length,
    #[error("password must not be only whitespace")]
    Blank,
}

/// The hash could not be computed or the stored hash is unreadable: a server-side fault.
#[derive(Debug, thiserror::Error)]
#[error("password hashing: {0}")]
pub struct HashError(String);

/// Checks a new password against the policy: 8 to 256 characters, not all whitespace.
pub fn check_policy(password: &str) -> Result<(), PolicyError> {
    let len = password.chars().count();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(PolicyError::Length);
    }
    if password.chars().all(char::is_whitespace) {
        return Err(PolicyError::Blank);
    }
    Ok(())
}

/// The hasher every new hash is made with. Parameters are spelled out rather than taken from the
/// crate's defaults so an upgrade cannot change them silently.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Runs `f` on the blocking pool once a hashing slot is free.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, HashError> {
    let permit = Arc::clone(&HASHING).acquire_owned().await.map_err(|e| HashError(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let out = f();
        drop(permit);
        out
    })
    .await
    .map_err(|e| HashError(e.to_string()))
}

/// An argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) with a fresh random salt.
pub async fn hash(password: String) -> Result<String, HashError> {
    blocking(move || {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| HashError(e.to_string()))?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| HashError(e.to_string()))?;
        hasher().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| HashError(e.to_string()))
    })
    .await?
}

/// Whether `password` matches the PHC string `hash` (at the cost recorded in the hash). A stored
/// hash that cannot be read is an error, not a mismatch.
pub async fn verify(password: String, hash: String) -> Result<bool, HashError> {
    blocking(move || {
        let parsed = PasswordHash::new(&hash).map_err(|e| HashError(e.to_string()))?;
        match hasher().verify_password(password.as_bytes(), &parsed) {
            Ok(()) => Ok(true),
            Err(password_hash::Error::Password) => Ok(false),
            Err(e) => Err(HashError(e.to_string())),
        }
    })
    .await?
}

/// Spends the time of a real verification for a login that names no user; always "no match".
pub async fn verify_unknown(password: String) -> Result<bool, HashError> {
    verify(password, DUMMY_HASH.to_owned()).await.map(|_| false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_bounds_length_in_characters_and_refuses_blank() {
        assert_eq!(check_policy("short7!"), Err(PolicyError::Length));
        assert_eq!(check_policy("eight888"), Ok(()));
        assert_eq!(check_policy(&"é".repeat(MAX_LEN)), Ok(()), "characters, not bytes");
        assert_eq!(check_policy(&"x".repeat(MAX_LEN + 1)), Err(PolicyError::Length));
        assert_eq!(check_policy(" \t \n    "), Err(PolicyError::Blank));
        assert_eq!(check_policy("  pass word  "), Ok(()));
    }

    #[tokio::test]
    async fn hashes_are_salted_argon2id_and_verify() {
        let a = hash("correct horse".into()).await.unwrap();
        let b = hash("correct horse".into()).await.unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify("correct horse".into(), a.clone()).await.unwrap());
        assert!(!verify("correct horsE".into(), a).await.unwrap());
        assert!(verify("x".into(), "not a hash".into()).await.is_err());
    }

    #[tokio::test]
    async fn the_dummy_hash_costs_what_a_real_one_does() {
        let real = hash("whatever1".into()).await.unwrap();
        let real = PasswordHash::new(&real).unwrap();
        let dummy = PasswordHash::new(DUMMY_HASH).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
        assert_eq!(dummy.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
        assert!(!verify_unknown("whatever1".into()).await.unwrap());
    }
}
