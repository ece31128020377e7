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
        .list_users(identity::proto::identity::v1::ListUsersRequest {
            query: "migrated".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.users, [user]);
}

#[derive(diesel::QueryableByName)]
struct Constraint {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    kind: String,
}

/// A constraint renamed or added without a name in `db::Error` would turn
/// its violation into INTERNAL: every one of the schema's has its variant,
/// and every variant its constraint.
#[tokio::test]
async fn every_constraint_of_the_schema_has_its_name_in_db_error() {
    use diesel_async::RunQueryDsl;
    use identity::db::{CHECKS, Ref, UniqueKey};
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let found: Vec<Constraint> = diesel::sql_query(
        "SELECT c.conname::text AS name, c.contype::text AS kind FROM pg_constraint c \
         JOIN pg_namespace n ON n.oid = c.connamespace \
         WHERE n.nspname = 'public' AND c.conrelid <> 0 \
           AND c.conrelid::regclass::text <> '__diesel_schema_migrations' \
         ORDER BY 1",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let names = |kind: &str| -> Vec<String> {
        let mut v: Vec<String> = found
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.name.clone())
            .collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut unique = names("p");
    unique.extend(names("u"));
    assert_eq!(
        sorted(unique),
        sorted(UniqueKey::ALL.iter().map(|k| k.name().to_owned()).collect())
    );
    assert_eq!(
        names("f"),
        sorted(Ref::ALL.iter().map(|r| r.name().to_owned()).collect())
    );
    assert_eq!(
        names("c"),
        sorted(CHECKS.iter().map(|c| (*c).to_owned()).collect())
    );
}
