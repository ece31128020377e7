//! The verification cache (`VERIFY_CACHE`): token checks answered from
//! memory, and never staler than the guarantees say: a change through this
//! replica at once, a change through another replica or by hand in SQL
//! within the feed's delivery (well under a second), and no answer from
//! memory while the database is away.

use std::sync::Arc;
use std::time::Duration;

use identity::proto::identity::v1 as pb;
use tokio::time::Instant;
use tonic::Code;

use crate::auth::http1_get;
use crate::changes_watch::{allow_connections, cut_database};
use crate::helpers::*;

/// The value of a metric without labels.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let addr = app.addr;
    let body = tokio::task::spawn_blocking(move || http1_get(addr, "/metrics").2)
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

async fn verify(app: &TestApp, token: &str) -> Result<pb::VerifyTokenResponse, tonic::Status> {
    app.anon
        .auth
        .clone()
        .verify_token(pb::VerifyTokenRequest {
            access_token: token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// VerifyToken until `done` says its answer is the expected one; how long
/// that took. Fails after `within`.
async fn until(
    app: &TestApp,
    token: &str,
    within: Duration,
    done: impl Fn(&Result<pb::VerifyTokenResponse, tonic::Status>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let answer = verify(app, token).await;
        if done(&answer) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still {answer:?} after {within:?}"
        );
        tokio::task::yield_now().await;
    }
}

/// Verifies until an answer comes from memory (the cache is fresh once its
/// consumer has read the feed).
async fn warm(app: &TestApp, token: &str) {
    let hits = metric(app, "identity_verify_cache_hits_total").await;
    let start = Instant::now();
    loop {
        verify(app, token).await.expect("a valid token");
        if metric(app, "identity_verify_cache_hits_total").await > hits {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never a hit");
    }
}

fn inactive(answer: &Result<pb::VerifyTokenResponse, tonic::Status>) -> bool {
    answer
        .as_ref()
        .is_err_and(|s| s.code() == Code::Unauthenticated && reason(s) == "USER_INACTIVE")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_this_replica_is_seen_by_the_very_next_check() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("ulla").await;
    warm(&app, &tokens.access_token).await;

    app.deactivate(&user).await;
    let refused = verify(&app, &tokens.access_token).await.unwrap_err();
    assert_eq!(reason(&refused), "USER_INACTIVE");

    // Groups too: a membership added is in the next answer.
    let (other, tokens) = app.signed_in_user("vito").await;
    warm(&app, &tokens.access_token).await;
    let group = app.group_with("Night shift", &[&other]).await;
    let answer = verify(&app, &tokens.access_token).await.unwrap();
    assert_eq!(answer.groups.len(), 1);
    assert_eq!(answer.groups[0].id, group.id);
    // The logged-out session, at once.
    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: tokens.refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    let refused = verify(&app, &tokens.access_token).await.unwrap_err();
    assert_eq!(reason(&refused), "SESSION_ENDED");
}

/// The feed's consumer would evict within milliseconds anyway: only the
/// writing call's own eviction makes the very next check fresh every time.
/// Fifty changes, each checked at once after a check from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_through_this_replica_is_in_the_next_check_not_only_eventually() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("rhea").await;
    warm(&app, &tokens.access_token).await;
    let hits = metric(&app, "identity_verify_cache_hits_total").await;
    for round in 0..50 {
        // Cached again after the last change's eviction (the second
        // check is answered from memory).
        verify(&app, &tokens.access_token).await.unwrap();
        verify(&app, &tokens.access_token).await.unwrap();
        let name = format!("Round {round}");
        app.update_user(&user.id, &["first_name"], |u| u.first_name = name.clone())
            .await
            .unwrap();
        let answer = verify(&app, &tokens.access_token).await.unwrap();
        assert_eq!(
            answer.user.unwrap().first_name,
            name,
            "round {round}: the check right after the change answered from before it"
        );
    }
    // The checks before each change came from memory: the rounds tested the
    // cache, not the database.
    let hits = metric(&app, "identity_verify_cache_hits_total").await - hits;
    assert!(hits >= 40.0, "only {hits} hits in 50 rounds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_another_replica_or_in_sql_is_seen_within_a_second() {
    let db = Arc::new(TestDb::migrated().await);
    let a = spawn_app_on(db.clone(), |_| {}).await;
    // The same keys: b verifies a's tokens.
    let b = spawn_app_with(db.clone(), a.keys_dir.clone(), |_| {}).await;
    let (user, tokens) = a.signed_in_user("wes").await;
    warm(&b, &tokens.access_token).await;

    a.deactivate(&user).await;
    let took = until(&b, &tokens.access_token, Duration::from_secs(1), inactive).await;
    eprintln!("replica b saw the deactivation after {took:?}");

    // By hand in SQL: seen on both.
    let (user, tokens) = a.signed_in_user("xia").await;
    warm(&b, &tokens.access_token).await;
    crate::changes::sql(
        &a,
        &format!(
            "UPDATE users SET is_active = false WHERE id = '{}'",
            user.id
        ),
    )
    .await;
    until(&b, &tokens.access_token, Duration::from_secs(1), inactive).await;
    until(&a, &tokens.access_token, Duration::from_secs(1), inactive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_database_the_cache_does_not_answer() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("yann").await;
    warm(&app, &tokens.access_token).await;
    cut_database(&app, true).await;
    // Within the cache's freshness bound at most, the answer is
    // UNAVAILABLE, and it stays so: no answer from memory.
    until(&app, &tokens.access_token, Duration::from_secs(1), |a| {
        a.as_ref().is_err_and(|s| s.code() == Code::Unavailable)
    })
    .await;
    for _ in 0..5 {
        let answer = verify(&app, &tokens.access_token).await;
        assert_eq!(answer.unwrap_err().code(), Code::Unavailable);
    }
    allow_connections(&app).await;
    until(&app, &tokens.access_token, Duration::from_secs(10), |a| {
        a.is_ok()
    })
    .await;
}

#[tokio::test]
async fn the_cache_is_bounded_and_can_be_turned_off() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.verify_cache_size = 2).await;
    let mut tokens = Vec::new();
    for name in ["zane", "zara", "zeno"] {
        tokens.push(app.signed_in_user(name).await.1);
    }
    for t in &tokens {
        warm(&app, &t.access_token).await;
    }
    assert!(metric(&app, "identity_verify_cache_entries").await <= 2.0);
    assert!(metric(&app, "identity_verify_cache_evictions_total").await >= 1.0);

    let app = app.restart(|c| c.verify_cache = false).await;
    let (_, t) = app.signed_in_user("zoe").await;
    for _ in 0..3 {
        verify(&app, &t.access_token).await.unwrap();
    }
    assert_eq!(metric(&app, "identity_verify_cache_hits_total").await, 0.0);
}
