//! The one error type of the service and its one mapping to gRPC statuses.
//!
//! Every layer returns [`Error`]; `grpc` handlers turn it into a
//! [`tonic::Status`] with `?`. The mapping is an exhaustive `match` without a
//! catch-all arm, so a new variant does not compile until someone decides its
//! code. Client mistakes carry their details; faults of the service are
//! logged and answered with a bare "internal error", never the source text.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Everything that can go wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// INVALID_ARGUMENT, with one `google.rpc.BadRequest` field violation each.
    #[error("invalid argument")]
    InvalidArgument(Vec<FieldViolation>),

    /// NOT_FOUND: no such user or group. The string names what was missing.
    #[error("{0} not found")]
    NotFound(&'static str),

    /// ALREADY_EXISTS: a unique field is taken; the string names the field.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),

    /// ALREADY_EXISTS naming the field, with advice on what to do instead.
    #[error("{0} already exists: {1}")]
    AlreadyExistsHint(&'static str, &'static str),

    /// UNAUTHENTICATED: wrong login or password. One message for an unknown
    /// login and a wrong password, so that the answer enumerates nobody.
    #[error("invalid login or password")]
    InvalidCredentials,

    /// UNAUTHENTICATED: no, invalid or expired token, or an inactive caller.
    /// The reason is machine-readable (`google.rpc.ErrorInfo`).
    #[error("invalid token")]
    InvalidToken(&'static str),

    /// PERMISSION_DENIED: authenticated, but not allowed.
    #[error("permission denied")]
    PermissionDenied,

    /// FAILED_PRECONDITION: the system is not in a state the call needs.
    #[error("{0}")]
    FailedPrecondition(&'static str),

    /// FAILED_PRECONDITION with a machine-readable reason
    /// (`google.rpc.ErrorInfo`): an account token used, expired or not
    /// valid; a login refused for an unverified email.
    #[error("{1}")]
    Refused(&'static str, &'static str),

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

/// The `google.rpc.ErrorInfo` domain of this service's refusals.
pub const ERROR_DOMAIN: &str = "identity";

impl Error {
    /// INVALID_ARGUMENT with a single field violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
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
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(description) => {
                self.add(field, description);
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

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error as D};
        match e {
            D::NotFound => Error::internal("unexpected NotFound from the database"),
            // COMMIT or ROLLBACK failed: the connection went away mid-transaction.
            D::RollbackErrorOnCommit { .. } | D::BrokenTransactionManager => {
                Error::Unavailable(Box::new(e))
            }
            D::DatabaseError(DatabaseErrorKind::UniqueViolation, ref info)
                if info
                    .constraint_name()
                    .and_then(crate::db::unique_field)
                    .is_some() =>
            {
                let field = info.constraint_name().and_then(crate::db::unique_field);
                Error::AlreadyExists(field.unwrap_or("value"))
            }
            D::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, ref info)
                if info
                    .constraint_name()
                    .and_then(crate::db::missing_reference)
                    .is_some() =>
            {
                let what = info
                    .constraint_name()
                    .and_then(crate::db::missing_reference);
                Error::NotFound(what.unwrap_or("row"))
            }
            // A lost connection, a standby that took over (read-only), or a
            // transaction that lost a conflict: all transient, worth a retry.
            D::DatabaseError(
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::ReadOnlyTransaction
                | DatabaseErrorKind::SerializationFailure,
                _,
            ) => Error::Unavailable(Box::new(e)),
            D::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if info.message().starts_with("terminating connection")
                    || info.message().contains("the database system is") =>
            {
                // 57P01 admin_shutdown and 57P03 cannot_connect_now: the
                // server is going away or not there yet.
                Error::Unavailable(Box::new(e))
            }
            other => Error::Internal(Box::new(other)),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for Error {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        use deadpool::managed::PoolError as P;
        match e {
            // No connection in time, or none could be made: the database is
            // away (or overloaded); worth a retry.
            P::Timeout(_) | P::Backend(_) | P::Closed => Error::Unavailable(Box::new(e)),
            P::NoRuntimeSpecified | P::PostCreateHook(_) => Error::Internal(Box::new(e)),
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
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::AlreadyExists(field) => {
                Status::already_exists(format!("{field} already exists"))
            }
            Error::AlreadyExistsHint(field, hint) => {
                Status::already_exists(format!("{field} already exists: {hint}"))
            }
            Error::InvalidCredentials => Status::with_error_details(
                Code::Unauthenticated,
                "invalid login or password",
                ErrorDetails::with_error_info("INVALID_CREDENTIALS", ERROR_DOMAIN, []),
            ),
            Error::InvalidToken(reason) => Status::with_error_details(
                Code::Unauthenticated,
                if reason == crate::token::jwt::reason::MISSING {
                    "authentication required: send authorization: Bearer <access token>"
                } else {
                    "invalid or expired token"
                },
                ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []),
            ),
            Error::PermissionDenied => Status::permission_denied("permission denied"),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::Refused(reason, message) => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []),
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
            (Error::NotFound("user"), Code::NotFound),
            (Error::AlreadyExists("email"), Code::AlreadyExists),
            (
                Error::AlreadyExistsHint("slug", "pass one"),
                Code::AlreadyExists,
            ),
            (Error::InvalidCredentials, Code::Unauthenticated),
            (Error::InvalidToken("TOKEN_EXPIRED"), Code::Unauthenticated),
            (Error::PermissionDenied, Code::PermissionDenied),
            (
                Error::FailedPrecondition("last superuser"),
                Code::FailedPrecondition,
            ),
            (
                Error::Refused("ACCOUNT_TOKEN_USED", "token already used"),
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
