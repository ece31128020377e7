//! Migrations up, down and up again, and the schema matching diesel's view.

use std::collections::BTreeMap;

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

/// A table of `src/db/schema.rs`: its primary key, in order, and each
/// column's (PostgreSQL type name, nullable).
#[derive(Debug, Default, PartialEq, Eq)]
struct Table {
    key: Vec<String>,
    columns: BTreeMap<String, (String, bool)>,
}

/// The PostgreSQL type (`udt_name`) of a diesel SQL type.
fn udt_name(diesel_type: &str) -> &'static str {
    match diesel_type {
        "Uuid" => "uuid",
        "Text" => "text",
        "Bool" => "bool",
        "Jsonb" => "jsonb",
        "Timestamptz" => "timestamptz",
        "Bytea" => "bytea",
        "Int2" => "int2",
        "Int4" => "int4",
        "Int8" => "int8",
        "Xid8" => "xid8",
        "Array<Text>" => "_text",
        other => panic!("schema.rs: add {other} to the type map of this test"),
    }
}

/// The `diesel::table!` blocks of schema.rs: `name (key, ..) {` then
/// `column -> Type,` lines, `Nullable<Type>` for nullable columns.
fn parse_schema(source: &str) -> BTreeMap<String, Table> {
    let mut tables = BTreeMap::new();
    let mut current: Option<(String, Table)> = None;
    for line in source.lines().map(str::trim) {
        if let Some((name, table)) = &mut current {
            if line == "}" {
                let (name, table) = (std::mem::take(name), std::mem::take(table));
                tables.insert(name, table);
                current = None;
            } else if let Some((column, ty)) = line.split_once(" -> ") {
                let ty = ty.trim_end_matches(',');
                let (ty, nullable) = match ty.strip_prefix("Nullable<") {
                    Some(inner) => (inner.trim_end_matches('>'), true),
                    None => (ty, false),
                };
                let previous = table
                    .columns
                    .insert(column.to_owned(), (udt_name(ty).to_owned(), nullable));
                assert!(previous.is_none(), "{name}.{column} twice");
            } else {
                panic!("schema.rs, table {name}: cannot read {line:?}");
            }
        } else if let Some(head) = line.strip_suffix(" {")
            && let Some((name, key)) = head.split_once(" (")
            && let Some(key) = key.strip_suffix(')')
        {
            let table = Table {
                key: key.split(',').map(|k| k.trim().to_owned()).collect(),
                columns: BTreeMap::new(),
            };
            current = Some((name.to_owned(), table));
        }
    }
    assert!(current.is_none(), "schema.rs: a table! block is not closed");
    tables
}

#[derive(diesel::QueryableByName)]
struct Column {
    #[diesel(sql_type = diesel::sql_types::Text)]
    table_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    column_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    udt_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    is_nullable: String,
}

#[derive(diesel::QueryableByName)]
struct KeyColumn {
    #[diesel(sql_type = diesel::sql_types::Text)]
    table_name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    column_name: String,
}

/// The tables of a migrated database, read as [`parse_schema`] reads
/// schema.rs.
async fn migrated_tables(conn: &mut diesel_async::AsyncPgConnection) -> BTreeMap<String, Table> {
    use diesel_async::RunQueryDsl;
    let columns: Vec<Column> = diesel::sql_query(
        "SELECT table_name::text, column_name::text, udt_name::text, is_nullable::text \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'",
    )
    .load(conn)
    .await
    .unwrap();
    let keys: Vec<KeyColumn> = diesel::sql_query(
        "SELECT c.conrelid::regclass::text AS table_name, a.attname::text AS column_name \
         FROM pg_constraint c \
         JOIN pg_namespace n ON n.oid = c.connamespace \
         CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, position) \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum \
         WHERE c.contype = 'p' AND n.nspname = 'public' \
           AND c.conrelid::regclass::text <> '__diesel_schema_migrations' \
         ORDER BY 1, k.position",
    )
    .load(conn)
    .await
    .unwrap();
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    for c in columns {
        let nullable = c.is_nullable == "YES";
        tables
            .entry(c.table_name)
            .or_default()
            .columns
            .insert(c.column_name, (c.udt_name, nullable));
    }
    for k in keys {
        tables
            .entry(k.table_name)
            .or_default()
            .key
            .push(k.column_name);
    }
    tables
}

/// schema.rs is kept by hand beside migrations/: every table, column, type,
/// nullability and primary key of one is in the other, both ways.
#[tokio::test]
async fn schema_rs_declares_exactly_the_tables_of_the_migrations() {
    let declared = parse_schema(include_str!("../../src/db/schema.rs"));
    assert!(declared.contains_key("users"), "the parse finds the tables");
    let db = TestDb::migrated().await;
    let migrated = migrated_tables(&mut db.connect().await).await;

    let names = |t: &BTreeMap<String, Table>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&declared),
        names(&migrated),
        "tables (left: schema.rs, right: migrations)"
    );
    for (name, table) in &declared {
        let found = &migrated[name];
        assert_eq!(table.key, found.key, "primary key of {name}");
        for (column, declared) in &table.columns {
            assert_eq!(
                Some(declared),
                found.columns.get(column),
                "{name}.{column}: (type, nullable) in schema.rs, then in migrations"
            );
        }
        for column in found.columns.keys() {
            assert!(
                table.columns.contains_key(column),
                "{name}.{column}: in migrations, missing from schema.rs"
            );
        }
    }
}

/// Replicas starting together on an empty database: one applies every
/// migration, the others wait for it and apply none; none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrating_at_once_take_turns() {
    let db = TestDb::empty().await;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { identity::db::migrations::run_pending(&url).await })
        })
        .collect();
    let mut applied = Vec::new();
    for run in runs {
        applied.push(run.await.unwrap().expect("no run fails"));
    }
    let all = identity::db::migrations::status(&db.url).await.unwrap();
    assert!(all.iter().all(|m| m.applied));
    applied.sort_by_key(Vec::len);
    assert_eq!(applied[3].len(), all.len(), "one run applied them all");
    assert!(applied[..3].iter().all(Vec::is_empty), "{applied:?}");
}
