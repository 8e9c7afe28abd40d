"""KEY-002/003/004: onboard, rotate or restore a subscription key through the Key Vault ledger.

These plans are not ARM requests: each is one key rotation (`shared/rotation.py`), which the
engine hands to its `Rotator` under the instance lease, and which takes the subscription's
own lease and journals each of its steps before it runs. The plan lists one `RotateKey` per
write it will make, so the dry run says what happens and the write budget counts it.
Planners are pure: they read the snapshot's ledger and keyed key hashes, never a key.
"""

from __future__ import annotations

from shared.actions import Change, PlanContext, Refusal, RemediationPlan, RotateKey, remediation
from shared.model import Finding, KeyHashes, Snapshot, TrackedKey
from shared.rotation import SLOT_TAG, SUBSCRIPTION_TAG, ledger_secret_name, other, subscription_parts

_SLOTS = ("primary", "secondary")


def _tracked(snapshot: Snapshot, subscription_id: str) -> list[TrackedKey]:
    return [k for k in snapshot.key_ledger if k.subscription_id.lower() == subscription_id.lower()]


def _hashes(snapshot: Snapshot, subscription_id: str) -> KeyHashes | None:
    return next((h for h in snapshot.key_hashes if h.subscription_id.lower() == subscription_id.lower()), None)


def _no_vault(finding: Finding) -> Refusal:
    return Refusal(
        finding.rule_id,
        finding.instance_id,
        finding.resource_id,
        "key rotation needs the key-ledger vault: set APIMR_KEY_VAULT_URL",
    )


def _rotation_plan(
    finding: Finding, key: TrackedKey, snapshot: Snapshot, context: PlanContext
) -> RemediationPlan | Refusal:
    """Rotate (restoring first when the copy matches neither key); refuse a mislabelled tag."""
    slot = key.slot.strip().lower()
    if slot not in _SLOTS:
        return Refusal(
            finding.rule_id,
            finding.instance_id,
            finding.resource_id,
            f"Key Vault secret '{key.secret_name}' has {SLOT_TAG}={key.slot or '(empty)'}: set primary or secondary",
        )
    hashes = _hashes(snapshot, finding.resource_id)
    holds = None
    if hashes is not None and key.value_hash:
        holds = next((s for s in _SLOTS if getattr(hashes, s) == key.value_hash), "neither")
    if holds not in (None, "neither", slot):
        return Refusal(
            finding.rule_id,
            finding.instance_id,
            finding.resource_id,
            f"the vault copy in '{key.secret_name}' is APIM's {holds} key but is tagged {SLOT_TAG}={slot}: rotating "
            f"would regenerate the key clients use; correct the tag to {holds}, then the next run rotates",
        )
    target = other(slot)
    sub = finding.resource_id
    steps: list[RotateKey] = []
    if holds == "neither":
        steps.append(
            RotateKey(
                sub, "rotate", key.secret_name, f"store APIM's {slot} key in '{key.secret_name}' (restore service)"
            )
        )
    steps += [
        RotateKey(
            sub, "rotate", key.secret_name, f"POST {sub}/regenerate{target.capitalize()}Key (the slot not in use)"
        ),
        RotateKey(
            sub, "rotate", key.secret_name, f"store APIM's {target} key as the new version of '{key.secret_name}'"
        ),
    ]
    verb = "Restore, then rotate" if holds == "neither" else "Rotate"
    max_age = context.params.get("max_age_days")
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=finding.instance_id,
        resource_id=sub,
        summary=f"{verb} the key of subscription {sub.rsplit('/', 1)[-1]}",
        changes=(
            Change(f"keyVault.secrets['{key.secret_name}'].tags.{SLOT_TAG}", slot, target),
            Change(
                f"keyVault.secrets['{key.secret_name}'].value",
                f"APIM's {slot} key" if holds != "neither" else "a key APIM rejects",
                f"APIM's new {target} key" + (f" (expires in {max_age} days)" if max_age else ""),
            ),
        ),
        steps=tuple(steps),
        expectations=(),
    )


@remediation("KEY-002")
def onboard_key(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    if context.key_vault_url is None:
        return _no_vault(finding)
    service_id, sid = subscription_parts(finding.resource_id)
    name = ledger_secret_name(service_id.rsplit("/", 1)[1], sid, finding.resource_id)
    return RemediationPlan(
        rule_id=finding.rule_id,
        instance_id=finding.instance_id,
        resource_id=finding.resource_id,
        summary=f"Track the key of subscription {sid} in the Key Vault ledger",
        changes=(
            Change(
                f"keyVault.secrets['{name}']",
                "(none)",
                f"APIM's primary key, tagged {SUBSCRIPTION_TAG} and {SLOT_TAG}=primary",
            ),
        ),
        steps=(RotateKey(finding.resource_id, "onboard", name, f"store APIM's primary key as '{name}'"),),
        expectations=(),
    )


@remediation("KEY-004")
def restore_key(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    if context.key_vault_url is None:
        return _no_vault(finding)
    tracked = _tracked(snapshot, finding.resource_id)
    if len(tracked) != 1:
        return Refusal(
            finding.rule_id,
            finding.instance_id,
            finding.resource_id,
            f"{len(tracked)} Key Vault secrets track this subscription: which one clients read is ambiguous",
        )
    return _rotation_plan(finding, tracked[0], snapshot, context)


@remediation("KEY-003", depends_on=("KEY-004",))
def rotate_key(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
    if context.key_vault_url is None:
        return _no_vault(finding)
    tracked = _tracked(snapshot, finding.resource_id)
    if len(tracked) != 1:
        return Refusal(
            finding.rule_id,
            finding.instance_id,
            finding.resource_id,
            f"{len(tracked)} Key Vault secrets track this subscription: which one clients read is ambiguous",
        )
    return _rotation_plan(finding, tracked[0], snapshot, context)
