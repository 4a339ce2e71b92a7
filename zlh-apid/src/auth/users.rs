//! Accounts: what makes an email and a username acceptable, and the `users` table.
//!
//! Emails and usernames are stored lowercased, so sign-in is case-insensitive and two accounts
//! cannot differ only by case. A username cannot contain `@`, so an identifier with an `@` is
//! always an email and one without is always a username.

use std::fmt;

use serde::Serialize;

use crate::db::{self, Db};
use crate::http::ApiError;

/// Longest email accepted (the SMTP path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Username length bounds, in characters.
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;

/// What a user may do. Operators are admins; everyone else is a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    /// Anything but `admin` reads as a plain user: an unexpected value never grants rights.
    pub fn from_db(s: &str) -> Self {
        if s == "admin" {
            Role::Admin
        } else {
            Role::User
        }
    }
}

/// A row of `users`. `Debug` leaves the password hash out.
#[derive(Clone)]
pub struct User {
    pub id: String,
    pub email: String,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("username", &self.username)
            .field("role", &self.role)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("email must be an address like name@example.com, at most {MAX_EMAIL_LEN} characters")]
    InvalidEmail,
    #[error("username must be 3 to 32 characters of a-z, 0-9, '_', '.' and '-'")]
    InvalidUsername,
    #[error("email is already registered")]
    DuplicateEmail,
    #[error("username is already taken")]
    DuplicateUsername,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::InvalidEmail | UserError::InvalidUsername => ApiError::bad_request(e.to_string()),
            UserError::DuplicateEmail | UserError::DuplicateUsername => ApiError::conflict(e.to_string()),
            UserError::Db(e) => e.into(),
        }
    }
}

/// Trims and lowercases an email and checks it loosely: one `@` with something on each side, no
/// whitespace or control characters, at most [`MAX_EMAIL_LEN`] bytes. Deliverability is not our
/// concern here.
pub fn normalize_email(raw: &str) -> Result<String, UserError> {
    let email = raw.trim().to_lowercase();
    let Some((local, domain)) = email.split_once('@') else {
        return Err(UserError::InvalidEmail);
    };
    let valid = email.len() <= MAX_EMAIL_LEN
        && !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(UserError::InvalidEmail)
    }
}

/// Trims and lowercases a username and checks it: 3 to 32 of `a-z 0-9 _ . -`.
pub fn normalize_username(raw: &str) -> Result<String, UserError> {
    let username = raw.trim().to_ascii_lowercase();
    let valid = USERNAME_LEN.contains(&username.len())
        && username.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(username)
    } else {
        Err(UserError::InvalidUsername)
    }
}

const COLUMNS: &str = "id, email, username, password_hash, role, created_at";

type Row = (String, String, String, String, String, i64);

fn from_row((id, email, username, password_hash, role, created_at): Row) -> User {
    User { id, email, username, password_hash, role: Role::from_db(&role), created_at }
}

/// Which of `email` / `username` (both normalized) is already in use, if any; email first.
pub async fn check_available(db: &Db, email: &str, username: &str) -> Result<(), UserError> {
    let taken: Vec<(String, String)> =
        sqlx::query_as("SELECT email, username FROM users WHERE email = $1 OR username = $2")
            .bind(email)
            .bind(username)
            .fetch_all(db.pool())
            .await?;
    if taken.iter().any(|(e, _)| e == email) {
        Err(UserError::DuplicateEmail)
    } else if taken.iter().any(|(_, u)| u == username) {
        Err(UserError::DuplicateUsername)
    } else {
        Ok(())
    }
}

/// Creates an account. `email` and `username` are normalized here (so callers may pass them raw);
/// `password_hash` is a PHC string from [`super::password::hash`]. A duplicate is reported by
/// field, whether found up front or by losing an insert race to another replica.
pub async fn create(db: &Db, email: &str, username: &str, password_hash: &str, role: Role) -> Result<User, UserError> {
    let email = normalize_email(email)?;
    let username = normalize_username(username)?;
    check_available(db, &email, &username).await?;
    let user = User {
        id: db::new_id(),
        email,
        username,
        password_hash: password_hash.to_owned(),
        role,
        created_at: db::now_ms(),
    };
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, username, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&user.id)
    .bind(&user.email)
    .bind(&user.username)
    .bind(&user.password_hash)
    .bind(user.role.as_str())
    .bind(user.created_at)
    .execute(db.pool())
    .await;
    match inserted {
        Ok(_) => Ok(user),
        Err(e) if db::is_unique_violation(&e) => {
            check_available(db, &user.email, &user.username).await?;
            // The account that won the race was deleted meanwhile; it was still a duplicate.
            Err(UserError::DuplicateEmail)
        }
        Err(e) => Err(e.into()),
    }
}

/// The account an identifier names: an email if it contains `@`, a username otherwise (any case,
/// surrounding whitespace ignored).
pub async fn find_by_identifier(db: &Db, identifier: &str) -> Result<Option<User>, sqlx::Error> {
    let identifier = identifier.trim().to_lowercase();
    let column = if identifier.contains('@') { "email" } else { "username" };
    let sql = format!("SELECT {COLUMNS} FROM users WHERE {column} = $1");
    Ok(sqlx::query_as::<_, Row>(&sql).bind(&identifier).fetch_optional(db.pool()).await?.map(from_row))
}

pub async fn find_by_id(db: &Db, id: &str) -> Result<Option<User>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
    Ok(sqlx::query_as::<_, Row>(&sql).bind(id).fetch_optional(db.pool()).await?.map(from_row))
}

/// Sets a user's role; false when there is no such user. Takes effect on the user's next request.
/// Operators do it with `zlh-apid admin grant|revoke` ([`super::admins`]).
pub async fn set_role(db: &Db, id: &str, role: Role) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("UPDATE users SET role = $1 WHERE id = $2").bind(role.as_str()).bind(id).execute(db.pool()).await?;
    Ok(done.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_lowercased_and_checked_loosely() {
        assert_eq!(normalize_email("  Alice@Example.COM ").unwrap(), "alice@example.com");
        assert_eq!(normalize_email("a+tag@sub.example").unwrap(), "a+tag@sub.example");
        for bad in ["", "alice", "@example.com", "alice@", "a@b@c", "al ice@example.com", "a@exa\tmple.com"] {
            assert!(matches!(normalize_email(bad), Err(UserError::InvalidEmail)), "{bad:?}");
        }
        let long = format!("{}@example.com", "a".repeat(MAX_EMAIL_LEN));
        assert!(matches!(normalize_email(&long), Err(UserError::InvalidEmail)));
    }

    #[test]
    fn usernames_are_lowercased_and_limited_to_a_safe_alphabet() {
        assert_eq!(normalize_username(" Alice_99.x-y ").unwrap(), "alice_99.x-y");
        assert_eq!(normalize_username("abc").unwrap(), "abc");
        assert_eq!(normalize_username(&"a".repeat(32)).unwrap(), "a".repeat(32));
        for bad in ["ab", &"a".repeat(33), "al ice", "a@b.c", "ålice", "bob!", "x/y"] {
            assert!(matches!(normalize_username(bad), Err(UserError::InvalidUsername)), "{bad:?}");
        }
    }

    #[test]
    fn roles_never_escalate_by_accident() {
        assert_eq!(Role::from_db("admin"), Role::Admin);
        assert_eq!(Role::from_db("Admin"), Role::User);
        assert_eq!(Role::from_db(""), Role::User);
    }

    #[test]
    fn debug_leaves_the_hash_out() {
        let u = User {
            id: "1".into(),
            email: "a@b.c".into(),
            username: "abc".into(),
            password_hash: "$argon2id$secret-hash".into(),
            role: Role::User,
            created_at: 0,
        };
        assert!(!format!("{u:?}").contains("argon2id"));
    }
}
