//! Who may call what: every cell of the authorization table (docs/security.md), callers
//! losing power at once, and the last superuser.

use tonic::Code;

use crate::helpers::{Clients, Lookup, TestApp, TestDb, TestUser, spawn_app, spawn_app_on};
use identity::proto::identity::v1 as pb;

/// The outcome of a call, as far as authorization goes: refused (with its
/// code) or let through (whatever the handler then answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Through,
    Unauthenticated,
    Denied,
}

/// A refusal by the authorization layer, told apart from a handler's own
/// answer: a wrong password is UNAUTHENTICATED too, with another reason.
fn outcome<T>(result: Result<T, tonic::Status>) -> Outcome {
    use tonic_types::StatusExt;
    match result {
        Ok(_) => Outcome::Through,
        Err(s)
            if s.code() == Code::Unauthenticated
                && s.get_details_error_info()
                    .is_none_or(|i| i.reason != "INVALID_CREDENTIALS") =>
        {
            Outcome::Unauthenticated
        }
        Err(s) if s.code() == Code::PermissionDenied => Outcome::Denied,
        Err(_) => Outcome::Through,
    }
}

/// Every RPC, called by `c` about `me` (the caller's own user, if any) and
/// `other` (someone else). Returns (name, outcome).
pub(crate) async fn every_rpc(
    c: &Clients,
    me: &pb::User,
    other: &pb::User,
    spare: (pb::Tokens, pb::Tokens),
) -> Vec<(&'static str, Outcome)> {
    let (mut u, mut g, mut a) = (c.users.clone(), c.groups.clone(), c.auth.clone());
    let some_group = uuid::Uuid::now_v7().to_string();
    vec![
        (
            "CreateUser",
            outcome(
                u.create_user(
                    TestUser::named(&format!(
                        "n{}",
                        &uuid::Uuid::now_v7().simple().to_string()[24..]
                    ))
                    .request(),
                )
                .await,
            ),
        ),
        (
            "GetUser(self)",
            outcome(c.get_user(Lookup::Id(&me.id)).await),
        ),
        (
            "GetUser(other)",
            outcome(c.get_user(Lookup::Id(&other.id)).await),
        ),
        (
            "UpdateUser(self, names)",
            outcome(
                c.update_user(&me.id, &["first_name", "last_name", "attributes"], |u| {
                    u.first_name = "Me".into();
                })
                .await,
            ),
        ),
        (
            "UpdateUser(self, flags)",
            outcome(
                c.update_user(&me.id, &["is_verified"], |u| {
                    u.is_verified = true;
                    u.is_active = true;
                })
                .await,
            ),
        ),
        (
            "UpdateUser(other)",
            outcome(
                c.update_user(&other.id, &["last_name"], |u| u.last_name = "X".into())
                    .await,
            ),
        ),
        (
            "ListUsers",
            outcome(u.list_users(pb::ListUsersRequest::default()).await),
        ),
        (
            "DeleteUser",
            outcome(
                u.delete_user(pb::DeleteUserRequest {
                    id: uuid::Uuid::now_v7().to_string(),
                })
                .await,
            ),
        ),
        (
            "SetPassword",
            outcome(
                u.set_password(pb::SetPasswordRequest {
                    id: other.id.clone(),
                    new_password: "another password".into(),
                })
                .await,
            ),
        ),
        (
            "Login",
            outcome(
                a.login(pb::LoginRequest {
                    login: "spare".into(),
                    password: TestUser::named("spare").password,
                })
                .await,
            ),
        ),
        (
            "Refresh",
            outcome(
                a.refresh(pb::RefreshRequest {
                    refresh_token: spare.0.refresh_token.clone(),
                })
                .await,
            ),
        ),
        (
            "Logout",
            outcome(
                a.logout(pb::LogoutRequest {
                    refresh_token: spare.1.refresh_token.clone(),
                    all_sessions: false,
                })
                .await,
            ),
        ),
        (
            "VerifyToken",
            outcome(
                a.verify_token(pb::VerifyTokenRequest {
                    access_token: spare.0.access_token.clone(),
                })
                .await,
            ),
        ),
        (
            "GetPublicKeys",
            outcome(a.get_public_keys(pb::GetPublicKeysRequest {}).await),
        ),
        (
            "ChangePassword",
            outcome(
                a.change_password(pb::ChangePasswordRequest {
                    current_password: "wrong current".into(),
                    new_password: "whatever long".into(),
                })
                .await,
            ),
        ),
        (
            "GetGroup",
            outcome(g.get_group(pb::GetGroupRequest::default()).await),
        ),
        (
            "ListGroups",
            outcome(g.list_groups(pb::ListGroupsRequest::default()).await),
        ),
        (
            "ListUserGroups(self)",
            outcome(
                g.list_user_groups(pb::ListUserGroupsRequest {
                    user_id: me.id.clone(),
                })
                .await,
            ),
        ),
        (
            "CreateGroup",
            outcome(g.create_group(pb::CreateGroupRequest::default()).await),
        ),
        (
            "DeleteGroup",
            outcome(
                g.delete_group(pb::DeleteGroupRequest {
                    id: some_group.clone(),
                })
                .await,
            ),
        ),
        (
            "AddGroupMember",
            outcome(
                g.add_group_member(pb::AddGroupMemberRequest::default())
                    .await,
            ),
        ),
        (
            "RemoveGroupMember",
            outcome(
                g.remove_group_member(pb::RemoveGroupMemberRequest::default())
                    .await,
            ),
        ),
        (
            "ListGroupMembers",
            outcome(
                g.list_group_members(pb::ListGroupMembersRequest::default())
                    .await,
            ),
        ),
    ]
}

async fn regular_user(app: &TestApp, name: &str) -> (pb::User, Clients) {
    let (user, tokens) = app.signed_in_user(name).await;
    (user, app.as_token(&tokens.access_token))
}

#[tokio::test]
async fn every_cell_of_the_authorization_table_holds() {
    use Outcome::*;
    let app = spawn_app().await;
    let (user, as_user) = regular_user(&app, "plainuser").await;
    let other = app.create_user("someoneelse").await;
    let nobody = pb::User {
        id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    };

    // (rpc, anonymous, user, superuser)
    let table = [
        ("CreateUser", Through, Through, Through),
        ("GetUser(self)", Unauthenticated, Through, Through),
        ("GetUser(other)", Unauthenticated, Denied, Through),
        ("UpdateUser(self, names)", Unauthenticated, Through, Through),
        ("UpdateUser(self, flags)", Unauthenticated, Denied, Through),
        ("UpdateUser(other)", Unauthenticated, Denied, Through),
        ("ListUsers", Unauthenticated, Denied, Through),
        ("DeleteUser", Unauthenticated, Denied, Through),
        ("SetPassword", Unauthenticated, Denied, Through),
        ("Login", Through, Through, Through),
        ("Refresh", Through, Through, Through),
        ("Logout", Through, Through, Through),
        ("VerifyToken", Through, Through, Through),
        ("GetPublicKeys", Through, Through, Through),
        ("ChangePassword", Unauthenticated, Through, Through),
        ("GetGroup", Unauthenticated, Through, Through),
        ("ListGroups", Unauthenticated, Through, Through),
        ("ListUserGroups(self)", Unauthenticated, Through, Through),
        ("CreateGroup", Unauthenticated, Denied, Through),
        ("DeleteGroup", Unauthenticated, Denied, Through),
        ("AddGroupMember", Unauthenticated, Denied, Through),
        ("RemoveGroupMember", Unauthenticated, Denied, Through),
        ("ListGroupMembers", Unauthenticated, Denied, Through),
    ];
    app.create_user("spare").await;
    let spare = async || {
        let pw = TestUser::named("spare").password;
        let a = app.login("spare", &pw).await.unwrap().tokens.unwrap();
        let b = app.login("spare", &pw).await.unwrap().tokens.unwrap();
        (a, b)
    };
    let anon = every_rpc(&app.anon, &nobody, &other, spare().await).await;
    let users = every_rpc(&as_user, &user, &other, spare().await).await;
    let supers = every_rpc(&app.admin, &app.root, &other, spare().await).await;
    for (i, (rpc, want_anon, want_user, want_super)) in table.iter().enumerate() {
        assert_eq!(anon[i].0, *rpc);
        assert_eq!((rpc, anon[i].1), (rpc, *want_anon), "anonymous");
        assert_eq!((rpc, users[i].1), (rpc, *want_user), "user");
        assert_eq!((rpc, supers[i].1), (rpc, *want_super), "superuser");
    }
}

#[tokio::test]
async fn users_may_not_register_with_flags_and_only_superusers_when_registration_is_closed() {
    let app = spawn_app().await;
    let (_, as_user) = regular_user(&app, "flagger").await;
    let flagged = |name: &str, f: fn(&mut pb::CreateUserRequest)| {
        let mut r = TestUser::named(name).request();
        f(&mut r);
        r
    };
    let flags: [fn(&mut pb::CreateUserRequest); 3] = [
        |r| r.is_superuser = true,
        |r| r.is_verified = true,
        |r| r.is_active = Some(false),
    ];
    for (i, f) in flags.iter().enumerate() {
        let s = app
            .anon
            .users
            .clone()
            .create_user(flagged(&format!("anon{i}"), *f))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
        let s = as_user
            .users
            .clone()
            .create_user(flagged(&format!("user{i}"), *f))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied);
        app.admin
            .users
            .clone()
            .create_user(flagged(&format!("super{i}"), *f))
            .await
            .unwrap();
    }
    // Explicitly active is a default flag.
    app.anon
        .users
        .clone()
        .create_user(flagged("explicit", |r| r.is_active = Some(true)))
        .await
        .unwrap();

    let app = app.restart(|c| c.allow_registration = false).await;
    let s = app
        .anon
        .users
        .clone()
        .create_user(TestUser::named("closed1").request())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let (_, as_user) = {
        let tokens = app
            .login("flagger", &TestUser::named("flagger").password)
            .await
            .unwrap()
            .tokens
            .unwrap();
        ((), app.as_token(&tokens.access_token))
    };
    let s = as_user
        .users
        .clone()
        .create_user(TestUser::named("closed2").request())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    app.admin
        .users
        .clone()
        .create_user(TestUser::named("closed3").request())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_demoted_deactivated_or_deleted_caller_loses_power_at_once() {
    let app = spawn_app().await;
    let mut req = TestUser::named("deputy").request();
    req.is_superuser = true;
    let deputy = app.create_user_from(req).await.unwrap();
    let tokens = app
        .login("deputy", &TestUser::named("deputy").password)
        .await
        .unwrap()
        .tokens
        .unwrap();
    let as_deputy = app.as_token(&tokens.access_token);
    as_deputy
        .users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap();

    // Demoted: the same token is now a regular user's.
    app.update_user(&deputy.id, &["is_superuser"], |u| u.is_superuser = false)
        .await
        .unwrap();
    let s = as_deputy
        .users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // Deactivated: no longer anyone.
    app.update_user(&deputy.id, &["is_active"], |u| u.is_active = false)
        .await
        .unwrap();
    let s = as_deputy
        .get_user(Lookup::Id(&deputy.id))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Deleted.
    let (victim, as_victim) = regular_user(&app, "victim").await;
    as_victim.get_user(Lookup::Id(&victim.id)).await.unwrap();
    app.users
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: victim.id.clone(),
        })
        .await
        .unwrap();
    let s = as_victim
        .get_user(Lookup::Id(&victim.id))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_last_active_superuser_cannot_remove_itself() {
    let app = spawn_app().await;
    let root = app.root.id.clone();
    for (paths, is_superuser, is_active) in [
        (&["is_superuser"][..], false, true),
        (&["is_active"][..], true, false),
    ] {
        let s = app
            .update_user(&root, paths, |u| {
                u.is_superuser = is_superuser;
                u.is_active = is_active;
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition);
    }
    let s = app
        .users
        .clone()
        .delete_user(pb::DeleteUserRequest { id: root.clone() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    // Names are fine.
    app.update_user(&root, &["first_name"], |u| u.first_name = "Root".into())
        .await
        .unwrap();

    // With a second superuser, root may step down.
    let mut req = TestUser::named("heir").request();
    req.is_superuser = true;
    app.users.clone().create_user(req).await.unwrap();
    app.update_user(&root, &["is_superuser"], |u| u.is_superuser = false)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_token_on_an_optional_rpc_must_still_be_valid() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |_| {}).await;
    let bad = app.as_token("not-a-token");
    let s = bad
        .users
        .clone()
        .create_user(TestUser::named("withbadtoken").request())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
}

/// docs/security.md's authorization table names every RPC of the port
/// (identity's and Envoy's Check) in the row of the access the server
/// enforces.
#[test]
fn the_documented_authorization_table_is_the_enforced_one() {
    use identity::grpc::authz::{Access, access};
    let text = std::fs::read_to_string("docs/security.md").unwrap();
    let section = text
        .split("## Authorization")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an Authorization section");
    let mut rows: Vec<(Access, Vec<String>)> = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (kind, rpcs) = (cells[1], cells[2]);
        let access = match kind {
            k if k.starts_with("public") => Access::Public,
            k if k.starts_with("optional") => Access::Optional,
            "signed in" => Access::SignedIn,
            "superuser" => Access::Superuser,
            _ => continue,
        };
        // The RPC names: capitalised words outside parentheses.
        let mut depth = 0;
        let mut plain = String::new();
        for c in rpcs.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                c if depth == 0 => plain.push(c),
                _ => {}
            }
        }
        let names = plain
            .split([',', ';', ' '])
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
            .filter(|w| w.chars().next().is_some_and(char::is_uppercase))
            .map(str::to_owned)
            .collect();
        rows.push((access, names));
    }
    let mut checked = 0;
    for (path, _) in identity::limits::rpc_methods() {
        if !path.starts_with("/identity.") && !path.starts_with("/envoy.") {
            continue;
        }
        let method = path.rsplit('/').next().unwrap();
        let documented: Vec<Access> = rows
            .iter()
            .filter(|(_, names)| names.iter().any(|n| n == method))
            .map(|(a, _)| *a)
            .collect();
        assert_eq!(
            documented,
            vec![access(&path)],
            "{path}: docs/security.md's rows vs the enforced access"
        );
        checked += 1;
    }
    assert!(checked >= 39, "{checked} RPCs");
}
