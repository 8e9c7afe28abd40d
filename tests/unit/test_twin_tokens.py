"""The twin's bearer-token check remembers tokens it verified (a scan sends one token
thousands of times) without becoming laxer: expiry and audience are judged on every
request, a forged or unsigned token is never remembered, and rotation starts over."""

from __future__ import annotations

import pytest

import twin.tokens as tokens
from twin.tokens import Principal, TokenError, TokenIssuer

ARM = "https://management.azure.com"
PRODUCT = Principal(client_id="c1", object_id="o1", display_name="product")


def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = TokenIssuer("t1")
    token = issuer.mint(PRODUCT, ARM, lifetime=600)
    assert issuer.verify(f"Bearer {token}", [ARM])["oid"] == "o1"
    assert issuer.verify(f"Bearer {token}", [ARM])["oid"] == "o1"
    later = tokens.time.time() + 601
    monkeypatch.setattr(tokens.time, "time", lambda: later)
    with pytest.raises(TokenError) as expired:
        issuer.verify(f"Bearer {token}", [ARM])
    assert expired.value.code == "ExpiredAuthenticationToken"


def test_a_remembered_token_is_checked_for_its_audience_each_time() -> None:
    issuer = TokenIssuer("t1")
    token = issuer.mint(PRODUCT, ARM)
    issuer.verify(f"Bearer {token}", [ARM])
    with pytest.raises(TokenError) as wrong:
        issuer.verify(f"Bearer {token}", ["https://vault.azure.net"])
    assert wrong.value.code == "InvalidAuthenticationTokenAudience"


@pytest.mark.parametrize("forged", [{"unsigned": True}, {"foreign_key": True}])
def test_forged_tokens_are_refused_every_time(forged: dict[str, bool]) -> None:
    issuer = TokenIssuer("t1")
    token = issuer.mint(PRODUCT, ARM, **forged)
    for _ in range(2):
        with pytest.raises(TokenError):
            issuer.verify(f"Bearer {token}", [ARM])


def test_rotation_keeps_old_tokens_valid_and_forgets_what_it_verified() -> None:
    issuer = TokenIssuer("t1")
    token = issuer.mint(PRODUCT, ARM)
    issuer.verify(f"Bearer {token}", [ARM])
    issuer.rotate()
    assert issuer.verify(f"Bearer {token}", [ARM])["oid"] == "o1", "the JWKS keeps the old key"
    fresh = issuer.mint(PRODUCT, ARM)
    assert issuer.verify(f"Bearer {fresh}", [ARM])["oid"] == "o1"
