//! The change feed (ChangeService): what is recorded, in what order, and
//! how watchers follow it.

use crate::helpers::*;
use identity::proto::identity::v1 as pb;
use pb::ChangeKind as K;

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
