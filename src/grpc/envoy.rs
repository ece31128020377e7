//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/
//! Check`), on the same port: a sidecar asks about every request it
//! proxies. The request's `authorization: Bearer` credential is checked
//! exactly as VerifyToken checks it (fresh); the route's policy comes from
//! the check's `context_extensions`. A refusal is an HTTP answer for Envoy
//! to send; a failure of identity itself (the database away) is a gRPC
//! error, which Envoy with `failure_mode_allow: false` turns into a denial:
//! the check never fails open.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::error::{Error, Reason};
use crate::service::{AuthService, verify::Verified};

/// The headers identity sets on an allowed request; every other incoming
/// `x-identity-*` header is removed.
const PREFIX: &str = "x-identity-";

/// The gRPC face of the Envoy check.
#[derive(Debug, Clone)]
pub struct EnvoyGrpc {
    auth: AuthService,
}

impl EnvoyGrpc {
    /// Checks credentials with `auth`.
    pub fn new(auth: AuthService) -> Self {
        Self { auth }
    }
}

/// A route's policy, from the check's `context_extensions`. A value other
/// than the documented ones is read the strict way (a typo never opens a
/// route).
#[derive(Debug, Default, PartialEq, Eq)]
struct Policy {
    /// Any one of these group slugs suffices; empty: no group needed.
    groups: Vec<String>,
    /// Only superusers.
    superuser: bool,
    /// A request without a credential passes (a bad one is still refused).
    anonymous: bool,
    /// Only sessions that a second factor proved (`amr` with `otp` or
    /// `rcode`); an API key never passes.
    mfa: bool,
}

impl Policy {
    fn of(extensions: &HashMap<String, String>) -> Policy {
        let flag = |name: &str| extensions.get(name).map(|v| v.trim().to_ascii_lowercase());
        Policy {
            groups: extensions
                .get("require_groups")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            // Anything but an explicit "false" (or nothing) requires it.
            superuser: flag("require_superuser").is_some_and(|v| v != "false" && !v.is_empty()),
            // Only an explicit "true" opens the route.
            anonymous: flag("allow_anonymous").is_some_and(|v| v == "true"),
            // As require_superuser: anything but an explicit "false".
            mfa: flag("require_mfa").is_some_and(|v| v != "false" && !v.is_empty()),
        }
    }

    /// Whether `verified` may pass; `false`: HTTP 403.
    fn allows(&self, verified: &Verified) -> bool {
        let user = &verified.caller.user;
        (!self.superuser || user.is_superuser)
            && (self.groups.is_empty()
                || verified
                    .groups
                    .iter()
                    .any(|g| self.groups.contains(&g.slug)))
    }
}

/// The proxied request's headers (lower-case names), from `headers` or,
/// when Envoy sends raw headers, `header_map`.
fn headers(request: &CheckRequest) -> HashMap<String, String> {
    let Some(http) = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return HashMap::new();
    };
    let mut headers: HashMap<String, String> = http
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    if let Some(map) = &http.header_map {
        for h in &map.headers {
            let value = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            headers.insert(h.key.to_ascii_lowercase(), value);
        }
    }
    headers
}

/// The bearer token of an `authorization` header value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

fn header(key: &str, value: impl Into<String>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Every incoming `x-identity-*` header but those in `keep`.
fn spoofed(incoming: &HashMap<String, String>, keep: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = incoming
        .keys()
        .filter(|k| k.starts_with(PREFIX) && !keep.contains(&k.as_str()))
        .cloned()
        .collect();
    names.sort();
    names
}

/// Allowed, as `verified` (or anonymously, with no identity at all).
fn allowed(incoming: &HashMap<String, String>, verified: Option<&Verified>) -> CheckResponse {
    let Some(verified) = verified else {
        return CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers_to_remove: spoofed(incoming, &[]),
                ..Default::default()
            })),
            ..Default::default()
        };
    };
    let user = &verified.caller.user;
    let groups = verified
        .groups
        .iter()
        .map(|g| g.slug.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let values = [
        ("x-identity-user-id", user.id.to_string()),
        ("x-identity-username", user.username.clone()),
        (
            "x-identity-session-id",
            // None for an API key.
            verified
                .caller
                .session_id()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        ),
        ("x-identity-groups", groups),
        ("x-identity-superuser", user.is_superuser.to_string()),
        // RFC 8176 methods, comma-separated; empty for an API key.
        ("x-identity-amr", verified.caller.amr().join(",")),
    ];
    let names: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
    let metadata = Struct {
        fields: values
            .iter()
            .map(|(k, v)| (k.trim_start_matches(PREFIX).replace('-', "_"), string(v)))
            .collect(),
    };
    CheckResponse {
        status: Some(rpc::Status::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: values.iter().map(|(k, v)| header(k, v.clone())).collect(),
            headers_to_remove: spoofed(incoming, &names),
            ..Default::default()
        })),
        dynamic_metadata: Some(metadata),
    }
}

/// Refused: HTTP 401 (no valid credential) or 403 (the route's policy).
fn denied(code: tonic::Code, http: HttpStatusCode, reason: &str) -> CheckResponse {
    let mut headers = vec![header("x-identity-deny-reason", reason)];
    if http == HttpStatusCode::Unauthorized {
        headers.push(header(
            "www-authenticate",
            r#"Bearer error="invalid_token""#,
        ));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message: reason.to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http as i32 }),
            headers,
            body: String::new(),
        })),
        dynamic_metadata: None,
    }
}

fn unauthenticated(reason: Reason) -> CheckResponse {
    denied(
        tonic::Code::Unauthenticated,
        HttpStatusCode::Unauthorized,
        reason.as_str(),
    )
}

#[tonic::async_trait]
impl Authorization for EnvoyGrpc {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let incoming = headers(&request);
        let policy = request
            .attributes
            .as_ref()
            .map(|a| Policy::of(&a.context_extensions))
            .unwrap_or_default();
        // The proxied request's path without its query: for a gRPC service
        // behind the mesh, the full method name an API key may be limited to.
        let path = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| h.path.split('?').next().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let credential = incoming
            .get("authorization")
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty());
        let answer = match credential {
            None if policy.anonymous => allowed(&incoming, None),
            None => unauthenticated(Reason::TokenMissing),
            Some(value) => match bearer(value) {
                None => unauthenticated(Reason::TokenMalformed),
                Some(token) => match self.auth.verify(token).await {
                    Ok(verified) if !verified.caller.allows(&path) => denied(
                        tonic::Code::PermissionDenied,
                        HttpStatusCode::Forbidden,
                        "METHOD_NOT_ALLOWED",
                    ),
                    Ok(verified)
                        if policy.mfa
                            && !crate::token::jwt::second_factor(verified.caller.amr()) =>
                    {
                        denied(
                            tonic::Code::PermissionDenied,
                            HttpStatusCode::Forbidden,
                            "MFA_REQUIRED",
                        )
                    }
                    Ok(verified) if policy.allows(&verified) => allowed(&incoming, Some(&verified)),
                    Ok(_) => denied(
                        tonic::Code::PermissionDenied,
                        HttpStatusCode::Forbidden,
                        "PERMISSION_DENIED",
                    ),
                    Err(Error::InvalidToken(reason)) => unauthenticated(reason),
                    // The database away, or a fault of identity's own: an
                    // error, which Envoy turns into a denial.
                    Err(e) => return Err(e.into()),
                },
            },
        };
        Ok(Response::new(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_the_strict_way() {
        let of = |pairs: &[(&str, &str)]| {
            Policy::of(
                &pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
        };
        assert_eq!(of(&[]), Policy::default());
        let p = of(&[
            ("require_groups", " ops, ,dev "),
            ("require_superuser", "yes"),
        ]);
        assert_eq!(p.groups, ["ops", "dev"]);
        assert!(p.superuser, "a value other than false requires it");
        assert!(!of(&[("require_superuser", "false")]).superuser);
        assert!(of(&[("allow_anonymous", "TRUE")]).anonymous);
        assert!(!of(&[("allow_anonymous", "yes")]).anonymous);
    }

    #[test]
    fn only_bearer_credentials_are_read() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer a b"), None);
    }
}
