//! Plain HTTP beside gRPC on the same port (HTTP/1.1 and h2c), for mesh
//! sidecars and gateways: the signing key in PEM, the JSON Web Key Set, and
//! Prometheus metrics.

use axum::{
    Router,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

use crate::metrics::Metrics;
use crate::token::TokenIssuer;

/// Caches may keep the keys for five minutes: short enough that a rotation
/// (where old and new keys both verify for longer) reaches every verifier.
const CACHE_CONTROL: &str = "public, max-age=300";

/// `GET /pub-key`, `GET /.well-known/jwks.json` and `GET /metrics`.
pub fn routes(tokens: TokenIssuer, metrics: Metrics) -> Router {
    let pem_tokens = tokens.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    )],
                    metrics.render(),
                )
            }),
        )
        .route(
            "/pub-key",
            get(move || async move {
                let pem = pem_tokens.keys().signing().public_pem.clone();
                respond("application/x-pem-file", pem)
            }),
        )
        .route(
            "/.well-known/jwks.json",
            get(move || async move {
                let jwks = tokens.keys().jwks_json().to_owned();
                respond("application/json", jwks)
            }),
        )
}

fn respond(content_type: &'static str, body: String) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static(CACHE_CONTROL),
            ),
        ],
        body,
    )
}
