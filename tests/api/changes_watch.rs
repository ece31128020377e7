//! WatchChanges as a stream: heartbeats, the end at shutdown, the stream
//! limit, the exemption from REQUEST_TIMEOUT, who may watch, and the
//! database going away under a watcher.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::changes::*;
use crate::helpers::*;
use identity::proto::identity::v1 as pb;
use pb::ChangeKind as K;

#[tokio::test]
async fn heartbeats_come_every_changes_heartbeat_and_move_past_filtered_changes() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.changes_heartbeat = Duration::from_millis(200)).await;
    let mut watch = open_watch(&app.admin, "", &[K::GroupCreated])
        .await
        .unwrap();
    let opened = Instant::now();
    let first = next_response(&mut watch).await;
    assert!(first.changes.is_empty());

    // Changes the filter leaves out: no response of their own, but the
    // heartbeats' cursor moves past them.
    app.create_user("edna").await;
    app.create_user("fred").await;
    let past = head(&app).await;
    let mut beats = 0;
    let mut cursor = first.cursor.clone();
    while beats < 4 || cursor < past {
        let beat = next_response(&mut watch).await;
        assert!(beat.changes.is_empty(), "{beat:?}");
        assert!(beat.cursor >= cursor, "never backwards");
        cursor = beat.cursor;
        beats += 1;
    }
    assert!(cursor >= past);
    // Four beats of 200 ms: well within 3 s even on a busy machine.
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "{:?}",
        opened.elapsed()
    );

    // A matching change comes alone.
    app.create_user("gail").await;
    let group = app
        .admin
        .groups
        .clone()
        .create_group(pb::CreateGroupRequest {
            groupname: "Watched".into(),
            slug: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .group
        .unwrap();
    let (changes, _) = read_changes(&mut watch, 1).await;
    assert_eq!(changes[0].kind(), K::GroupCreated);
    assert_eq!(changes[0].group_id, group.id);
}

#[tokio::test]
async fn a_watch_ends_with_ok_when_the_server_shuts_down() {
    let app = spawn_app().await;
    let mut watch = open_watch(&app.admin, "", &[]).await.unwrap();
    next_response(&mut watch).await;
    app.stop().await;
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match watch.message().await {
                Ok(Some(response)) => assert!(response.changes.is_empty()),
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "ends with OK: {end:?}");
}

#[tokio::test]
async fn watches_count_against_max_streams() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.max_streams = 1).await;
    let mut first = open_watch(&app.admin, "", &[]).await.unwrap();
    next_response(&mut first).await;
    let refused = match open_watch(&app.admin, "", &[]).await {
        Err(status) => status,
        Ok(mut second) => tokio::time::timeout(DEADLINE, second.message())
            .await
            .unwrap()
            .expect_err("a second stream is refused"),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Unary calls are not streams.
    let user = app.create_user("hugo").await;
    assert_eq!(read_changes(&mut first, 1).await.0[0].user_id, user.id);

    // Closed, it frees its place (once the server has seen it go).
    drop(first);
    let mut again = tokio::time::timeout(DEADLINE, async {
        loop {
            match open_watch(&app.admin, "", &[]).await {
                Ok(mut watch) => match watch.message().await {
                    Ok(Some(_)) => return watch,
                    Ok(None) => panic!("ended at once"),
                    Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
                },
                Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a place frees up");
    let user = app.create_user("ivan").await;
    assert_eq!(read_changes(&mut again, 1).await.0[0].user_id, user.id);
}

#[tokio::test]
async fn a_watch_outlives_the_request_timeout() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| {
        c.request_timeout = Duration::from_millis(300);
        c.changes_heartbeat = Duration::from_millis(100);
    })
    .await;
    let mut watch = open_watch(&app.admin, "", &[]).await.unwrap();
    let opened = Instant::now();
    let mut beats = 0;
    // Several timeouts' worth of heartbeats.
    while opened.elapsed() < Duration::from_millis(1_200) {
        let beat = next_response(&mut watch).await;
        assert!(beat.changes.is_empty());
        beats += 1;
    }
    assert!(beats >= 4, "{beats} heartbeats");
    let user = app.create_user("jane").await;
    assert_eq!(read_changes(&mut watch, 1).await.0[0].user_id, user.id);
}

#[tokio::test]
async fn only_superusers_read_the_feed() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("kurt").await;
    let user = app.as_token(&tokens.access_token);
    for (clients, code) in [
        (&app.anon, Code::Unauthenticated),
        (&user, Code::PermissionDenied),
    ] {
        let listed = clients
            .changes
            .clone()
            .list_changes(pb::ListChangesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(listed.code(), code, "{listed:?}");
        let watched = match open_watch(clients, "", &[]).await {
            Err(status) => status,
            Ok(mut watch) => tokio::time::timeout(DEADLINE, watch.message())
                .await
                .unwrap()
                .expect_err("refused"),
        };
        assert_eq!(watched.code(), code, "{watched:?}");
    }
}

/// Ends every connection of the server to its database (as a restart of
/// PostgreSQL would), and with `refuse`, refuses new ones until
/// [`allow_connections`].
pub async fn cut_database(app: &TestApp, refuse: bool) {
    let name = &app.db.name;
    let refuse = if refuse {
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false; ")
    } else {
        String::new()
    };
    app.db
        .admin(&format!(
            "{refuse}SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ))
        .await;
}

pub async fn allow_connections(app: &TestApp) {
    let name = &app.db.name;
    app.db
        .admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await;
}

/// Creates a user, trying again while the service says the database is
/// unavailable (its pool finding out that its connections died).
async fn create_user_retrying(app: &TestApp, username: &str) -> pb::User {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match app
                .admin
                .create_user(TestUser::named(username).request())
                .await
            {
                Ok(user) => return user,
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    tokio::task::yield_now().await;
                }
            }
        }
    })
    .await
    .expect("the database comes back")
}

/// Reads `watch` until it has delivered `n` changes or ended; an end must
/// be UNAVAILABLE. The changes and the last cursor sent.
async fn read_until_end(
    watch: &mut Watch,
    n: usize,
    after: &str,
) -> (Vec<pb::Change>, String, bool) {
    let mut changes = Vec::new();
    let mut cursor = after.to_owned();
    while changes.len() < n {
        match tokio::time::timeout(DEADLINE, watch.message())
            .await
            .expect("a response or the end within the deadline")
        {
            Ok(Some(response)) => {
                changes.extend(response.changes);
                cursor = response.cursor;
            }
            Ok(None) => panic!("a watch does not end with OK while the server runs"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                return (changes, cursor, true);
            }
        }
    }
    (changes, cursor, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_across_lost_database_connections_loses_nothing_when_resumed() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.changes_heartbeat = Duration::from_millis(300)).await;
    let start = head(&app).await;
    let mut watch = open_watch(&app.admin, &start, &[]).await.unwrap();
    next_response(&mut watch).await;
    let before = app.create_user("lara").await;
    let (seen, mut cursor) = read_changes(&mut watch, 1).await;
    assert_eq!(seen[0].user_id, before.id);

    cut_database(&app, false).await;
    let made = [
        create_user_retrying(&app, "mark").await,
        create_user_retrying(&app, "nell").await,
        create_user_retrying(&app, "otto").await,
    ];
    // Either the stream delivers them, or it ends with UNAVAILABLE.
    let (mut received, last, ended) = read_until_end(&mut watch, made.len(), &cursor).await;
    cursor = last;
    if ended {
        // Resumed from the last cursor it sent: the rest, once.
        let rest = changes_after(&app, &cursor).await;
        let mut resumed = open_watch(&app.admin, &cursor, &[]).await.unwrap();
        let (watched, _) = read_changes(&mut resumed, rest.len()).await;
        assert!(watched == rest);
        received.extend(rest);
    }
    let listed = changes_after(&app, &seen[0].cursor).await;
    assert!(received == listed, "{received:#?} {listed:#?}");
    let ids: Vec<&str> = received.iter().map(|c| c.user_id.as_str()).collect();
    assert_eq!(ids, made.iter().map(|u| u.id.as_str()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_ends_unavailable_when_the_database_stays_away_and_a_resumed_one_loses_nothing() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.changes_heartbeat = Duration::from_millis(300)).await;
    let start = head(&app).await;
    let mut watch = open_watch(&app.admin, &start, &[]).await.unwrap();
    let mut cursor = next_response(&mut watch).await.cursor;

    cut_database(&app, true).await;
    // Heartbeats may come while the retries last; then the end.
    let status = tokio::time::timeout(DEADLINE, async {
        loop {
            match watch.message().await {
                Ok(Some(beat)) => {
                    assert!(beat.changes.is_empty());
                    cursor = beat.cursor;
                }
                Ok(None) => panic!("not OK: the server runs"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream ends while the database is away");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let listed = app
        .admin
        .changes
        .clone()
        .list_changes(pb::ListChangesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::Unavailable, "{listed:?}");

    allow_connections(&app).await;
    let made = [
        create_user_retrying(&app, "pia").await,
        create_user_retrying(&app, "quin").await,
    ];
    let mut resumed = open_watch(&app.admin, &cursor, &[]).await.unwrap();
    let (watched, _) = read_changes(&mut resumed, 2).await;
    let ids: Vec<&str> = watched.iter().map(|c| c.user_id.as_str()).collect();
    assert_eq!(ids, [made[0].id.as_str(), made[1].id.as_str()]);
    assert!(watched == changes_after(&app, &start).await);
}
