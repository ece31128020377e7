//! UserService through the generated client.

use std::collections::{HashMap, HashSet};

use tonic::Code;

use crate::helpers::{Lookup, TestUser, mask, spawn_app, taken_field, violated_fields};
use identity::proto::identity::v1 as pb;

#[tokio::test]
async fn create_user_returns_the_new_user_with_defaults() {
    let app = spawn_app().await;
    let mut req = TestUser::named("alice").request();
    req.first_name = "Alice".into();
    req.last_name = "Liddell".into();
    req.attributes = HashMap::from([("team".into(), "core".into())]);

    let user = app.create_user_from(req.clone()).await.unwrap();

    let id = uuid::Uuid::parse_str(&user.id).unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(user.id, id.hyphenated().to_string(), "canonical lowercase");
    assert_eq!(user.username, "alice");
    assert_eq!(user.email, req.email);
    assert_eq!(
        (user.first_name.as_str(), user.last_name.as_str()),
        ("Alice", "Liddell")
    );
    assert!(user.is_active, "is_active defaults to true");
    assert!(!user.is_superuser && !user.is_verified);
    assert_eq!(user.attributes, req.attributes);
    assert!(user.create_time.is_some() && user.update_time.is_some());
}

#[tokio::test]
async fn create_user_honours_explicit_flags() {
    let app = spawn_app().await;
    let mut req = TestUser::named("bob").request();
    req.is_active = Some(false);
    req.is_superuser = true;
    req.is_verified = true;
    let user = app.create_user_from(req).await.unwrap();
    assert!(!user.is_active && user.is_superuser && user.is_verified);
}

#[tokio::test]
async fn usernames_are_bounded_at_3_and_150_characters() {
    let app = spawn_app().await;
    for (name, ok) in [
        ("ab".to_owned(), false),
        ("abc".to_owned(), true),
        ("é".repeat(150), true),
        ("b".repeat(151), false),
    ] {
        let result = app
            .users
            .clone()
            .create_user(TestUser::named(&name).request())
            .await;
        match (ok, result) {
            (true, Ok(_)) => {}
            (false, Err(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{name}");
                assert_eq!(violated_fields(&status), ["username"]);
            }
            (ok, other) => panic!(
                "{} chars: expected ok={ok}, got {other:?}",
                name.chars().count()
            ),
        }
    }
}

#[tokio::test]
async fn fullwidth_and_case_variants_are_the_same_username() {
    let app = spawn_app().await;
    let user = app.create_user("ａｌｉｃｅ").await;
    assert_eq!(user.username, "alice", "stored in NFKC");

    for variant in ["alice", "Alice", "ALICE", " alice "] {
        let status = app
            .users
            .clone()
            .create_user(TestUser::named(variant).request())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{variant:?}");
        assert_eq!(
            taken_field(&status).as_deref(),
            Some("username"),
            "the status names the field"
        );
    }
    let found = app.get_user(Lookup::Username("alic")).await;
    assert_eq!(
        found.unwrap_err().code(),
        Code::NotFound,
        "whole names only"
    );
    let found = app.get_user(Lookup::Username("ＡＬＩＣＥ")).await.unwrap();
    assert_eq!(found.id, user.id);
}

#[tokio::test]
async fn mixed_script_usernames_are_refused() {
    let app = spawn_app().await;
    // The first letter is CYRILLIC SMALL LETTER A.
    let status = app
        .users
        .clone()
        .create_user(TestUser::named("\u{430}lice").request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["username"]);
    // All Cyrillic is fine.
    app.create_user("алиса").await;
}

#[tokio::test]
async fn a_nul_in_any_field_is_invalid_argument_naming_it() {
    let app = spawn_app().await;
    let base = TestUser::named("nul").request();
    let cases: Vec<(&str, pb::CreateUserRequest)> = vec![
        (
            "username",
            pb::CreateUserRequest {
                username: "nu\0l".into(),
                ..base.clone()
            },
        ),
        (
            "email",
            pb::CreateUserRequest {
                email: "n\0@example.com".into(),
                ..base.clone()
            },
        ),
        (
            "password",
            pb::CreateUserRequest {
                password: "correct\0horse".into(),
                ..base.clone()
            },
        ),
        (
            "first_name",
            pb::CreateUserRequest {
                first_name: "A\0".into(),
                ..base.clone()
            },
        ),
        (
            "last_name",
            pb::CreateUserRequest {
                last_name: "B\0".into(),
                ..base.clone()
            },
        ),
        (
            "attributes",
            pb::CreateUserRequest {
                attributes: HashMap::from([("k".into(), "v\0".into())]),
                ..base.clone()
            },
        ),
    ];
    for (field, req) in cases {
        let status = app.users.clone().create_user(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert_eq!(violated_fields(&status), [field]);
    }
    for lookup in [Lookup::Username("a\0b"), Lookup::Email("a\0@b.c")] {
        let status = app.get_user(lookup).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}

#[tokio::test]
async fn every_bad_field_is_reported_at_once() {
    let app = spawn_app().await;
    let req = pb::CreateUserRequest {
        username: "x".into(),
        email: "not-an-email".into(),
        password: "short".into(),
        ..Default::default()
    };
    let status = app.users.clone().create_user(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["username", "email", "password"]);
}

#[tokio::test]
async fn emails_differing_only_in_case_collide() {
    let app = spawn_app().await;
    let mut first = TestUser::named("carol");
    first.email = "Carol@Example.com".into();
    let created = app.create_user_from(first.request()).await.unwrap();
    assert_eq!(created.email, "Carol@Example.com", "shown as given");

    let mut second = TestUser::named("carol2");
    second.email = "carol@EXAMPLE.COM".into();
    let status = app
        .users
        .clone()
        .create_user(second.request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(taken_field(&status).as_deref(), Some("email"));

    let found = app
        .get_user(Lookup::Email("CAROL@example.COM"))
        .await
        .unwrap();
    assert_eq!(found.username, "carol");
}

#[tokio::test]
async fn passwords_are_bounded_at_8_and_256_characters() {
    let app = spawn_app().await;
    for (len, ok) in [(7, false), (8, true), (256, true), (257, false)] {
        let mut user = TestUser::named(&format!("pw{len}"));
        // Letters in no pattern (a repeated one is refused as such).
        let mut x: u32 = 12345;
        user.password = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from(b'a' + ((x >> 16) % 26) as u8)
            })
            .collect();
        let result = app.users.clone().create_user(user.request()).await;
        match (ok, result) {
            (true, Ok(_)) => {}
            (false, Err(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument);
                assert_eq!(violated_fields(&status), ["password"]);
            }
            (ok, other) => panic!("{len}: expected ok={ok}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_password_equal_to_the_username_or_email_is_refused() {
    let app = spawn_app().await;
    let mut user = TestUser::named("dorothy99");
    user.password = "DOROTHY99".into();
    let status = app
        .users
        .clone()
        .create_user(user.request())
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["password"]);

    let mut user = TestUser::named("dorothy99");
    user.password = user.email.clone();
    let status = app
        .users
        .clone()
        .create_user(user.request())
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["password"]);
}

#[tokio::test]
async fn attributes_are_validated() {
    let app = spawn_app().await;
    let too_many: HashMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    for attributes in [
        HashMap::from([("Bad".to_owned(), "v".to_owned())]),
        HashMap::from([("k".to_owned(), "v".repeat(1025))]),
        too_many,
    ] {
        let mut req = TestUser::named("attrs").request();
        req.attributes = attributes;
        let status = app.users.clone().create_user(req).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["attributes"]);
    }
}

#[tokio::test]
async fn get_user_finds_by_id_username_and_email() {
    let app = spawn_app().await;
    let user = app.create_user("Erin").await;
    for lookup in [
        Lookup::Id(&user.id),
        Lookup::Id(&user.id.to_uppercase()),
        Lookup::Username("erin"),
        Lookup::Email(&user.email.to_uppercase()),
    ] {
        let found = app.get_user(lookup).await.unwrap();
        assert_eq!(found, user);
    }
}

#[tokio::test]
async fn get_user_answers_not_found_and_invalid_argument() {
    let app = spawn_app().await;
    let missing = uuid::Uuid::now_v7().to_string();
    let status = app.get_user(Lookup::Id(&missing)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = app.get_user(Lookup::Username("nobody")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let status = app.get_user(Lookup::Id("not-a-uuid")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["id"]);

    let status = app
        .users
        .clone()
        .get_user(pb::GetUserRequest { lookup: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn twenty_concurrent_creates_of_one_username_give_one_user() {
    let app = spawn_app().await;
    let calls = (0..20).map(|i| {
        let mut client = app.users.clone();
        let mut user = TestUser::named(if i % 2 == 0 { "Racer" } else { "racer" });
        user.email = format!("racer{i}@example.com");
        async move { client.create_user(user.request()).await }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exists = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::AlreadyExists))
        .count();
    assert_eq!((ok, exists), (1, 19), "{results:?}");
}

#[tokio::test]
async fn pagination_walks_every_user_once_in_id_order() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for i in 0..23 {
        created.push(app.create_user(&format!("walker{i:02}")).await.id);
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .list_users(pb::ListUsersRequest {
                page_size: 5,
                page_token: token,
                query: "walker".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.total_size, 23);
        assert!(page.users.len() <= 5);
        seen.extend(page.users.into_iter().map(|u| u.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 5);
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no repeats");
    let mut sorted = created.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "every user, ordered by id");
    // UUIDv7 ids are time ordered: creation order is id order.
    assert_eq!(created, sorted);
}

#[tokio::test]
async fn page_size_zero_means_fifty_and_bad_pages_are_invalid() {
    let app = spawn_app().await;
    // With root, 51 users.
    for i in 0..50 {
        app.create_user(&format!("many{i:02}")).await;
    }
    let page = app
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap();
    assert_eq!(page.users.len(), 50);
    assert!(!page.next_page_token.is_empty());

    // Exactly one full page: no token to an empty page.
    let only = app
        .list_users(pb::ListUsersRequest {
            query: "many".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((only.users.len(), only.total_size), (50, 50));
    assert!(only.next_page_token.is_empty());

    let status = app
        .list_users(pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);

    let status = app
        .list_users(pb::ListUsersRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);

    // A token is bound to the filters it was made with.
    let status = app
        .list_users(pb::ListUsersRequest {
            page_token: page.next_page_token,
            query: "many".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);
}

#[tokio::test]
async fn query_matches_substrings_case_insensitively_with_literal_wildcards() {
    let app = spawn_app().await;
    let mut req = TestUser::named("pct").request();
    req.first_name = "100%_Sure".into();
    app.users.clone().create_user(req).await.unwrap();
    let mut req = TestUser::named("plain").request();
    req.first_name = "100xxSure".into();
    req.last_name = "Ünsal".into();
    app.users.clone().create_user(req).await.unwrap();
    let mut req = TestUser::named("slash").request();
    req.last_name = "back\\slash".into();
    app.users.clone().create_user(req).await.unwrap();

    let names = |resp: pb::ListUsersResponse| -> Vec<String> {
        let mut v: Vec<_> = resp.users.into_iter().map(|u| u.username).collect();
        v.sort();
        v
    };
    let query = |q: &str| pb::ListUsersRequest {
        query: q.into(),
        ..Default::default()
    };

    assert_eq!(names(app.list_users(query("0%_s")).await.unwrap()), ["pct"]);
    assert_eq!(names(app.list_users(query("%")).await.unwrap()), ["pct"]);
    assert_eq!(names(app.list_users(query("_")).await.unwrap()), ["pct"]);
    assert_eq!(names(app.list_users(query("\\")).await.unwrap()), ["slash"]);
    assert_eq!(
        names(app.list_users(query("SURE")).await.unwrap()),
        ["pct", "plain"]
    );
    assert_eq!(
        names(app.list_users(query("ünsal")).await.unwrap()),
        ["plain"]
    );
    assert_eq!(
        names(app.list_users(query("EXAMPLE.COM")).await.unwrap()),
        ["pct", "plain", "root", "slash"]
    );
    let resp = app.list_users(query("nobody-matches")).await.unwrap();
    assert_eq!((resp.users.len(), resp.total_size), (0, 0));
}

#[tokio::test]
async fn list_filters_by_flags() {
    let app = spawn_app().await;
    let mut req = TestUser::named("inactive").request();
    req.is_active = Some(false);
    app.users.clone().create_user(req).await.unwrap();
    let mut req = TestUser::named("admin").request();
    req.is_superuser = true;
    req.is_verified = true;
    app.users.clone().create_user(req).await.unwrap();
    app.create_user("regular").await;

    let only = |is_active, is_superuser, is_verified| pb::ListUsersRequest {
        is_active,
        is_superuser,
        is_verified,
        ..Default::default()
    };
    let names = |resp: pb::ListUsersResponse| -> Vec<String> {
        let mut v: Vec<_> = resp.users.into_iter().map(|u| u.username).collect();
        v.sort();
        v
    };
    assert_eq!(
        names(app.list_users(only(Some(false), None, None)).await.unwrap()),
        ["inactive"]
    );
    assert_eq!(
        names(app.list_users(only(Some(true), None, None)).await.unwrap()),
        ["admin", "regular", "root"]
    );
    assert_eq!(
        names(app.list_users(only(None, Some(true), None)).await.unwrap()),
        ["admin", "root"]
    );
    assert_eq!(
        names(app.list_users(only(None, None, Some(false))).await.unwrap()),
        ["inactive", "regular"]
    );
    let resp = app
        .list_users(only(Some(true), Some(false), Some(false)))
        .await
        .unwrap();
    assert_eq!(
        (names(resp.clone()), resp.total_size),
        (vec!["regular".to_owned()], 1)
    );
}

#[tokio::test]
async fn list_by_group_checks_the_group_id() {
    let app = spawn_app().await;
    let req = pb::ListUsersRequest {
        group_id: "nope".into(),
        ..Default::default()
    };
    let status = app.list_users(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["group_id"]);
    let req = pb::ListUsersRequest {
        group_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    };
    assert_eq!(
        app.list_users(req).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn update_user_changes_only_the_masked_fields() {
    let app = spawn_app().await;
    let mut req = TestUser::named("frank").request();
    req.first_name = "Frank".into();
    req.attributes = HashMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
    let user = app.create_user_from(req).await.unwrap();

    let masked = ["first_name", "is_verified", "attributes"];
    let updated = app
        .update_user(&user.id, &masked, |u| {
            u.username = "ignored".into();
            u.first_name = "Francis".into();
            u.last_name = "Not in the mask".into();
            u.is_superuser = true;
            u.is_verified = true;
            u.attributes = HashMap::from([("c".into(), "3".into())]);
        })
        .await
        .unwrap();

    assert_eq!(updated.first_name, "Francis");
    assert_eq!(updated.last_name, "", "not in the mask");
    assert!(updated.is_verified);
    assert!(!updated.is_superuser, "not in the mask");
    assert!(
        updated.is_active,
        "not in the mask: false in the message is ignored"
    );
    assert_eq!(updated.username, "frank");
    assert_eq!(
        updated.attributes,
        HashMap::from([("c".into(), "3".into())]),
        "the whole map replaced"
    );
    let secs = |t: &Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
    assert!(secs(&updated.update_time) > secs(&user.update_time));
    assert_eq!(updated.create_time, user.create_time);

    // The search text follows the new name.
    let found = app
        .list_users(pb::ListUsersRequest {
            query: "francis".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.total_size, 1);
}

#[tokio::test]
async fn update_user_refuses_bad_masks_and_unknown_users() {
    let app = spawn_app().await;
    let user = app.create_user("grace").await;
    let update = |paths: Option<prost_types::FieldMask>, user: pb::User| pb::UpdateUserRequest {
        user: Some(user),
        update_mask: paths,
    };
    for paths in [
        mask(&[]),
        None,
        mask(&["username"]),
        mask(&["email"]),
        mask(&["id"]),
        mask(&["create_time"]),
        mask(&["password"]),
        mask(&["first_name", "nonsense"]),
    ] {
        let status = app
            .users
            .clone()
            .update_user(update(paths.clone(), user.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{paths:?}");
        assert_eq!(violated_fields(&status), ["update_mask"], "{paths:?}");
    }
    let status = app
        .update_user(&user.id, &["first_name"], |u| {
            u.first_name = "x".repeat(151);
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["user.first_name"]);

    let ghost = uuid::Uuid::now_v7().to_string();
    let status = app
        .update_user(&ghost, &["first_name"], |_| {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let status = app
        .users
        .clone()
        .update_user(pb::UpdateUserRequest {
            user: None,
            update_mask: mask(&["first_name"]),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn delete_user_removes_it_and_is_not_found_the_second_time() {
    let app = spawn_app().await;
    let user = app.create_user("heidi").await;
    let delete = pb::DeleteUserRequest {
        id: user.id.clone(),
    };
    app.users.clone().delete_user(delete.clone()).await.unwrap();
    let status = app.get_user(Lookup::Id(&user.id)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = app.users.clone().delete_user(delete).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = app
        .users
        .clone()
        .delete_user(pb::DeleteUserRequest { id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["id"]);
    // The name is free again.
    app.create_user("heidi").await;
}

#[tokio::test]
async fn set_password_replaces_the_stored_hash() {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::RunQueryDsl;
    use identity::db::schema::users;

    let app = spawn_app().await;
    let user = app.create_user("ivanovich").await;
    let id = uuid::Uuid::parse_str(&user.id).unwrap();
    let mut conn = app.db.connect().await;
    let hash_of = async |conn: &mut diesel_async::AsyncPgConnection| -> String {
        users::table
            .filter(users::id.eq(id))
            .select(users::password_hash)
            .first(conn)
            .await
            .unwrap()
    };
    let before = hash_of(&mut conn).await;
    assert!(before.starts_with("$argon2id$"), "argon2id PHC string");

    app.users
        .clone()
        .set_password(pb::SetPasswordRequest {
            id: user.id.clone(),
            new_password: "a brand new secret".into(),
        })
        .await
        .unwrap();
    let after = hash_of(&mut conn).await;
    assert_ne!(before, after);
    let parsed = argon2::PasswordHash::new(&after).unwrap();
    use argon2::PasswordVerifier;
    assert!(
        argon2::Argon2::default()
            .verify_password(b"a brand new secret", &parsed)
            .is_ok()
    );

    for (id, pw, code) in [
        (user.id.clone(), "short".to_owned(), Code::InvalidArgument),
        (
            user.id.clone(),
            "IVANOVICH".to_owned(),
            Code::InvalidArgument,
        ),
        (user.id.clone(), "IVANOVICHes".to_owned(), Code::Ok),
        (
            uuid::Uuid::now_v7().to_string(),
            "long enough pw".to_owned(),
            Code::NotFound,
        ),
        (
            "bad".to_owned(),
            "long enough pw".to_owned(),
            Code::InvalidArgument,
        ),
    ] {
        let result = app
            .users
            .clone()
            .set_password(pb::SetPasswordRequest {
                id,
                new_password: pw.clone(),
            })
            .await;
        let got = result.err().map_or(Code::Ok, |s| s.code());
        assert_eq!(got, code, "{pw}");
    }
}

#[tokio::test]
async fn a_username_may_not_be_another_users_email_or_the_reverse() {
    let app = spawn_app().await;
    let mut owner = TestUser::named("owner");
    owner.email = "Shared@Example.com".into();
    app.users
        .clone()
        .create_user(owner.request())
        .await
        .unwrap();

    // Taking that address as a username would catch its owner's email logins.
    let status = app
        .users
        .clone()
        .create_user(TestUser::named("shared@example.com").request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(taken_field(&status).as_deref(), Some("username"));

    // And the reverse: an email equal to someone's username.
    app.create_user("name@corp.example").await;
    let mut taker = TestUser::named("taker");
    taker.email = "NAME@corp.example".into();
    let status = app
        .users
        .clone()
        .create_user(taker.request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(taken_field(&status).as_deref(), Some("email"));

    // One's own username may be one's own email.
    let mut same = TestUser::named("me@self.example");
    same.email = "me@self.example".into();
    app.users.clone().create_user(same.request()).await.unwrap();
}
