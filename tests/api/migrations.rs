//! Migrations up, down and up again, and the schema matching diesel's view.

use identity::db::migrations;

use crate::helpers::{TestDb, spawn_app_on};

#[tokio::test]
async fn migrations_go_up_down_and_up_again() {
    let db = TestDb::empty().await;

    let applied = migrations::run_pending(&db.url).await.unwrap();
    assert!(!applied.is_empty());
    assert!(
        migrations::status(&db.url)
            .await
            .unwrap()
            .iter()
            .all(|m| m.applied)
    );
    assert!(
        migrations::run_pending(&db.url).await.unwrap().is_empty(),
        "idempotent"
    );

    // Down, all the way.
    for _ in 0..applied.len() {
        migrations::revert_last(&db.url).await.unwrap();
    }
    assert!(
        migrations::status(&db.url)
            .await
            .unwrap()
            .iter()
            .all(|m| !m.applied)
    );

    // Up again, and the service works on it: diesel's schema matches.
    assert_eq!(migrations::run_pending(&db.url).await.unwrap(), applied);
    let app = spawn_app_on(db, |_| {}).await;
    let user = app.create_user("migrated").await;
    let listed = app
        .users
        .clone()
        .list_users(identity::proto::identity::v1::ListUsersRequest {
            query: "migrated".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.users, [user]);
}
