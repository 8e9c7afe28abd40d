"""Entra ID access tokens for the HTTP API: who is calling, checked against the authority.

`TokenValidator.validate(authorization)` accepts a bearer token only when

- it is a JWT signed with RS256 (nothing else: `alg: none`, HS256 and every other
  algorithm are refused before a key is looked at) by a key the tenant publishes. Keys come
  from the `jwks_uri` of the tenant's OpenID configuration at `APIMR_AUTHORITY_HOST`, are
  cached for `keys_ttl` and fetched again when a token names a `kid` the cache lacks (Entra
  rolls its keys), at most once per `refresh_interval` so junk kids cannot make the product
  hammer the authority;
- its issuer is the configured tenant's, in the form its version uses. Entra issues v1
  tokens (`iss` = `https://sts.windows.net/{tenant}/`, `appid`) or v2 tokens (`iss` =
  `{authority}/{tenant}/v2.0`, `azp`) depending on the API app registration's
  `accessTokenAcceptedVersion`, not on the caller, so both are accepted; each issuer is
  read from the authority's own v1 and v2 OpenID documents (right in every cloud), and a
  token must carry the one that matches its `ver`. `tid` must be the tenant too;
- its audience is `APIMR_API_AUDIENCE` (the App ID URI for v1 tokens, the client id for v2);
- it is within `exp`/`nbf` with `leeway` seconds for clock skew;
- it names the caller: `oid`, and `appid` (v1) or `azp` (v2).

App roles (the `roles` claim) nest: `Remediator.Admin` includes `Remediator.Operate`, which
includes `Remediator.Read`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import jwt

from shared.errors import RemediatorError, TransientError
from shared.settings import ApiSettings

KEYS_TTL = 3600.0  # seconds the signing keys are trusted before they are fetched again
REFRESH_INTERVAL = 60.0  # at most one fetch for an unknown kid per this many seconds
LEEWAY = 60.0  # clock skew allowed on exp and nbf, seconds
FETCH_TIMEOUT = 10.0

Fetch = Callable[[str], Awaitable[Mapping[str, Any]]]


class Role(StrEnum):
    READ = "Remediator.Read"
    OPERATE = "Remediator.Operate"
    ADMIN = "Remediator.Admin"


# What each role grants: a role includes the ones below it.
_GRANTS: dict[Role, frozenset[Role]] = {
    Role.READ: frozenset({Role.READ}),
    Role.OPERATE: frozenset({Role.READ, Role.OPERATE}),
    Role.ADMIN: frozenset({Role.READ, Role.OPERATE, Role.ADMIN}),
}


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of the API."""

    object_id: str  # oid: the calling principal
    app_id: str  # appid (v1) or azp (v2): the calling application
    tenant_id: str
    roles: frozenset[str]
    token_version: str

    def has(self, role: Role) -> bool:
        known = {r.value for r in Role}
        return any(role in _GRANTS[Role(r)] for r in self.roles if r in known)

    @property
    def trigger_detail(self) -> str:
        """What the journal records as the trigger of a change this caller asked for."""
        return f"oid={self.object_id} appid={self.app_id}"


class AuthError(RemediatorError):
    """The request carries no acceptable token: HTTP 401 with a WWW-Authenticate challenge."""

    def __init__(self, description: str, *, missing: bool = False) -> None:
        super().__init__(description)
        self.description = description
        self.missing = missing  # RFC 6750: no error code when the request had no token at all

    def challenge(self, realm: str) -> str:
        if self.missing:
            return f'Bearer realm="{realm}"'
        safe = self.description.replace("\\", "").replace('"', "'")
        return f'Bearer realm="{realm}", error="invalid_token", error_description="{safe}"'


@dataclass(frozen=True)
class _Keys:
    keys: Mapping[str, Any]  # kid -> public key
    issuers: Mapping[str, str]  # token version ("1.0", "2.0") -> issuer
    fetched_at: float


class SigningKeys:
    """The tenant's issuers and signing keys, from the authority's OpenID documents, cached."""

    def __init__(
        self,
        authority_host: str,
        tenant_id: str,
        fetch: Fetch,
        *,
        ttl: float = KEYS_TTL,
        refresh_interval: float = REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = f"{authority_host.rstrip('/')}/{tenant_id}"
        self.tenant_id = tenant_id
        self._fetch = fetch
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._cached: _Keys | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def _load(self) -> _Keys:
        v2 = await self._fetch(f"{self.base}/v2.0/.well-known/openid-configuration")
        v1 = await self._fetch(f"{self.base}/.well-known/openid-configuration")
        issuers = {}
        for version, document in (("1.0", v1), ("2.0", v2)):
            issuer = str(document.get("issuer", "")).replace("{tenantid}", self.tenant_id)
            if not issuer:
                raise TransientError(f"the authority's v{version[0]} OpenID configuration names no issuer")
            issuers[version] = issuer
        jwks = await self._fetch(str(v2.get("jwks_uri") or f"{self.base}/discovery/v2.0/keys"))
        keys: dict[str, Any] = {}
        for entry in jwks.get("keys", []):
            if not isinstance(entry, Mapping) or entry.get("kty") != "RSA" or not entry.get("kid"):
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                keys[str(entry["kid"])] = jwt.PyJWK(dict(entry), algorithm="RS256").key
            except jwt.PyJWTError:
                continue  # a key we cannot use is simply not trusted
        self.fetches += 1
        return _Keys(keys=keys, issuers=issuers, fetched_at=self._clock())

    async def current(self, kid: str | None = None) -> _Keys:
        """The cached keys; fetched when stale, or when `kid` is unknown and the last fetch
        is older than the refresh interval."""
        async with self._lock:
            cached = self._cached
            now = self._clock()
            stale = cached is None or now - cached.fetched_at >= self.ttl
            unknown = cached is not None and kid is not None and kid not in cached.keys
            if stale or (unknown and cached is not None and now - cached.fetched_at >= self.refresh_interval):
                self._cached = cached = await self._load()
            assert cached is not None
            return cached


class TokenValidator:
    """Checks the API's bearer tokens (see the module docstring for exactly what)."""

    def __init__(self, api: ApiSettings, keys: SigningKeys, *, leeway: float = LEEWAY) -> None:
        self.audience = api.audience
        self.tenant_id = api.tenant_id
        self.keys = keys
        self.leeway = leeway

    async def validate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise AuthError("a bearer token is required", missing=True)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise AuthError("the token is not a JWT") from error
        if header.get("alg") != "RS256":
            raise AuthError(f"the token's algorithm {str(header.get('alg'))[:16]!r} is not accepted (RS256 only)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("the token names no signing key (kid)")
        known = await self.keys.current(kid)
        key = known.keys.get(kid)
        if key is None:
            raise AuthError("the token is signed with a key the tenant does not publish")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=list(known.issuers.values()),
                leeway=self.leeway,
                options={"require": ["exp", "nbf", "iat", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise AuthError("the token has expired") from error
        except jwt.ImmatureSignatureError as error:
            raise AuthError("the token is not valid yet (nbf)") from error
        except jwt.InvalidAudienceError as error:
            raise AuthError("the token is for another audience") from error
        except jwt.InvalidIssuerError as error:
            raise AuthError("the token is from another issuer") from error
        except jwt.InvalidSignatureError as error:
            raise AuthError("the token's signature does not verify") from error
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(f"the token lacks the {error.claim!r} claim") from error
        except jwt.PyJWTError as error:
            raise AuthError("the token is malformed") from error
        version = str(claims.get("ver", "1.0"))
        if known.issuers.get(version) != claims["iss"]:
            raise AuthError("the token's issuer does not match its version")
        if str(claims.get("tid", "")).lower() != self.tenant_id.lower():
            raise AuthError("the token is from another tenant")
        app_id = claims.get("azp") if version == "2.0" else claims.get("appid")
        object_id = claims.get("oid")
        if not isinstance(object_id, str) or not object_id or not isinstance(app_id, str) or not app_id:
            raise AuthError("the token does not name the calling principal (oid) and application")
        roles = claims.get("roles", [])
        if not isinstance(roles, list):
            raise AuthError("the token's roles claim is malformed")
        return Caller(
            object_id=object_id,
            app_id=app_id,
            tenant_id=self.tenant_id,
            roles=frozenset(str(r) for r in roles),
            token_version=version,
        )


def https_fetcher(context: ssl.SSLContext, *, timeout: float = FETCH_TIMEOUT) -> Fetch:
    """GET a JSON document over HTTPS with `context` (system store plus APIMR_CA_BUNDLE).

    A session per fetch: fetches are rare (cached keys), and a session is bound to the
    event loop it was made on. A failure is transient: the API answers 503, never 401, since
    the caller's token was not judged."""

    async def fetch(url: str) -> Mapping[str, Any]:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.get(url, ssl=context, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise TransientError(f"the authority answered {response.status} for its metadata")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise TransientError(f"the authority's metadata could not be read ({type(error).__name__})") from error
        if not isinstance(body, Mapping):
            raise TransientError("the authority's metadata is not a JSON object")
        return body

    return fetch
