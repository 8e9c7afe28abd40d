"""CERT-003: refresh an expiring Key Vault-linked certificate from the vault.

APIM re-reads a version-less Key Vault reference by itself within hours; when the vault
already holds a renewed certificate, `refreshSecret` makes APIM take it now instead of
serving the expiring copy until then. The planner acts only on evidence that Key Vault
holds a version created after APIM last read the secret (`PlanEvidence.vault_versions`,
metadata only): otherwise a refresh would read the same expiring certificate again, and it
refuses, saying to renew the certificate in Key Vault.

The spec gives Certificate_RefreshSecret no If-Match (apimcertificates.json, 2022-08-01
and later); the call changes nothing but APIM's copy of what the vault already holds, so a
concurrent change cannot be clobbered by it. Verification re-reads the certificate: its
Key Vault read must have succeeded.
"""

from __future__ import annotations

from shared.actions import (
    APIM_API_VERSION,
    ArmWrite,
    Change,
    Expectation,
    PlanContext,
    Refusal,
    RemediationPlan,
    remediation,
)
from shared.model import Finding, Snapshot


@remediation("CERT-003")
def refresh_certificate(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    cert = next((c for c in snapshot.certificates if c.id.lower() == finding.resource_id.lower()), None)

    def refuse(reason: str) -> Refusal:
        return Refusal(finding.rule_id, finding.instance_id, finding.resource_id, reason)

    if cert is None:
        return refuse("the certificate is no longer in the snapshot")
    if not cert.key_vault_secret_id:
        return refuse(f"certificate '{cert.name}' was uploaded, not linked to Key Vault: upload a renewed one")
    found = context.evidence.vault_version_of(cert.id)
    if found is None:
        return refuse("no Key Vault evidence was gathered for this certificate")
    if found.missing:
        return refuse(f"cannot tell whether Key Vault holds a renewed certificate: {found.missing}")
    last_read = cert.key_vault_last_status_time
    newest = found.newest_created
    if newest is None or last_read is None or newest <= last_read:
        when = last_read.isoformat() if last_read else "an unknown time"
        return refuse(
            f"Key Vault holds no version of the secret newer than the one APIM read at {when}: renew the "
            "certificate in Key Vault first (APIM then picks it up by itself, or this fix refreshes it)"
        )
    before = cert.expiration_date.isoformat() if cert.expiration_date else "(not set)"
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=finding.instance_id,
        resource_id=cert.id,
        summary=f"Refresh certificate '{cert.name}' from Key Vault (a version created {newest.isoformat()})",
        changes=(
            Change(
                "properties.expirationDate",
                before,
                f"that of the secret's current version in Key Vault (created {newest.isoformat()})",
            ),
        ),
        steps=(
            ArmWrite(
                method="POST",
                resource_id=f"{cert.id}/refreshSecret",
                api_version=APIM_API_VERSION,
                body=None,
                if_match=None,  # Certificate_RefreshSecret takes none
                description=f"APIM reads certificate '{cert.name}' from Key Vault again",
            ),
        ),
        expectations=(Expectation(cert.id, APIM_API_VERSION, "properties.keyVault.lastStatus.code", "Success"),),
    )
