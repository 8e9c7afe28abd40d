"""Signing and checking the twin's access tokens (RS256 JWTs, like Entra ID v1 app tokens).

Tokens carry iss/aud/exp/nbf/iat/oid/appid/tid/roles. The issuer is the v1 form
`https://sts.windows.net/{tenant}/`, which is what ARM tokens carry and what Azurite's
`--oauth basic` check requires. Expiry is checked against real time, not the twin's
movable clock: clients cache tokens by real time, and moving the estate's clock (key
ages, secret expiry) must not log everybody out.
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


class TokenIssuer:
    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self.issuer = f"https://sts.windows.net/{tenant_id}/"
        self.kid = uuid.uuid4().hex
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        numbers = self._key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self.kid,
                    "n": _b64(numbers.n),
                    "e": _b64(numbers.e),
                }
            ]
        }

    def mint(self, principal: Principal, audience: str, *, lifetime: int = TOKEN_LIFETIME, **overrides: Any) -> str:
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
            "azp": principal.client_id,
            "tid": self.tenant_id,
            "idtyp": "app",
            "ver": "1.0",
            "roles": list(principal.roles),
            "uti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

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
        try:
            claims: Mapping[str, Any] = jwt.decode(
                token,
                self._key.public_key(),
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
        audience = str(claims.get("aud", "")).rstrip("/")
        if audience not in allowed:
            raise TokenError(
                "InvalidAuthenticationTokenAudience",
                f"The access token has been obtained for wrong audience or resource '{claims.get('aud')}'. "
                f"It should exactly match with one of the allowed audiences {allowed}.",
            )
        return claims
