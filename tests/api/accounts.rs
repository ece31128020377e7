//! AccountService and `identity import`: email verification, password reset,
//! REQUIRE_VERIFIED_LOGIN, and users brought in with hashes made by other
//! tools, who then log in and are upgraded to argon2id.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::Code;

use crate::helpers::{Lookup, TestApp, TestDb, TestUser, reason, spawn_app, spawn_app_on};
use identity::db::schema::users;
use identity::proto::identity::v1 as pb;

/// Made by Python's `bcrypt` 5.0.0, an independent implementation:
/// `bcrypt.hashpw(b"imported password one", bcrypt.gensalt(rounds=4))`.
pub const BCRYPT_HASH: &str = "$2b$04$C2ySnT/AI1FbR6CJ7gXhmOGb8W0LUirb877YzEEJ.ybDTyVL0cpUq";
pub const BCRYPT_PASSWORD: &str = "imported password one";
/// Made by Python's `argon2-cffi` 25.1.0 (argon2i, weaker than the
/// service's argon2id): `PasswordHasher(time_cost=1, memory_cost=1024,
/// parallelism=1, type=Type.I).hash("imported password two")`.
const ARGON2I_HASH: &str = "$argon2i$v=19$m=1024,t=1,p=1$KXUz4YO2648x7oeaHr4liw$IH/D3v/mvrc2M8k24pPdsv1z5TFxZYJJesJPOfu2cF0";
const ARGON2I_PASSWORD: &str = "imported password two";

async fn stored_hash(app: &TestApp, username: &str) -> String {
    let mut conn = app.db.connect().await;
    users::table
        .filter(users::username.eq(username))
        .select(users::password_hash)
        .first(&mut conn)
        .await
        .unwrap()
}

async fn is_verified(app: &TestApp, id: &str) -> bool {
    app.get_user(Lookup::Id(id)).await.unwrap().is_verified
}

async fn verification_token(app: &TestApp, user_id: &str) -> String {
    app.admin
        .accounts
        .clone()
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: user_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

#[tokio::test]
async fn a_verification_token_verifies_once_and_only_its_user() {
    let app = spawn_app().await;
    let user = app.create_user("verifiable").await;
    assert!(!user.is_verified);

    // Only a superuser may issue one; the token is the only proof needed.
    let (_, tokens) = app.signed_in_user("someone").await;
    let refused = app
        .as_token(&tokens.access_token)
        .accounts
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let issued = app
        .admin
        .accounts
        .clone()
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.email, user.email);
    let expires = issued.expire_time.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!(
        (86_000..=86_400).contains(&expires),
        "24 h by default: {expires}"
    );

    let confirmed = app
        .anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest {
            token: issued.token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(confirmed.id, user.id);
    assert!(confirmed.is_verified && is_verified(&app, &user.id).await);

    let again = app
        .anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest {
            token: issued.token,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(reason(&again), "ACCOUNT_TOKEN_USED");

    let unknown = app
        .anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest {
            token: "a-token-this-service-never-issued".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition);
    assert_eq!(reason(&unknown), "ACCOUNT_TOKEN_INVALID");

    let empty = app
        .anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest { token: " ".into() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    let missing = app
        .admin
        .accounts
        .clone()
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn an_expired_or_foreign_token_changes_nothing() {
    let app = spawn_app().await;
    let user = app.create_user("latecomer").await;
    let token = verification_token(&app, &user.id).await;
    let mut conn = app.db.connect().await;
    diesel::sql_query("UPDATE account_tokens SET expire_time = now() - interval '1 minute'")
        .execute(&mut conn)
        .await
        .unwrap();
    let expired = app
        .anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest { token })
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::FailedPrecondition);
    assert_eq!(reason(&expired), "ACCOUNT_TOKEN_EXPIRED");
    assert!(!is_verified(&app, &user.id).await);

    // A reset token is not a verification token, nor the other way round.
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
    let foreign = app
        .anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest { token: reset })
        .await
        .unwrap_err();
    assert_eq!(reason(&foreign), "ACCOUNT_TOKEN_INVALID");
    let verify = verification_token(&app, &user.id).await;
    let foreign = app
        .anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: verify,
            new_password: "a brand new password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&foreign), "ACCOUNT_TOKEN_INVALID");
    assert!(!is_verified(&app, &user.id).await);
}

#[tokio::test]
async fn required_verification_refuses_only_after_a_correct_password() {
    let app = spawn_app_on(TestDb::migrated().await, |c| {
        c.require_verified_login = true
    })
    .await;
    let user = app.create_user("unverified").await;
    let password = TestUser::named("unverified").password;

    let wrong = app
        .login("unverified", "not the password")
        .await
        .unwrap_err();
    assert_eq!(
        wrong.code(),
        Code::Unauthenticated,
        "a guesser learns nothing"
    );
    let refused = app.login("unverified", &password).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "EMAIL_NOT_VERIFIED");

    let token = verification_token(&app, &user.id).await;
    app.anon
        .accounts
        .clone()
        .confirm_email(pb::ConfirmEmailRequest { token })
        .await
        .unwrap();
    assert!(app.login("unverified", &password).await.is_ok());
}

#[tokio::test]
async fn a_reset_sets_the_password_once_and_ends_every_session() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("forgetful").await;
    let old_password = TestUser::named("forgetful").password;

    // Same answer for an unknown address, without a token.
    let unknown = app
        .admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "nobody@example.com".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unknown.token.is_empty() && unknown.expire_time.is_none());
    // Only the trusted caller gets tokens.
    let anonymous = app
        .anon
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: user.email.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let issued = app
        .admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: user.email.to_uppercase(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!issued.token.is_empty());
    let expires = issued.expire_time.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!(
        (3_500..=3_600).contains(&expires),
        "1 h by default: {expires}"
    );

    // The input rules apply, and a refused password leaves the token usable.
    let weak = app
        .anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: issued.token.clone(),
            new_password: "short".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(weak.code(), Code::InvalidArgument);
    assert_eq!(crate::helpers::violated_fields(&weak), ["new_password"]);

    app.anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: issued.token.clone(),
            new_password: "a brand new password".into(),
        })
        .await
        .unwrap();

    let ended = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: tokens.access_token,
        })
        .await
        .unwrap_err();
    assert!(
        ["SESSION_ENDED", "CREDENTIALS_CHANGED"].contains(&reason(&ended).as_str()),
        "{ended:?}"
    );
    assert_eq!(
        app.login("forgetful", &old_password)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert!(app.login("forgetful", "a brand new password").await.is_ok());

    let reused = app
        .anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: issued.token,
            new_password: "yet another password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&reused), "ACCOUNT_TOKEN_USED");
    assert!(app.login("forgetful", "a brand new password").await.is_ok());
}

#[tokio::test]
async fn reset_requests_are_throttled_per_address_known_or_not() {
    let app = spawn_app().await;
    let user = app.create_user("popular").await;
    let mut refused = 0;
    for email in [user.email.as_str(), "ghost@example.com"] {
        let mut codes = Vec::new();
        for _ in 0..7 {
            let result = app
                .admin
                .accounts
                .clone()
                .request_password_reset(pb::RequestPasswordResetRequest {
                    email: email.into(),
                })
                .await;
            codes.push(result.map(|_| Code::Ok).unwrap_or_else(|s| s.code()));
        }
        assert_eq!(&codes[..4], [Code::Ok; 4], "{email}: {codes:?}");
        assert_eq!(codes[6], Code::ResourceExhausted, "{email}: {codes:?}");
        refused += codes
            .iter()
            .filter(|&&c| c == Code::ResourceExhausted)
            .count();
    }
    let body = crate::metrics::scrape(app.addr).await;
    let throttled = r#"identity_resource_exhausted_total{cause="reset_throttle"}"#;
    assert_eq!(
        crate::metrics::sample(&body, throttled),
        Some(refused as f64),
        "{body}"
    );
}

fn imported(username: &str, hash: &str) -> pb::ImportedUser {
    pb::ImportedUser {
        username: username.into(),
        email: format!("{username}@example.com"),
        password_hash: hash.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn imported_hashes_from_other_tools_log_in_and_are_upgraded() {
    let app = spawn_app().await;
    app.create_user("taken").await;
    let id = uuid::Uuid::now_v7().to_string();
    let users = vec![
        pb::ImportedUser {
            id: id.clone(),
            is_verified: true,
            first_name: "Bea".into(),
            groups: vec!["staff".into(), "imported".into()],
            ..imported("bea.crypt", BCRYPT_HASH)
        },
        imported("ari.gon", ARGON2I_HASH),
        imported("bad.hash", "md5$abc"),
        imported("taken", BCRYPT_HASH),
        imported("x", BCRYPT_HASH),
    ];
    let request = pb::ImportUsersRequest { users };
    let results = app
        .admin
        .accounts
        .clone()
        .import_users(request.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::import_result::Outcome;
    let outcomes: Vec<Outcome> = results.iter().map(|r| r.outcome()).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Imported,
            Outcome::Imported,
            Outcome::Refused,
            Outcome::Refused,
            Outcome::Refused
        ]
    );
    assert_eq!(results[0].id, id, "the given id is kept");
    assert!(
        results[2].reason.starts_with("password_hash"),
        "{}",
        results[2].reason
    );
    assert!(
        results[3].reason.starts_with("username"),
        "{}",
        results[3].reason
    );
    assert!(
        results[4].reason.starts_with("username"),
        "{}",
        results[4].reason
    );

    // Run again: idempotent.
    let again = app
        .admin
        .accounts
        .clone()
        .import_users(request)
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(again[0].outcome(), Outcome::AlreadyImported);
    assert_eq!(again[1].outcome(), Outcome::AlreadyImported);

    // The bcrypt user logs in with its old password, is in its groups, and
    // its hash is now argon2id with the service's parameters.
    let login = app.login("bea.crypt", BCRYPT_PASSWORD).await.unwrap();
    let user = login.user.unwrap();
    assert!(user.is_verified && user.first_name == "Bea");
    let verified = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: login.tokens.unwrap().access_token,
        })
        .await
        .unwrap()
        .into_inner();
    let mut slugs: Vec<String> = verified.groups.into_iter().map(|g| g.slug).collect();
    slugs.sort();
    assert_eq!(slugs, ["imported", "staff"]);
    let upgraded = stored_hash(&app, "bea.crypt").await;
    assert!(
        upgraded.starts_with("$argon2id$v=19$m=4096,t=1,p=1$"),
        "{upgraded}"
    );
    assert!(
        app.login("bea.crypt", BCRYPT_PASSWORD).await.is_ok(),
        "still the same password"
    );
    assert!(app.login("bea.crypt", "wrong").await.is_err());

    // The argon2i user likewise.
    assert_eq!(
        app.login("ari.gon", "wrong password")
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        stored_hash(&app, "ari.gon").await,
        ARGON2I_HASH,
        "kept until a success"
    );
    app.login("ari.gon", ARGON2I_PASSWORD).await.unwrap();
    assert!(stored_hash(&app, "ari.gon").await.starts_with("$argon2id$"));

    // Only a superuser imports.
    let (_, tokens) = app.signed_in_user("plain").await;
    let refused = app
        .as_token(&tokens.access_token)
        .accounts
        .import_users(pb::ImportUsersRequest {
            users: vec![imported("sneaky", BCRYPT_HASH)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn the_import_command_reports_refused_lines_and_resumes() {
    let db = TestDb::migrated().await;
    let dir = crate::helpers::TempDir::new("identity-import");
    let file = dir.0.join("users.jsonl");
    let lines = [
        format!(
            r#"{{"username": "line.one", "email": "one@example.com", "password_hash": "{BCRYPT_HASH}", "groups": ["imported"]}}"#
        ),
        String::new(),
        r#"{"username": "line.three", "email": "not-an-email", "password_hash": "x"}"#.into(),
        "not json at all".into(),
        format!(
            r#"{{"username": "line.five", "email": "five@example.com", "password_hash": "{ARGON2I_HASH}", "is_verified": true}}"#
        ),
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let path = file.to_str().unwrap();
    let run = || {
        crate::cli::identity(
            &["import", path, "--batch-size", "2"],
            &[("DATABASE_URL", &db.url)],
            None,
        )
    };

    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused lines fail the run: {stdout}"
    );
    assert!(stdout.contains("line 3: refused: email"), "{stdout}");
    assert!(
        stdout.contains("line 4: refused: not a valid user object"),
        "{stdout}"
    );
    assert!(
        stdout.contains("imported 2, already there 0, refused 2"),
        "{stdout}"
    );

    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("imported 0, already there 2, refused 2"),
        "{stdout}"
    );

    // The imported users log in through the service.
    let app = spawn_app_on(db, |_| {}).await;
    assert!(app.login("one@example.com", BCRYPT_PASSWORD).await.is_ok());
    assert!(app.login("line.five", ARGON2I_PASSWORD).await.is_ok());
}

/// passlib's and pwdlib's argon2 default (made by argon2-cffi 25.1.0's
/// `PasswordHasher().hash("imported password three")`): stronger than the
/// service's parameters, and rewritten to them at the first login.
const PWDLIB_HASH: &str = "$argon2id$v=19$m=65536,t=3,p=4$W0weUSGgu99Mz55kJ2uKnA$9rSJp1K47doHn8RvMhtRlejQgb0gnvxxNEJDo/7osJs";

#[tokio::test]
async fn a_stronger_imported_hash_is_rewritten_to_the_service_parameters() {
    let app = spawn_app().await;
    app.admin
        .accounts
        .clone()
        .import_users(pb::ImportUsersRequest {
            users: vec![imported("pwd.lib", PWDLIB_HASH)],
        })
        .await
        .unwrap();
    app.login("pwd.lib", "imported password three")
        .await
        .unwrap();
    let hash = stored_hash(&app, "pwd.lib").await;
    assert!(hash.starts_with("$argon2id$v=19$m=4096,t=1,p=1$"), "{hash}");
}

#[tokio::test]
async fn a_deactivated_user_cannot_reset_and_a_token_serves_one_of_two_racers() {
    let app = spawn_app().await;
    let user = app.create_user("racer").await;
    let reset = |email: String| {
        let mut accounts = app.admin.accounts.clone();
        async move {
            accounts
                .request_password_reset(pb::RequestPasswordResetRequest { email })
                .await
                .unwrap()
                .into_inner()
                .token
        }
    };

    // Two confirmations of one token at once: exactly one wins.
    let token = verification_token(&app, &user.id).await;
    let confirm = || {
        let mut accounts = app.anon.accounts.clone();
        let token = token.clone();
        async move {
            accounts
                .confirm_email(pb::ConfirmEmailRequest { token })
                .await
        }
    };
    let (a, b) = tokio::join!(confirm(), confirm());
    assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} {b:?}");

    // A token issued before deactivation sets no password.
    let token = reset(user.email.clone()).await;
    app.deactivate(&user).await;
    let refused = app
        .anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token,
            new_password: "a brand new password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "ACCOUNT_TOKEN_INVALID");
    let hash = stored_hash(&app, "racer").await;
    let still = identity::hashing::Hasher::new(
        identity::hashing::HashParams {
            memory_kib: 4096,
            iterations: 1,
            parallelism: 1,
        },
        1,
        1,
    )
    .unwrap()
    .verify(&TestUser::named("racer").password, Some(&hash))
    .await
    .unwrap();
    assert!(still, "the old password stands");
}
