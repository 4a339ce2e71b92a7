//! `zlh-apid admin grant|revoke|list`, run as the operator runs it: the built binary on the
//! configured SQLite database. Also: the data dir and the database file it creates are private,
//! and a config still naming `admin_emails` is refused with the way to do it now.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use zlh_apid::auth::users::{self, Role};
use zlh_apid::db::Db;

fn zlh_apid(data_dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_zlh-apid"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_clear()
        .env("ZLH_LOG_FORMAT", "text")
        .output()
        .expect("run zlh-apid")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn role(db: &Db, email: &str) -> Role {
    users::find_by_identifier(db, email).await.unwrap().unwrap().role
}

#[tokio::test]
async fn the_operator_grants_lists_and_revokes_admins_on_the_configured_database() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    // First use creates the data dir and the database, both readable by their owner only.
    assert_eq!(ok(&zlh_apid(&data, &["admin", "list"])), "");
    assert_eq!(mode(&data), 0o700, "the data dir");
    assert_eq!(mode(&data.join("zlh.db")), 0o600, "the database file");

    let db = Db::connect(&format!("sqlite://{}", data.join("zlh.db").display())).await.unwrap();
    users::create(&db, "ops@example.com", "ops", "$argon2id$not-used", Role::User).await.unwrap();
    users::create(&db, "dev@example.com", "dev", "$argon2id$not-used", Role::User).await.unwrap();

    assert_eq!(ok(&zlh_apid(&data, &["admin", "grant", "Ops@Example.com"])), "ops@example.com is an admin\n");
    assert_eq!(role(&db, "ops@example.com").await, Role::Admin);
    assert_eq!(role(&db, "dev@example.com").await, Role::User);
    assert_eq!(ok(&zlh_apid(&data, &["admin", "grant", "ops@example.com"])), "ops@example.com was already an admin\n");
    assert_eq!(ok(&zlh_apid(&data, &["admin", "list"])), "ops@example.com\n");

    // Nobody is made an admin by naming an address that has no account (yet).
    let err = refused(&zlh_apid(&data, &["admin", "grant", "later@example.com"]));
    assert!(err.contains("error: no account is registered with later@example.com"), "{err}");
    let err = refused(&zlh_apid(&data, &["admin", "grant", "not-an-address"]));
    assert!(err.contains("error: email must be"), "{err}");
    assert_eq!(ok(&zlh_apid(&data, &["admin", "list"])), "ops@example.com\n", "nothing changed");

    assert_eq!(ok(&zlh_apid(&data, &["admin", "revoke", "ops@example.com"])), "ops@example.com is not an admin\n");
    assert_eq!(role(&db, "ops@example.com").await, Role::User);
    assert_eq!(ok(&zlh_apid(&data, &["admin", "list"])), "");
}

#[test]
fn a_config_naming_admin_emails_is_refused_by_serve_and_admin_alike() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("zlh-apid.toml"), "admin_emails = [\"ops@example.com\"]\n").unwrap();
    for args in [&["serve"][..], &["admin", "list"]] {
        let err = refused(&zlh_apid(tmp.path(), args));
        assert!(err.contains("admin_emails no longer makes anyone an admin"), "{args:?}: {err}");
        assert!(err.contains("zlh-apid admin grant <email>"), "{args:?}: {err}");
    }
    assert!(!tmp.path().join("zlh.db").exists(), "refused before touching the database");
}
