//! The change feed (ChangeService): what is recorded, by whom, through which
//! RPC and with which request id; also for changes made by hand in SQL and
//! by the command line. The helpers here serve the other `changes_*` files.

use std::time::Duration;

use diesel_async::SimpleAsyncConnection;
use tonic::Code;

use crate::helpers::*;
use identity::proto::identity::v1 as pb;
use pb::ChangeKind as K;

/// How long a test waits for an event before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A WatchChanges stream.
pub type Watch = tonic::Streaming<pb::WatchChangesResponse>;

/// Every change after `after` (empty: the oldest kept), paging to the end.
pub async fn all_changes(app: &TestApp, after: &str) -> (Vec<pb::Change>, String) {
    let mut changes = Vec::new();
    let mut cursor = after.to_owned();
    loop {
        let page = app
            .admin
            .changes
            .clone()
            .list_changes(pb::ListChangesRequest {
                after_cursor: cursor.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("list changes")
            .into_inner();
        let n = page.changes.len();
        changes.extend(page.changes);
        cursor = page.cursor;
        if n < 1000 {
            return (changes, cursor);
        }
    }
}

/// The changes after `after`.
pub async fn changes_after(app: &TestApp, after: &str) -> Vec<pb::Change> {
    all_changes(app, after).await.0
}

/// The cursor at the head of the feed: what comes next is after it.
pub async fn head(app: &TestApp) -> String {
    all_changes(app, "").await.1
}

/// `message` with the header `x-request-id: id`.
pub fn with_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("an ascii request id"));
    request
}

/// The full name of an RPC of package identity.v1: `"UserService/GetUser"`
/// becomes `"/identity.v1.UserService/GetUser"`.
pub fn rpc(name: &str) -> String {
    format!("/identity.v1.{name}")
}

/// The expected change of `kind`, made by `actor` through `method`
/// ("UserService/CreateUser") in the call `request_id`; the ids of what
/// changed are set with struct update syntax.
pub fn made(kind: K, actor: &str, method: &str, request_id: &str) -> pb::Change {
    pb::Change {
        kind: kind as i32,
        actor_id: actor.to_owned(),
        rpc: rpc(method),
        request_id: request_id.to_owned(),
        ..Default::default()
    }
}

/// A change without its place and time, to compare with [`made`].
pub fn plain(change: &pb::Change) -> pb::Change {
    pb::Change {
        cursor: String::new(),
        commit_time: None,
        ..change.clone()
    }
}

/// The changes without place and time, in a stable order: for the changes
/// of one commit whose order within it the test does not fix.
pub fn plain_sorted(changes: &[pb::Change]) -> Vec<pb::Change> {
    let mut plain: Vec<pb::Change> = changes.iter().map(plain).collect();
    plain.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    plain
}

/// The commit a change belongs to: the first half of its cursor (changes of
/// one transaction share it).
pub fn commit_of(change: &pb::Change) -> &str {
    &change.cursor[..16]
}

/// Asserts that `changes` (at least one) were committed together.
pub fn assert_one_commit(changes: &[pb::Change]) {
    assert!(!changes.is_empty());
    let first = commit_of(&changes[0]);
    assert!(
        changes.iter().all(|c| commit_of(c) == first),
        "one commit: {changes:#?}"
    );
}

/// The session id of an access token (VerifyToken's claims).
pub async fn session_of(app: &TestApp, access_token: &str) -> String {
    app.anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: access_token.into(),
        })
        .await
        .expect("verify token")
        .into_inner()
        .claims
        .expect("claims")
        .session_id
}

/// Opens WatchChanges as `clients` after `after` (empty: from now) for
/// `kinds` (empty: all).
pub async fn open_watch(
    clients: &Clients,
    after: &str,
    kinds: &[K],
) -> Result<Watch, tonic::Status> {
    let response = clients
        .changes
        .clone()
        .watch_changes(pb::WatchChangesRequest {
            after_cursor: after.into(),
            kinds: kinds.iter().map(|k| *k as i32).collect(),
        })
        .await?;
    Ok(response.into_inner())
}

/// The next response of `watch`, within [`DEADLINE`]; fails on an error or
/// the end of the stream.
pub async fn next_response(watch: &mut Watch) -> pb::WatchChangesResponse {
    tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("a response within the deadline")
        .expect("no error")
        .expect("no end")
}

/// Reads `watch` until it has delivered `n` changes (failing on more in
/// the same response); returns them and the last cursor it sent.
pub async fn read_changes(watch: &mut Watch, n: usize) -> (Vec<pb::Change>, String) {
    let mut changes = Vec::new();
    let mut cursor = String::new();
    while changes.len() < n {
        let response = next_response(watch).await;
        changes.extend(response.changes);
        cursor = response.cursor;
    }
    assert_eq!(changes.len(), n, "no more than expected: {changes:#?}");
    (changes, cursor)
}

/// An UpdateUser request of `first_name` (a change of one field).
pub fn rename(id: &str, first_name: &str) -> pb::UpdateUserRequest {
    pb::UpdateUserRequest {
        user: Some(pb::User {
            id: id.into(),
            first_name: first_name.into(),
            ..Default::default()
        }),
        update_mask: mask(&["first_name"]),
    }
}

/// Runs `sql` on the test's database by hand (no actor, no RPC).
pub async fn sql(app: &TestApp, sql: &str) {
    app.db
        .connect()
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test]
async fn an_update_through_the_api_is_recorded_with_its_fields_actor_rpc_and_request_id() {
    let app = spawn_app().await;
    let (_, start) = all_changes(&app, "").await;
    let user = app.create_user("alice").await;
    let mut request = tonic::Request::new(pb::UpdateUserRequest {
        user: Some(pb::User {
            id: user.id.clone(),
            first_name: "Alice".into(),
            is_superuser: true,
            ..Default::default()
        }),
        update_mask: mask(&["first_name", "is_superuser"]),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-promote-alice".parse().unwrap());
    app.admin.users.clone().update_user(request).await.unwrap();

    let (changes, _) = all_changes(&app, &start).await;
    let kinds: Vec<K> = changes.iter().map(|c| c.kind()).collect();
    assert_eq!(kinds, [K::UserCreated, K::UserUpdated], "{changes:#?}");
    let updated = &changes[1];
    assert_eq!(updated.user_id, user.id);
    assert_eq!(updated.fields, ["first_name", "is_superuser"]);
    assert_eq!(updated.actor_id, app.root.id);
    assert_eq!(updated.rpc, "/identity.v1.UserService/UpdateUser");
    assert_eq!(updated.request_id, "req-promote-alice");
    assert!(changes[0].cursor < changes[1].cursor);
}

#[tokio::test]
async fn a_watcher_sees_a_change_committed_after_it_opened() {
    let app = spawn_app().await;
    let mut stream = app
        .admin
        .changes
        .clone()
        .watch_changes(pb::WatchChangesRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The first response comes at once: the stream is open from here.
    let first = stream.message().await.unwrap().expect("a first response");
    assert!(first.changes.is_empty());
    let user = app.create_user("bob").await;
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .expect("a change within 5 s")
        .unwrap()
        .expect("a response");
    assert_eq!(next.changes.len(), 1, "{next:#?}");
    assert_eq!(next.changes[0].kind(), K::UserCreated);
    assert_eq!(next.changes[0].user_id, user.id);
    // The stream's cursor is at or past its last change.
    assert!(next.cursor >= next.changes[0].cursor);
}

#[tokio::test]
async fn user_service_changes_are_recorded_with_actor_rpc_and_request_id() {
    let app = spawn_app().await;
    let root = app.root.id.clone();
    let mut users = app.admin.users.clone();

    // CreateUser by a superuser, and by nobody (registration).
    let start = head(&app).await;
    let carol = users
        .create_user(with_id(TestUser::named("carol").request(), "req-create"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let dave = app
        .anon
        .users
        .clone()
        .create_user(with_id(TestUser::named("dave").request(), "req-register"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [
            pb::Change {
                user_id: carol.id.clone(),
                ..made(
                    K::UserCreated,
                    &root,
                    "UserService/CreateUser",
                    "req-create"
                )
            },
            pb::Change {
                user_id: dave.id.clone(),
                ..made(K::UserCreated, "", "UserService/CreateUser", "req-register")
            },
        ]
    );

    // UpdateUser names exactly the fields that changed, in the feed's order.
    let start = head(&app).await;
    let mut change = pb::User {
        id: carol.id.clone(),
        first_name: "Carol".into(),
        last_name: String::new(),
        is_active: false,
        attributes: [("team".to_owned(), "blue".to_owned())].into(),
        ..Default::default()
    };
    let request = |user: &pb::User, id: &str| {
        with_id(
            pb::UpdateUserRequest {
                user: Some(user.clone()),
                update_mask: mask(&["attributes", "is_active", "last_name", "first_name"]),
            },
            id,
        )
    };
    users
        .update_user(request(&change, "req-update"))
        .await
        .unwrap();
    // The same values again change nothing, and record nothing.
    users
        .update_user(request(&change, "req-same"))
        .await
        .unwrap();
    // Reactivated: one field.
    change.is_active = true;
    users
        .update_user(request(&change, "req-reactivate"))
        .await
        .unwrap();
    // A user changing its own name acts as itself.
    let tokens = app
        .anon
        .auth
        .clone()
        .login(with_id(
            pb::LoginRequest {
                login: "dave".into(),
                password: TestUser::named("dave").password,
            },
            "req-login",
        ))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    app.as_token(&tokens.access_token)
        .users
        .clone()
        .update_user(with_id(
            pb::UpdateUserRequest {
                user: Some(pb::User {
                    id: dave.id.clone(),
                    last_name: "Self".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["last_name"]),
            },
            "req-self",
        ))
        .await
        .unwrap();
    let dave_session = session_of(&app, &tokens.access_token).await;
    let changes = changes_after(&app, &start).await;
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [
            pb::Change {
                user_id: carol.id.clone(),
                fields: vec!["first_name".into(), "is_active".into(), "attributes".into()],
                ..made(
                    K::UserUpdated,
                    &root,
                    "UserService/UpdateUser",
                    "req-update"
                )
            },
            pb::Change {
                user_id: carol.id.clone(),
                fields: vec!["is_active".into()],
                ..made(
                    K::UserUpdated,
                    &root,
                    "UserService/UpdateUser",
                    "req-reactivate"
                )
            },
            pb::Change {
                user_id: dave.id.clone(),
                session_id: dave_session.clone(),
                ..made(
                    K::SessionStarted,
                    &dave.id,
                    "AuthService/Login",
                    "req-login"
                )
            },
            pb::Change {
                user_id: dave.id.clone(),
                fields: vec!["last_name".into()],
                ..made(
                    K::UserUpdated,
                    &dave.id,
                    "UserService/UpdateUser",
                    "req-self"
                )
            },
        ]
    );

    // DeleteUser removes its memberships and ends its live sessions, all in
    // the commit of the deletion.
    let mut groups = app.admin.groups.clone();
    let mut group_ids = Vec::new();
    for name in ["readers", "writers"] {
        let group = groups
            .create_group(pb::CreateGroupRequest {
                groupname: name.into(),
                slug: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .group
            .unwrap();
        groups
            .add_group_member(pb::AddGroupMemberRequest {
                group_id: group.id.clone(),
                user_id: dave.id.clone(),
            })
            .await
            .unwrap();
        group_ids.push(group.id);
    }
    let second = app
        .login("dave", &TestUser::named("dave").password)
        .await
        .unwrap();
    let second_session = session_of(&app, &second.tokens.unwrap().access_token).await;
    // An ended session ends no more when its user goes.
    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: tokens.refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    let start = head(&app).await;
    users
        .delete_user(with_id(
            pb::DeleteUserRequest {
                id: dave.id.clone(),
            },
            "req-delete",
        ))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_one_commit(&changes);
    let deleted = |kind| made(kind, &root, "UserService/DeleteUser", "req-delete");
    let mut expected = vec![
        pb::Change {
            user_id: dave.id.clone(),
            ..deleted(K::UserDeleted)
        },
        pb::Change {
            user_id: dave.id.clone(),
            session_id: second_session,
            end_reason: "USER_DELETED".into(),
            ..deleted(K::SessionEnded)
        },
    ];
    for group_id in &group_ids {
        expected.push(pb::Change {
            user_id: dave.id.clone(),
            group_id: group_id.clone(),
            ..deleted(K::MemberRemoved)
        });
    }
    assert_eq!(plain_sorted(&changes), plain_sorted(&expected));
}

#[tokio::test]
async fn a_generated_request_id_is_the_one_echoed_and_an_unsafe_one_is_replaced() {
    let app = spawn_app().await;
    let start = head(&app).await;
    let response = app
        .admin
        .users
        .clone()
        .create_user(TestUser::named("erin").request())
        .await
        .unwrap();
    let echoed = response
        .metadata()
        .get("x-request-id")
        .expect("a request id in the response")
        .to_str()
        .unwrap()
        .to_owned();
    let response = app
        .admin
        .users
        .clone()
        .create_user(with_id(TestUser::named("frank").request(), "bad id; drop"))
        .await
        .unwrap();
    let replaced = response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(replaced, "bad id; drop");

    let changes = changes_after(&app, &start).await;
    let ids: Vec<&str> = changes.iter().map(|c| c.request_id.as_str()).collect();
    assert_eq!(ids, [echoed.as_str(), replaced.as_str()]);
    assert!(!echoed.is_empty() && !replaced.is_empty());
    assert_ne!(echoed, replaced);
}

#[tokio::test]
async fn sessions_start_and_end_with_their_reasons_and_a_refresh_is_no_change() {
    let app = spawn_app().await;
    let user = app.create_user("gina").await;
    let password = TestUser::named("gina").password;
    let mut auth = app.anon.auth.clone();
    let login = |id: &'static str| {
        let mut auth = app.anon.auth.clone();
        let password = password.clone();
        async move {
            auth.login(with_id(
                pb::LoginRequest {
                    login: "gina".into(),
                    password,
                },
                id,
            ))
            .await
            .unwrap()
            .into_inner()
            .tokens
            .unwrap()
        }
    };
    let user_did = |kind, method: &str, request_id: &str| pb::Change {
        user_id: user.id.clone(),
        ..made(kind, &user.id, method, request_id)
    };

    let start = head(&app).await;
    let one = login("req-login-1").await;
    let s1 = session_of(&app, &one.access_token).await;
    // A wrong password changes nothing.
    let wrong = auth
        .login(pb::LoginRequest {
            login: "gina".into(),
            password: "not the password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    // Refresh: a new pair, the same session, no change.
    let refreshed = auth
        .refresh(with_id(
            pb::RefreshRequest {
                refresh_token: one.refresh_token.clone(),
            },
            "req-refresh",
        ))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    auth.logout(with_id(
        pb::LogoutRequest {
            refresh_token: refreshed.refresh_token.clone(),
            all_sessions: false,
        },
        "req-logout",
    ))
    .await
    .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [
            pb::Change {
                session_id: s1.clone(),
                ..user_did(K::SessionStarted, "AuthService/Login", "req-login-1")
            },
            pb::Change {
                session_id: s1.clone(),
                end_reason: "LOGOUT".into(),
                ..user_did(K::SessionEnded, "AuthService/Logout", "req-logout")
            },
        ]
    );

    // Logout of all sessions ends each live one, in one commit.
    let two = login("req-login-2").await;
    let three = login("req-login-3").await;
    let (s2, s3) = (
        session_of(&app, &two.access_token).await,
        session_of(&app, &three.access_token).await,
    );
    let start = head(&app).await;
    auth.logout(with_id(
        pb::LogoutRequest {
            refresh_token: two.refresh_token.clone(),
            all_sessions: true,
        },
        "req-logout-all",
    ))
    .await
    .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_one_commit(&changes);
    let ended = |session: &str| pb::Change {
        session_id: session.into(),
        end_reason: "LOGOUT".into(),
        ..user_did(K::SessionEnded, "AuthService/Logout", "req-logout-all")
    };
    assert_eq!(
        plain_sorted(&changes),
        plain_sorted(&[ended(&s2), ended(&s3)])
    );

    // A retired refresh token presented again ends its session: no actor
    // (the token proves nobody), the RPC that detected it.
    let four = login("req-login-4").await;
    let s4 = session_of(&app, &four.access_token).await;
    auth.refresh(pb::RefreshRequest {
        refresh_token: four.refresh_token.clone(),
    })
    .await
    .unwrap();
    let start = head(&app).await;
    let reused = auth
        .refresh(with_id(
            pb::RefreshRequest {
                refresh_token: four.refresh_token.clone(),
            },
            "req-reuse",
        ))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated);
    let changes = changes_after(&app, &start).await;
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [pb::Change {
            user_id: user.id.clone(),
            session_id: s4,
            end_reason: "REUSE_DETECTED".into(),
            ..made(K::SessionEnded, "", "AuthService/Refresh", "req-reuse")
        }]
    );
}

#[tokio::test]
async fn password_changes_end_the_sessions_they_end_with_the_reason_of_each() {
    let app = spawn_app().await;
    let root = app.root.id.clone();
    let (user, mine) = app.signed_in_user("hank").await;
    let password = TestUser::named("hank").password;
    let other = app.login("hank", &password).await.unwrap().tokens.unwrap();
    let (s_mine, s_other) = (
        session_of(&app, &mine.access_token).await,
        session_of(&app, &other.access_token).await,
    );
    let of_user = |c: pb::Change| pb::Change {
        user_id: user.id.clone(),
        ..c
    };

    // ChangePassword: the caller's own session lives on.
    let start = head(&app).await;
    app.as_token(&mine.access_token)
        .auth
        .clone()
        .change_password(with_id(
            pb::ChangePasswordRequest {
                current_password: password.clone(),
                new_password: "a second password".into(),
            },
            "req-change",
        ))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_one_commit(&changes);
    let by = |kind| {
        of_user(made(
            kind,
            &user.id,
            "AuthService/ChangePassword",
            "req-change",
        ))
    };
    assert_eq!(
        plain_sorted(&changes),
        plain_sorted(&[
            by(K::PasswordChanged),
            pb::Change {
                session_id: s_other.clone(),
                end_reason: "PASSWORD_CHANGED".into(),
                ..by(K::SessionEnded)
            },
        ])
    );

    // SetPassword by a superuser ends every session.
    let third = app
        .login("hank", "a second password")
        .await
        .unwrap()
        .tokens
        .unwrap();
    let s_third = session_of(&app, &third.access_token).await;
    let start = head(&app).await;
    app.admin
        .users
        .clone()
        .set_password(with_id(
            pb::SetPasswordRequest {
                id: user.id.clone(),
                new_password: "a third password".into(),
            },
            "req-set",
        ))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_one_commit(&changes);
    let by = |kind| of_user(made(kind, &root, "UserService/SetPassword", "req-set"));
    let ended = |session: &str| pb::Change {
        session_id: session.into(),
        end_reason: "PASSWORD_SET".into(),
        ..by(K::SessionEnded)
    };
    assert_eq!(
        plain_sorted(&changes),
        plain_sorted(&[by(K::PasswordChanged), ended(&s_mine), ended(&s_third)])
    );

    // ResetPassword with a token: the user the token proves acts.
    let fourth = app
        .login("hank", "a third password")
        .await
        .unwrap()
        .tokens
        .unwrap();
    let s_fourth = session_of(&app, &fourth.access_token).await;
    let start = head(&app).await;
    let issued = app
        .admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: user.email.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        changes_after(&app, &start).await.is_empty(),
        "issuing a token is no change"
    );
    app.anon
        .accounts
        .clone()
        .reset_password(with_id(
            pb::ResetPasswordRequest {
                token: issued.token,
                new_password: "a fourth password".into(),
            },
            "req-reset",
        ))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_one_commit(&changes);
    let by = |kind| {
        of_user(made(
            kind,
            &user.id,
            "AccountService/ResetPassword",
            "req-reset",
        ))
    };
    assert_eq!(
        plain_sorted(&changes),
        plain_sorted(&[
            by(K::PasswordChanged),
            pb::Change {
                session_id: s_fourth,
                end_reason: "PASSWORD_RESET".into(),
                ..by(K::SessionEnded)
            },
        ])
    );
}

#[tokio::test]
async fn a_confirmed_email_is_an_update_by_the_user_the_token_proves() {
    let app = spawn_app().await;
    let user = app.create_user("iris").await;
    let start = head(&app).await;
    let token = app
        .admin
        .accounts
        .clone()
        .issue_verification_token(pb::IssueVerificationTokenRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    app.anon
        .accounts
        .clone()
        .confirm_email(with_id(pb::ConfirmEmailRequest { token }, "req-confirm"))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [pb::Change {
            user_id: user.id.clone(),
            fields: vec!["is_verified".into()],
            ..made(
                K::UserUpdated,
                &user.id,
                "AccountService/ConfirmEmail",
                "req-confirm"
            )
        }]
    );
}

#[tokio::test]
async fn group_changes_are_recorded_and_idempotent_calls_record_nothing() {
    let app = spawn_app().await;
    let root = app.root.id.clone();
    let (a, b) = (app.create_user("jack").await, app.create_user("kate").await);
    let mut groups = app.admin.groups.clone();

    let start = head(&app).await;
    let group = groups
        .create_group(with_id(
            pb::CreateGroupRequest {
                groupname: "Editors".into(),
                slug: String::new(),
            },
            "req-group",
        ))
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    let member = |user: &pb::User| pb::AddGroupMemberRequest {
        group_id: group.id.clone(),
        user_id: user.id.clone(),
    };
    groups
        .add_group_member(with_id(member(&a), "req-add-a"))
        .await
        .unwrap();
    groups
        .add_group_member(with_id(member(&b), "req-add-b"))
        .await
        .unwrap();
    // Adding a member again, removing a non-member: nothing changes.
    groups
        .add_group_member(with_id(member(&a), "req-add-again"))
        .await
        .unwrap();
    let remove = |user: &pb::User| pb::RemoveGroupMemberRequest {
        group_id: group.id.clone(),
        user_id: user.id.clone(),
    };
    groups
        .remove_group_member(with_id(remove(&b), "req-remove-b"))
        .await
        .unwrap();
    groups
        .remove_group_member(with_id(remove(&b), "req-remove-again"))
        .await
        .unwrap();
    groups
        .add_group_member(with_id(member(&b), "req-readd-b"))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    let in_group = |c: pb::Change, user: &pb::User| pb::Change {
        group_id: group.id.clone(),
        user_id: user.id.clone(),
        ..c
    };
    let added = |user, id| {
        in_group(
            made(K::MemberAdded, &root, "GroupService/AddGroupMember", id),
            user,
        )
    };
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [
            pb::Change {
                group_id: group.id.clone(),
                ..made(
                    K::GroupCreated,
                    &root,
                    "GroupService/CreateGroup",
                    "req-group"
                )
            },
            added(&a, "req-add-a"),
            added(&b, "req-add-b"),
            in_group(
                made(
                    K::MemberRemoved,
                    &root,
                    "GroupService/RemoveGroupMember",
                    "req-remove-b"
                ),
                &b
            ),
            added(&b, "req-readd-b"),
        ]
    );

    // DeleteGroup removes each membership, in the commit of the deletion.
    let start = head(&app).await;
    groups
        .delete_group(with_id(
            pb::DeleteGroupRequest {
                id: group.id.clone(),
            },
            "req-drop",
        ))
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    assert_one_commit(&changes);
    let by = |kind| made(kind, &root, "GroupService/DeleteGroup", "req-drop");
    assert_eq!(
        plain_sorted(&changes),
        plain_sorted(&[
            pb::Change {
                group_id: group.id.clone(),
                ..by(K::GroupDeleted)
            },
            in_group(by(K::MemberRemoved), &a),
            in_group(by(K::MemberRemoved), &b),
        ])
    );
}

#[tokio::test]
async fn imported_users_are_created_by_the_importer_and_their_rehash_at_login_is_no_change() {
    let app = spawn_app().await;
    let root = app.root.id.clone();
    let start = head(&app).await;
    let results = app
        .admin
        .accounts
        .clone()
        .import_users(with_id(
            pb::ImportUsersRequest {
                users: vec![pb::ImportedUser {
                    username: "lena".into(),
                    email: "lena@example.com".into(),
                    password_hash: crate::accounts::BCRYPT_HASH.into(),
                    groups: vec!["imported".into()],
                    ..Default::default()
                }],
            },
            "req-import",
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    let id = results[0].id.clone();
    let changes = changes_after(&app, &start).await;
    let by = |kind| made(kind, &root, "AccountService/ImportUsers", "req-import");
    let group_id = changes
        .iter()
        .find(|c| c.kind() == K::GroupCreated)
        .map(|c| c.group_id.clone())
        .unwrap_or_else(|| panic!("the new group is created: {changes:#?}"));
    assert_eq!(
        plain_sorted(&changes),
        plain_sorted(&[
            pb::Change {
                user_id: id.clone(),
                ..by(K::UserCreated)
            },
            pb::Change {
                group_id: group_id.clone(),
                ..by(K::GroupCreated)
            },
            pb::Change {
                user_id: id.clone(),
                group_id,
                ..by(K::MemberAdded)
            },
        ])
    );

    // The first login rewrites the bcrypt hash: a session starts, and that
    // is all (the password did not change).
    let start = head(&app).await;
    let login = app
        .login("lena", crate::accounts::BCRYPT_PASSWORD)
        .await
        .unwrap();
    let changes = changes_after(&app, &start).await;
    let kinds: Vec<K> = changes.iter().map(|c| c.kind()).collect();
    assert_eq!(kinds, [K::SessionStarted], "{changes:#?}");
    assert_eq!(
        changes[0].session_id,
        session_of(&app, &login.tokens.unwrap().access_token).await
    );
}

#[tokio::test]
async fn changes_made_by_hand_in_sql_are_recorded_without_actor_rpc_or_request_id() {
    let app = spawn_app().await;
    let id = uuid::Uuid::now_v7().to_string();
    let start = head(&app).await;
    // One statement a time: a simple query of several runs as one
    // transaction.
    for statement in [
        format!(
            "INSERT INTO users (id, username, username_canonical, email, email_canonical, \
                                password_hash, search) \
             VALUES ('{id}', 'manual', 'manual', 'manual@example.com', 'manual@example.com', \
                     'x', 'manual')"
        ),
        format!(
            "UPDATE users SET first_name = 'Man', is_verified = true, \
                              attributes = '{{\"k\": \"v\"}}' WHERE id = '{id}'"
        ),
        // No change: the same values, and a rehash (the hash only).
        format!("UPDATE users SET first_name = 'Man' WHERE id = '{id}'"),
        format!("UPDATE users SET password_hash = 'y' WHERE id = '{id}'"),
        format!(
            "UPDATE users SET password_changed_at = now() + interval '1 second' WHERE id = '{id}'"
        ),
        format!(
            "BEGIN; UPDATE users SET last_name = 'Ual' WHERE id = '{id}'; \
             UPDATE users SET is_active = false WHERE id = '{id}'; COMMIT"
        ),
        format!("DELETE FROM users WHERE id = '{id}'"),
    ] {
        sql(&app, &statement).await;
    }
    let changes = changes_after(&app, &start).await;
    let by_hand = |kind, fields: &[&str]| pb::Change {
        kind: kind as i32,
        user_id: id.clone(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        ..Default::default()
    };
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [
            by_hand(K::UserCreated, &[]),
            by_hand(K::UserUpdated, &["first_name", "is_verified", "attributes"]),
            by_hand(K::PasswordChanged, &[]),
            by_hand(K::UserUpdated, &["last_name"]),
            by_hand(K::UserUpdated, &["is_active"]),
            by_hand(K::UserDeleted, &[]),
        ]
    );
    // Each statement its own commit, but the two of the transaction share one.
    let commits: Vec<&str> = changes.iter().map(commit_of).collect();
    assert_eq!(commits[3], commits[4]);
    let mut distinct = commits.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "{changes:#?}");
    assert!(changes.windows(2).all(|w| w[0].cursor < w[1].cursor));
}

#[tokio::test]
async fn a_session_ended_by_hand_is_recorded_with_its_reason() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("mona").await;
    let session = session_of(&app, &tokens.access_token).await;
    let start = head(&app).await;
    sql(
        &app,
        &format!(
            "UPDATE sessions SET end_time = now(), end_reason = 'ended_by_admin' \
             WHERE id = '{session}'"
        ),
    )
    .await;
    let changes = changes_after(&app, &start).await;
    assert_eq!(
        changes.iter().map(plain).collect::<Vec<_>>(),
        [pb::Change {
            kind: K::SessionEnded as i32,
            user_id: user.id,
            session_id: session,
            end_reason: "ENDED_BY_ADMIN".into(),
            ..Default::default()
        }]
    );
}

#[tokio::test]
async fn the_command_line_records_its_command_as_the_rpc() {
    let db = TestDb::migrated().await;
    let dir = TempDir::new("identity-changes-import");
    let file = dir.0.join("users.jsonl");
    std::fs::write(
        &file,
        format!(
            r#"{{"username": "nina", "email": "nina@example.com", "password_hash": "{}"}}"#,
            crate::accounts::BCRYPT_HASH
        ),
    )
    .unwrap();
    let out = crate::cli::identity(
        &["import", file.to_str().unwrap()],
        &[("DATABASE_URL", &db.url)],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = crate::cli::identity(
        &[
            "createsuperuser",
            "--username",
            "olga",
            "--email",
            "olga@example.com",
        ],
        &[
            ("DATABASE_URL", &db.url),
            ("IDENTITY_PASSWORD", "a long admin secret"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let app = spawn_app_on(db, |_| {}).await;
    let changes = changes_after(&app, "").await;
    let created: Vec<(&str, &str)> = changes
        .iter()
        .filter(|c| c.kind() == K::UserCreated)
        .map(|c| (c.rpc.as_str(), c.actor_id.as_str()))
        .collect();
    // The import, createsuperuser, then the harness's root.
    assert_eq!(created.len(), 3, "{changes:#?}");
    assert_eq!(created[0], ("identity import", ""));
    assert_eq!(created[1], ("identity createsuperuser", ""));
}
