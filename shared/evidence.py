"""What a fix that can cut callers off must have seen before it acts: evidence for planning.

A precondition read from the snapshot says a fix is possible; evidence says it is safe:
gateway logs show a subscription key unused for N days (KEY-001), a TLS handshake shows
a backend's certificate validates (API-003). The engine gathers it before planning, through
the narrow `EvidenceSource` protocol (production: `shared.evidence_source`), and hands it to
the planners inside `PlanContext`; planners stay pure and refuse when what they need is
missing. Nothing here holds a secret: no key, and backend URLs only as scheme://host:port.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.model import Finding, Snapshot


@dataclass(frozen=True)
class KeyUsage:
    """What gateway logs say about one APIM subscription's key over the last `window_days`.

    `missing` says which evidence could not be had (no workspace receives gateway logs, a
    query failed, ...); when it is set the counts prove nothing.
    """

    subscription_id: str  # ARM id of the APIM subscription
    sid: str  # its name: what ApiManagementGatewayLogs.ApimSubscriptionId holds
    window_days: int
    workspaces: tuple[str, ...] = ()  # names of the workspaces queried
    uses: int = 0  # gateway requests made with this subscription in the window
    last_used: datetime | None = None
    service_rows: int = 0  # gateway log rows of the whole service in the window: logs arrive at all
    logs_since: datetime | None = None  # the oldest gateway log row of the service in the window
    queried_at: datetime | None = None  # the workspace's now() when the query ran
    missing: str | None = None


@dataclass(frozen=True)
class TlsProbe:
    """A TLS handshake from the product to one backend, verifying chain and host name."""

    backend_id: str
    target: str  # scheme://host:port only: never userinfo, path or query (they may carry secrets)
    ok: bool
    problem: str | None = None  # expired | self-signed | untrusted issuer | name mismatch | unreachable ...


@dataclass(frozen=True)
class VaultVersion:
    """What Key Vault holds for one Key Vault-linked APIM certificate (CERT-003): when its
    newest enabled version was created. Metadata only: the certificate itself is never read.

    `missing` says why it is unknown (no access, no such secret, a pinned version, ...); when
    it is set nothing is proven.
    """

    certificate_id: str  # the APIM certificate's ARM id
    secret_id: str  # keyVault.secretIdentifier as the certificate names it
    newest_created: datetime | None = None
    missing: str | None = None


@dataclass(frozen=True)
class PlanEvidence:
    """Evidence gathered for one run's chosen findings (empty: nothing was gathered)."""

    key_usage: tuple[KeyUsage, ...] = ()
    tls_probes: tuple[TlsProbe, ...] = ()
    vault_versions: tuple[VaultVersion, ...] = ()

    def vault_version_of(self, certificate_id: str) -> VaultVersion | None:
        wanted = certificate_id.strip().lower()
        return next((v for v in self.vault_versions if v.certificate_id.strip().lower() == wanted), None)

    def usage_of(self, subscription_id: str) -> KeyUsage | None:
        wanted = subscription_id.strip().lower()
        return next((u for u in self.key_usage if u.subscription_id.strip().lower() == wanted), None)

    def probe_of(self, backend_id: str) -> TlsProbe | None:
        wanted = backend_id.strip().lower()
        return next((p for p in self.tls_probes if p.backend_id.strip().lower() == wanted), None)


class EvidenceSource(Protocol):
    async def gather(
        self, snapshot: Snapshot, findings: Sequence[Finding], params: Mapping[str, Mapping[str, Any]]
    ) -> PlanEvidence:
        """Evidence for `findings` (only the rules that need any); `params` by rule id.

        Never raises for evidence it cannot get: that is recorded (`missing`, `problem`) so
        the planner refuses and says what is missing.
        """
        ...


def safe_target(url: str | None) -> str:
    """scheme://host:port of a URL, without userinfo, path or query."""
    try:
        parts = urlsplit((url or "").strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an unparseable URL)"
    scheme = (parts.scheme or "").lower()
    if not host:
        return "(a URL without a host)"
    shown = f"[{host}]" if ":" in host else host
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(scheme)
    return f"{scheme}://{shown}:{port or default}"
