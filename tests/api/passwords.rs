//! Passwords too easy to guess, or in the breached list of
//! BREACHED_PASSWORDS_FILE, are refused wherever one is set (CreateUser,
//! SetPassword, ChangePassword, ResetPassword) with INVALID_ARGUMENT naming
//! the field; a long lowercase passphrase stays valid; Login, existing
//! passwords and imported hashes are not judged again. The list in either
//! form (Have I Been Pwned's SHA-1 text, or built by `identity passwords
//! build`), a bad file at start, and the `passwords` command.

use std::path::{Path, PathBuf};

use identity::{
    app::Application,
    domain::{BreachedList, NewPassword},
    proto::identity::v1 as pb,
};
use sha1::{Digest, Sha1};
use tonic::Code;

use crate::accounts::{BCRYPT_HASH, BCRYPT_PASSWORD};
use crate::cli::identity;
use crate::helpers::*;

const WEAK: [&str; 8] = [
    "password",
    "Password1",
    "P@ssw0rd!",
    "aaaaaaaa",
    "12345678",
    "abcdefgh",
    "qwertyuiop",
    "iloveyou2024",
];

fn invalid(status: tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), [field], "{status:?}");
}

/// Sets each of `passwords` in every RPC that sets one, and expects each
/// refused with INVALID_ARGUMENT naming the field; then a password outside
/// them is set through a reset token the refusals did not spend, and logs
/// in.
async fn refused_wherever_a_password_is_set(app: &TestApp, passwords: &[&str], fine: &str) {
    for refused in passwords {
        let request = pb::CreateUserRequest {
            password: (*refused).into(),
            ..TestUser::named("refused").request()
        };
        invalid(app.anon.create_user(request).await.unwrap_err(), "password");
    }
    let (user, tokens) = app.signed_in_user("strong").await;
    let me = app.as_token(&tokens.access_token);
    for refused in passwords {
        invalid(
            app.admin
                .users
                .clone()
                .set_password(pb::SetPasswordRequest {
                    id: user.id.clone(),
                    new_password: (*refused).into(),
                })
                .await
                .unwrap_err(),
            "new_password",
        );
        invalid(
            me.auth
                .clone()
                .change_password(pb::ChangePasswordRequest {
                    current_password: TestUser::named("strong").password,
                    new_password: (*refused).into(),
                })
                .await
                .unwrap_err(),
            "new_password",
        );
    }
    let reset = app
        .admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: user.email.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    for refused in passwords {
        invalid(
            app.anon
                .accounts
                .clone()
                .reset_password(pb::ResetPasswordRequest {
                    token: reset.clone(),
                    new_password: (*refused).into(),
                })
                .await
                .unwrap_err(),
            "new_password",
        );
    }
    app.anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: reset,
            new_password: fine.into(),
        })
        .await
        .unwrap();
    app.login("strong", fine).await.unwrap();
}

#[tokio::test]
async fn weak_passwords_are_refused_wherever_a_password_is_set() {
    let app = spawn_app().await;
    // A passphrase of plain lowercase words is fine (no composition rules).
    refused_wherever_a_password_is_set(&app, &WEAK, "gravel lantern oyster").await;
}

/// Long passwords that pass every other rule: refused only for being in the
/// test's list.
const BREACHED: [&str; 4] = [
    "tangerine velvet orchestra",
    "marmalade submarine 1987",
    "Quixotic-Lampshade-42",
    "une phrase de passe très longue",
];

/// SHA-1 in uppercase hexadecimal, with RustCrypto's `sha1` (the service
/// hashes with aws-lc-rs): as Have I Been Pwned publishes it.
fn sha1_hex(password: &str) -> String {
    Sha1::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// A list in Have I Been Pwned's format: the SHA-1 of each of `passwords`
/// among other hashes, out of order, with `\r\n`, a blank line and a
/// duplicate, as `name` in `dir`.
fn hibp_file(dir: &TempDir, name: &str, passwords: &[&str]) -> PathBuf {
    let mut lines: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{}:{}",
                sha1_hex(&format!("someone else's password {i}")),
                i + 1
            )
        })
        .collect();
    for (i, p) in passwords.iter().enumerate() {
        lines.insert(i * 37, format!("{}:{}", sha1_hex(p), 1000 + i));
    }
    lines.push(String::new());
    lines.push(format!("{}:3", sha1_hex(passwords[0]).to_lowercase()));
    let path = dir.0.join(name);
    std::fs::write(&path, lines.join("\r\n") + "\r\n").unwrap();
    path
}

/// `identity passwords build INPUT OUTPUT`, by the real binary.
fn build(input: &Path, output: &Path) -> std::process::Output {
    identity(
        &[
            "passwords",
            "build",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
        &[],
        None,
    )
}

async fn with_list(file: &Path) -> TestApp {
    let file = file.to_owned();
    spawn_app_on(TestDb::migrated().await, move |c| {
        c.breached_passwords_file = Some(file)
    })
    .await
}

#[test]
fn the_listed_passwords_pass_every_other_rule() {
    for p in BREACHED {
        assert!(NewPassword::parse(p, &BreachedList::empty()).is_ok(), "{p}");
    }
}

#[tokio::test]
async fn breached_passwords_in_the_sha1_text_are_refused_wherever_a_password_is_set() {
    let dir = TempDir::new("identity-breached");
    let app = with_list(&hibp_file(&dir, "pwned.txt", &BREACHED)).await;
    refused_wherever_a_password_is_set(&app, &BREACHED, "gravel lantern oyster").await;
}

#[tokio::test]
async fn breached_passwords_in_the_built_file_are_refused_wherever_a_password_is_set() {
    let dir = TempDir::new("identity-breached");
    let text = hibp_file(&dir, "pwned.txt", &BREACHED);
    let built = dir.0.join("pwned.bin");
    let out = build(&text, &built);
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_file(&text).unwrap();
    let app = with_list(&built).await;
    refused_wherever_a_password_is_set(&app, &BREACHED, "gravel lantern oyster").await;
}

#[tokio::test]
async fn existing_passwords_and_imported_hashes_still_log_in() {
    let app = spawn_app().await;
    let veteran = TestUser {
        password: BREACHED[0].to_owned(),
        ..TestUser::named("veteran")
    };
    app.anon.create_user(veteran.request()).await.unwrap();

    let dir = TempDir::new("identity-breached");
    let file = hibp_file(&dir, "pwned.txt", &[BREACHED[0], BCRYPT_PASSWORD]);
    let app = app
        .restart(move |c| c.breached_passwords_file = Some(file))
        .await;
    app.login("veteran", BREACHED[0]).await.unwrap();
    // A hash is imported whatever its password; Login (which re-hashes
    // it with the current parameters) does not judge it either.
    let results = app
        .admin
        .accounts
        .clone()
        .import_users(pb::ImportUsersRequest {
            users: vec![pb::ImportedUser {
                username: "imported.one".into(),
                email: "imported.one@example.com".into(),
                password_hash: BCRYPT_HASH.into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        results[0].outcome(),
        pb::import_result::Outcome::Imported,
        "{results:?}"
    );
    app.login("imported.one", BCRYPT_PASSWORD).await.unwrap();
    app.login("imported.one", BCRYPT_PASSWORD).await.unwrap();
    // Setting it anew is refused.
    let (user, _) = app.signed_in_user("strong").await;
    invalid(
        app.admin
            .users
            .clone()
            .set_password(pb::SetPasswordRequest {
                id: user.id,
                new_password: BREACHED[0].into(),
            })
            .await
            .unwrap_err(),
        "new_password",
    );
}

#[tokio::test]
async fn a_missing_or_malformed_list_fails_the_start_with_one_line_naming_it() {
    let db = TestDb::migrated().await;
    let dir = TempDir::new("identity-breached");
    let malformed = dir.0.join("malformed.txt");
    std::fs::write(
        &malformed,
        format!("{}:1\r\nnot a hash\r\n", sha1_hex(BREACHED[0])),
    )
    .unwrap();
    let missing = dir.0.join("missing.txt");
    for (file, says) in [(&malformed, "line 2"), (&missing, "")] {
        let mut config = test_config(&db.url);
        config.keys_dir = dir.0.join("keys");
        config.breached_passwords_file = Some(file.clone());
        let e = Application::build(&config).await.unwrap_err().to_string();
        assert!(e.starts_with("BREACHED_PASSWORDS_FILE: "), "{e}");
        assert!(
            e.contains(&file.display().to_string()) && e.contains(says),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");

        // The binary: one line, exit code 2, before any database work.
        let out = identity(
            &["serve"],
            &[("BREACHED_PASSWORDS_FILE", file.to_str().unwrap())],
            None,
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("identity: BREACHED_PASSWORDS_FILE: ") && stderr.contains(says),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn createsuperuser_refuses_a_breached_password() {
    let db = TestDb::migrated().await;
    let dir = TempDir::new("identity-breached");
    let file = hibp_file(&dir, "pwned.txt", &BREACHED);
    let args = [
        "createsuperuser",
        "--username",
        "boss",
        "--email",
        "boss@example.com",
    ];
    let file = file.display().to_string();
    let env = |password| {
        [
            ("DATABASE_URL", db.url.as_str()),
            ("BREACHED_PASSWORDS_FILE", file.as_str()),
            ("IDENTITY_PASSWORD", password),
        ]
    };
    let out = identity(&args, &env(BREACHED[2]), None);
    assert_eq!(out.status.code(), Some(2), "bad input: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("identity: invalid password"), "{stderr}");

    let out = identity(&args, &env("gravel lantern oyster"), None);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn passwords_build_writes_a_list_the_service_loads() {
    let dir = TempDir::new("identity-breached");
    let text = hibp_file(&dir, "pwned.txt", &BREACHED);
    let built = dir.0.join("pwned.bin");
    let out = build(&text, &built);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("{} entries", 200 + 4)),
        "{out:?}"
    );
    let (list, format) = BreachedList::load(&built).unwrap();
    assert_eq!(format, identity::domain::breached::ListFormat::Built);
    assert_eq!(list.len(), 204);
    assert!(BREACHED.iter().all(|p| list.contains(p)));
    assert!(!list.contains("gravel lantern oyster"));

    // `check` loads either form as the service would.
    for file in [&text, &built] {
        let out = identity(&["passwords", "check", file.to_str().unwrap()], &[], None);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("204 entries"));
    }

    // Only the passwords seen at least 1000 times: the four.
    let few = dir.0.join("few.bin");
    let out = identity(
        &[
            "passwords",
            "build",
            text.to_str().unwrap(),
            few.to_str().unwrap(),
            "--min-count",
            "1000",
        ],
        &[],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(BreachedList::load(&few).unwrap().0.len(), 4);
}

#[test]
fn passwords_build_exits_1_on_a_bad_input_and_2_on_a_bad_option() {
    let dir = TempDir::new("identity-breached");
    let text = hibp_file(&dir, "pwned.txt", &BREACHED);
    let built = dir.0.join("pwned.bin");
    let malformed = dir.0.join("malformed.txt");
    std::fs::write(
        &malformed,
        format!("{}:1\n\n{}\n", sha1_hex("a"), &sha1_hex("b")[5..]),
    )
    .unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    for (input, output, line) in [
        (path(&malformed), path(&built), "malformed.txt line 3: "),
        (
            path(&dir.0.join("missing.txt")),
            path(&built),
            "missing.txt: ",
        ),
        (
            path(&text),
            path(&dir.0.join("no/such/dir/x.bin")),
            "x.bin: ",
        ),
    ] {
        let out = identity(&["passwords", "build", &input, &output], &[], None);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("identity: ") && last.contains(line),
            "{stderr}"
        );
    }
    assert!(!built.exists(), "nothing written from a bad input");
    // Left behind: nothing but the inputs.
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 2);

    for bad in [
        vec!["passwords", "build", "only-input.txt"],
        vec!["passwords", "build", "a", "b", "--min-count", "0"],
        vec!["passwords", "build", "a", "b", "--min-count", "many"],
    ] {
        let out = identity(&bad, &[], None);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}
