"""Signing and checking the twin's access tokens (RS256 JWTs, like Entra ID app tokens).

Tokens carry iss/aud/exp/nbf/iat/oid/tid/roles and, as Entra issues them, `appid` (v1
tokens) or `azp` (v2 tokens). The default issuer is the v1 form
`https://sts.windows.net/{tenant}/`, which is what ARM tokens carry and what Azurite's
`--oauth basic` check requires; a v2 token (`version="2.0"`: what Entra issues for an API
whose app registration sets `accessTokenAcceptedVersion: 2`) carries
`{authority}/{tenant}/v2.0`. The signing key can be rotated: the JWKS then lists the new
key and the old ones (as Entra publishes several), and tokens name theirs by `kid`.

Expiry is checked against real time, not the twin's movable clock: clients cache tokens
by real time, and moving the estate's clock (key ages, secret expiry) must not log
everybody out.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

TOKEN_LIFETIME = 3600


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenError(Exception):
    """Why a bearer token was refused; the message goes into the 401 body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Principal:
    client_id: str
    object_id: str
    display_name: str
    roles: tuple[str, ...] = ()


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


VERIFIED_CACHE = 1024  # verified tokens remembered (the twin serves a handful of principals)


class TokenIssuer:
    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.issuer = f"https://sts.windows.net/{tenant_id}/"
        # kid -> key; the last one signs. Rotation keeps the old ones in the JWKS.
        self._keys: dict[str, rsa.RSAPrivateKey] = {uuid.uuid4().hex: _new_key()}
        # Tokens whose signature and issuer were verified -> their claims. A client sends the
        # same token for an hour; checking its RS256 signature (and PyJWT's base64 checks)
        # on each of a large scan's requests made the twin, not the client, the bottleneck.
        # Time (exp/nbf) and audience are still checked on every request.
        self._verified: dict[str, Mapping[str, Any]] = {}

    @property
    def kid(self) -> str:
        return next(reversed(self._keys))

    @property
    def _key(self) -> rsa.RSAPrivateKey:
        return self._keys[self.kid]

    def rotate(self) -> str:
        """Sign with a new key from now on (the JWKS keeps the old ones); returns its kid."""
        kid = uuid.uuid4().hex
        self._keys[kid] = _new_key()
        self._verified.clear()
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self._keys.items():
            numbers = key.public_key().public_numbers()
            keys.append(
                {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": _b64(numbers.n), "e": _b64(numbers.e)}
            )
        return {"keys": keys}

    def v2_issuer(self, login_url: str) -> str:
        return f"{login_url.rstrip('/')}/{self.tenant_id}/v2.0"

    def mint(
        self,
        principal: Principal,
        audience: str,
        *,
        lifetime: int = TOKEN_LIFETIME,
        v2_issuer: str | None = None,
        unsigned: bool = False,
        foreign_key: bool = False,
        **overrides: Any,
    ) -> str:
        """A token for `audience`. `v2_issuer`: a v2 token (that issuer, `azp`, no `appid`).
        `unsigned`: `alg: none` and no signature; `foreign_key`: signed by a key the JWKS
        does not list, under this issuer's current kid (a forgery). `overrides` win."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "oid": principal.object_id,
            "sub": principal.object_id,
            "appid": principal.client_id,
            "appidacr": "1",
            "tid": self.tenant_id,
            "idtyp": "app",
            "ver": "1.0",
            "roles": list(principal.roles),
            "uti": uuid.uuid4().hex,
        }
        if v2_issuer is not None:
            for v1_only in ("appid", "appidacr"):
                del claims[v1_only]
            claims.update(iss=v2_issuer, ver="2.0", azp=principal.client_id, azpacr="1")
        claims.update(overrides)
        # A claim overridden with None is left out (a token without `roles`, `oid`, ...).
        claims = {name: value for name, value in claims.items() if value is not None}
        if unsigned:
            return jwt.encode(claims, "", algorithm="none")
        key = _new_key() if foreign_key else self._key
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": self.kid})

    def verify(self, authorization: str | None, audiences: Iterable[str]) -> Mapping[str, Any]:
        """Check an Authorization header; return the claims or raise TokenError."""
        if not authorization:
            raise TokenError("AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise TokenError(
                "InvalidAuthenticationToken", "The 'Authorization' header must be of the form 'Bearer <token>'."
            )
        allowed = [a.rstrip("/") for a in audiences]
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify_signed(token)
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()
            self._verified[token] = claims
        else:
            now = time.time()
            if now >= float(claims["exp"]):
                raise TokenError("ExpiredAuthenticationToken", "The access token expiry UTC time is in the past.")
            if now < float(claims["nbf"]):
                raise TokenError("InvalidAuthenticationToken", "The access token is not yet valid (nbf).")
        audience = str(claims.get("aud", "")).rstrip("/")
        if audience not in allowed:
            raise TokenError(
                "InvalidAuthenticationTokenAudience",
                f"The access token has been obtained for wrong audience or resource '{claims.get('aud')}'. "
                f"It should exactly match with one of the allowed audiences {allowed}.",
            )
        return claims

    def _verify_signed(self, token: str) -> Mapping[str, Any]:
        """Signature, algorithm, issuer, required claims and time, by PyJWT."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as error:
            raise TokenError("InvalidAuthenticationToken", f"The access token is invalid: {error}.") from error
        key = self._keys.get(str(kid), self._key)
        try:
            claims: Mapping[str, Any] = jwt.decode(
                token,
                key.public_key(),
                algorithms=["RS256"],
                issuer=self.issuer,
                options={"require": ["exp", "nbf", "iat", "aud", "iss"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as error:
            raise TokenError(
                "ExpiredAuthenticationToken", "The access token expiry UTC time is in the past."
            ) from error
        except jwt.ImmatureSignatureError as error:
            raise TokenError("InvalidAuthenticationToken", "The access token is not yet valid (nbf).") from error
        except jwt.InvalidIssuerError as error:
            raise TokenError(
                "InvalidAuthenticationTokenTenant", "The access token is from the wrong issuer."
            ) from error
        except jwt.InvalidSignatureError as error:
            raise TokenError("InvalidAuthenticationToken", "The access token signature is invalid.") from error
        except jwt.PyJWTError as error:
            raise TokenError("InvalidAuthenticationToken", f"The access token is invalid: {error}.") from error
        return claims
