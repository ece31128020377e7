//! The change feed's order: exactly once and in commit order with many
//! writers on two replicas, resumption from any cursor, and transactions
//! rolled back without leaving a change or a hole.

use std::sync::Arc;

use diesel_async::SimpleAsyncConnection;
use tonic::Code;

use crate::changes::*;
use crate::helpers::*;
use identity::proto::identity::v1 as pb;
use pb::ChangeKind as K;

/// The transaction of a change's cursor (its first 16 hex digits).
fn transaction(cursor: &str) -> i64 {
    i64::from_str_radix(&cursor[..16], 16).expect("a hex cursor")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_writers_on_two_replicas_are_seen_once_in_commit_order_by_a_watcher_on_each() {
    const WRITERS: usize = 8;
    const EACH: usize = 100;
    let db = Arc::new(TestDb::migrated().await);
    let a = spawn_app_on(db.clone(), |_| {}).await;
    let b = spawn_app_on(db.clone(), |_| {}).await;
    let mut ids = Vec::new();
    for i in 0..WRITERS {
        ids.push(a.create_user(&format!("writer{i}")).await.id);
    }
    let start = head(&a).await;
    let watchers = [&a, &b].map(|app| {
        let clients = app.admin.clone();
        let start = start.clone();
        tokio::spawn(async move {
            let mut watch = open_watch(&clients, &start, &[]).await.unwrap();
            read_changes(&mut watch, WRITERS * EACH).await.0
        })
    });

    // Each writer renames its own user, on replica a or b by turns.
    let writers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let users = [&a, &b][i % 2].admin.users.clone();
            let id = id.clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    users
                        .clone()
                        .update_user(rename(&id, &format!("name{n}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let [seen_a, seen_b] = watchers;
    let (seen_a, seen_b) = (seen_a.await.unwrap(), seen_b.await.unwrap());

    let listed = changes_after(&a, &start).await;
    assert_eq!(listed.len(), WRITERS * EACH);
    assert!(
        listed.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "strictly in feed order"
    );
    assert!(listed.iter().all(|c| c.kind() == K::UserUpdated));
    for id in &ids {
        assert_eq!(
            listed.iter().filter(|c| &c.user_id == id).count(),
            EACH,
            "every change of {id} once"
        );
    }
    // Every call its own transaction, each listed once.
    let transactions: std::collections::BTreeSet<i64> =
        listed.iter().map(|c| transaction(&c.cursor)).collect();
    assert_eq!(transactions.len(), WRITERS * EACH);
    assert!(
        seen_a == listed,
        "replica a's watcher saw the feed as listed"
    );
    assert!(
        seen_b == listed,
        "replica b's watcher saw the feed as listed"
    );
    // The other replica lists the same.
    assert!(changes_after(&b, &start).await == listed);
}

#[tokio::test]
async fn a_reader_resumed_from_any_cursor_gets_every_later_change_and_none_before() {
    let app = spawn_app().await;
    let start = head(&app).await;
    let users = [
        app.create_user("paul").await,
        app.create_user("quinn").await,
        app.create_user("rita").await,
    ];
    let mut groups = app.admin.groups.clone();
    let group = groups
        .create_group(pb::CreateGroupRequest {
            groupname: "Crew".into(),
            slug: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    for user in &users {
        groups
            .add_group_member(pb::AddGroupMemberRequest {
                group_id: group.id.clone(),
                user_id: user.id.clone(),
            })
            .await
            .unwrap();
    }
    // One commit of four changes: a cursor may stand inside it.
    groups
        .delete_group(pb::DeleteGroupRequest {
            id: group.id.clone(),
        })
        .await
        .unwrap();
    let all = changes_after(&app, &start).await;
    assert_eq!(all.len(), 3 + 1 + 3 + 4, "{all:#?}");
    assert_one_commit(&all[7..]);

    for k in 0..all.len() {
        let after = &all[k].cursor;
        let later = &all[k + 1..];
        let listed = changes_after(&app, after).await;
        assert!(listed == later, "ListChanges after change {k}");
        let mut watch = open_watch(&app.admin, after, &[]).await.unwrap();
        let (watched, cursor) = if later.is_empty() {
            let first = next_response(&mut watch).await;
            (first.changes, first.cursor)
        } else {
            read_changes(&mut watch, later.len()).await
        };
        assert!(watched == later, "WatchChanges after change {k}");
        assert!(&cursor >= all.last().map(|c| &c.cursor).unwrap());
    }

    // Resumed from the head, it waits for what comes next.
    let mut watch = open_watch(&app.admin, &all.last().unwrap().cursor, &[])
        .await
        .unwrap();
    assert!(next_response(&mut watch).await.changes.is_empty());
    let late = app.create_user("sam").await;
    let (next, _) = read_changes(&mut watch, 1).await;
    assert_eq!(next[0].user_id, late.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_rolled_back_leaves_no_change_and_no_hole() {
    let app = spawn_app().await;
    let (victim, bystander) = (app.create_user("tara").await, app.create_user("uma").await);
    let start = head(&app).await;
    let mut watch = open_watch(&app.admin, &start, &[]).await.unwrap();
    assert!(next_response(&mut watch).await.changes.is_empty());

    // Rolled back at once.
    let mut conn = app.db.connect().await;
    conn.batch_execute(&format!(
        "BEGIN; UPDATE users SET first_name = 'gone' WHERE id = '{}'; ROLLBACK",
        victim.id
    ))
    .await
    .unwrap();
    // Rolled back after a younger transaction committed a change: that
    // change waits (its place is not final while an older writer runs),
    // then comes, with nothing of the rolled-back one.
    conn.batch_execute(&format!(
        "BEGIN; UPDATE users SET first_name = 'gone too' WHERE id = '{}'",
        victim.id
    ))
    .await
    .unwrap();
    app.admin
        .users
        .clone()
        .update_user(rename(&bystander.id, "Uma"))
        .await
        .unwrap();
    assert!(
        changes_after(&app, &start).await.is_empty(),
        "nothing is listed while an older writer is open"
    );
    conn.batch_execute("ROLLBACK").await.unwrap();
    // A call that fails changes nothing either.
    let taken = app
        .create_user_from(TestUser::named("tara").request())
        .await;
    assert_eq!(taken.unwrap_err().code(), Code::AlreadyExists);
    let later = app.create_user("vera").await;

    let (watched, _) = read_changes(&mut watch, 2).await;
    let listed = changes_after(&app, &start).await;
    assert!(watched == listed, "{watched:#?} {listed:#?}");
    let seen: Vec<(K, &str)> = listed
        .iter()
        .map(|c| (c.kind(), c.user_id.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (K::UserUpdated, bystander.id.as_str()),
            (K::UserCreated, later.id.as_str())
        ]
    );
    // And the feed goes on.
    let last = app.create_user("wanda").await;
    let (next, _) = read_changes(&mut watch, 1).await;
    assert_eq!(next[0].user_id, last.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_commits_after_a_younger_one_is_not_skipped() {
    let app = spawn_app().await;
    let (slow, quick) = (app.create_user("xena").await, app.create_user("yuri").await);
    let start = head(&app).await;
    let mut watch = open_watch(&app.admin, &start, &[]).await.unwrap();
    assert!(next_response(&mut watch).await.changes.is_empty());

    // An older transaction writes first and commits last: a reader that
    // went by commit numbers taken at write time would skip it for good.
    let mut conn = app.db.connect().await;
    conn.batch_execute(&format!(
        "BEGIN; UPDATE users SET first_name = 'Slow' WHERE id = '{}'",
        slow.id
    ))
    .await
    .unwrap();
    app.admin
        .users
        .clone()
        .update_user(rename(&quick.id, "Quick"))
        .await
        .unwrap();
    conn.batch_execute("COMMIT").await.unwrap();

    // Both, once each, in the feed's order (the older transaction first),
    // alike for the watcher, the list, and a reader resumed in between.
    let (watched, _) = read_changes(&mut watch, 2).await;
    let listed = changes_after(&app, &start).await;
    assert!(watched == listed, "{watched:#?} {listed:#?}");
    let users: Vec<&str> = listed.iter().map(|c| c.user_id.as_str()).collect();
    assert_eq!(users, [slow.id.as_str(), quick.id.as_str()]);
    assert_eq!(changes_after(&app, &listed[0].cursor).await, listed[1..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_reaches_a_watcher_on_another_within_a_second() {
    let db = Arc::new(TestDb::migrated().await);
    let a = spawn_app_on(db.clone(), |_| {}).await;
    // A heartbeat far away: only the other replica's notice can wake it.
    let b = spawn_app_on(db.clone(), |c| {
        c.changes_heartbeat = std::time::Duration::from_secs(60)
    })
    .await;
    let mut watch = open_watch(&b.admin, "", &[]).await.unwrap();
    next_response(&mut watch).await;
    for i in 0..5 {
        let user = a.create_user(&format!("remote{i}")).await;
        let response = tokio::time::timeout(std::time::Duration::from_secs(1), watch.message())
            .await
            .expect("within a second of the commit")
            .unwrap()
            .unwrap();
        assert_eq!(response.changes.len(), 1, "{response:#?}");
        assert_eq!(response.changes[0].user_id, user.id);
    }
}
