"""Key rotation through Key Vault (the dual-key scheme of the design): NOT BUILT YET.

Issue 12 builds it. Until then the Event Grid events that will start a rotation —
Key Vault `SecretNearExpiry` / `SecretExpired`, APIM `SubscriptionCreated` /
`GatewayTokenNearExpiry` — are routed here so the routing is real and tested, and this
stub says plainly, in one structured log event per event, that nothing was rotated. It
never reports success: its outcome is `not_built`.

Azure actions: none yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LOG = logging.getLogger("apim_remediator.rotate_keys")
ISSUE = "issue 12"


@dataclass(frozen=True)
class RotationRequest:
    event_id: str
    event_type: str
    subject: str  # the secret name (Key Vault) or "/subscriptions/{sid}" (APIM)
    source: str  # the event's topic: the vault's or the APIM service's ARM id


@dataclass(frozen=True)
class RotationOutcome:
    status: str  # "not_built" until issue 12 lands
    detail: str


async def rotation_requested(request: RotationRequest) -> RotationOutcome:
    """Log that a rotation was asked for and that rotation does not exist yet."""
    detail = (
        f"key rotation is not built yet ({ISSUE}): {request.event_type} for {request.subject!r} "
        f"from {request.source!r} was received and acknowledged; nothing was rotated"
    )
    LOG.warning(
        "%s",
        detail,
        extra={
            "event": "rotation.not_built",
            "event_id": request.event_id,
            "event_type": request.event_type,
            "resource_id": request.source,
            "subject": request.subject,
            "issue": ISSUE,
        },
    )
    return RotationOutcome(status="not_built", detail=detail)
