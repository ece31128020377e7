//! The Rust client example (`examples/verify_tokens`): its verifier, as a
//! service would use it, against the real server.

#[path = "../../examples/verify_tokens/verifier.rs"]
#[allow(dead_code)]
mod verifier;

use crate::helpers::spawn_app;
use verifier::{Refused, Verifier};

#[tokio::test]
async fn the_example_verifies_offline_and_falls_back_to_fresh_state() {
    let app = spawn_app().await;
    let (user, tokens) = app.signed_in_user("reader").await;
    let verifier = Verifier::new(app.channel.clone(), "identity", "identity")
        .await
        .expect("keys loaded");

    let claims = verifier
        .verify_offline(&tokens.access_token)
        .expect("valid offline");
    assert_eq!(claims.sub, user.id);
    assert_eq!(claims.username, "reader");
    let fresh = verifier
        .verify_fresh(&tokens.access_token)
        .await
        .expect("valid now");
    assert_eq!(fresh.user.unwrap().id, user.id);

    // A token with one character of its signature changed is refused.
    let mut forged = tokens.access_token.clone().into_bytes();
    let at = forged.len() - 10;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert!(matches!(
        verifier.verify_offline(&forged),
        Err(Refused::Invalid(_))
    ));

    // Deactivated: the token still verifies offline (its claims are from
    // login time) but identity, asked, says no. That is the staleness the
    // fallback exists for.
    app.deactivate(&user).await;
    assert!(verifier.verify_offline(&tokens.access_token).is_ok());
    match verifier.verify_fresh(&tokens.access_token).await {
        Err(Refused::Stale { reason, .. }) => assert_eq!(reason, "USER_INACTIVE"),
        other => panic!("expected USER_INACTIVE, got {other:?}"),
    }
}

#[tokio::test]
async fn the_example_refuses_tokens_for_another_audience() {
    let app = spawn_app().await;
    let (_, tokens) = app.signed_in_user("reader").await;
    let verifier = Verifier::new(app.channel.clone(), "identity", "another-service")
        .await
        .expect("keys loaded");
    assert!(matches!(
        verifier.verify_offline(&tokens.access_token),
        Err(Refused::Invalid(_))
    ));
}
