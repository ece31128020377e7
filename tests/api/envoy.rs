//! The Envoy check (`envoy.service.auth.v3.Authorization/Check`), called as
//! an Envoy sidecar calls it: the proxied request's headers in
//! `attributes.request.http.headers`, the route's policy in
//! `context_extensions`.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, attribute_context::HttpRequest, attribute_context::Request as Attrs,
    authorization_client::AuthorizationClient,
};
use identity::proto::identity::v1 as pb;
use tonic::Code;

use crate::changes_watch::{allow_connections, cut_database};
use crate::helpers::*;

/// A Check as Envoy builds it: lower-case header names, and the route's
/// `context_extensions`.
pub(crate) fn request(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> CheckRequest {
    let map = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Attrs {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    host: "orders.internal".into(),
                    headers: map(headers),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: map(extensions),
            ..Default::default()
        }),
    }
}

pub(crate) async fn check(
    app: &TestApp,
    request: CheckRequest,
) -> Result<CheckResponse, tonic::Status> {
    // The sidecar sends no credential of its own.
    AuthorizationClient::new(app.channel.clone())
        .check(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The allowed answer's headers to set, by name, and headers to remove.
pub(crate) fn allowed(response: &CheckResponse) -> (HashMap<String, String>, Vec<String>) {
    assert_eq!(
        response.status.as_ref().map(|s| s.code),
        Some(0),
        "{response:?}"
    );
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not allowed: {response:?}");
    };
    let set = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    (set, ok.headers_to_remove.clone())
}

/// The denied answer's HTTP status and its headers.
pub(crate) fn denied(response: &CheckResponse) -> (i32, i32, HashMap<String, String>) {
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not denied: {response:?}");
    };
    let headers = denied
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    (
        response.status.as_ref().map_or(0, |s| s.code),
        denied.status.as_ref().map_or(0, |s| s.code),
        headers,
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn a_valid_token_passes_with_fresh_identity_headers_and_no_forged_ones() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("olga").await;
    let credential = bearer(&tokens.access_token);
    let forged = request(
        &[
            ("authorization", &credential),
            ("x-identity-user-id", "someone-else"),
            ("x-identity-superuser", "true"),
            ("x-identity-role", "admin"),
        ],
        &[],
    );
    let response = check(&app, forged.clone()).await.unwrap();
    let (set, removed) = allowed(&response);
    assert_eq!(set["x-identity-user-id"], user.id);
    assert_eq!(set["x-identity-username"], "olga");
    assert_eq!(set["x-identity-groups"], "");
    assert_eq!(set["x-identity-superuser"], "false");
    assert!(!set["x-identity-session-id"].is_empty());
    // Set headers overwrite what the client sent; any other x-identity-*
    // goes.
    assert_eq!(removed, ["x-identity-role"]);
    let metadata = response.dynamic_metadata.expect("dynamic metadata");
    let field = |k: &str| match &metadata.fields[k].kind {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(field("user_id"), user.id);
    assert_eq!(field("superuser"), "false");

    // A membership added now is in the very next check (fresh, not the
    // token's claims).
    app.group_with("Billing", &[&user]).await;
    let (set, _) = allowed(&check(&app, forged).await.unwrap());
    assert_eq!(set["x-identity-groups"], "billing");
}

#[tokio::test]
async fn a_missing_malformed_or_stale_credential_is_refused_with_its_reason() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("pavel").await;
    let cases = [
        (request(&[], &[]), "TOKEN_MISSING"),
        (
            request(&[("authorization", "Basic cGF2ZWw6eA==")], &[]),
            "TOKEN_MALFORMED",
        ),
        (
            request(&[("authorization", "Bearer not.a.jwt")], &[]),
            "TOKEN_MALFORMED",
        ),
    ];
    for (request, reason) in cases {
        let response = check(&app, request).await.unwrap();
        let (grpc, http, headers) = denied(&response);
        assert_eq!(grpc, Code::Unauthenticated as i32);
        assert_eq!(http, 401);
        assert_eq!(headers["x-identity-deny-reason"], reason);
        assert_eq!(
            headers["www-authenticate"],
            r#"Bearer error="invalid_token""#
        );
    }

    // Logged out: the token is still signed and unexpired, and refused.
    app.anon
        .auth
        .clone()
        .logout(pb::LogoutRequest {
            refresh_token: tokens.refresh_token.clone(),
            all_sessions: false,
        })
        .await
        .unwrap();
    let credential = bearer(&tokens.access_token);
    let response = check(&app, request(&[("authorization", &credential)], &[]))
        .await
        .unwrap();
    let (_, http, headers) = denied(&response);
    assert_eq!(http, 401);
    assert_eq!(headers["x-identity-deny-reason"], "SESSION_ENDED");

    // Deactivated.
    let (user, tokens) = app.signed_in_user("quinn").await;
    app.deactivate(&user).await;
    let credential = bearer(&tokens.access_token);
    let response = check(&app, request(&[("authorization", &credential)], &[]))
        .await
        .unwrap();
    assert_eq!(
        denied(&response).2["x-identity-deny-reason"],
        "USER_INACTIVE"
    );
}

#[tokio::test]
async fn route_policies_require_a_group_or_a_superuser_and_may_allow_anonymous_callers() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("rita").await;
    let credential = bearer(&tokens.access_token);
    let as_rita =
        |extensions: &[(&str, &str)]| request(&[("authorization", &credential)], extensions);

    // Superusers only: 403 for rita, through for root.
    let response = check(&app, as_rita(&[("require_superuser", "true")]))
        .await
        .unwrap();
    let (grpc, http, headers) = denied(&response);
    assert_eq!((grpc, http), (Code::PermissionDenied as i32, 403));
    assert_eq!(headers["x-identity-deny-reason"], "PERMISSION_DENIED");
    let root = app
        .login("root", ROOT_PASSWORD)
        .await
        .unwrap()
        .tokens
        .unwrap();
    let root_credential = bearer(&root.access_token);
    let response = check(
        &app,
        request(
            &[("authorization", &root_credential)],
            &[("require_superuser", "true")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(allowed(&response).0["x-identity-superuser"], "true");

    // Any one of the groups suffices.
    let response = check(&app, as_rita(&[("require_groups", "ops,billing")]))
        .await
        .unwrap();
    assert_eq!(denied(&response).1, 403);
    app.group_with("Ops", &[&user]).await;
    let response = check(&app, as_rita(&[("require_groups", "ops,billing")]))
        .await
        .unwrap();
    assert_eq!(allowed(&response).0["x-identity-groups"], "ops");

    // Anonymous routes: no credential passes, with no identity at all; a
    // bad credential is still refused.
    let open = [("allow_anonymous", "true")];
    let response = check(
        &app,
        request(
            &[
                ("x-identity-user-id", &user.id),
                ("x-identity-groups", "ops"),
            ],
            &open,
        ),
    )
    .await
    .unwrap();
    let (set, mut removed) = allowed(&response);
    assert!(set.is_empty());
    removed.sort();
    assert_eq!(removed, ["x-identity-groups", "x-identity-user-id"]);
    let response = check(&app, request(&[("authorization", "Bearer nope")], &open))
        .await
        .unwrap();
    assert_eq!(denied(&response).1, 401);
}

#[tokio::test]
async fn with_the_database_away_the_check_fails_and_never_lets_a_request_through() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("sven").await;
    let credential = bearer(&tokens.access_token);
    cut_database(&app, true).await;
    let failed = check(&app, request(&[("authorization", &credential)], &[]))
        .await
        .expect_err("no answer without the database");
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    allow_connections(&app).await;
}
