//! The one error type of the service and its one mapping to gRPC statuses.
//!
//! Every layer returns [`Error`]; `grpc` handlers turn it into a
//! [`tonic::Status`] with `?`. The mapping is an exhaustive `match` without a
//! catch-all arm, so a new variant does not compile until someone decides its
//! code. Client mistakes carry their details; faults of the service are
//! logged and answered with a bare "internal error", never the source text.
//!
//! [`Error`]: crate::error::Error

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Everything that can go wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// INVALID_ARGUMENT, with one `google.rpc.BadRequest` field violation each.
    #[error("invalid argument")]
    InvalidArgument(Vec<FieldViolation>),

    /// NOT_FOUND: no such user or group.
    #[error("{} not found", .0.as_str())]
    NotFound(Resource),

    /// ALREADY_EXISTS: a unique field is taken. The message names the field,
    /// and so does a `google.rpc.ErrorInfo` (reason `FIELD_TAKEN`, metadata
    /// `field`), with advice on what to do instead when there is some.
    #[error("{} already exists", field.as_str())]
    AlreadyExists {
        /// The request field whose value is taken.
        field: Field,
        /// What to do instead, if anything.
        hint: Option<&'static str>,
    },

    /// UNAUTHENTICATED: wrong login or password. One message for an unknown
    /// login and a wrong password, so that the answer enumerates nobody.
    #[error("invalid login or password")]
    InvalidCredentials,

    /// UNAUTHENTICATED: no, invalid or expired token, or an inactive caller.
    /// The reason is machine-readable (`google.rpc.ErrorInfo`).
    #[error("invalid token: {}", .0.as_str())]
    InvalidToken(Reason),

    /// UNAUTHENTICATED: a second factor that does not prove the caller: a
    /// wrong code, a code already used, a spent or expired challenge. The
    /// reason says which (`MFA_CODE_INVALID`, `MFA_CODE_REUSED`,
    /// `MFA_CHALLENGE_INVALID`).
    #[error("second factor refused: {}", .0.as_str())]
    SecondFactor(Reason),

    /// PERMISSION_DENIED: authenticated, but not allowed.
    #[error("permission denied")]
    PermissionDenied,

    /// PERMISSION_DENIED, reason MFA_REQUIRED: allowed only to a session
    /// that a second factor proved (`REQUIRE_MFA_FOR_SUPERUSERS`).
    #[error("a second factor is required")]
    MfaRequired,

    /// FAILED_PRECONDITION: the system is not in a state the call needs.
    #[error("{0}")]
    FailedPrecondition(&'static str),

    /// FAILED_PRECONDITION with a machine-readable reason
    /// (`google.rpc.ErrorInfo`): an account token used, expired or not
    /// valid; a login refused for an unverified email.
    #[error("{message}")]
    Refused {
        /// Why, for machines.
        reason: Reason,
        /// Why, for people.
        message: &'static str,
    },

    /// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo`: too many failed logins,
    /// or hashing capacity exhausted.
    #[error("{message}")]
    Throttled {
        /// What is exhausted.
        message: &'static str,
        /// When the client may try again.
        retry_after: Duration,
    },

    /// UNAVAILABLE: the database cannot be reached.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// INTERNAL: the service's own fault. Logged; the client sees a bare
    /// message "for security reasons".
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What NOT_FOUND says is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// A user.
    User,
    /// A group.
    Group,
    /// A login session.
    Session,
    /// An API key.
    ApiKey,
}

impl Resource {
    /// The name in the message.
    pub const fn as_str(self) -> &'static str {
        match self {
            Resource::User => "user",
            Resource::Group => "group",
            Resource::Session => "session",
            Resource::ApiKey => "API key",
        }
    }
}

/// A request field whose value must be unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A user's id (an import that brings its own).
    Id,
    /// A username.
    Username,
    /// An email.
    Email,
    /// A groupname.
    Groupname,
    /// A group's slug.
    Slug,
}

impl Field {
    /// The request field's name, as clients send it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Field::Id => "id",
            Field::Username => "username",
            Field::Email => "email",
            Field::Groupname => "groupname",
            Field::Slug => "slug",
        }
    }
}

/// The `google.rpc.ErrorInfo` reasons of this service (domain `identity`),
/// one enum for them all; [`Reason::as_str`] is the wire value, which
/// clients match on and which never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No bearer token where one is needed.
    TokenMissing,
    /// Not a JWT, not an access token, or a required claim is missing.
    TokenMalformed,
    /// Bad signature, unknown key or wrong algorithm.
    TokenSignature,
    /// Past `exp`.
    TokenExpired,
    /// Before `nbf`.
    TokenNotYetValid,
    /// Another `iss` or `aud`.
    TokenIssuerOrAudience,
    /// The subject no longer exists.
    UserNotFound,
    /// The subject is deactivated.
    UserInactive,
    /// The session was ended (logout, password change, reuse detection).
    SessionEnded,
    /// The token predates the user's last password change.
    CredentialsChanged,
    /// A refresh token that is unknown, expired, or of an ended session or
    /// an inactive user.
    RefreshTokenInvalid,
    /// A wrong login or password.
    InvalidCredentials,
    /// An account token that is unknown, for another purpose, or for an
    /// address the user no longer has.
    AccountTokenInvalid,
    /// An account token already used.
    AccountTokenUsed,
    /// An account token past its expiry.
    AccountTokenExpired,
    /// `REQUIRE_VERIFIED_LOGIN` is on and the user's email is not verified.
    EmailNotVerified,
    /// A unique field's value is taken (ALREADY_EXISTS).
    FieldTaken,
    /// A change feed cursor older than `CHANGES_RETENTION`.
    CursorExpired,
    /// A service account asked for what only a person with a password can
    /// do (Login, password and email RPCs).
    ServiceAccount,
    /// Not a key identity made, or no such key.
    ApiKeyInvalid,
    /// A key past its expire_time.
    ApiKeyExpired,
    /// A revoked key.
    ApiKeyRevoked,
    /// A key limited to some methods cannot be exchanged for a token that
    /// would not be.
    ApiKeyRestricted,
    /// A TOTP code or recovery code that is not right.
    MfaCodeInvalid,
    /// A TOTP code already accepted (or older than one accepted).
    MfaCodeReused,
    /// A login challenge that is unknown, spent or past its 5 minutes.
    MfaChallengeInvalid,
    /// The call needs a session proved by a second factor.
    MfaRequired,
    /// BeginTotpEnrollment while TOTP is on: disable it first.
    MfaAlreadyEnabled,
    /// ConfirmTotpEnrollment without an enrolment begun in the last 10
    /// minutes.
    MfaNotPending,
    /// DisableTotp while TOTP is off.
    MfaNotEnabled,
}

impl Reason {
    /// The wire value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::TokenMissing => "TOKEN_MISSING",
            Reason::TokenMalformed => "TOKEN_MALFORMED",
            Reason::TokenSignature => "TOKEN_SIGNATURE",
            Reason::TokenExpired => "TOKEN_EXPIRED",
            Reason::TokenNotYetValid => "TOKEN_NOT_YET_VALID",
            Reason::TokenIssuerOrAudience => "TOKEN_ISSUER_OR_AUDIENCE",
            Reason::UserNotFound => "USER_NOT_FOUND",
            Reason::UserInactive => "USER_INACTIVE",
            Reason::SessionEnded => "SESSION_ENDED",
            Reason::CredentialsChanged => "CREDENTIALS_CHANGED",
            Reason::RefreshTokenInvalid => "REFRESH_TOKEN_INVALID",
            Reason::InvalidCredentials => "INVALID_CREDENTIALS",
            Reason::AccountTokenInvalid => "ACCOUNT_TOKEN_INVALID",
            Reason::AccountTokenUsed => "ACCOUNT_TOKEN_USED",
            Reason::AccountTokenExpired => "ACCOUNT_TOKEN_EXPIRED",
            Reason::EmailNotVerified => "EMAIL_NOT_VERIFIED",
            Reason::FieldTaken => "FIELD_TAKEN",
            Reason::CursorExpired => "CURSOR_EXPIRED",
            Reason::ServiceAccount => "SERVICE_ACCOUNT",
            Reason::ApiKeyInvalid => "API_KEY_INVALID",
            Reason::ApiKeyExpired => "API_KEY_EXPIRED",
            Reason::ApiKeyRevoked => "API_KEY_REVOKED",
            Reason::ApiKeyRestricted => "API_KEY_RESTRICTED",
            Reason::MfaCodeInvalid => "MFA_CODE_INVALID",
            Reason::MfaCodeReused => "MFA_CODE_REUSED",
            Reason::MfaChallengeInvalid => "MFA_CHALLENGE_INVALID",
            Reason::MfaRequired => "MFA_REQUIRED",
            Reason::MfaAlreadyEnabled => "MFA_ALREADY_ENABLED",
            Reason::MfaNotPending => "MFA_NOT_PENDING",
            Reason::MfaNotEnabled => "MFA_NOT_ENABLED",
        }
    }
}

/// The `google.rpc.ErrorInfo` domain of this service's refusals.
pub const ERROR_DOMAIN: &str = "identity";

impl Error {
    /// INVALID_ARGUMENT with a single field violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// FAILED_PRECONDITION, reason SERVICE_ACCOUNT: what a service account
    /// (no password, never logs in) cannot do.
    pub fn service_account() -> Self {
        Error::Refused {
            reason: Reason::ServiceAccount,
            message: "a service account has no password and cannot log in: use an API key",
        }
    }

    /// INTERNAL from anything that went wrong inside the service.
    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Internal(e.into())
    }
}

/// Collects the field violations of a whole request, so that a client learns
/// every mistake at once instead of one per round trip.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation of `field`.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Keeps the value of `result`, or records its violation under `field`.
    pub fn check<T, E: Into<String>>(&mut self, field: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(description) => {
                self.add(field, description.into());
                None
            }
        }
    }

    /// `Ok` when nothing was recorded, else INVALID_ARGUMENT with all of them.
    pub fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(violations) => Status::with_error_details(
                Code::InvalidArgument,
                summarize(&violations),
                ErrorDetails::with_bad_request(violations),
            ),
            Error::NotFound(what) => Status::not_found(format!("{} not found", what.as_str())),
            Error::AlreadyExists { field, hint } => {
                let message = match hint {
                    Some(hint) => format!("{} already exists: {hint}", field.as_str()),
                    None => format!("{} already exists", field.as_str()),
                };
                Status::with_error_details(
                    Code::AlreadyExists,
                    message,
                    ErrorDetails::with_error_info(
                        Reason::FieldTaken.as_str(),
                        ERROR_DOMAIN,
                        [("field".to_owned(), field.as_str().to_owned())],
                    ),
                )
            }
            Error::InvalidCredentials => Status::with_error_details(
                Code::Unauthenticated,
                "invalid login or password",
                ErrorDetails::with_error_info(
                    Reason::InvalidCredentials.as_str(),
                    ERROR_DOMAIN,
                    [],
                ),
            ),
            Error::InvalidToken(reason) => Status::with_error_details(
                Code::Unauthenticated,
                match reason {
                    Reason::TokenMissing => {
                        "authentication required: send authorization: Bearer <access token>"
                    }
                    Reason::ApiKeyInvalid => "invalid API key",
                    Reason::ApiKeyExpired => "expired API key",
                    Reason::ApiKeyRevoked => "revoked API key",
                    _ => "invalid or expired token",
                },
                ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, []),
            ),
            Error::SecondFactor(reason) => Status::with_error_details(
                Code::Unauthenticated,
                match reason {
                    Reason::MfaCodeReused => "that code was already used: wait for the next one",
                    Reason::MfaChallengeInvalid => {
                        "the login challenge is spent or expired: log in again"
                    }
                    _ => "invalid code",
                },
                ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, []),
            ),
            Error::PermissionDenied => Status::permission_denied("permission denied"),
            Error::MfaRequired => Status::with_error_details(
                Code::PermissionDenied,
                "a session proved by a second factor is required: log in with TOTP",
                ErrorDetails::with_error_info(Reason::MfaRequired.as_str(), ERROR_DOMAIN, []),
            ),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::Refused { reason, message } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, []),
            ),
            Error::Throttled {
                message,
                retry_after,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                Status::unavailable("database unavailable")
            }
            Error::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

fn summarize(violations: &[FieldViolation]) -> String {
    match violations {
        [] => "invalid argument".to_owned(),
        [one] => format!("invalid {}: {}", one.field, one.description),
        [first, rest @ ..] => format!(
            "invalid {}: {} (and {} more)",
            first.field,
            first.description,
            rest.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_code() {
        let io = || std::io::Error::other("secret detail");
        let table: Vec<(Error, Code)> = vec![
            (
                Error::invalid("username", "too short"),
                Code::InvalidArgument,
            ),
            (Error::NotFound(Resource::User), Code::NotFound),
            (
                Error::AlreadyExists {
                    field: Field::Email,
                    hint: None,
                },
                Code::AlreadyExists,
            ),
            (
                Error::AlreadyExists {
                    field: Field::Slug,
                    hint: Some("pass one"),
                },
                Code::AlreadyExists,
            ),
            (Error::InvalidCredentials, Code::Unauthenticated),
            (
                Error::InvalidToken(Reason::TokenExpired),
                Code::Unauthenticated,
            ),
            (Error::PermissionDenied, Code::PermissionDenied),
            (Error::MfaRequired, Code::PermissionDenied),
            (
                Error::SecondFactor(Reason::MfaCodeReused),
                Code::Unauthenticated,
            ),
            (
                Error::FailedPrecondition("last superuser"),
                Code::FailedPrecondition,
            ),
            (
                Error::Refused {
                    reason: Reason::AccountTokenUsed,
                    message: "token already used",
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Throttled {
                    message: "busy",
                    retry_after: Duration::from_secs(1),
                },
                Code::ResourceExhausted,
            ),
            (Error::Unavailable(Box::new(io())), Code::Unavailable),
            (Error::Internal(Box::new(io())), Code::Internal),
        ];
        for (error, code) in table {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
        }
    }

    #[test]
    fn already_exists_names_the_field_in_error_info() {
        let status = Status::from(Error::AlreadyExists {
            field: Field::Username,
            hint: None,
        });
        assert_eq!(status.message(), "username already exists");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "FIELD_TAKEN");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("field").map(String::as_str),
            Some("username")
        );
    }

    #[test]
    fn reasons_keep_their_wire_values() {
        let all = [
            (Reason::TokenMissing, "TOKEN_MISSING"),
            (Reason::TokenMalformed, "TOKEN_MALFORMED"),
            (Reason::TokenSignature, "TOKEN_SIGNATURE"),
            (Reason::TokenExpired, "TOKEN_EXPIRED"),
            (Reason::TokenNotYetValid, "TOKEN_NOT_YET_VALID"),
            (Reason::TokenIssuerOrAudience, "TOKEN_ISSUER_OR_AUDIENCE"),
            (Reason::UserNotFound, "USER_NOT_FOUND"),
            (Reason::UserInactive, "USER_INACTIVE"),
            (Reason::SessionEnded, "SESSION_ENDED"),
            (Reason::CredentialsChanged, "CREDENTIALS_CHANGED"),
            (Reason::RefreshTokenInvalid, "REFRESH_TOKEN_INVALID"),
            (Reason::InvalidCredentials, "INVALID_CREDENTIALS"),
            (Reason::AccountTokenInvalid, "ACCOUNT_TOKEN_INVALID"),
            (Reason::AccountTokenUsed, "ACCOUNT_TOKEN_USED"),
            (Reason::AccountTokenExpired, "ACCOUNT_TOKEN_EXPIRED"),
            (Reason::EmailNotVerified, "EMAIL_NOT_VERIFIED"),
            (Reason::FieldTaken, "FIELD_TAKEN"),
            (Reason::CursorExpired, "CURSOR_EXPIRED"),
        ];
        for (reason, wire) in all {
            assert_eq!(reason.as_str(), wire);
        }
    }

    #[test]
    fn invalid_argument_carries_every_field_violation() {
        let mut v = Violations::new();
        v.add("username", "too short");
        v.add("email", "missing @");
        let status = Status::from(v.finish().unwrap_err());
        let bad = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        assert_eq!(fields, ["username", "email"]);
    }

    #[test]
    fn throttling_says_when_to_retry() {
        let status = Status::from(Error::Throttled {
            message: "busy",
            retry_after: Duration::from_secs(3),
        });
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(3)));
    }
}
