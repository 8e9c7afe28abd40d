"""Who the product is: the object id of its own identity, read from its own access token.

The Event Grid path must recognise the product's own ARM writes (their events carry the
caller's claims) so they start nothing. The object id is not configured: it is the `oid`
claim of a token the product's credential obtains anyway (managed identity in Azure, a
service principal locally), so it always matches the identity that actually writes, system-
or user-assigned, and cannot drift from a setting someone forgot to update.

The token is only read, not verified: it came from the token endpoint over TLS to the
credential that asked for it, and nothing is granted on its strength here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from azure.core.credentials_async import AsyncTokenCredential

from shared.errors import PermanentError, TransientError

_GUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$")


def normalise_object_id(value: object) -> str | None:
    """An object id as 32 lowercase hex digits (Event Grid's `principalId` has no dashes,
    the `oid` claim has them), or None when it is not one."""
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    return lowered.replace("-", "") if _GUID.match(lowered) else None


def token_object_id(token: str) -> str:
    """The `oid` claim of a JWT access token, normalised (see normalise_object_id)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise PermanentError("the product's access token is not a JWT: its object id cannot be read")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error) as exc:
        raise PermanentError(f"the product's access token has an unreadable payload ({type(exc).__name__})") from None
    oid = normalise_object_id(claims.get("oid") if isinstance(claims, dict) else None)
    if oid is None:
        raise PermanentError("the product's access token carries no object id ('oid' claim)")
    return oid


async def own_object_id(credential: AsyncTokenCredential, scope: str) -> str:
    """The product identity's object id, from a token for `scope` (ARM's)."""
    from azure.core.exceptions import ClientAuthenticationError

    try:
        token = await credential.get_token(scope)
    except ClientAuthenticationError as exc:
        raise TransientError(f"could not get the product's own token ({type(exc).__name__})") from exc
    return token_object_id(token.token)
