"""CERT: certificates the instance presents or trusts must not expire unnoticed.

Three places hold certificates: the custom domains (`hostnameConfigurations`, uploaded or
synced from Key Vault), the CA certificates the gateway trusts (`properties.certificates`)
and the certificates collection (client certificates the gateway presents to backends).
Each rule reports a certificate that has expired or expires within `expiry_days` of the
scan, and a Key Vault-linked one whose last sync failed (APIM keeps serving the old copy,
so a renewed certificate in the vault never reaches the gateway).

Dates come from Azure's own reading of the certificate (`certificate.expiry`,
`expirationDate`); a certificate whose expiry Azure did not return is not judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from shared.model import Finding, Severity, Snapshot
from shared.rules import Param, References, Rule, rule

CUSTOM_DOMAIN_DOC = "https://learn.microsoft.com/azure/api-management/configure-custom-domain"
CA_DOC = "https://learn.microsoft.com/azure/api-management/api-management-howto-ca-certificates"
CLIENT_CERT_DOC = "https://learn.microsoft.com/azure/api-management/api-management-howto-mutual-certificates"
EXPIRY_DAYS = Param(
    "expiry_days",
    30,
    "report a certificate that expires within this many days of the scan (an expired one always)",
    minimum=1,
    maximum=365,
)


def _expiry(
    rule: Rule,
    snapshot: Snapshot,
    *,
    expiry: datetime | None,
    days: int,
    what: str,
    path: str,
    resource_id: str | None,
    entry: str,
    remediable: bool = False,
) -> Finding | None:
    """A finding when `expiry` is past or within `days` of the snapshot; None otherwise."""
    if expiry is None:
        return None
    now = snapshot.read_at
    shown = expiry.date().isoformat()
    if expiry <= now:
        return rule.finding(
            snapshot,
            message=f"The {what} expired on {shown}.",
            path=path,
            actual=expiry.isoformat(),
            expected=f"later than {(now + timedelta(days=days)).date().isoformat()}",
            resource_id=resource_id,
            severity=Severity.HIGH,
            entry=entry,
            remediable=remediable,
        )
    if expiry < now + timedelta(days=days):
        left = (expiry - now).days
        return rule.finding(
            snapshot,
            message=f"The {what} expires on {shown}, in {left} day(s).",
            path=path,
            actual=expiry.isoformat(),
            expected=f"later than {(now + timedelta(days=days)).date().isoformat()}",
            resource_id=resource_id,
            severity=Severity.MEDIUM,
            entry=entry,
            remediable=remediable,
        )
    return None


@rule(
    "CERT-001",
    title="Custom domain certificates should not be expired or about to expire",
    severity=Severity.HIGH,
    rationale=(
        "When the certificate of a custom domain (gateway, portal, management, SCM) expires, every client "
        "of that host name fails its TLS handshake. The rule reports each custom host name whose certificate "
        "has expired (high) or expires within `expiry_days` (medium), and each Key Vault-linked one whose "
        "last sync from the vault failed (`certificateStatus: Failed`): APIM keeps serving its old copy, so "
        "a certificate renewed in the vault never reaches the gateway. The built-in `*.azure-api.net` host "
        "names carry Microsoft's certificate and are not checked. Detect only: renew the certificate in Key "
        "Vault (APIM picks up a new version within four hours when the hostname references the secret "
        "without a version) or upload a new one."
    ),
    references=References(mcsb=("DP-7",), docs=(CUSTOM_DOMAIN_DOC,)),
    params=[EXPIRY_DAYS],
)
def custom_domain_certificates(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    days = int(params["expiry_days"])
    found: list[Finding] = []
    for host in snapshot.service.hostname_configurations:
        if (host.certificate_source or "").lower() == "builtin":
            continue
        where = f"properties.hostnameConfigurations[{host.type}:{host.host_name}]"
        what = f"certificate of custom domain {host.host_name} ({host.type})"
        expiring = _expiry(
            rule,
            snapshot,
            expiry=host.expiry,
            days=days,
            what=what,
            path=f"{where}.certificate.expiry",
            resource_id=None,
            entry=host.host_name.lower(),
        )
        if expiring is not None:
            found.append(expiring)
        if host.key_vault_id and (host.certificate_status or "").lower() == "failed":
            found.append(
                rule.finding(
                    snapshot,
                    message=(
                        f"The certificate of custom domain {host.host_name} ({host.type}) could not be synced "
                        "from Key Vault: the gateway keeps its previous copy."
                    ),
                    path=f"{where}.certificateStatus",
                    actual=host.certificate_status,
                    expected="Completed",
                    severity=Severity.HIGH,
                    entry=host.host_name.lower(),
                )
            )
    return found


@rule(
    "CERT-002",
    title="CA certificates of the instance should not be expired or about to expire",
    severity=Severity.HIGH,
    rationale=(
        "The CA certificates uploaded to the instance (`properties.certificates`, stores Root and "
        "CertificateAuthority) are what the gateway trusts when it validates backend and client certificate "
        "chains. An expired one breaks every chain that runs through it. The rule reports each one that has "
        "expired (high) or expires within `expiry_days` (medium). The Consumption tier has no CA certificate "
        "store: the rule stays silent there. Detect only: upload the renewed CA certificate."
    ),
    references=References(mcsb=("DP-7",), docs=(CA_DOC,)),
    params=[EXPIRY_DAYS],
)
def ca_certificates(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if snapshot.service.sku_name.lower() == "consumption":
        return []
    days = int(params["expiry_days"])
    found: list[Finding] = []
    for cert in snapshot.service.ca_certificates:
        label = cert.thumbprint or cert.subject or "?"
        expiring = _expiry(
            rule,
            snapshot,
            expiry=cert.expiry,
            days=days,
            what=f"CA certificate {cert.subject or label} ({cert.store_name} store)",
            path=f"properties.certificates[{label}].certificate.expiry",
            resource_id=None,
            entry=label.lower(),
        )
        if expiring is not None:
            found.append(expiring)
    return found


@rule(
    "CERT-003",
    workspace_note=("Service-level certificates only: workspace certificates are not read."),
    title="Backend client certificates should not be expired or about to expire",
    severity=Severity.HIGH,
    rationale=(
        "The certificates collection holds the client certificates the gateway presents to backends "
        "(mutual TLS). When one expires, the backend refuses the gateway and every API behind it fails. The "
        "rule reports each certificate that has expired (high) or expires within `expiry_days` (medium), and "
        "each Key Vault-linked one whose last refresh from the vault failed (`keyVault.lastStatus`), since "
        "APIM then keeps its previous copy. Remediation, for an expiring Key Vault-linked certificate that "
        "names its secret without a version: when Key Vault holds a version created after APIM last read "
        "the secret (evidence: the secret's version list, metadata only), ask APIM to refresh it now "
        "(refreshSecret) and verify the read succeeded; otherwise it refuses and says to renew the "
        "certificate in Key Vault. Uploaded certificates and failed refreshes are detect only (upload a "
        "renewed certificate; give the instance's identity access to the vault)."
    ),
    references=References(mcsb=("DP-7", "IM-8"), docs=(CLIENT_CERT_DOC,)),
    params=[EXPIRY_DAYS],
    remediable=True,
)
def client_certificates(rule: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    if not snapshot.readable("certificates"):
        return []
    days = int(params["expiry_days"])
    found: list[Finding] = []
    for cert in snapshot.certificates:
        expiring = _expiry(
            rule,
            snapshot,
            expiry=cert.expiration_date,
            days=days,
            what=f"client certificate '{cert.name}' ({cert.subject or 'no subject'})",
            path="properties.expirationDate",
            resource_id=cert.id,
            entry="",
            remediable=bool(cert.key_vault_secret_id),  # refreshable from Key Vault; uploaded: detect only
        )
        if expiring is not None:
            found.append(expiring)
        code = cert.key_vault_last_status_code
        if cert.key_vault_secret_id and code is not None and code.lower() != "success":
            found.append(
                rule.finding(
                    snapshot,
                    message=(
                        f"Client certificate '{cert.name}' could not be refreshed from Key Vault ({code}): the "
                        "gateway keeps its previous copy."
                    ),
                    path="properties.keyVault.lastStatus.code",
                    actual=code,
                    expected="Success",
                    resource_id=cert.id,
                    severity=Severity.HIGH,
                    remediable=False,
                )
            )
    return found
