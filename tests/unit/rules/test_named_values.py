"""SEC rules: secrets in Key Vault, Key Vault references that refresh."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.model import Finding, NamedValue, Severity
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import NOW, SERVICE_ID, VAULT, compliant


def only(findings: list[Finding]) -> Finding:
    assert len(findings) == 1, findings
    return findings[0]


def nv(name: str, *, secret: bool = False, display_name: str | None = None, **kv: object) -> NamedValue:
    return NamedValue(
        id=f"{SERVICE_ID}/namedValues/{name}",
        name=name,
        display_name=display_name or name,
        secret=secret,
        **kv,  # type: ignore[arg-type]
    )


def test_compliant_snapshot_has_no_sec_findings() -> None:
    assert evaluate_rule("SEC-001", compliant()) == []
    assert evaluate_rule("SEC-002", compliant()) == []


def test_registry_metadata() -> None:
    assert REGISTRY["SEC-001"].remediable
    assert not REGISTRY["SEC-002"].remediable
    assert REGISTRY["SEC-002"].severity is Severity.HIGH
    assert REGISTRY["SEC-001"].references.azure_policy == ("f1cc7827-022c-473e-836e-5a51cae0b249",)


# -- SEC-001 secrets stored in APIM -----------------------------------------------------------


def test_sec001_secret_stored_in_apim() -> None:
    snap = compliant(named_values=(*compliant().named_values, nv("backend-pass", secret=True)))
    f = only(evaluate_rule("SEC-001", snap))
    assert (f.rule_id, f.resource_id) == ("SEC-001", f"{SERVICE_ID}/namedValues/backend-pass")
    assert f.severity is Severity.MEDIUM
    assert f.remediable
    assert (f.evidence.path, f.evidence.actual, f.evidence.expected) == (
        "properties.keyVault.secretIdentifier",
        "(not set)",
        "a Key Vault secret identifier",
    )


def test_sec001_empty_identifier_counts_as_missing() -> None:
    snap = compliant(named_values=(nv("x", secret=True, key_vault_secret_id="  "),))
    assert only(evaluate_rule("SEC-001", snap)).resource_id == f"{SERVICE_ID}/namedValues/x"


def test_sec001_key_vault_reference_passes() -> None:
    snap = compliant(named_values=(nv("backend-pass", secret=True, key_vault_secret_id=f"{VAULT}/secrets/p"),))
    assert evaluate_rule("SEC-001", snap) == []


@pytest.mark.parametrize(
    ("name", "display_name", "hint"),
    [
        ("backend-password", None, "password"),
        ("BACKEND_PASSWORD", None, "password"),
        ("partner-api-key", None, "key"),
        ("nv1", "Storage-Connection-String", "connectionstring"),
        ("nv2", "github.Token", "token"),
        ("client_secret", None, "secret"),
    ],
)
def test_sec001_plain_value_that_looks_secret(name: str, display_name: str | None, hint: str) -> None:
    snap = compliant(named_values=(nv(name, display_name=display_name),))
    f = only(evaluate_rule("SEC-001", snap))
    assert f.resource_id == f"{SERVICE_ID}/namedValues/{name}"
    assert f.severity is Severity.LOW
    assert not f.remediable  # only a person can tell whether it is a secret
    assert f.evidence.path == "properties.secret"
    assert f.evidence.actual == f"false (name contains '{hint}')"
    assert f.evidence.expected == "a Key Vault reference for secret values"


def test_sec001_plain_values_with_ordinary_names_pass() -> None:
    snap = compliant(named_values=(nv("region"), nv("backend-url"), nv("timeout-seconds")))
    assert evaluate_rule("SEC-001", snap) == []


def test_sec001_patterns_parameter() -> None:
    snap = compliant(named_values=(nv("partner-api-key"), nv("pin-code")))
    assert evaluate_rule("SEC-001", snap, {"secret_name_patterns": ()}) == []
    assert evaluate_rule("SEC-001", snap, {"secret_name_patterns": []}) == []  # a YAML list
    f = only(evaluate_rule("SEC-001", snap, {"secret_name_patterns": ["PIN"]}))
    assert f.resource_id == f"{SERVICE_ID}/namedValues/pin-code"
    assert f.evidence.actual == "false (name contains 'PIN')"


def test_sec001_one_finding_per_named_value() -> None:
    values = tuple(nv(f"nv-{i:04d}", secret=(i % 400 == 0)) for i in range(2500))
    findings = evaluate_rule("SEC-001", compliant(named_values=values))
    expected = [f"{SERVICE_ID}/namedValues/nv-{i:04d}" for i in range(0, 2500, 400)]
    assert sorted(f.resource_id for f in findings) == expected


# -- SEC-002 Key Vault refresh ----------------------------------------------------------------


def kv_ref(name: str, code: str | None, **changes: object) -> NamedValue:
    return nv(
        name,
        secret=True,
        key_vault_secret_id=f"{VAULT}/secrets/{name}",
        key_vault_last_status_code=code,
        **changes,
    )


def test_sec002_refresh_failed() -> None:
    when = NOW - timedelta(hours=5)
    bad = kv_ref(
        "partner-token",
        "Forbidden",
        key_vault_last_status_message="Caller is not authorized to perform action on resource.",
        key_vault_last_status_time=when,
    )
    snap = compliant(named_values=(*compliant().named_values, bad))
    f = only(evaluate_rule("SEC-002", snap))
    assert (f.rule_id, f.resource_id) == ("SEC-002", f"{SERVICE_ID}/namedValues/partner-token")
    assert f.severity is Severity.HIGH
    assert not f.remediable
    assert (f.evidence.path, f.evidence.actual, f.evidence.expected) == (
        "properties.keyVault.lastStatus.code",
        "Forbidden",
        "Success",
    )
    assert when.isoformat() in f.message
    assert "not authorized" in f.message


@pytest.mark.parametrize("code", ["Success", "success", "SUCCESS", " Success ", None, ""])
def test_sec002_success_or_no_status_passes(code: str | None) -> None:
    assert evaluate_rule("SEC-002", compliant(named_values=(kv_ref("a", code),))) == []


def test_sec002_long_status_message_is_trimmed() -> None:
    bad = kv_ref("a", "NotFound", key_vault_last_status_message="x" * 5000)
    f = only(evaluate_rule("SEC-002", compliant(named_values=(bad,))))
    assert len(f.message) < 400
