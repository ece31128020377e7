//! ListChanges, the audit trail: paging by cursor, filters, the requests it
//! refuses, and retention (CURSOR_EXPIRED once a cursor's commit is purged).

use tonic::Code;

use crate::changes::*;
use crate::helpers::*;
use identity::proto::identity::v1 as pb;
use pb::ChangeKind as K;

/// One page of ListChanges as root.
async fn page(
    app: &TestApp,
    request: pb::ListChangesRequest,
) -> Result<pb::ListChangesResponse, tonic::Status> {
    app.admin
        .changes
        .clone()
        .list_changes(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Every change that passes `request`'s filters, in pages of its
/// `page_size`; checks that each page but the last is full.
async fn pages(app: &TestApp, request: pb::ListChangesRequest) -> (Vec<pb::Change>, String) {
    let mut changes = Vec::new();
    let mut request = request;
    loop {
        let got = page(app, request.clone()).await.expect("a page");
        let n = got.changes.len();
        assert!(n <= request.page_size as usize);
        changes.extend(got.changes);
        request.after_cursor = got.cursor;
        if n < request.page_size as usize {
            return (changes, request.after_cursor);
        }
    }
}

/// Inserts `n` users by hand in one statement: `n` changes in one commit.
async fn bulk_users(app: &TestApp, n: usize) {
    sql(
        app,
        &format!(
            "INSERT INTO users (id, username, username_canonical, email, email_canonical, \
                                password_hash, search) \
             SELECT gen_random_uuid(), 'bulk' || i, 'bulk' || i, 'bulk' || i || '@example.com', \
                    'bulk' || i || '@example.com', 'x', 'bulk' || i \
             FROM generate_series(1, {n}) AS i"
        ),
    )
    .await;
}

#[tokio::test]
async fn pages_follow_the_cursor_even_inside_one_commit_and_an_empty_page_keeps_a_usable_cursor() {
    let app = spawn_app().await;
    let start = head(&app).await;
    bulk_users(&app, 1_200).await;
    let all = changes_after(&app, &start).await;
    assert_eq!(all.len(), 1_200);
    assert_one_commit(&all);

    // 0 means 100, above 1000 means 1000.
    let request = |page_size| pb::ListChangesRequest {
        after_cursor: start.clone(),
        page_size,
        ..Default::default()
    };
    assert_eq!(page(&app, request(0)).await.unwrap().changes.len(), 100);
    assert_eq!(
        page(&app, request(5_000)).await.unwrap().changes.len(),
        1_000
    );
    // A full page's cursor is its last change's.
    let full = page(&app, request(7)).await.unwrap();
    assert_eq!(full.cursor, full.changes[6].cursor);

    // Small pages, cut inside the commit, give the same changes.
    let (paged, end) = pages(&app, request(7)).await;
    assert!(paged == all);
    assert!(end >= all.last().unwrap().cursor);
    // Past the end: an empty page, and a cursor to go on from.
    let empty = page(
        &app,
        pb::ListChangesRequest {
            after_cursor: end.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(empty.changes.is_empty());
    assert!(empty.cursor >= end);
    let user = app.create_user("xena").await;
    let next = changes_after(&app, &empty.cursor).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].user_id, user.id);
}

/// Which changes a filter should let through.
type Matches<'a> = Box<dyn Fn(&pb::Change) -> bool + 'a>;

#[tokio::test]
async fn filters_by_kind_user_and_actor_list_exactly_the_matching_changes() {
    let app = spawn_app().await;
    let start = head(&app).await;
    let (yan, tokens) = app.signed_in_user("yan").await;
    let zoe = app.create_user("zoe").await;
    app.as_token(&tokens.access_token)
        .update_user(&yan.id, &["first_name"], |u| u.first_name = "Yan".into())
        .await
        .unwrap();
    app.update_user(&zoe.id, &["last_name"], |u| u.last_name = "Z".into())
        .await
        .unwrap();
    let group = app
        .admin
        .groups
        .clone()
        .create_group(pb::CreateGroupRequest {
            groupname: "Band".into(),
            slug: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    for user in [&yan, &zoe] {
        app.admin
            .groups
            .clone()
            .add_group_member(pb::AddGroupMemberRequest {
                group_id: group.id.clone(),
                user_id: user.id.clone(),
            })
            .await
            .unwrap();
    }
    let all = changes_after(&app, &start).await;
    assert_eq!(all.len(), 2 + 1 + 1 + 1 + 1 + 2, "{all:#?}");

    let cases: Vec<(pb::ListChangesRequest, Matches)> = vec![
        (
            pb::ListChangesRequest {
                kinds: vec![K::UserUpdated as i32],
                ..Default::default()
            },
            Box::new(|c| c.kind() == K::UserUpdated),
        ),
        (
            pb::ListChangesRequest {
                kinds: vec![K::UserCreated as i32, K::MemberAdded as i32],
                ..Default::default()
            },
            Box::new(|c| matches!(c.kind(), K::UserCreated | K::MemberAdded)),
        ),
        (
            pb::ListChangesRequest {
                user_id: yan.id.clone(),
                ..Default::default()
            },
            Box::new(|c| c.user_id == yan.id),
        ),
        (
            pb::ListChangesRequest {
                actor_id: yan.id.clone(),
                ..Default::default()
            },
            Box::new(|c| c.actor_id == yan.id),
        ),
        (
            pb::ListChangesRequest {
                actor_id: app.root.id.clone(),
                user_id: zoe.id.clone(),
                kinds: vec![K::UserUpdated as i32, K::MemberAdded as i32],
                ..Default::default()
            },
            Box::new(|c| {
                c.actor_id == app.root.id
                    && c.user_id == zoe.id
                    && matches!(c.kind(), K::UserUpdated | K::MemberAdded)
            }),
        ),
    ];
    for (request, matches) in cases {
        let expected: Vec<pb::Change> = all.iter().filter(|c| matches(c)).cloned().collect();
        assert!(!expected.is_empty() && expected.len() < all.len());
        for page_size in [1, 2, 1000] {
            let (got, end) = pages(
                &app,
                pb::ListChangesRequest {
                    after_cursor: start.clone(),
                    page_size,
                    ..request.clone()
                },
            )
            .await;
            assert!(got == expected, "{request:?} by {page_size}: {got:#?}");
            // The last, short page moved the cursor past what did not match.
            assert!(end >= all.last().unwrap().cursor, "{request:?}");
        }
    }
    // Yan's own changes: the session its login started and its rename.
    let by_yan: Vec<K> = all
        .iter()
        .filter(|c| c.actor_id == yan.id)
        .map(|c| c.kind())
        .collect();
    assert_eq!(by_yan, [K::SessionStarted, K::UserUpdated]);
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments_naming_the_field() {
    let app = spawn_app().await;
    let head = head(&app).await;
    let ahead = format!(
        "{:016x}{:016x}",
        i64::from_str_radix(&head[..16], 16).unwrap() + 1_000,
        0
    );
    let cases = [
        (
            pb::ListChangesRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListChangesRequest {
                kinds: vec![K::Unspecified as i32],
                ..Default::default()
            },
            "kinds",
        ),
        (
            pb::ListChangesRequest {
                kinds: vec![K::UserCreated as i32, 99],
                ..Default::default()
            },
            "kinds",
        ),
        (
            pb::ListChangesRequest {
                user_id: "not-a-uuid".into(),
                ..Default::default()
            },
            "user_id",
        ),
        (
            pb::ListChangesRequest {
                actor_id: "not-a-uuid".into(),
                ..Default::default()
            },
            "actor_id",
        ),
        (
            pb::ListChangesRequest {
                after_cursor: "abc".into(),
                ..Default::default()
            },
            "after_cursor",
        ),
        (
            pb::ListChangesRequest {
                after_cursor: "z".repeat(32),
                ..Default::default()
            },
            "after_cursor",
        ),
        (
            pb::ListChangesRequest {
                after_cursor: "f".repeat(32),
                ..Default::default()
            },
            "after_cursor",
        ),
        (
            pb::ListChangesRequest {
                after_cursor: ahead.clone(),
                ..Default::default()
            },
            "after_cursor",
        ),
    ];
    for (request, field) in cases {
        let status = page(&app, request.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert_eq!(violated_fields(&status), [field], "{request:?}: {status:?}");
    }

    // WatchChanges refuses a bad start the same way, at the call.
    for (after, kinds, field) in [
        ("abc".to_owned(), vec![], "after_cursor"),
        (ahead, vec![], "after_cursor"),
        (String::new(), vec![K::Unspecified as i32], "kinds"),
        (String::new(), vec![42], "kinds"),
    ] {
        let opened = app
            .admin
            .changes
            .clone()
            .watch_changes(pb::WatchChangesRequest {
                after_cursor: after.clone(),
                kinds,
            })
            .await;
        let status = match opened {
            Err(status) => status,
            Ok(stream) => {
                let mut stream = stream.into_inner();
                tokio::time::timeout(DEADLINE, stream.message())
                    .await
                    .unwrap()
                    .expect_err("refused")
            }
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{after}: {status:?}");
        assert_eq!(violated_fields(&status), [field], "{after}: {status:?}");
    }
}

#[tokio::test]
async fn a_purged_cursor_is_expired_and_the_feed_goes_on_after_the_purge() {
    let app = spawn_app().await;
    let start = head(&app).await;
    let old = [app.create_user("adam").await, app.create_user("bert").await];
    let kept = app.create_user("cleo").await;
    let before = changes_after(&app, &start).await;
    assert_eq!(before.len(), 3);
    // The commits of adam and bert (and everything before them) grow old.
    sql(
        &app,
        &format!(
            "UPDATE changes SET record_time = now() - interval '30 days' \
             WHERE xid <= '{}'::xid8",
            i64::from_str_radix(commit_of(&before[1]), 16).unwrap()
        ),
    )
    .await;

    // The new server purges at start.
    let app = app.restart(|_| {}).await;
    let expired = tokio::time::timeout(DEADLINE, async {
        loop {
            let listed = page(
                &app,
                pb::ListChangesRequest {
                    after_cursor: before[0].cursor.clone(),
                    ..Default::default()
                },
            )
            .await;
            match listed {
                Ok(_) => tokio::task::yield_now().await,
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the purge at start expires the old cursor");
    assert_eq!(expired.code(), Code::FailedPrecondition, "{expired:?}");
    assert_eq!(reason(&expired), "CURSOR_EXPIRED");
    for after in [&start, &before[0].cursor] {
        let status = page(
            &app,
            pb::ListChangesRequest {
                after_cursor: after.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(reason(&status), "CURSOR_EXPIRED", "{status:?}");
        let watched = match open_watch(&app.admin, after, &[]).await {
            Err(status) => status,
            Ok(mut watch) => tokio::time::timeout(DEADLINE, watch.message())
                .await
                .unwrap()
                .expect_err("expired"),
        };
        assert_eq!(watched.code(), Code::FailedPrecondition, "{watched:?}");
        assert_eq!(reason(&watched), "CURSOR_EXPIRED");
    }

    // The last purged change's cursor lost nothing after it: still good.
    let rest = changes_after(&app, &before[1].cursor).await;
    assert_eq!(rest[0], before[2]);
    assert_eq!(rest[0].user_id, kept.id);
    // From empty: the oldest kept, none of the purged.
    let from_empty = changes_after(&app, "").await;
    assert!(from_empty == rest, "{from_empty:#?}");
    assert!(
        from_empty
            .iter()
            .all(|c| c.user_id != old[0].id && c.user_id != old[1].id)
    );
    // New changes flow, to readers and watchers.
    let mut watch = open_watch(&app.admin, "", &[]).await.unwrap();
    next_response(&mut watch).await;
    let new = app.create_user("dora").await;
    let (watched, _) = read_changes(&mut watch, 1).await;
    assert_eq!(watched[0].user_id, new.id);
    assert_eq!(changes_after(&app, "").await.last(), watched.last());
}

/// A session past its refresh token's expiry that nobody ended: the purge
/// (here, the one at start) ends it with EXPIRED before deleting it, so the
/// feed says why it ended, not that its user was deleted.
#[tokio::test]
async fn the_purge_of_a_session_that_expired_unended_records_it_as_expired() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("ivy").await;
    let session = session_of(&app, &tokens.access_token).await;
    sql(
        &app,
        &format!(
            "UPDATE sessions SET refresh_expire_time = now() - interval '8 days' \
             WHERE id = '{session}'"
        ),
    )
    .await;
    let start = head(&app).await;
    let app = app.restart(|_| {}).await;
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            let changes = changes_after(&app, &start).await;
            if let Some(ended) = changes.into_iter().find(|c| c.session_id == session) {
                return ended;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the purge at start records the session's end");
    assert_eq!(ended.kind, K::SessionEnded as i32);
    assert_eq!(ended.end_reason, "EXPIRED");
    assert_eq!(ended.user_id, user.id);
    // And it is gone, ended or not.
    let listed = app
        .admin
        .auth
        .clone()
        .list_sessions(pb::ListSessionsRequest {
            user_id: user.id.clone(),
            include_ended: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.iter().all(|s| s.id != session));
}
