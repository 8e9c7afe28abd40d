"""The API's token check around its key cache, over a fake authority (documents served by a
function, a clock moved by hand): keys are cached for their TTL, fetched again for an
unknown kid at most once per refresh interval, and roles nest. Real tokens against the
twin's authority: tests/integration/test_api.py."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shared.entra import AuthError, Caller, Role, SigningKeys, TokenValidator
from shared.settings import ApiSettings

TENANT = "7a1b2c3d-0000-4000-8000-00000000a001"
AUTHORITY = "https://login.example"
AUDIENCE = "api://remediator"


def _b64(number: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes((number.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class Authority:
    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.requests: list[str] = []

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    async def fetch(self, url: str) -> Mapping[str, Any]:
        self.requests.append(url)
        base = f"{AUTHORITY}/{TENANT}"
        if url == f"{base}/v2.0/.well-known/openid-configuration":
            return {"issuer": f"{base}/v2.0", "jwks_uri": f"{base}/discovery/v2.0/keys"}
        if url == f"{base}/.well-known/openid-configuration":
            return {"issuer": f"https://sts.windows.net/{TENANT}/"}
        assert url == f"{base}/discovery/v2.0/keys", url
        keys = []
        for kid, key in self.keys.items():
            numbers = key.public_key().public_numbers()
            keys.append({"kty": "RSA", "use": "sig", "kid": kid, "n": _b64(numbers.n), "e": _b64(numbers.e)})
        return {"keys": keys}

    def token(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {"aud": AUDIENCE, "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT, "ver": "1.0",
                "iat": now, "nbf": now, "exp": now + 600, "oid": "o", "appid": "a", "roles": [], **claims}  # fmt: skip
        return jwt.encode(body, self.keys[kid], algorithm="RS256", headers={"kid": kid})


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def validator(authority: Authority, clock: Clock) -> TokenValidator:
    keys = SigningKeys(AUTHORITY, TENANT, authority.fetch, ttl=3600, refresh_interval=60, clock=clock)
    return TokenValidator(ApiSettings(audience=AUDIENCE, tenant_id=TENANT), keys)


async def test_keys_are_cached_and_an_unknown_kid_refetches_at_most_once_per_interval() -> None:
    authority, clock = Authority(), Clock()
    authority.add_key("k1")
    check = validator(authority, clock)
    await check.validate("Bearer " + authority.token("k1"))
    await check.validate("Bearer " + authority.token("k1"))
    assert check.keys.fetches == 1  # cached

    authority.add_key("k2")  # the authority rolls its keys
    with pytest.raises(AuthError, match="a key the tenant does not publish"):
        await check.validate("Bearer " + authority.token("k2"))  # within the interval: no fetch
    assert check.keys.fetches == 1
    clock.now += 61
    caller = await check.validate("Bearer " + authority.token("k2"))
    assert (check.keys.fetches, caller.object_id) == (2, "o")
    for _ in range(5):  # junk kids cannot make the product hammer the authority
        with pytest.raises(AuthError):
            await check.validate("Bearer " + jwt.encode({}, authority.keys["k1"], "RS256", headers={"kid": "junk"}))
    assert check.keys.fetches == 2
    clock.now += 3600  # past the TTL: fetched again even for a known kid
    await check.validate("Bearer " + authority.token("k1"))
    assert check.keys.fetches == 3


async def test_a_token_without_a_kid_or_with_a_symmetric_algorithm_fetches_nothing() -> None:
    authority, clock = Authority(), Clock()
    authority.add_key("k1")
    check = validator(authority, clock)
    with pytest.raises(AuthError, match="RS256 only"):
        await check.validate("Bearer " + jwt.encode({"aud": AUDIENCE}, "secret-" * 8, "HS256", headers={"kid": "k1"}))
    with pytest.raises(AuthError, match="names no signing key"):
        await check.validate("Bearer " + jwt.encode({"aud": AUDIENCE}, authority.keys["k1"], "RS256"))
    assert authority.requests == []


def test_roles_nest_and_unknown_roles_grant_nothing() -> None:
    def caller(*roles: str) -> Caller:
        return Caller("o", "a", TENANT, frozenset(roles), "1.0")

    assert [caller(Role.ADMIN.value).has(r) for r in Role] == [True, True, True]
    assert [caller(Role.OPERATE.value).has(r) for r in Role] == [True, True, False]
    assert [caller(Role.READ.value).has(r) for r in Role] == [True, False, False]
    assert [caller("Remediator.Root", "admin").has(r) for r in Role] == [False, False, False]
    assert caller().trigger_detail == "oid=o appid=a"
