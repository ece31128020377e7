//! Access tokens: JWTs per RFC 9068 (`typ: at+jwt`), signed with the
//! store's signing key, verified with the algorithm of the key named by
//! `kid`, never the one the token claims.

use std::time::Duration;

use std::sync::Arc;

use arc_swap::ArcSwap;
use jsonwebtoken::{Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::KeyStore;
use crate::error::{Error, Reason};

/// The `typ` header of access tokens (RFC 9068).
pub const TOKEN_TYPE: &str = "at+jwt";
/// Clock skew tolerated on exp and nbf.
const LEEWAY_SECONDS: u64 = 10;
/// Longer tokens are refused unread.
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// The most group slugs an access token carries, and the most bytes of them:
/// with every other claim at its longest, a token stays well under
/// `MAX_TOKEN_LEN`, so every token identity issues is one it accepts. A
/// user in more groups gets the oldest ones (the order is the caller's: by
/// group id) and the claim `groups_truncated: true`; VerifyToken answers
/// with all of them.
pub const MAX_GROUP_CLAIMS: usize = 64;
/// See [`MAX_GROUP_CLAIMS`].
pub const MAX_GROUP_CLAIM_BYTES: usize = 2048;

/// `aud` may be one string or an array (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Audience {
    /// The audiences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Audience::One(a) => vec![a.clone()],
            Audience::Many(v) => v.clone(),
        }
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    /// `iss`: who issued the token, `JWT_ISSUER`.
    pub iss: String,
    /// `aud`: whom the token is for, `JWT_AUDIENCE`; issued as one string,
    /// accepted as either form.
    pub aud: Audience,
    /// `sub`: the user's id, a lowercase UUID.
    pub sub: String,
    /// `exp`: expiry in Unix seconds, `iat` + `ACCESS_TOKEN_TTL`.
    pub exp: i64,
    /// `iat`: issue time in Unix seconds.
    pub iat: i64,
    /// `nbf`: not before, in Unix seconds; always `iat`.
    pub nbf: i64,
    /// `jti`: the token's id, a new UUIDv7 per token. Its timestamp, to the
    /// millisecond, dates the token against the last password change.
    pub jti: String,
    /// `sid`: the session's id (a UUIDv7), the same across the session's
    /// refreshes.
    pub sid: String,
    /// `username`: the username as shown, not its case fold, at issue time.
    pub username: String,
    /// `email`: the email as given, not its case fold, at issue time.
    pub email: String,
    /// `is_superuser`: the flag at issue time.
    pub is_superuser: bool,
    /// `is_active`: the flag at issue time; tokens are issued to active users
    /// only, so it is always true.
    pub is_active: bool,
    /// `is_verified`: the flag at issue time.
    pub is_verified: bool,
    /// `groups`: the slugs of the user's groups at issue time, by group id;
    /// at most [`MAX_GROUP_CLAIMS`] slugs, [`MAX_GROUP_CLAIM_BYTES`] bytes in
    /// all.
    pub groups: Vec<String>,
    /// Present (and true) only when `groups` was cut to its bound.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub groups_truncated: bool,
    /// `amr` (RFC 8176): how the session was authenticated: `pwd`, then
    /// `otp` or `rcode` when a second factor proved it. Absent for an API
    /// key's token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
    /// `acr`: `aal1` for one factor, `aal2` for a password and a second
    /// factor (NIST SP 800-63B's assurance levels). Absent for an API key's
    /// token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
}

impl AccessClaims {
    /// Whether a second factor proved the session (`otp` or `rcode`).
    pub fn second_factor(&self) -> bool {
        second_factor(&self.amr)
    }
}

/// Whether `amr` names a second factor (`otp` or `rcode`).
pub fn second_factor(amr: &[String]) -> bool {
    amr.iter().any(|m| m == "otp" || m == "rcode")
}

/// The `acr` of a session authenticated by `amr`.
pub fn acr_of(amr: &[String]) -> Option<&'static str> {
    if second_factor(amr) {
        Some("aal2")
    } else if amr.iter().any(|m| m == "pwd") {
        Some("aal1")
    } else {
        None
    }
}

/// The user facts an access token carries.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    /// The user, the `sub` claim.
    pub user_id: Uuid,
    /// The session the token belongs to, the `sid` claim.
    pub session_id: Uuid,
    /// The username as shown, the `username` claim.
    pub username: &'a str,
    /// The email as given, the `email` claim.
    pub email: &'a str,
    /// The user's superuser flag now, the `is_superuser` claim.
    pub is_superuser: bool,
    /// The user's active flag now, the `is_active` claim.
    pub is_active: bool,
    /// The user's verified flag now, the `is_verified` claim.
    pub is_verified: bool,
    /// The slugs of the user's groups, by group id; the token carries the
    /// first that fit its bound.
    pub groups: Vec<String>,
    /// How the session was authenticated, the `amr` claim.
    pub amr: &'a [String],
}

/// Signs and verifies access tokens. The key store can be swapped while
/// the service runs (key rotation without a restart); every clone of an
/// issuer sees the swap.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    keys: Arc<ArcSwap<KeyStore>>,
    issuer: String,
    audience: String,
    ttl: Duration,
    verified: Arc<std::sync::Mutex<Verified>>,
}

/// The most tokens whose verification is remembered.
const VERIFIED_TOKENS: usize = 16_384;

/// Tokens already verified, by the SHA-256 of their text, with the key
/// set they were verified under: a signature need not be checked twice.
/// Times (exp, nbf) are checked again at every use.
#[derive(Debug, Default)]
struct Verified {
    claims: std::collections::HashMap<[u8; 32], (u64, AccessClaims)>,
    order: std::collections::VecDeque<[u8; 32]>,
    /// Bumped whenever the key set changes: what was verified under
    /// another set is verified again.
    generation: u64,
}

impl TokenIssuer {
    /// An issuer with these keys, `iss`, `aud` and lifetime.
    pub fn new(keys: KeyStore, issuer: String, audience: String, ttl: Duration) -> Self {
        Self {
            keys: Arc::new(ArcSwap::from_pointee(keys)),
            issuer,
            audience,
            ttl,
            verified: Arc::default(),
        }
    }

    /// The `iss` of every token (`JWT_ISSUER`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key store as it is now.
    pub fn keys(&self) -> Arc<KeyStore> {
        self.keys.load_full()
    }

    /// Replaces the key store; returns whether the set of keys changed.
    pub fn replace_keys(&self, keys: KeyStore) -> bool {
        let kids = |k: &KeyStore| k.keys().iter().map(|k| k.kid.clone()).collect::<Vec<_>>();
        let changed = kids(&self.keys.load()) != kids(&keys);
        if changed {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            self.keys.store(Arc::new(keys));
            verified.generation += 1;
            verified.claims.clear();
            verified.order.clear();
        }
        changed
    }

    /// Signs an access token for `subject`; returns it with its claims.
    pub fn issue(&self, subject: Subject<'_>) -> Result<(String, AccessClaims), Error> {
        let now = chrono::Utc::now().timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: Audience::One(self.audience.clone()),
            sub: subject.user_id.to_string(),
            exp: now.saturating_add(ttl),
            iat: now,
            nbf: now,
            jti: Uuid::now_v7().to_string(),
            sid: subject.session_id.to_string(),
            username: subject.username.to_owned(),
            email: subject.email.to_owned(),
            is_superuser: subject.is_superuser,
            is_active: subject.is_active,
            is_verified: subject.is_verified,
            groups_truncated: false,
            groups: Vec::new(),
            amr: subject.amr.to_vec(),
            acr: acr_of(subject.amr).map(str::to_owned),
        };
        let claims = bound_groups(claims, subject.groups);
        let keys = self.keys.load();
        let key = keys.signing();
        let mut header = Header::new(key.algorithm);
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(key.kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &key.encoding).map_err(Error::internal)?;
        Ok((token, claims))
    }

    /// Checks signature, kid, typ, exp and nbf (with a small leeway), iss
    /// and aud. Says nothing of the user or session: see the auth service.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, Error> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let generation = {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((generation, claims)) = verified.claims.get(&digest)
                && *generation == verified.generation
                && in_time(claims)
            {
                return Ok(claims.clone());
            }
            verified.generation
        };
        let claims = self.verify_signed(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.generation == generation
            && verified
                .claims
                .insert(digest, (generation, claims.clone()))
                .is_none()
        {
            verified.order.push_back(digest);
            while verified.order.len() > VERIFIED_TOKENS {
                if let Some(old) = verified.order.pop_front() {
                    verified.claims.remove(&old);
                }
            }
        }
        Ok(claims)
    }

    /// The full check of [`Self::verify`]: header, key, signature, claims.
    fn verify_signed(&self, token: &str) -> Result<AccessClaims, Error> {
        let refuse = Error::InvalidToken;
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(refuse(Reason::TokenMalformed));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| refuse(Reason::TokenMalformed))?;
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(TOKEN_TYPE) || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok {
            return Err(refuse(Reason::TokenMalformed));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or(refuse(Reason::TokenMalformed))?;
        let keys = self.keys.load();
        let key = keys.find(kid).ok_or(refuse(Reason::TokenSignature))?;
        // The key decides the algorithm; a token naming another is refused.
        if header.alg != key.algorithm {
            return Err(refuse(Reason::TokenSignature));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &validation)
            .map_err(|e| {
                refuse(match e.kind() {
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::InvalidKeyFormat => Reason::TokenSignature,
                    ErrorKind::ExpiredSignature => Reason::TokenExpired,
                    ErrorKind::ImmatureSignature => Reason::TokenNotYetValid,
                    ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                        Reason::TokenIssuerOrAudience
                    }
                    _ => Reason::TokenMalformed,
                })
            })?;
        Ok(data.claims)
    }
}

/// Whether a verified token's times still hold (with the same leeway as
/// its verification): otherwise it is verified again, for its error.
fn in_time(claims: &AccessClaims) -> bool {
    let now = chrono::Utc::now().timestamp();
    let leeway = LEEWAY_SECONDS as i64;
    claims.exp.saturating_add(leeway) > now && claims.nbf.saturating_sub(leeway) <= now
}

/// Puts the first of `groups` into `claims`, within [`MAX_GROUP_CLAIMS`]
/// and [`MAX_GROUP_CLAIM_BYTES`]; marks the claims when some were left out.
fn bound_groups(mut claims: AccessClaims, mut groups: Vec<String>) -> AccessClaims {
    let mut bytes = 0;
    let kept = groups
        .iter()
        .take(MAX_GROUP_CLAIMS)
        .take_while(|slug| {
            bytes += slug.len();
            bytes <= MAX_GROUP_CLAIM_BYTES
        })
        .count();
    claims.groups_truncated = kept < groups.len();
    groups.truncate(kept);
    claims.groups = groups;
    claims
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: String::new(),
            aud: Audience::One(String::new()),
            sub: String::new(),
            exp: 0,
            iat: 0,
            nbf: 0,
            jti: String::new(),
            sid: String::new(),
            username: String::new(),
            email: String::new(),
            is_superuser: false,
            is_active: true,
            is_verified: false,
            groups: Vec::new(),
            groups_truncated: false,
            amr: vec!["pwd".into()],
            acr: Some("aal1".into()),
        }
    }

    #[test]
    fn a_few_groups_are_all_kept_in_their_order_without_the_mark() {
        let c = bound_groups(claims(), vec!["b".into(), "a".into()]);
        assert_eq!(c.groups, ["b", "a"]);
        assert!(!c.groups_truncated);
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("groups_truncated").is_none());
    }

    #[test]
    fn many_groups_are_cut_to_the_bound_and_marked() {
        let slugs: Vec<String> = (0..500).map(|i| format!("group-{i:03}")).collect();
        let c = bound_groups(claims(), slugs);
        assert_eq!(c.groups.len(), MAX_GROUP_CLAIMS);
        assert_eq!(c.groups[0], "group-000");
        assert!(c.groups_truncated);
        assert_eq!(serde_json::to_value(&c).unwrap()["groups_truncated"], true);
    }

    #[test]
    fn long_slugs_are_cut_by_bytes() {
        let slugs: Vec<String> = (0..64)
            .map(|i| format!("{i:02}{}", "x".repeat(62)))
            .collect();
        let c = bound_groups(claims(), slugs);
        assert_eq!(c.groups.len(), MAX_GROUP_CLAIM_BYTES / 64);
        assert!(c.groups_truncated);
    }
}
