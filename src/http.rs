//! Plain HTTP beside gRPC on the same port (HTTP/1.1 and h2c), for mesh
//! sidecars and gateways: the signing key in PEM, the JSON Web Key Set, the
//! OpenID Connect discovery document that points at it, and Prometheus
//! metrics.

use axum::{
    Router,
    http::{HeaderMap, HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

use crate::metrics::Metrics;
use crate::token::TokenIssuer;

/// Caches may keep the keys for five minutes: short enough that a rotation
/// (where old and new keys both verify for longer) reaches every verifier.
const CACHE_CONTROL: &str = "public, max-age=300";

/// `GET /pub-key`, `GET /.well-known/jwks.json`,
/// `GET /.well-known/openid-configuration` and `GET /metrics`. `tls`: the
/// port speaks TLS, so the JWKS' address is `https`.
pub fn routes(tokens: TokenIssuer, metrics: Metrics, tls: bool) -> Router {
    let pem_tokens = tokens.clone();
    let discovery_tokens = tokens.clone();
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move |uri: axum::http::Uri, headers: HeaderMap| async move {
                respond(
                    "application/json",
                    discovery(&discovery_tokens, &uri, &headers, tls),
                )
            }),
        )
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

/// The OpenID Connect discovery document (OpenID Connect Discovery 1.0,
/// RFC 8414's fields that a verifier reads): the issuer (`JWT_ISSUER`), where
/// the keys are, and the algorithms they sign with. `jwks_uri` is on the
/// host the client asked for (its `Host`, or HTTP/2's `:authority`), so the
/// document is right behind any name the service is reached by.
fn discovery(
    tokens: &TokenIssuer,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    tls: bool,
) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic() && c != '/'))
        .unwrap_or("localhost");
    let scheme = if tls { "https" } else { "http" };
    let keys = tokens.keys();
    let mut algorithms: Vec<&str> = keys
        .keys()
        .iter()
        .map(|k| crate::token::keys::algorithm_name(k.algorithm))
        .collect();
    let mut seen = std::collections::HashSet::new();
    algorithms.retain(|a| seen.insert(*a));
    serde_json::json!({
        "issuer": tokens.issuer(),
        "jwks_uri": format!("{scheme}://{host}/.well-known/jwks.json"),
        "id_token_signing_alg_values_supported": algorithms,
        "subject_types_supported": ["public"],
        "response_types_supported": ["token"],
        "claims_supported": [
            "iss", "aud", "sub", "exp", "iat", "nbf", "jti", "sid", "username",
            "email", "is_superuser", "is_active", "is_verified", "groups"
        ],
    })
    .to_string()
}
