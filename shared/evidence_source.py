"""The production `EvidenceSource`: gateway logs in Log Analytics for KEY-001, TLS handshakes
to backends for API-003, Key Vault secret versions for CERT-003. Every client comes from
the factory.

Key Vault versions (CERT-003): the versions of the secret a Key Vault-linked certificate
names, listed as metadata (`Microsoft.KeyVault/vaults/secrets/readMetadata/action`, in "Key
Vault Secrets User" or "Key Vault Reader" on that vault): never the certificate itself.

Key usage: the service's diagnostic settings (from the snapshot) that send GatewayLogs to a
workspace with resource-specific tables name the workspaces; ARM gives each one's customerId
(Workspaces - Get, Microsoft.OperationalInsights/workspaces/read) and one query per workspace
(Microsoft.OperationalInsights/workspaces/query/read) counts the service's gateway requests
per ApimSubscriptionId over the window. The key itself is never read.

TLS: a handshake only (no request is sent) to the backend URL's host:port, verifying chain
and host name against the system store plus APIMR_CA_BUNDLE, with bounded timeouts. The
evidence names the target as scheme://host:port: a backend URL may carry credentials
(user:password@) or a SAS (?sig=...), and neither may reach a plan, a journal or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from azure.core.exceptions import AzureError
from azure.monitor.query import LogsQueryStatus

from shared.actions.executor import ArmApi
from shared.armapi import AzureArm
from shared.azure import ClientFactory
from shared.errors import RemediatorError, error_code_and_message
from shared.evidence import KeyUsage, PlanEvidence, TlsProbe, VaultVersion, safe_target
from shared.inventory import describe_failure
from shared.model import ApimCertificate, ApimSubscription, Backend, DiagnosticSetting, Finding, Snapshot

WORKSPACE_API_VERSION = "2023-09-01"
DEFAULT_UNUSED_DAYS = 30  # KEY-001's parameter default
PROBE_TIMEOUT = 10.0  # seconds for connect + handshake to one backend
QUERY_TIMEOUT = 60  # seconds the Log Analytics service may spend on one query
# What the Log Analytics query API checks on the workspace (Azure permissions for Monitor).
QUERY_ACTION = "Microsoft.OperationalInsights/workspaces/query/read"
READ_METADATA_ACTION = "Microsoft.KeyVault/vaults/secrets/readMetadata/action"
_SECRET_ID = re.compile(r"^https://([^/]+)/secrets/([^/]+)(?:/([0-9a-fA-F]{32}))?/?$")
_GATEWAY_CATEGORIES = {"gatewaylogs"}
_GATEWAY_GROUPS = {"alllogs"}
# OpenSSL's X509_V_ERR_* codes a backend's certificate most often fails with.
_VERIFY_PROBLEMS = {
    10: "certificate expired",
    9: "certificate not yet valid",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "issuer not trusted (unable to get the local issuer certificate)",
    21: "issuer not trusted (unable to verify the first certificate)",
    62: "name mismatch (the certificate is not valid for the backend's host)",
    64: "name mismatch (the certificate is not valid for the backend's host)",  # an IP address
}


def _kql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sends_gateway_logs(setting: DiagnosticSetting) -> bool:
    return bool(setting.workspace_id) and any(
        log.enabled
        and (
            (log.category or "").lower() in _GATEWAY_CATEGORIES or (log.category_group or "").lower() in _GATEWAY_GROUPS
        )
        for log in setting.logs
    )


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    return None


class _Seen:
    """Per-subscription counts from the rows of one or more workspaces."""

    def __init__(self) -> None:
        self.rows = 0
        self.since: datetime | None = None
        self.queried_at: datetime | None = None
        self.uses: dict[str, int] = {}
        self.last: dict[str, datetime] = {}

    def add(self, sid: str, calls: int, first: datetime | None, last: datetime | None, now: datetime | None) -> None:
        key = sid.strip().lower()
        self.rows += calls
        self.uses[key] = self.uses.get(key, 0) + calls
        if first is not None:
            self.since = first if self.since is None else min(self.since, first)
        if last is not None:
            self.last[key] = max(self.last.get(key, last), last)
        if now is not None:
            self.queried_at = now if self.queried_at is None else max(self.queried_at, now)


class AzureEvidenceSource:
    """`EvidenceSource` over the factory's ARM pipeline, Logs query client and TLS context."""

    def __init__(self, factory: ClientFactory, *, arm: ArmApi | None = None, probe_timeout: float = PROBE_TIMEOUT):
        self.arm: ArmApi = arm or AzureArm(factory)
        self.factory = factory
        self.probe_timeout = probe_timeout

    async def gather(
        self, snapshot: Snapshot, findings: Sequence[Finding], params: Mapping[str, Mapping[str, Any]]
    ) -> PlanEvidence:
        key_ids = {f.resource_id.lower() for f in findings if f.rule_id == "KEY-001" and f.remediable}
        backend_ids = {f.resource_id.lower() for f in findings if f.rule_id == "API-003" and f.remediable}
        subs = [s for s in snapshot.subscriptions if s.id.lower() in key_ids]
        backends = [b for b in snapshot.backends if b.id.lower() in backend_ids]
        days = int(params.get("KEY-001", {}).get("unused_days", DEFAULT_UNUSED_DAYS))
        usage = await self.key_usage(snapshot, subs, days) if subs else ()
        probes = await asyncio.gather(*(self.probe(b) for b in backends))
        cert_ids = {f.resource_id.lower() for f in findings if f.rule_id == "CERT-003" and f.remediable}
        certs = [c for c in snapshot.certificates if c.id.lower() in cert_ids and c.key_vault_secret_id]
        versions = await asyncio.gather(*(self.vault_version(c) for c in certs))
        return PlanEvidence(key_usage=usage, tls_probes=tuple(probes), vault_versions=tuple(versions))

    # -- CERT-003: Key Vault versions ---------------------------------------------------

    async def vault_version(self, cert: ApimCertificate) -> VaultVersion:
        """When the newest enabled version of the certificate's Key Vault secret was created."""
        secret_id = cert.key_vault_secret_id or ""
        match = _SECRET_ID.match(secret_id.strip())
        if match is None:
            return VaultVersion(cert.id, secret_id, missing="keyVault.secretIdentifier is not a Key Vault secret URL")
        host, name, version = match.groups()
        if version:
            return VaultVersion(
                cert.id,
                secret_id,
                missing=f"the certificate names version {version} of the secret, so APIM never takes a newer one; "
                "point it at the secret without a version",
            )
        try:
            client = self.factory.secrets_async(f"https://{host}")
            newest: datetime | None = None
            async for props in client.list_properties_of_secret_versions(name):
                created = _utc(props.created_on)
                if props.enabled is not False and created is not None and (newest is None or created > newest):
                    newest = created
        except RemediatorError as error:
            return VaultVersion(cert.id, secret_id, missing=str(error))
        except AzureError as error:
            hint = (
                f"; the identity needs {READ_METADATA_ACTION!r} on the vault"
                if "403" in describe_failure(error)
                else ""
            )
            return VaultVersion(
                cert.id, secret_id, missing=f"listing the secret's versions failed ({describe_failure(error)}){hint}"
            )
        if newest is None:
            return VaultVersion(cert.id, secret_id, missing="the secret has no enabled version")
        return VaultVersion(cert.id, secret_id, newest_created=newest)

    # -- KEY-001: gateway logs ------------------------------------------------------------

    async def key_usage(self, snapshot: Snapshot, subs: Sequence[ApimSubscription], days: int) -> tuple[KeyUsage, ...]:
        def every(
            missing: str | None, workspaces: tuple[str, ...] = (), seen: _Seen | None = None
        ) -> tuple[KeyUsage, ...]:
            seen = seen or _Seen()
            return tuple(
                KeyUsage(
                    subscription_id=s.id,
                    sid=s.sid,
                    window_days=days,
                    workspaces=workspaces,
                    uses=seen.uses.get(s.sid.strip().lower(), 0),
                    last_used=seen.last.get(s.sid.strip().lower()),
                    service_rows=seen.rows,
                    logs_since=seen.since,
                    queried_at=seen.queried_at,
                    missing=missing,
                )
                for s in subs
            )

        if not snapshot.readable("diagnostic_settings"):
            return every(
                "the service's diagnostic settings could not be read, so no workspace is known to hold its logs."
            )
        sending = [s for s in snapshot.diagnostic_settings if _sends_gateway_logs(s)]
        dedicated = {s.workspace_id.lower(): s.workspace_id for s in sending if s.workspace_id and _dedicated(s)}
        if not dedicated:
            if sending:
                return every(
                    "the service sends GatewayLogs only to the AzureDiagnostics table (destination type not "
                    "resource-specific); the product reads ApiManagementGatewayLogs. Set the diagnostic setting's "
                    "destination table to resource-specific."
                )
            return every(
                "no diagnostic setting sends the service's GatewayLogs to a Log Analytics workspace (LOG-001 adds "
                "one); without gateway logs nothing shows who still calls with the key."
            )
        seen = _Seen()
        problems: list[str] = []
        queried: list[str] = []
        for workspace_id in dedicated.values():
            problem = await self._query_workspace(workspace_id, snapshot.service.id, days, seen)
            if problem:
                problems.append(problem)
            else:
                queried.append(_name(workspace_id))
        return every("; ".join(problems) or None, tuple(queried), seen)

    async def _query_workspace(self, workspace_id: str, service_id: str, days: int, seen: _Seen) -> str | None:
        """Add the service's gateway requests per subscription to `seen`; a problem, or None."""
        name = _name(workspace_id)
        try:
            response = await self.arm.send("GET", workspace_id, WORKSPACE_API_VERSION)
        except RemediatorError as error:
            return f"reading workspace {name} failed ({error})"
        body = response.body if isinstance(response.body, dict) else {}
        customer_id = (body.get("properties") or {}).get("customerId") if response.status < 400 else None
        if not customer_id:
            code, error_message = error_code_and_message(body)
            code = code or "no customerId"
            # ARM's AuthorizationFailed names the action the identity lacks: keep it.
            refused = code in ("AuthorizationFailed", "LinkedAuthorizationFailed") and error_message
            message = f": {error_message[:1000]}" if refused else ""
            return f"reading workspace {name} failed ({response.status} {code}{message})"
        query = (
            "ApiManagementGatewayLogs\n"
            f"| where _ResourceId =~ {_kql_string(service_id)}\n"
            "| summarize calls = count(), first_seen = min(TimeGenerated), last_seen = max(TimeGenerated)"
            " by ApimSubscriptionId\n"
            "| extend queried_at = now()"
        )
        try:
            result = await self.factory.logs_async().query_workspace(
                str(customer_id), query, timespan=timedelta(days=days), server_timeout=QUERY_TIMEOUT
            )
        except AzureError as error:
            first_line = (str(error).splitlines() or [""])[0][:200]
            hint = ""
            if "InsufficientAccessError" in str(error):
                # Log Analytics does not say which action it checked; the product knows it.
                hint = f"; the identity needs {QUERY_ACTION!r} on the workspace"
            return f"querying workspace {name} failed ({type(error).__name__}: {first_line}){hint}"
        if result.status != LogsQueryStatus.SUCCESS:
            # A partial result is not evidence of absence.
            return f"querying workspace {name} returned a partial result"
        for table in result.tables:
            for row in table.rows:
                cells = dict(zip(table.columns, row, strict=False))
                seen.add(
                    str(cells.get("ApimSubscriptionId") or ""),
                    int(cells.get("calls") or 0),
                    _utc(cells.get("first_seen")),
                    _utc(cells.get("last_seen")),
                    _utc(cells.get("queried_at")),
                )
        return None

    # -- API-003: TLS handshakes --------------------------------------------------------

    async def probe(self, backend: Backend) -> TlsProbe:
        target = safe_target(backend.url)
        try:
            parts = urlsplit(backend.url or "")
            host, port = parts.hostname, parts.port or 443
        except ValueError:
            return TlsProbe(backend.id, target, ok=False, problem="the backend URL could not be parsed")
        if parts.scheme.lower() != "https" or not host:
            return TlsProbe(backend.id, target, ok=False, problem="not an https URL with a host")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=self.factory.tls_probe_context(),
                    server_hostname=host,
                    ssl_handshake_timeout=self.probe_timeout,
                ),
                timeout=self.probe_timeout,
            )
        except ssl.SSLCertVerificationError as error:
            problem = _VERIFY_PROBLEMS.get(error.verify_code, f"certificate did not verify ({error.verify_message})")
            return TlsProbe(backend.id, target, ok=False, problem=problem)
        except ssl.SSLError as error:
            return TlsProbe(
                backend.id, target, ok=False, problem=f"TLS handshake failed ({error.reason or 'SSLError'})"
            )
        except TimeoutError:
            return TlsProbe(
                backend.id, target, ok=False, problem=f"unreachable (no handshake in {self.probe_timeout:g} s)"
            )
        except OSError as error:
            reason = error.strerror or type(error).__name__
            return TlsProbe(backend.id, target, ok=False, problem=f"unreachable ({reason})")
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):  # verified; how the close goes does not matter
            await asyncio.wait_for(writer.wait_closed(), timeout=self.probe_timeout)
        return TlsProbe(backend.id, target, ok=True)


def _dedicated(setting: DiagnosticSetting) -> bool:
    return (setting.destination_type or "").lower() == "dedicated"
