//! Seeding: users in batched multi-row inserts, with the same canonical forms
//! and search text the service computes, and one real argon2id hash (the
//! service's parameters) that every seeded user shares. Every user is in two
//! of sixteen groups, so that VerifyToken's read returns groups as it would
//! in production.

use std::time::Instant;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use identity::db::{
    Pool,
    groups::NewGroupRow,
    schema::{group_members, groups, login_names, users},
    users::NewUserRow,
};
use identity::domain::{Email, Groupname, Slug, Username, text};
use uuid::Uuid;

/// The password of every seeded user.
pub const PASSWORD: &str = "bench horse battery staple";

const FIRST: [&str; 16] = [
    "ada", "alan", "grace", "edsger", "barbara", "donald", "frances", "john", "margaret", "ken",
    "radia", "tony", "leslie", "niklaus", "shafi", "robin",
];
const LAST: [&str; 16] = [
    "lovelace",
    "turing",
    "hopper",
    "dijkstra",
    "liskov",
    "knuth",
    "allen",
    "backus",
    "hamilton",
    "thompson",
    "perlman",
    "hoare",
    "lamport",
    "wirth",
    "goldwasser",
    "milner",
];

/// The username of seeded user `i` (user 0 is the superuser).
pub fn username(i: usize) -> String {
    if i == 0 {
        return "bench.admin".into();
    }
    format!("{}.{}{i}", FIRST[i % 16], LAST[(i / 16) % 16])
}

/// A ListUsers query that matches seeded user `i` and few others: its last
/// name and number, e.g. "lovelace1234" (also matches lovelace12340 to
/// lovelace12349 where those exist).
pub fn query_for(i: usize) -> String {
    format!("{}{i}", LAST[(i / 16) % 16])
}

/// The users seeded so far: their ids, in seeding order; and the groups.
#[derive(Default)]
pub struct Seeded {
    pub ids: Vec<Uuid>,
    pub groups: Vec<Uuid>,
}

/// The two groups of user `i`: distinct indexes into the sixteen groups.
fn groups_of(i: usize) -> [usize; 2] {
    let first = i % 16;
    [first, (first + 1 + (i / 16) % 15) % 16]
}

async fn create_groups(pool: &Pool) -> Vec<Uuid> {
    let names: Vec<(Uuid, Groupname, Slug)> = (0..16)
        .map(|n| {
            let name = Groupname::parse(&format!("Team {n}")).expect("a valid groupname");
            let slug = Slug::derive(&name).expect("a slug");
            (Uuid::now_v7(), name, slug)
        })
        .collect();
    let searches: Vec<String> = names
        .iter()
        .map(|(_, name, slug)| text::search_text(&[name.as_str(), slug.as_str()]))
        .collect();
    let rows: Vec<NewGroupRow<'_>> = names
        .iter()
        .zip(&searches)
        .map(|((id, name, slug), search)| NewGroupRow {
            id: *id,
            groupname: name.as_str(),
            groupname_canonical: name.canonical(),
            slug: slug.as_str(),
            search,
        })
        .collect();
    let mut conn = pool.get().await.expect("a connection");
    diesel::insert_into(groups::table)
        .values(&rows)
        .execute(&mut conn)
        .await
        .expect("seeded groups");
    names.into_iter().map(|(id, ..)| id).collect()
}

/// Adds users until there are `total`, in batches over the pool, two
/// batches at a time; then VACUUM ANALYZE, as after any bulk load.
pub async fn grow(pool: &Pool, seeded: &mut Seeded, total: usize, hash: &str) {
    const BATCH: usize = 2_000;
    let started = Instant::now();
    let from = seeded.ids.len();
    if total <= from {
        return;
    }
    if seeded.groups.is_empty() {
        seeded.groups = create_groups(pool).await;
    }
    let group_ids = seeded.groups.clone();
    let ids: Vec<Uuid> = (from..total).map(|_| Uuid::now_v7()).collect();
    let batches: Vec<(usize, Vec<Uuid>)> = ids
        .chunks(BATCH)
        .enumerate()
        .map(|(n, chunk)| (from + n * BATCH, chunk.to_vec()))
        .collect();
    let mut pending = batches.into_iter();
    loop {
        let a = pending.next();
        let b = pending.next();
        if a.is_none() {
            break;
        }
        let (ra, rb) = tokio::join!(
            async {
                if let Some((first, ids)) = a {
                    insert_batch(pool, first, &ids, hash, &group_ids).await;
                }
            },
            async {
                if let Some((first, ids)) = b {
                    insert_batch(pool, first, &ids, hash, &group_ids).await;
                }
            }
        );
        let ((), ()) = (ra, rb);
    }
    seeded.ids.extend(ids);
    let mut conn = pool.get().await.expect("a connection");
    // One statement per call: several would run as one transaction block,
    // where VACUUM may not.
    for table in ["users", "login_names", "group_members"] {
        conn.batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .expect("VACUUM ANALYZE");
    }
    eprintln!(
        "seeded {} users (now {total}) in {:.1} s",
        total - from,
        started.elapsed().as_secs_f64()
    );
}

async fn insert_batch(pool: &Pool, first: usize, ids: &[Uuid], hash: &str, group_ids: &[Uuid]) {
    struct Owned {
        username: Username,
        email: Email,
        first: &'static str,
        last: &'static str,
        search: String,
    }
    let owned: Vec<Owned> = (first..first + ids.len())
        .map(|i| {
            let name = username(i);
            let username = Username::parse(&name).expect("a valid seeded username");
            let email = Email::parse(&format!("{name}@bench.example")).expect("a valid email");
            let (first, last) = (FIRST[i % 16], LAST[(i / 16) % 16]);
            let search = text::search_text(&[username.as_str(), email.as_str(), first, last]);
            Owned {
                username,
                email,
                first,
                last,
                search,
            }
        })
        .collect();
    let now = chrono::Utc::now();
    let rows: Vec<NewUserRow<'_>> = owned
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(n, (o, &id))| NewUserRow {
            id,
            username: o.username.as_str(),
            username_canonical: o.username.canonical(),
            email: o.email.as_str(),
            email_canonical: o.email.canonical(),
            password_hash: hash,
            first_name: o.first,
            last_name: o.last,
            is_superuser: first + n == 0,
            is_active: true,
            is_verified: true,
            attributes: serde_json::json!({}),
            search: &o.search,
            password_changed_at: now,
            is_service: false,
        })
        .collect();
    let names: Vec<_> = owned
        .iter()
        .zip(ids)
        .flat_map(|(o, &id)| {
            [
                (
                    login_names::name.eq(o.username.canonical().to_owned()),
                    login_names::user_id.eq(id),
                ),
                (
                    login_names::name.eq(o.email.canonical().to_owned()),
                    login_names::user_id.eq(id),
                ),
            ]
        })
        .collect();
    let members: Vec<_> = ids
        .iter()
        .enumerate()
        .flat_map(|(n, &id)| {
            groups_of(first + n).map(|g| {
                (
                    group_members::group_id.eq(group_ids[g]),
                    group_members::user_id.eq(id),
                )
            })
        })
        .collect();
    let mut conn = pool.get().await.expect("a connection");
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        diesel::insert_into(users::table)
            .values(&rows)
            .execute(conn)
            .await?;
        diesel::insert_into(login_names::table)
            .values(&names)
            .execute(conn)
            .await?;
        diesel::insert_into(group_members::table)
            .values(&members)
            .execute(conn)
            .await?;
        Ok(())
    })
    .await
    .expect("a seeded batch");
}
