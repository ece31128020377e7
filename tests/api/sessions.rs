//! ListSessions and EndSession: who may see and end which sessions, what
//! they show, and that an ended session's tokens stop working everywhere.

use crate::changes::all_changes;
use crate::helpers::*;
use identity::proto::identity::v1 as pb;
use tonic::Code;

async fn list(
    clients: &Clients,
    user_id: &str,
    include_ended: bool,
) -> Result<Vec<pb::Session>, tonic::Status> {
    let mut sessions = Vec::new();
    let mut token = String::new();
    loop {
        let page = clients
            .auth
            .clone()
            .list_sessions(pb::ListSessionsRequest {
                user_id: user_id.into(),
                page_size: 2,
                page_token: token,
                include_ended,
            })
            .await?
            .into_inner();
        sessions.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return Ok(sessions);
        }
        token = page.next_page_token;
    }
}

async fn end(clients: &Clients, session_id: &str) -> Result<(), tonic::Status> {
    clients
        .auth
        .clone()
        .end_session(pb::EndSessionRequest {
            session_id: session_id.into(),
        })
        .await
        .map(|_| ())
}

/// The `sid` claim of an access token (read without checking it: the
/// server checked it when it issued it).
fn sid(access_token: &str) -> String {
    use base64::Engine;
    let payload = access_token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    let claims: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["sid"].as_str().expect("a sid").to_owned()
}

#[tokio::test]
async fn users_list_their_own_live_sessions_across_pages_and_the_ended_ones_on_request() {
    let app = spawn_app().await;
    let (user, first) = app.signed_in_user("carol").await;
    let password = TestUser::named("carol").password;
    let mut tokens = vec![first];
    for _ in 0..4 {
        let login = app.login("carol", &password).await.unwrap();
        tokens.push(login.tokens.unwrap());
    }
    let me = app.as_token(&tokens[0].access_token);

    let live = list(&me, "", false).await.unwrap();
    let mut ids: Vec<String> = live.iter().map(|s| s.id.clone()).collect();
    let mut expected: Vec<String> = tokens.iter().map(|t| sid(&t.access_token)).collect();
    expected.sort();
    ids.sort();
    assert_eq!(ids, expected);
    for s in &live {
        assert_eq!(s.user_id, user.id);
        assert!(s.create_time.is_some() && s.last_refresh_time.is_some());
        assert!(s.refresh_token_expire_time.is_some());
        assert!(s.end_time.is_none() && s.end_reason.is_empty());
    }
    // Asking by one's own id is the same.
    assert_eq!(list(&me, &user.id, false).await.unwrap().len(), 5);

    // Logging out one ends it: gone from the live list, shown with its reason.
    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: tokens[4].refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    assert_eq!(list(&me, "", false).await.unwrap().len(), 4);
    let all = list(&me, "", true).await.unwrap();
    assert_eq!(all.len(), 5);
    let ended = all
        .iter()
        .find(|s| s.id == sid(&tokens[4].access_token))
        .expect("the ended session is listed");
    assert!(ended.end_time.is_some());
    assert_eq!(ended.end_reason, "LOGOUT");
}

#[tokio::test]
async fn a_user_ends_their_own_session_and_its_tokens_stop_working_everywhere() {
    let app = spawn_app().await;
    let (_, a) = app.signed_in_user("dave").await;
    let b = app
        .login("dave", &TestUser::named("dave").password)
        .await
        .unwrap()
        .tokens
        .unwrap();
    let me = app.as_token(&a.access_token);
    end(&me, &sid(&b.access_token)).await.unwrap();
    // Twice is fine.
    end(&me, &sid(&b.access_token)).await.unwrap();

    // The ended session's access token is refused, its refresh token too.
    let refused = app
        .as_token(&b.access_token)
        .users
        .get_user(Lookup::Username("dave").request())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(reason(&refused), "SESSION_ENDED");
    let refresh = app
        .anon
        .auth
        .clone()
        .refresh(pb::RefreshRequest {
            refresh_token: b.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refresh.code(), Code::Unauthenticated);
    // The other session lives on; the ended one reads LOGOUT.
    let all = list(&me, "", true).await.unwrap();
    let ended = all.iter().find(|s| s.id == sid(&b.access_token)).unwrap();
    assert_eq!(ended.end_reason, "LOGOUT");
    assert_eq!(list(&me, "", false).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_superuser_lists_and_ends_anyones_sessions_as_ended_by_admin_in_the_feed() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("erin").await;
    let session = sid(&tokens.access_token);
    let (_, start) = all_changes(&app, "").await;

    let listed = list(&app.admin, &user.id, false).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, session);
    end(&app.admin, &session).await.unwrap();

    let all = list(&app.admin, &user.id, true).await.unwrap();
    assert_eq!(all[0].end_reason, "ENDED_BY_ADMIN");
    let (changes, _) = all_changes(&app, &start).await;
    assert_eq!(changes.len(), 1, "{changes:#?}");
    let change = &changes[0];
    assert_eq!(change.kind(), pb::ChangeKind::SessionEnded);
    assert_eq!(change.session_id, session);
    assert_eq!(change.user_id, user.id);
    assert_eq!(change.end_reason, "ENDED_BY_ADMIN");
    assert_eq!(change.actor_id, app.root.id);
    assert_eq!(change.rpc, "/identity.v1.AuthService/EndSession");
    // Ending it again records nothing more.
    end(&app.admin, &session).await.unwrap();
    let (again, _) = all_changes(&app, &start).await;
    assert_eq!(again.len(), 1);
}

#[tokio::test]
async fn others_sessions_are_refused_to_users_and_unknown_ones_are_not_found() {
    let app = spawn_app().await;
    let (frank, frank_tokens) = app.signed_in_user("frank").await;
    let (_, grace_tokens) = app.signed_in_user("grace").await;
    let grace = app.as_token(&grace_tokens.access_token);

    let denied = list(&grace, &frank.id, false).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = end(&grace, &sid(&frank_tokens.access_token))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Frank's session is untouched.
    assert_eq!(list(&app.admin, &frank.id, false).await.unwrap().len(), 1);

    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        end(&grace, &unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        list(&app.admin, &unknown, false).await.unwrap_err().code(),
        Code::NotFound
    );
    for bad in [end(&grace, "nope").await, end(&grace, "").await] {
        let status = bad.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), ["session_id"]);
    }
    let status = list(&grace, "nope", false).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["user_id"]);

    // Anonymous callers are UNAUTHENTICATED.
    assert_eq!(
        list(&app.anon, "", false).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        end(&app.anon, &unknown).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}
