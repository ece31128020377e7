//! Defects found by trying identity as an attacker and as a busy client
//! would: parallel and cancelled logins, logins racing password changes,
//! reset tokens outliving a password change, trimmed and invisible
//! characters, users in many groups, and what one session keeps.

use std::time::Duration;

use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use futures::{StreamExt, future::join_all, stream};
use tonic::Code;
use tonic_types::StatusExt;

use crate::authz::{Outcome, every_rpc};
use crate::helpers::{
    ROOT_PASSWORD, ROOT_USERNAME, TestApp, TestDb, TestUser, reason, spawn_app, spawn_app_on,
    violated_fields,
};
use identity::proto::identity::v1 as pb;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    let mut conn = app.db.connect().await;
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n
}

// 1. Parallel logins.

#[tokio::test]
async fn fifty_parallel_correct_logins_of_one_account_all_succeed() {
    let app = spawn_app().await;
    let user = TestUser::named("worker");
    app.create_user("worker").await;
    let logins = (0..50).map(|_| app.login("worker", &user.password));
    let results = join_all(logins).await;
    let failed: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|s| (s.code(), s.message().to_owned()))
        .collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}

#[tokio::test]
async fn a_hundred_parallel_wrong_guesses_reach_at_most_five_password_checks() {
    let app = spawn_app().await;
    let user = TestUser::named("victim");
    app.create_user("victim").await;
    let guesses = (0..100).map(|i| {
        let app = &app;
        async move { app.login("victim", &format!("wrong guess {i:03}")).await }
    });
    let results = join_all(guesses).await;
    let checked = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|s| s.code() == Code::Unauthenticated))
        .count();
    let refused = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    assert_eq!(checked, 5, "password checks that answered");
    assert_eq!(refused, 95, "the rest met the lock");
    // The lock holds for the right password too.
    let locked = app.login("victim", &user.password).await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted);
    assert!(locked.get_details_retry_info().is_some());
}

// 2. Cancelled attempts.

#[tokio::test]
async fn logins_cancelled_by_their_deadline_never_count() {
    // A hash that takes far longer than the deadline, so that every attempt
    // is cancelled, most of them mid-check.
    let app = spawn_app_on(TestDb::migrated().await, |c| {
        c.argon2_memory_kib = 64 * 1024;
        c.argon2_iterations = 4;
    })
    .await;
    let user = TestUser::named("hasty");
    app.create_user("hasty").await;
    for _ in 0..10 {
        let mut request = tonic::Request::new(pb::LoginRequest {
            login: "hasty".into(),
            password: user.password.clone(),
        });
        request.set_timeout(Duration::from_millis(5));
        let status = app.anon.auth.clone().login(request).await.unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    app.login("hasty", &user.password)
        .await
        .expect("cancelled attempts are not failures");
}

// 3. A login racing a password change.

#[tokio::test]
async fn a_login_that_checked_the_old_password_during_a_change_gets_no_session() {
    let app = spawn_app().await;
    let user = app.create_user("racer").await;
    let old = TestUser::named("racer").password;

    // Hold the login after it has read the old hash, before it checks it:
    // its throttling lease waits behind this lock.
    let mut blocker = app.db.connect().await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE login_attempts IN SHARE MODE;")
        .await
        .unwrap();
    let login = {
        let mut auth = app.anon.auth.clone();
        let old = old.clone();
        tokio::spawn(async move {
            auth.login(pb::LoginRequest {
                login: "racer".into(),
                password: old,
            })
            .await
        })
    };
    // The login waits on the lock: an event seen in pg_locks, not a sleep.
    while count(
        &app,
        "SELECT count(*) AS n FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
         WHERE c.relname = 'login_attempts' AND NOT l.granted",
    )
    .await
        == 0
    {
        tokio::task::yield_now().await;
    }
    // Meanwhile an administrator sets a new password, which ends every
    // session of the user.
    app.admin
        .users
        .clone()
        .set_password(pb::SetPasswordRequest {
            id: user.id.clone(),
            new_password: "the administrator's new password".into(),
        })
        .await
        .unwrap();
    blocker.batch_execute("COMMIT").await.unwrap();

    let status = login.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let live = count(
        &app,
        &format!(
            "SELECT count(*) AS n FROM sessions WHERE user_id = '{}' AND end_time IS NULL",
            user.id
        ),
    )
    .await;
    assert_eq!(live, 0, "no session outlives the change");
    app.login("racer", "the administrator's new password")
        .await
        .expect("the new password works");
}

// 4. Reset tokens and password changes.

async fn reset_token(app: &TestApp, email: &str) -> String {
    app.admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: email.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn reset_with(app: &TestApp, token: &str) -> Result<(), tonic::Status> {
    app.anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: token.into(),
            new_password: "taken back by the old link".into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn change_password_and_set_password_spend_earlier_reset_tokens() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("cleaned").await;
    let old = TestUser::named("cleaned").password;

    let mailed = reset_token(&app, &user.email).await;
    app.as_token(&tokens.access_token)
        .auth
        .change_password(pb::ChangePasswordRequest {
            current_password: old,
            new_password: "changed by the user".into(),
        })
        .await
        .unwrap();
    let spent = reset_with(&app, &mailed).await.unwrap_err();
    assert_eq!(spent.code(), Code::FailedPrecondition);
    assert_eq!(reason(&spent), "ACCOUNT_TOKEN_USED");

    let mailed = reset_token(&app, &user.email).await;
    app.admin
        .users
        .clone()
        .set_password(pb::SetPasswordRequest {
            id: user.id.clone(),
            new_password: "set by the administrator".into(),
        })
        .await
        .unwrap();
    let spent = reset_with(&app, &mailed).await.unwrap_err();
    assert_eq!(spent.code(), Code::FailedPrecondition);
    assert_eq!(reason(&spent), "ACCOUNT_TOKEN_USED");
    app.login("cleaned", "set by the administrator")
        .await
        .expect("the administrator's password stands");
}

// 5. REQUIRE_VERIFIED_LOGIN and Refresh.

#[tokio::test]
async fn required_verification_also_stops_refresh_of_existing_sessions() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("unverified").await;
    let app = app.restart(|c| c.require_verified_login = true).await;

    let refused = app
        .anon
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "EMAIL_NOT_VERIFIED");

    // Once verified, the same refresh token works: the refusal spent nothing.
    app.update_user(&user.id, &["is_verified"], |u| u.is_verified = true)
        .await
        .unwrap();
    app.anon
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token,
        })
        .await
        .expect("refresh after verification");
}

// 6. and 7. Trimming and invisible characters.

#[tokio::test]
async fn fields_are_trimmed_before_they_are_checked() {
    let app = spawn_app().await;
    let created = app
        .anon
        .create_user(pb::CreateUserRequest {
            username: "  alice\t ".into(),
            email: "\talice@example.com\n".into(),
            password: "alice's long password".into(),
            first_name: "\tAlice\n".into(),
            ..Default::default()
        })
        .await
        .expect("trimmed fields are valid");
    assert_eq!(created.username, "alice");
    assert_eq!(created.email, "alice@example.com");
    assert_eq!(created.first_name, "Alice");
    app.login("\talice\r\n", "alice's long password")
        .await
        .expect("the login is trimmed too");

    let group = app
        .admin
        .groups
        .clone()
        .create_group(pb::CreateGroupRequest {
            groupname: "\tAdmins\n".into(),
            slug: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    assert_eq!(
        (group.groupname.as_str(), group.slug.as_str()),
        ("Admins", "admins")
    );

    // Inside a field a control character is still refused.
    let status = app
        .anon
        .users
        .clone()
        .create_user(pb::CreateUserRequest {
            username: "bo\tb".into(),
            email: "bob@example.com".into(),
            password: "bob's long password".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["username"]);
}

#[tokio::test]
async fn invisible_characters_are_refused_in_names_that_identify() {
    let app = spawn_app().await;
    let invisible = ["\u{200B}", "\u{00AD}", "\u{2060}", "\u{202E}", "\u{FEFF}"];
    for (i, c) in invisible.iter().enumerate() {
        let status = app
            .anon
            .users
            .clone()
            .create_user(pb::CreateUserRequest {
                username: format!("spoof{c}{i}"),
                email: format!("admin{i}@exa{c}mple.com"),
                password: "a long enough password".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "U+{:04X}",
            c.chars().next().unwrap() as u32
        );
        assert_eq!(violated_fields(&status), ["username", "email"]);

        let status = app
            .admin
            .groups
            .clone()
            .create_group(pb::CreateGroupRequest {
                groupname: format!("Admins{c}"),
                slug: format!("admins-{i}"),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), ["groupname"]);
    }

    // Names keep the joiners some scripts need, and refuse the rest.
    let persian = "\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}";
    let created = app
        .anon
        .create_user(pb::CreateUserRequest {
            first_name: persian.into(),
            ..TestUser::named("joiner").request()
        })
        .await
        .unwrap();
    assert_eq!(created.first_name, persian);
    let status = app
        .anon
        .users
        .clone()
        .create_user(pb::CreateUserRequest {
            last_name: "Smith\u{202E}".into(),
            ..TestUser::named("override").request()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["last_name"]);
}

// 8. A user in 500 groups.

#[tokio::test]
async fn a_superuser_in_five_hundred_groups_can_do_everything() {
    let app = spawn_app().await;
    let slugs: Vec<String> = (0..500).map(|i| format!("team-{i:03}")).collect();
    let created: Vec<pb::Group> = stream::iter(slugs.iter())
        .map(|slug| {
            let mut groups = app.admin.groups.clone();
            let root = app.root.id.clone();
            async move {
                let group = groups
                    .create_group(pb::CreateGroupRequest {
                        groupname: slug.clone(),
                        slug: slug.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .group
                    .unwrap();
                groups
                    .add_group_member(pb::AddGroupMemberRequest {
                        group_id: group.id.clone(),
                        user_id: root,
                    })
                    .await
                    .unwrap();
                group
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(created.len(), 500);

    let tokens = app
        .login(ROOT_USERNAME, ROOT_PASSWORD)
        .await
        .expect("login")
        .tokens
        .unwrap();
    assert!(
        tokens.access_token.len() < 8 * 1024,
        "{}",
        tokens.access_token.len()
    );

    let verified = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: tokens.access_token.clone(),
        })
        .await
        .expect("VerifyToken")
        .into_inner();
    let by_id: Vec<String> = verified.groups.into_iter().map(|g| g.slug).collect();
    let mut all = by_id.clone();
    all.sort();
    assert_eq!(all, slugs, "VerifyToken answers with every group");
    // The token carries the 64 oldest, and says that it was cut.
    let claims = jwt_claims(&tokens.access_token);
    assert_eq!(claims["groups"], serde_json::json!(by_id[..64]));
    assert_eq!(claims["groups_truncated"], true);

    let me = app.as_token(&tokens.access_token);
    let refreshed = me
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token.clone(),
        })
        .await
        .expect("Refresh")
        .into_inner()
        .tokens
        .unwrap();
    assert!(refreshed.access_token.len() < 8 * 1024);

    let other = app.create_user("other").await;
    app.create_user("spare").await;
    let pw = TestUser::named("spare").password;
    let spare = (
        app.login("spare", &pw).await.unwrap().tokens.unwrap(),
        app.login("spare", &pw).await.unwrap().tokens.unwrap(),
    );
    let me = app.as_token(&refreshed.access_token);
    for (rpc, outcome) in every_rpc(&me, &app.root, &other, spare).await {
        assert_eq!((rpc, outcome), (rpc, Outcome::Through));
    }
    me.accounts
        .clone()
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: other.id.clone(),
        })
        .await
        .expect("AccountService as the same caller");
}

fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

// 14. What one session keeps.

#[tokio::test]
async fn a_session_keeps_a_bounded_number_of_retired_refresh_tokens() {
    let app = spawn_app().await;
    let (_, first) = app.signed_in_user("looper").await;
    let mut auth = app.anon.auth.clone();
    let mut presented = vec![first.refresh_token.clone()];
    let mut current = first;
    for _ in 0..80 {
        current = auth
            .refresh(pb::RefreshRequest {
                refresh_token: current.refresh_token.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .tokens
            .unwrap();
        presented.push(current.refresh_token.clone());
    }
    let kept = count(
        &app,
        "SELECT count(*) AS n FROM retired_refresh_tokens r JOIN sessions s ON s.id = r.session_id",
    )
    .await;
    assert_eq!(kept, 64, "the newest 64 retired tokens");

    // The oldest is forgotten: refused as unknown, the session lives on.
    let forgotten = auth
        .refresh(pb::RefreshRequest {
            refresh_token: presented[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&forgotten), "REFRESH_TOKEN_INVALID");
    app.anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: current.access_token.clone(),
        })
        .await
        .expect("still live");

    // A recent one is still reuse: the session ends.
    let reused = auth
        .refresh(pb::RefreshRequest {
            refresh_token: presented[presented.len() - 2].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&reused), "SESSION_ENDED");
    let ended = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: current.access_token,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&ended), "SESSION_ENDED");
}
