//! Passwords too easy to guess are refused wherever one is set (CreateUser,
//! SetPassword, ChangePassword, ResetPassword) with INVALID_ARGUMENT naming
//! the field; a long lowercase passphrase stays valid; Login and imported
//! hashes are not judged again.

use identity::proto::identity::v1 as pb;
use tonic::Code;

use crate::helpers::*;

const WEAK: [&str; 8] = [
    "password",
    "Password1",
    "P@ssw0rd!",
    "aaaaaaaa",
    "12345678",
    "abcdefgh",
    "qwertyuiop",
    "iloveyou2024",
];

fn invalid(status: tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), [field], "{status:?}");
}

#[tokio::test]
async fn weak_passwords_are_refused_wherever_a_password_is_set() {
    let app = spawn_app().await;
    for weak in WEAK {
        let request = pb::CreateUserRequest {
            password: weak.into(),
            ..TestUser::named("weakling").request()
        };
        invalid(app.anon.create_user(request).await.unwrap_err(), "password");
    }
    let (user, tokens) = app.signed_in_user("strong").await;
    let me = app.as_token(&tokens.access_token);
    for weak in WEAK {
        invalid(
            app.admin
                .users
                .clone()
                .set_password(pb::SetPasswordRequest {
                    id: user.id.clone(),
                    new_password: weak.into(),
                })
                .await
                .unwrap_err(),
            "new_password",
        );
        invalid(
            me.auth
                .clone()
                .change_password(pb::ChangePasswordRequest {
                    current_password: TestUser::named("strong").password,
                    new_password: weak.into(),
                })
                .await
                .unwrap_err(),
            "new_password",
        );
    }
    let reset = app
        .admin
        .accounts
        .clone()
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: user.email.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    for weak in WEAK {
        invalid(
            app.anon
                .accounts
                .clone()
                .reset_password(pb::ResetPasswordRequest {
                    token: reset.clone(),
                    new_password: weak.into(),
                })
                .await
                .unwrap_err(),
            "new_password",
        );
    }
    // The token was not spent by the refusals; a passphrase of plain
    // lowercase words is fine (no composition rules).
    app.anon
        .accounts
        .clone()
        .reset_password(pb::ResetPasswordRequest {
            token: reset,
            new_password: "gravel lantern oyster".into(),
        })
        .await
        .unwrap();
    app.login("strong", "gravel lantern oyster").await.unwrap();
}
