//! The second factor (`proto/identity/v1/auth.proto`, docs/security.md): enrolment, the
//! second step of a login, turning it off, and a superuser's reset.
//!
//! - A secret is made here, shown once (BeginTotpEnrollment), and stored
//!   sealed with the MFA key (`token::mfa_key`), the user's id as associated
//!   data; it is opened only to check a code.
//! - A code is accepted once: the step it matched must be later than the
//!   last one accepted, which one conditional UPDATE records (so two
//!   replicas cannot both accept it).
//! - A wrong code, or a replayed one, counts on the login throttle's key
//!   of the user, as a wrong password does; a matching password of a user
//!   with TOTP on clears nothing until the second factor is right.
//! - Login with a second factor costs one more round trip (CompleteLogin)
//!   and no second password hash.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::audit;
use super::auth::{AuthService, IssuedTokens};
use super::throttle::user_key;
use crate::db;
use crate::domain::User;
use crate::domain::recovery::{RecoveryCodes, recovery_hash};
use crate::domain::totp::{self, CodeError, TotpSecret};
use crate::error::{Error, Reason, Resource};
use crate::token::mfa_key::MfaKeys;
use crate::token::opaque;

/// How long an enrolment waits for its first code.
pub const ENROLLMENT_TTL: Duration = Duration::from_secs(10 * 60);
/// How long a login's challenge waits for its second factor.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(5 * 60);

/// A new secret, as BeginTotpEnrollment shows it, once. Its `Debug` hides
/// it.
pub struct Enrollment {
    /// `otpauth://totp/...`, for an authenticator app.
    pub otpauth_uri: String,
    /// The secret in base32, to type in.
    pub secret_base32: String,
    /// When the enrolment lapses.
    pub expire: DateTime<Utc>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("expire", &self.expire)
            .finish_non_exhaustive()
    }
}

/// What proves the second factor of a login, or of DisableTotp.
#[derive(Clone, Copy)]
pub enum Proof<'a> {
    /// A TOTP code.
    Code(&'a str),
    /// A recovery code (spent by its use).
    RecoveryCode(&'a str),
}

impl std::fmt::Debug for Proof<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proof::Code(_) => "Code",
            Proof::RecoveryCode(_) => "RecoveryCode",
        })
    }
}

fn randomness() -> Error {
    Error::internal("no randomness")
}

/// What the database keeps of a recovery code: SHA-256 of the user's id
/// and the code's hash, so that a leaked table must be searched user by
/// user (50 bits each) rather than once for everyone.
fn stored_recovery_hash(user_id: Uuid, code_hash: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(user_id.as_bytes());
    h.update(code_hash);
    h.finalize().to_vec()
}

fn invalid_code() -> Error {
    Error::SecondFactor(Reason::MfaCodeInvalid)
}

impl AuthService {
    fn mfa_keys(&self) -> Result<&Arc<MfaKeys>, Error> {
        self.mfa
            .as_ref()
            .ok_or_else(|| Error::internal("no MFA key loaded"))
    }

    /// Opens the sealed secret of `user_id`.
    fn open_secret(&self, user_id: Uuid, sealed: &[u8]) -> Result<TotpSecret, Error> {
        let bytes = self
            .mfa_keys()?
            .open(sealed, user_id.as_bytes())
            .map_err(Error::internal)?;
        TotpSecret::from_bytes(bytes).map_err(Error::internal)
    }

    /// BeginTotpEnrollment: a new secret for `user`, pending until
    /// confirmed; FAILED_PRECONDITION MFA_ALREADY_ENABLED when TOTP is on.
    #[tracing::instrument(skip_all, fields(user_id = %user.id))]
    pub async fn begin_totp(&self, user: &User) -> Result<Enrollment, Error> {
        if user.is_service {
            return Err(Error::service_account());
        }
        let secret = TotpSecret::generate().map_err(|_| randomness())?;
        let sealed = self
            .mfa_keys()?
            .seal(secret.as_bytes(), user.id.as_bytes())
            .map_err(Error::internal)?;
        let expire = Utc::now() + ENROLLMENT_TTL;
        let mut conn = db::conn(&self.pool).await?;
        if !db::totp::begin(&mut conn, user.id, &sealed, expire).await? {
            return Err(Error::Refused {
                reason: Reason::MfaAlreadyEnabled,
                message: "TOTP is on already: turn it off first (DisableTotp)",
            });
        }
        tracing::info!("TOTP enrolment begun");
        Ok(Enrollment {
            otpauth_uri: secret.otpauth_uri(self.tokens.issuer(), &user.username),
            secret_base32: secret.base32(),
            expire,
        })
    }

    /// ConfirmTotpEnrollment: turns TOTP on with a code of the pending
    /// secret; returns the recovery codes, shown once.
    #[tracing::instrument(skip_all, fields(user_id = %user.id))]
    pub async fn confirm_totp(&self, user: &User, code: &str) -> Result<Vec<String>, Error> {
        let mut conn = db::conn(&self.pool).await?;
        let factor = db::totp::factor(&mut conn, user.id).await?;
        let pending = match factor {
            Some(f) if f.confirm_time.is_some() => {
                return Err(Error::Refused {
                    reason: Reason::MfaAlreadyEnabled,
                    message: "TOTP is on already",
                });
            }
            Some(f) if f.pending_expire_time.is_some_and(|t| t > Utc::now()) => f,
            _ => {
                return Err(Error::Refused {
                    reason: Reason::MfaNotPending,
                    message: "no TOTP enrolment under way: begin one (BeginTotpEnrollment)",
                });
            }
        };
        let secret = self.open_secret(user.id, &pending.secret)?;
        let step = match totp::check_code(&secret, code, Utc::now().timestamp(), None) {
            Ok(step) => step,
            Err(_) => return Err(invalid_code()),
        };
        let recovery = RecoveryCodes::generate().map_err(|_| randomness())?;
        let stored: Vec<Vec<u8>> = recovery
            .hashes
            .iter()
            .map(|h| stored_recovery_hash(user.id, h))
            .collect();
        let origin = audit::as_user(user.id);
        let confirmed =
            audit::transaction_as_touching(&mut conn, &origin, &[user.id], async |conn| {
                db::totp::confirm(conn, user.id, step, &stored).await
            })
            .await?;
        if !confirmed {
            return Err(Error::Refused {
                reason: Reason::MfaNotPending,
                message: "the TOTP enrolment lapsed: begin again",
            });
        }
        tracing::info!("TOTP turned on");
        Ok(recovery.codes)
    }

    /// DisableTotp: the caller's password or a current code proves it.
    #[tracing::instrument(skip_all, fields(user_id = %user.id))]
    pub async fn disable_totp(
        &self,
        user: &User,
        password: Option<&str>,
        code: Option<&str>,
    ) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        let Some(factor) = db::totp::factor(&mut conn, user.id)
            .await?
            .filter(|f| f.confirm_time.is_some())
        else {
            return Err(Error::Refused {
                reason: Reason::MfaNotEnabled,
                message: "TOTP is not on",
            });
        };
        // The same throttle as a login: this is a way to test passwords
        // and codes too.
        let (lease, _) = self.throttle.claim(conn, user_key(user.id)).await?;
        let proved = match (password, code) {
            (Some(password), _) => {
                let mut conn = db::conn(&self.pool).await?;
                let hash = db::users::password_hash(&mut conn, user.id)
                    .await?
                    .map(|(hash, _)| hash);
                drop(conn);
                self.hasher.verify(password, hash.as_deref()).await?
            }
            (None, Some(code)) => {
                let secret = self.open_secret(user.id, &factor.secret)?;
                match totp::check_code(&secret, code, Utc::now().timestamp(), factor.last_used_step)
                {
                    Ok(step) => {
                        let mut conn = db::conn(&self.pool).await?;
                        db::totp::use_step(&mut conn, user.id, step).await?
                    }
                    Err(_) => false,
                }
            }
            (None, None) => {
                return Err(Error::invalid(
                    "current_password",
                    "give the current password or a TOTP code",
                ));
            }
        };
        let mut conn = db::conn(&self.pool).await?;
        if !proved {
            lease.mismatched(&mut conn).await?;
            return Err(match password {
                Some(_) => Error::InvalidCredentials,
                None => invalid_code(),
            });
        }
        lease.matched(&mut conn).await?;
        let origin = audit::as_user(user.id);
        audit::transaction_as_touching(&mut conn, &origin, &[user.id], async |conn| {
            db::totp::remove(conn, user.id).await
        })
        .await?;
        tracing::info!("TOTP turned off");
        Ok(())
    }

    /// ResetSecondFactor (superuser): removes a user's second factor, for a
    /// user who lost it. NOT_FOUND for an unknown user; OK when it had none.
    #[tracing::instrument(skip_all, fields(user_id = %user_id))]
    pub async fn reset_second_factor(&self, user_id: Uuid) -> Result<(), Error> {
        let mut conn = db::conn(&self.pool).await?;
        if db::users::by_id(&mut conn, user_id).await?.is_none() {
            return Err(Error::NotFound(Resource::User));
        }
        let removed = audit::transaction_touching(&mut conn, &[user_id], async |conn| {
            db::totp::remove(conn, user_id).await
        })
        .await?;
        tracing::info!(removed, "second factor reset");
        Ok(())
    }

    /// The second step of a login whose password matched: a challenge for
    /// CompleteLogin.
    pub(super) async fn challenge(
        &self,
        conn: &mut db::Conn,
        user: &User,
        password_changed_at: DateTime<Utc>,
    ) -> Result<String, Error> {
        let secret = opaque::generate().map_err(|_| randomness())?;
        let expire = Utc::now() + CHALLENGE_TTL;
        db::totp::create_challenge(conn, &secret.hash, user.id, password_changed_at, expire)
            .await?;
        Ok(secret.token)
    }

    /// CompleteLogin: the challenge and a code (or a recovery code) give a
    /// session whose tokens say how it was proved (`amr`).
    #[tracing::instrument(skip_all)]
    pub async fn complete_login(
        &self,
        challenge: &str,
        proof: Proof<'_>,
    ) -> Result<(IssuedTokens, User), Error> {
        let spent = || Error::SecondFactor(Reason::MfaChallengeInvalid);
        let challenge_hash = opaque::hash(challenge);
        let mut conn = db::conn(&self.pool).await?;
        let Some((found, factor)) = db::totp::challenge(&mut conn, &challenge_hash).await? else {
            return Err(spent());
        };
        let user_id = found.user_id;
        let Some(factor) = factor else {
            // TOTP was turned off since the password matched: log in again.
            return Err(spent());
        };
        let (lease, _) = self.throttle.claim(conn, user_key(user_id)).await?;
        let mut conn = db::conn(&self.pool).await?;
        // A secret sealed with a previous MFA key is sealed again with the
        // current one, in the transaction below (a key rotation's tail).
        let mut resealed = None;
        let (amr, step, recovery_hash) = match proof {
            Proof::Code(code) => {
                let secret = self.open_secret(user_id, &factor.secret)?;
                let keys = self.mfa_keys()?;
                if keys.needs_reseal(&factor.secret) {
                    resealed = Some(
                        keys.seal(secret.as_bytes(), user_id.as_bytes())
                            .map_err(Error::internal)?,
                    );
                }
                match totp::check_code(&secret, code, Utc::now().timestamp(), factor.last_used_step)
                {
                    Ok(step) => (["pwd", "otp"], Some(step), None),
                    Err(e) => {
                        lease.mismatched(&mut conn).await?;
                        tracing::info!(user_id = %user_id, "second factor refused");
                        return Err(match e {
                            CodeError::Reused => Error::SecondFactor(Reason::MfaCodeReused),
                            CodeError::Invalid => invalid_code(),
                        });
                    }
                }
            }
            Proof::RecoveryCode(code) => match recovery_hash(code) {
                Some(hash) => (
                    ["pwd", "rcode"],
                    None,
                    Some(stored_recovery_hash(user_id, &hash)),
                ),
                None => {
                    lease.mismatched(&mut conn).await?;
                    return Err(invalid_code());
                }
            },
        };
        let amr: Vec<String> = amr.iter().map(|m| (*m).to_owned()).collect();
        // The challenge is spent, the code recorded as used (or the recovery
        // code spent) and the session started in one transaction: a code
        // replayed on another replica at the same moment loses the UPDATE.
        let refresh = opaque::generate().map_err(|_| randomness())?;
        let refresh_expire = Utc::now() + self.refresh_ttl;
        let session_id = Uuid::now_v7();
        let origin = audit::as_user(user_id);
        let outcome =
            audit::transaction_as_touching(&mut conn, &origin, &[user_id], async |conn| {
                if !db::totp::spend_challenge(conn, &challenge_hash).await? {
                    return Ok(Err(spent()));
                }
                let accepted = match (step, &recovery_hash) {
                    (Some(step), _) => db::totp::use_step(conn, user_id, step).await?,
                    (None, Some(hash)) => db::totp::use_recovery_code(conn, user_id, hash).await?,
                    (None, None) => false,
                };
                if let Some(new) = &resealed {
                    db::totp::reseal(conn, user_id, &factor.secret, new).await?;
                }
                if !accepted {
                    return Ok(Err(match step {
                        Some(_) => Error::SecondFactor(Reason::MfaCodeReused),
                        None => invalid_code(),
                    }));
                }
                let row = db::sessions::NewSessionRow {
                    id: session_id,
                    user_id,
                    refresh_hash: &refresh.hash,
                    refresh_expire_time: refresh_expire,
                    amr: &amr,
                };
                if !db::sessions::start(conn, &row, found.password_changed_at).await? {
                    // The password changed, or the user was deactivated, since
                    // the password matched.
                    return Ok(Err(Error::InvalidCredentials));
                }
                Ok::<_, Error>(Ok(()))
            })
            .await?;
        if let Err(e) = outcome {
            // Rolled back: the challenge lives on for another try, unless
            // the refusal was the challenge's own.
            if matches!(
                e,
                Error::SecondFactor(Reason::MfaCodeInvalid | Reason::MfaCodeReused)
            ) {
                lease.mismatched(&mut conn).await?;
            }
            return Err(e);
        }
        lease.matched(&mut conn).await?;
        let user = db::users::by_id(&mut conn, user_id)
            .await?
            .ok_or(Error::InvalidCredentials)?;
        let groups = db::groups::of_user(&mut conn, user_id).await?;
        drop(conn);
        let tokens = self.issue(
            &user,
            &groups,
            session_id,
            &amr,
            refresh.token,
            refresh_expire,
        )?;
        tracing::info!(user_id = %user_id, amr = %crate::telemetry::List(&amr), "logged in with a second factor");
        Ok((tokens, user))
    }
}
