//! A Rust service's side of identity: log in a user, verify the access
//! token offline with the published keys, then ask VerifyToken for the
//! user's state now.
//!
//! ```text
//! cargo run --example verify_tokens -- http://127.0.0.1:50051 <login> <password>
//! ```
//!
//! `verifier.rs` is the part to copy into a service; tests/api/examples.rs
//! runs it against a real server.

// `verifier.rs` is written to be copied into a service as a module of its
// own, so its API is `pub` even though this binary cannot export it.
#![allow(unreachable_pub)]

mod verifier;

use identity::proto::identity::v1::{self as pb, auth_service_client::AuthServiceClient};
use tonic::transport::Channel;

use verifier::Verifier;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(login), Some(password)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: verify_tokens <http://host:port> <login> <password>");
        std::process::exit(2);
    };
    let issuer = std::env::var("JWT_ISSUER").unwrap_or_else(|_| "identity".into());
    let audience = std::env::var("JWT_AUDIENCE").unwrap_or_else(|_| "identity".into());

    // One HTTP/2 connection, shared by every call.
    let channel = Channel::from_shared(addr)?.connect().await?;
    let verifier = Verifier::new(channel.clone(), &issuer, &audience).await?;

    // A client would do this part; the service only receives the token.
    let tokens = AuthServiceClient::new(channel)
        .login(pb::LoginRequest { login, password })
        .await?
        .into_inner()
        .tokens
        .ok_or("no tokens")?;

    let claims = verifier.verify_offline(&tokens.access_token)?;
    println!(
        "offline: {} <{}> ({}, session {}) superuser={} active={} verified={} groups={:?}, \
         valid until {}",
        claims.username,
        claims.email,
        claims.sub,
        claims.sid,
        claims.is_superuser,
        claims.is_active,
        claims.is_verified,
        claims.groups,
        claims.exp
    );

    let fresh = verifier.verify_fresh(&tokens.access_token).await?;
    let user = fresh.user.ok_or("no user")?;
    let groups: Vec<&str> = fresh.groups.iter().map(|g| g.slug.as_str()).collect();
    println!(
        "fresh:   {} active={} verified={} groups={groups:?}",
        user.username, user.is_active, user.is_verified
    );
    Ok(())
}
