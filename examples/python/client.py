#!/usr/bin/env python3
"""A walk through identity's login flow, from Python.

    python client.py 127.0.0.1:50051

It registers a throwaway user, logs in, verifies the access token offline
(PyJWT + the service's JWKS, found through its OpenID Connect discovery
document as an OIDC library finds it), asks the service about the token, refreshes,
replays the retired refresh token, calls an RPC as the user, logs out,
shows that the logged-out token is refused, then turns TOTP on and logs in
with a code computed by pyotp. Every step checks what it gets:
the script exits non-zero as soon as the service does something else.

Stubs: generated from proto/ by run.py into ./generated (see README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.request
import uuid
from datetime import timezone
from pathlib import Path

import grpc
import jwt  # PyJWT
import pyotp  # RFC 6238 codes, as an authenticator app computes them
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The generated stubs live beside this file (python -m grpc_tools.protoc ...
# --python_out=generated); they import each other as identity.v1.*.
sys.path.insert(0, os.environ.get("IDENTITY_STUBS", str(Path(__file__).parent / "generated")))
from identity.v1 import auth_pb2, auth_pb2_grpc, user_pb2, user_pb2_grpc  # noqa: E402

RPC_TIMEOUT = 10.0  # seconds; every call gets a deadline
CLOCK_SKEW = 10  # seconds of leeway for exp/nbf between us and the service
ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")  # RFC 9068 header typ
ERROR_DOMAIN = "identity"  # google.rpc.ErrorInfo.domain of the service's refusals


class Failed(Exception):
    """The service did not do what the contract says."""


def expect(condition: bool, what: str) -> None:
    # Not `assert`: that disappears under `python -O`.
    if not condition:
        raise Failed(what)


def step(number: str, title: str, detail: str) -> None:
    print(f"{number:>3} {title:<31} {detail}", flush=True)


def when(ts) -> str:
    """A google.protobuf.Timestamp as an ISO 8601 UTC string."""
    return ts.ToDatetime(tzinfo=timezone.utc).isoformat(timespec="seconds")


def bearer(access_token: str) -> list[tuple[str, str]]:
    """Call metadata that authenticates as the token's user (keys are lowercase in gRPC)."""
    return [("authorization", f"Bearer {access_token}")]


# ---------------------------------------------------------------- errors

def refusal(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, ErrorInfo reason or '') of a failed call.

    The service puts a google.rpc.Status in the `grpc-status-details-bin`
    trailer; grpcio-status decodes it, and its details are Any messages
    (ErrorInfo for token refusals, BadRequest for invalid fields, RetryInfo
    when throttled).
    """
    reason = ""
    status = rpc_status.from_call(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                # Reasons are namespaced by domain; ours is "identity".
                reason = info.reason if info.domain == ERROR_DOMAIN else f"{info.domain}/{info.reason}"
    return err.code(), err.details(), reason


def expect_refused(call, request, code: grpc.StatusCode, reason: str, **kwargs) -> str:
    """Makes a call that must fail with `code` (and ErrorInfo `reason`); returns a summary."""
    try:
        call(request, timeout=RPC_TIMEOUT, **kwargs)
    except grpc.RpcError as err:
        got_code, message, got_reason = refusal(err)
        expect(got_code == code, f"expected {code.name}, got {got_code.name}: {message}")
        expect(got_reason == reason, f"expected ErrorInfo reason {reason}, got {got_reason or 'none'}")
        return f"{got_code.name} ({got_reason}): {message}"
    raise Failed(f"expected {code.name} ({reason}), but the call succeeded")


# ---------------------------------------------------------- offline check

class OfflineVerifier:
    """Verifies access tokens without calling the service, as any backend would.

    Keys come from GET /.well-known/jwks.json on the service's port; PyJWKClient
    caches the set (5 minutes, as the service's Cache-Control says) and fetches
    it again when a token names a kid it does not know (key rotation).
    """

    def __init__(self, jwks_url: str, issuer: str, audience: str):
        self.jwks = jwt.PyJWKClient(jwks_url, cache_jwk_set=True, lifespan=300, timeout=RPC_TIMEOUT)
        self.issuer = issuer
        self.audience = audience

    def verify(self, token: str) -> tuple[dict, dict]:
        """Returns (header, claims) of a valid token; raises jwt.InvalidTokenError otherwise."""
        header = jwt.get_unverified_header(token)  # only to pick the key; trusted below
        kid = header.get("kid")
        if not kid:
            raise jwt.InvalidTokenError("token has no kid")
        key = self.jwks.get_signing_key(kid)  # PyJWK with use=sig and this kid, or an error
        # Pin the algorithm to the key's, never to what the token says (alg confusion).
        if not key.algorithm_name:
            raise jwt.InvalidTokenError(f"JWK {kid} names no alg")
        verified = jwt.decode_complete(
            token,
            key=key,
            algorithms=[key.algorithm_name],
            issuer=self.issuer,
            audience=self.audience,
            leeway=CLOCK_SKEW,
            options={
                "require": ["exp", "nbf", "iat", "iss", "aud", "sub", "jti"],
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iss": True,
                "verify_aud": True,
            },
        )
        typ = str(verified["header"].get("typ", ""))
        if typ.lower() not in ACCESS_TOKEN_TYPES:
            raise jwt.InvalidTokenError(f"header typ {typ!r} is not an access token")
        return verified["header"], verified["payload"]


# ------------------------------------------------------------------- flow

def run(addr: str, issuer: str, audience: str, jwks_url: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        offline = OfflineVerifier(jwks_url, issuer, audience)

        # 1. Register. Anonymous callers may create users (ALLOW_REGISTRATION,
        #    on by default) with default flags only: no is_superuser etc.
        username = f"example-{secrets.token_hex(4)}"
        email = f"{username}@example.com"
        password = secrets.token_urlsafe(18)  # 8 to 256 characters, no composition rules
        created = users.CreateUser(
            user_pb2.CreateUserRequest(
                username=username, email=email, password=password,
                first_name="Example", last_name="Client",
                attributes={"source": "examples/python"},
            ),
            timeout=RPC_TIMEOUT,
        ).user
        expect(created.username == username and created.email == email, "CreateUser echoes the user")
        expect(uuid.UUID(created.id).version == 7 and created.id == str(uuid.UUID(created.id)),
               f"id {created.id!r} is a canonical UUIDv7")
        expect(created.is_active and not created.is_superuser and not created.is_verified,
               "a self-registered user is active, not superuser, not verified")
        step("1", "CreateUser", f"{created.username} id={created.id}")

        # 2. Log in, by username or email, case-insensitively.
        login = auth.Login(auth_pb2.LoginRequest(login=username.upper(), password=password),
                           timeout=RPC_TIMEOUT)
        first = login.tokens
        expect(login.user.id == created.id, "Login returns the user")
        expect(first.token_type == "Bearer", f"token_type {first.token_type!r}")
        expect(bool(first.access_token) and bool(first.refresh_token), "Login returns both tokens")
        step("2", "Login", f"access token until {when(first.access_token_expire_time)}, "
                           f"refresh token until {when(first.refresh_token_expire_time)}")

        # 3. Verify the access token offline: signature (key by kid from the
        #    JWKS, algorithm pinned to the key's), exp/nbf, iss, aud, typ.
        header, claims = offline.verify(first.access_token)
        expect(claims["sub"] == created.id, "sub is the user's id")
        expect(claims.get("username") == username, "the username claim")
        expect(claims.get("groups") == [], "a new user is in no group")
        expect(bool(claims.get("sid")), "the token names its session (sid)")
        step("3", "Offline verify (PyJWT + JWKS)",
             f"alg={header['alg']} kid={header['kid'][:12]}... typ={header['typ']} "
             f"iss={claims['iss']} aud={claims['aud']} sid={claims['sid']}")

        # 4. Ask the service: VerifyToken reads the user and session fresh from
        #    the database, so it also catches logouts and deactivations.
        verified = auth.VerifyToken(auth_pb2.VerifyTokenRequest(access_token=first.access_token),
                                    timeout=RPC_TIMEOUT)
        expect(verified.user.id == created.id, "VerifyToken returns the user")
        expect(verified.claims.subject == created.id and verified.claims.session_id == claims["sid"],
               "VerifyToken's claims match the token's")
        expect(verified.claims.token_id == claims["jti"], "VerifyToken's token_id is the jti")
        expect(verified.claims.issuer == issuer and audience in verified.claims.audience,
               "VerifyToken's iss/aud")
        u = verified.user
        step("4", "VerifyToken",
             f"user {u.username} active={u.is_active} verified={u.is_verified} "
             f"superuser={u.is_superuser} groups={[g.slug for g in verified.groups]} "
             f"attributes={dict(u.attributes)}")

        # 5. Refresh: a new pair for the same session; the old refresh token retires.
        refreshed = auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token),
                                 timeout=RPC_TIMEOUT)
        second = refreshed.tokens
        expect(second.refresh_token != first.refresh_token, "Refresh returns a new refresh token")
        expect(second.access_token != first.access_token, "Refresh returns a new access token")
        _, new_claims = offline.verify(second.access_token)
        expect(new_claims["sid"] == claims["sid"], "Refresh keeps the session (same sid)")
        expect(new_claims["jti"] != claims["jti"], "Refresh issues a new token id (jti)")
        step("5", "Refresh", f"new pair, same sid, new jti={new_claims['jti']}")

        # 6. Refresh tokens are single use. Replaying the retired one is taken
        #    as theft (reuse detection): it is refused AND the whole session
        #    ends, so the pair from step 5 dies with it.
        outcome = expect_refused(auth.Refresh, auth_pb2.RefreshRequest(refresh_token=first.refresh_token),
                                 grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")
        step("6", "Refresh with the old token", outcome)
        outcome = expect_refused(auth.VerifyToken,
                                 auth_pb2.VerifyTokenRequest(access_token=second.access_token),
                                 grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")
        step("", "...the new access token too", outcome)

        # 7. So: a new session.
        again = auth.Login(auth_pb2.LoginRequest(login=email, password=password), timeout=RPC_TIMEOUT)
        tokens = again.tokens
        _, session = offline.verify(tokens.access_token)
        expect(session["sid"] != claims["sid"], "a new login is a new session")
        step("7", "Login again (by email)", f"sid={session['sid']}")

        # 8. Call as the user: the access token goes in the authorization metadata.
        me = users.GetUser(user_pb2.GetUserRequest(id=created.id), timeout=RPC_TIMEOUT,
                           metadata=bearer(tokens.access_token)).user
        expect(me.id == created.id and me.email == email, "GetUser returns the caller")
        step("8", "GetUser as self (Bearer)", f"{me.username} <{me.email}> {me.first_name} {me.last_name}")

        # 9. Log out: ends the session of this refresh token.
        auth.Logout(auth_pb2.LogoutRequest(refresh_token=tokens.refresh_token), timeout=RPC_TIMEOUT)
        step("9", "Logout", "session ended")

        # 10. The service now refuses the access token, at VerifyToken and on
        #     every authenticated call...
        outcome = expect_refused(auth.VerifyToken,
                                 auth_pb2.VerifyTokenRequest(access_token=tokens.access_token),
                                 grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")
        step("10", "VerifyToken after logout", outcome)
        outcome = expect_refused(users.GetUser, user_pb2.GetUserRequest(id=created.id),
                                 grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED",
                                 metadata=bearer(tokens.access_token))
        step("", "GetUser after logout", outcome)

        # ...but an offline check still accepts it until it expires: a JWT is
        # stateless. Ask VerifyToken wherever a logout must count at once.
        _, still = offline.verify(tokens.access_token)
        left = int(still["exp"] - time.time())
        step("", "offline verify after logout",
             f"still passes (expires in {left}s): use VerifyToken when revocation matters")

        second_factor(auth, offline, username, password)


def second_factor(auth, offline: "OfflineVerifier", username: str, password: str) -> None:
    """Turns TOTP on with codes computed by pyotp (an authenticator app's
    arithmetic, RFC 6238), then logs in with password and code."""
    tokens = auth.Login(auth_pb2.LoginRequest(login=username, password=password),
                        timeout=RPC_TIMEOUT).tokens
    me = bearer(tokens.access_token)

    # 11. Enrol: the secret comes once, as an otpauth:// URI for a QR code.
    begun = auth.BeginTotpEnrollment(auth_pb2.BeginTotpEnrollmentRequest(),
                                     timeout=RPC_TIMEOUT, metadata=me)
    totp = pyotp.parse_uri(begun.otpauth_uri)
    expect(isinstance(totp, pyotp.TOTP) and totp.secret == begun.secret_base32,
           "the otpauth URI holds the secret")
    expect(totp.digits == 6 and totp.interval == 30, "6 digits, 30 s")
    confirmed = auth.ConfirmTotpEnrollment(auth_pb2.ConfirmTotpEnrollmentRequest(code=totp.now()),
                                           timeout=RPC_TIMEOUT, metadata=me)
    expect(len(confirmed.recovery_codes) == 10, "ten recovery codes")
    step("11", "TOTP on (pyotp)", f"{begun.otpauth_uri.split('?')[0]}, "
                                   f"{len(confirmed.recovery_codes)} recovery codes")

    # 12. A password is no longer enough: a challenge, then a code. The
    #     confirmation used this 30 s step's code, and a code is accepted
    #     once: the next step's code (one step of clock skew is allowed).
    login = auth.Login(auth_pb2.LoginRequest(login=username, password=password), timeout=RPC_TIMEOUT)
    expect(login.mfa_required and not login.HasField("tokens"), "Login asks for the second factor")
    code = totp.at(time.time() + 30)
    done = auth.CompleteLogin(auth_pb2.CompleteLoginRequest(mfa_challenge=login.mfa_challenge, code=code),
                              timeout=RPC_TIMEOUT)
    _, claims = offline.verify(done.tokens.access_token)
    expect(claims.get("amr") == ["pwd", "otp"] and claims.get("acr") == "aal2",
           f"the token says how the session was proved (amr={claims.get('amr')})")
    step("12", "Login + CompleteLogin", f"amr={claims['amr']} acr={claims['acr']}")

    # 13. The same code twice: refused.
    again = auth.Login(auth_pb2.LoginRequest(login=username, password=password), timeout=RPC_TIMEOUT)
    outcome = expect_refused(auth.CompleteLogin,
                             auth_pb2.CompleteLoginRequest(mfa_challenge=again.mfa_challenge, code=code),
                             grpc.StatusCode.UNAUTHENTICATED, "MFA_CODE_REUSED")
    step("13", "the same code again", outcome)


def discover(addr: str, issuer: str) -> str:
    """The JWKS' address, from GET /.well-known/openid-configuration (OpenID
    Connect Discovery), as OIDC libraries find the keys by the issuer."""
    url = f"http://{addr}/.well-known/openid-configuration"
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as response:
        doc = json.load(response)
    expect(doc.get("issuer") == issuer, f"discovery names the issuer {issuer!r} (got {doc.get('issuer')!r})")
    algorithms = doc.get("id_token_signing_alg_values_supported") or []
    expect(bool(algorithms), "discovery lists the signing algorithms")
    jwks_uri = doc.get("jwks_uri", "")
    expect(jwks_uri == f"http://{addr}/.well-known/jwks.json", f"jwks_uri on the host asked (got {jwks_uri!r})")
    step("0", "discovery", f"issuer {issuer}, keys at {jwks_uri}, algorithms {', '.join(algorithms)}")
    return jwks_uri


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("addr", nargs="?", default=os.environ.get("IDENTITY_ADDR", "127.0.0.1:50051"),
                        help="host:port of the service (env IDENTITY_ADDR; default %(default)s)")
    parser.add_argument("--issuer", default=os.environ.get("JWT_ISSUER", "identity"),
                        help="expected iss (env JWT_ISSUER; default %(default)s)")
    parser.add_argument("--audience", default=os.environ.get("JWT_AUDIENCE", "identity"),
                        help="expected aud (env JWT_AUDIENCE; default %(default)s)")
    parser.add_argument("--jwks-url", default=None,
                        help="JWKS to verify tokens with (default: the jwks_uri of the discovery document)")
    args = parser.parse_args()

    print(f"identity client example -> {args.addr} (iss={args.issuer} aud={args.audience})", flush=True)
    started = time.monotonic()
    try:
        jwks_url = args.jwks_url or discover(args.addr, args.issuer)
        run(args.addr, args.issuer, args.audience, jwks_url)
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        code, message, reason = refusal(e)
        print(f"FAILED: unexpected {code.name}{f' ({reason})' if reason else ''}: {message}", file=sys.stderr)
        return 1
    except jwt.PyJWTError as e:  # includes PyJWKClientError (JWKS fetch)
        print(f"FAILED: offline token check: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"OK: every step behaved as documented ({time.monotonic() - started:.2f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
