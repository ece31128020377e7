//! GroupService through the generated client: CRUD, slugs, membership, the
//! ListUsers filter, cascades, and groups in tokens and VerifyToken.

use std::collections::HashSet;

use tonic::Code;

use crate::helpers::{TestApp, spawn_app, taken_field, violated_fields};
use identity::proto::identity::v1 as pb;

async fn create(app: &TestApp, groupname: &str, slug: &str) -> Result<pb::Group, tonic::Status> {
    app.admin
        .groups
        .clone()
        .create_group(pb::CreateGroupRequest {
            groupname: groupname.into(),
            slug: slug.into(),
        })
        .await
        .map(|r| r.into_inner().group.unwrap())
}

async fn add(app: &TestApp, group: &str, user: &str) -> Result<(), tonic::Status> {
    app.admin
        .groups
        .clone()
        .add_group_member(pb::AddGroupMemberRequest {
            group_id: group.into(),
            user_id: user.into(),
        })
        .await
        .map(|_| ())
}

async fn remove(app: &TestApp, group: &str, user: &str) -> Result<(), tonic::Status> {
    app.admin
        .groups
        .clone()
        .remove_group_member(pb::RemoveGroupMemberRequest {
            group_id: group.into(),
            user_id: user.into(),
        })
        .await
        .map(|_| ())
}

async fn user_groups(app: &TestApp, user: &str) -> Result<Vec<String>, tonic::Status> {
    app.admin
        .groups
        .clone()
        .list_user_groups(pb::ListUserGroupsRequest {
            user_id: user.into(),
        })
        .await
        .map(|r| r.into_inner().groups.into_iter().map(|g| g.slug).collect())
}

fn get_by(lookup: pb::get_group_request::Lookup) -> pb::GetGroupRequest {
    pb::GetGroupRequest {
        lookup: Some(lookup),
    }
}

#[tokio::test]
async fn create_group_derives_slugs_by_transliteration() {
    let app = spawn_app().await;
    for (name, slug) in [
        ("Администраторы", "administratory"),
        ("Équipe Ops", "equipe-ops"),
        ("  Site  Reliability!! ", "site-reliability"),
        ("北京 Team", "bei-jing-team"),
    ] {
        let group = create(&app, name, "").await.unwrap();
        assert_eq!(group.slug, slug, "{name}");
        assert_eq!(group.groupname, name.trim());
        assert_eq!(
            uuid::Uuid::parse_str(&group.id).unwrap().get_version_num(),
            7
        );
        assert!(group.create_time.is_some());
    }
    // Only punctuation, or emoji deunicode cannot spell: no slug to derive.
    for name in ["!!!", "—", "  ?? "] {
        let status = create(&app, name, "").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}");
        assert_eq!(violated_fields(&status), ["groupname"]);
    }
    // Emoji-only names either derive a valid slug or are refused, never a bad slug.
    for name in ["🚀", "🎉🎉", "🙂 🙃"] {
        match create(&app, name, "").await {
            Ok(group) => assert!(
                identity::domain::Slug::parse(&group.slug).is_ok(),
                "{}",
                group.slug
            ),
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
        }
    }
}

#[tokio::test]
async fn explicit_slugs_are_validated_and_kept() {
    let app = spawn_app().await;
    let group = create(&app, "Ops", "platform-ops-2").await.unwrap();
    assert_eq!(group.slug, "platform-ops-2");
    for bad in ["Ops", "ops--x", "-ops", "ops_x", &"a".repeat(65), "op\0s"] {
        let status = create(&app, "Other", bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(violated_fields(&status), ["slug"]);
    }
    for bad in ["", &"g".repeat(151), "a\0b"] {
        let status = create(&app, bad, "fine").await.unwrap_err();
        assert_eq!(violated_fields(&status), ["groupname"], "{bad:?}");
    }
}

#[tokio::test]
async fn groupnames_and_slugs_are_unique() {
    let app = spawn_app().await;
    create(&app, "Developers", "").await.unwrap();
    // A case or width variant of the groupname.
    for variant in ["developers", "DEVELOPERS", "ＤＥＶＥＬＯＰＥＲＳ"] {
        let status = create(&app, variant, "other-slug").await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{variant}");
        assert_eq!(taken_field(&status).as_deref(), Some("groupname"));
    }
    // Another groupname deriving the same slug: the message says what to do.
    let status = create(&app, "Developers!", "").await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(taken_field(&status).as_deref(), Some("slug"));
    assert!(status.message().contains("explicitly"), "{status:?}");
    // An explicit slug that is taken.
    let status = create(&app, "Devs", "developers").await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(taken_field(&status).as_deref(), Some("slug"));
    create(&app, "Developers!", "developers-2").await.unwrap();
}

#[tokio::test]
async fn get_group_finds_by_id_groupname_and_slug() {
    use pb::get_group_request::Lookup;
    let app = spawn_app().await;
    let group = create(&app, "Finance Team", "").await.unwrap();
    let (_, tokens) = app.signed_in_user("reader").await;
    let as_user = app.as_token(&tokens.access_token);
    for lookup in [
        Lookup::Id(group.id.clone()),
        Lookup::Groupname("finance team".into()),
        Lookup::Groupname(" FINANCE TEAM ".into()),
        Lookup::Slug("finance-team".into()),
    ] {
        let found = as_user
            .groups
            .clone()
            .get_group(get_by(lookup))
            .await
            .unwrap()
            .into_inner()
            .group
            .unwrap();
        assert_eq!(found, group);
    }
    let status = as_user
        .groups
        .clone()
        .get_group(get_by(Lookup::Slug("nope".into())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = as_user
        .groups
        .clone()
        .get_group(get_by(Lookup::Id("nope".into())))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["id"]);
    let status = as_user
        .groups
        .clone()
        .get_group(pb::GetGroupRequest { lookup: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn list_groups_pages_and_searches() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(create(&app, &format!("Team {i}"), "").await.unwrap().id);
    }
    create(&app, "Other_100%", "").await.unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .admin
            .groups
            .clone()
            .list_groups(pb::ListGroupsRequest {
                page_size: 3,
                page_token: token,
                query: "TEAM".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 7);
        seen.extend(page.groups.into_iter().map(|g| g.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids, "every group once, in id order");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 7);

    let page = app
        .admin
        .groups
        .clone()
        .list_groups(pb::ListGroupsRequest {
            query: "0%".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.groups.len(), 1, "% is literal");
    let status = app
        .admin
        .groups
        .clone()
        .list_groups(pb::ListGroupsRequest {
            page_size: -5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);
}

#[tokio::test]
async fn membership_is_idempotent_and_checks_both_ends() {
    let app = spawn_app().await;
    let group = create(&app, "Members", "").await.unwrap();
    let user = app.create_user("member").await;
    let ghost = uuid::Uuid::now_v7().to_string();

    add(&app, &group.id, &user.id).await.unwrap();
    add(&app, &group.id, &user.id).await.unwrap();
    assert_eq!(user_groups(&app, &user.id).await.unwrap(), ["members"]);

    assert_eq!(
        add(&app, &ghost, &user.id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        add(&app, &group.id, &ghost).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        remove(&app, &ghost, &user.id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        remove(&app, &group.id, &ghost).await.unwrap_err().code(),
        Code::NotFound
    );
    let status = add(&app, "x", "y").await.unwrap_err();
    assert_eq!(violated_fields(&status), ["group_id", "user_id"]);

    remove(&app, &group.id, &user.id).await.unwrap();
    remove(&app, &group.id, &user.id).await.unwrap();
    assert!(user_groups(&app, &user.id).await.unwrap().is_empty());
    assert_eq!(
        user_groups(&app, &ghost).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn concurrent_adds_of_one_pair_make_one_membership() {
    let app = spawn_app().await;
    let group = create(&app, "Crowd", "").await.unwrap();
    let user = app.create_user("crowded").await;
    let results = futures::future::join_all((0..20).map(|_| add(&app, &group.id, &user.id))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let members = app
        .admin
        .groups
        .clone()
        .list_group_members(pb::ListGroupMembersRequest {
            group_id: group.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((members.users.len(), members.total_size), (1, 1));
}

#[tokio::test]
async fn members_are_listed_by_page_and_filter_list_users() {
    let app = spawn_app().await;
    let group = create(&app, "Big", "").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let u = app.create_user(&format!("big{i}")).await;
        add(&app, &group.id, &u.id).await.unwrap();
        ids.push(u.id);
    }
    app.create_user("outsider").await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .admin
            .groups
            .clone()
            .list_group_members(pb::ListGroupMembersRequest {
                group_id: group.id.clone(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 5);
        seen.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);

    let listed = app
        .list_users(pb::ListUsersRequest {
            group_id: group.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.users.into_iter().map(|u| u.id).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(listed.total_size, 5);

    let status = app
        .admin
        .groups
        .clone()
        .list_group_members(pb::ListGroupMembersRequest {
            group_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn deleting_a_group_or_a_user_removes_its_memberships() {
    let app = spawn_app().await;
    let a = create(&app, "Alpha", "").await.unwrap();
    let b = create(&app, "Beta", "").await.unwrap();
    let stays = app.create_user("stays").await;
    let goes = app.create_user("goes").await;
    for g in [&a, &b] {
        for u in [&stays, &goes] {
            add(&app, &g.id, &u.id).await.unwrap();
        }
    }

    app.admin
        .groups
        .clone()
        .delete_group(pb::DeleteGroupRequest { id: a.id.clone() })
        .await
        .unwrap();
    assert_eq!(user_groups(&app, &stays.id).await.unwrap(), ["beta"]);
    let status = app
        .admin
        .groups
        .clone()
        .delete_group(pb::DeleteGroupRequest { id: a.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    app.users
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: goes.id.clone(),
        })
        .await
        .unwrap();
    let members = app
        .admin
        .groups
        .clone()
        .list_group_members(pb::ListGroupMembersRequest {
            group_id: b.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        members
            .users
            .into_iter()
            .map(|u| u.username)
            .collect::<Vec<_>>(),
        ["stays"]
    );
    // The groupname and slug are free again.
    create(&app, "Alpha", "").await.unwrap();
}

#[tokio::test]
async fn tokens_carry_group_slugs_and_verify_token_reads_them_fresh() {
    let app = spawn_app().await;
    let ops = create(&app, "Ops", "").await.unwrap();
    let devs = create(&app, "Devs", "").await.unwrap();
    let (user, _) = app.signed_in_user("grouped").await;
    add(&app, &ops.id, &user.id).await.unwrap();
    let tokens = app
        .login(
            "grouped",
            &crate::helpers::TestUser::named("grouped").password,
        )
        .await
        .unwrap()
        .tokens
        .unwrap();
    let payload = tokens.access_token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["groups"], serde_json::json!(["ops"]));

    // A change shows at once in VerifyToken, for the old token too.
    add(&app, &devs.id, &user.id).await.unwrap();
    remove(&app, &ops.id, &user.id).await.unwrap();
    let verified = app
        .anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: tokens.access_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verified.groups, vec![devs]);

    // Refresh rebuilds the claim.
    let renewed = app
        .anon
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: tokens.refresh_token,
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    let payload = renewed.access_token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["groups"], serde_json::json!(["devs"]));
}

#[tokio::test]
async fn a_user_lists_its_own_groups_only() {
    let app = spawn_app().await;
    let (me, tokens) = app.signed_in_user("self.lister").await;
    let other = app.create_user("other.person").await;
    let as_me = app.as_token(&tokens.access_token);
    as_me
        .groups
        .clone()
        .list_user_groups(pb::ListUserGroupsRequest {
            user_id: me.id.clone(),
        })
        .await
        .unwrap();
    let status = as_me
        .groups
        .clone()
        .list_user_groups(pb::ListUserGroupsRequest {
            user_id: other.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    as_me
        .groups
        .clone()
        .list_groups(pb::ListGroupsRequest::default())
        .await
        .unwrap();
}
