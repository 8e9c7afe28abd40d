"""TLS-001/002/003: legacy protocols and weak ciphers in customProperties, with Azure's defaults."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shared.model import Finding, Severity, Snapshot, frozen_map
from shared.rules import REGISTRY, evaluate_rule
from tests.factories import GW, SECURE_CUSTOM_PROPERTIES, SERVICE_ID, compliant

CLIENT = [GW + "Security.Protocols." + p for p in ("Tls10", "Tls11", "Ssl30")]
BACKEND = [GW + "Security.Backend.Protocols." + p for p in ("Tls10", "Tls11", "Ssl30")]
TRIPLE_DES = GW + "Security.Ciphers.TripleDes168"
# Written out here rather than imported: the test states what Microsoft documents.
SETTABLE_CIPHERS = [
    GW + "Security.Ciphers." + name
    for name in (
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        "TLS_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_RSA_WITH_AES_256_CBC_SHA256",
        "TLS_RSA_WITH_AES_128_CBC_SHA256",
        "TLS_RSA_WITH_AES_256_CBC_SHA",
        "TLS_RSA_WITH_AES_128_CBC_SHA",
    )
]
# Every switch off: what a hardened instance returns.
HARDENED = {**SECURE_CUSTOM_PROPERTIES, **dict.fromkeys(SETTABLE_CIPHERS, "False")}
MODERN = "2024-01-10T08:00:00Z"
LEGACY = "2017-06-01T10:00:00.1234567Z"  # ARM returns seven fractional digits


def snap(custom: dict[str, str], *, created_at: str | None = MODERN, sku: str = "Premium") -> Snapshot:
    base = compliant()
    svc = replace(base.service, custom_properties=frozen_map(custom), created_at=created_at, sku_name=sku)
    return replace(base, service=svc)


def without(keys: list[str], custom: dict[str, str] = HARDENED) -> dict[str, str]:
    return {k: v for k, v in custom.items() if k not in keys}


def assert_findings(found: list[Finding], rule_id: str, expected: list[tuple[str, str]]) -> None:
    """Exactly these (path, actual) pairs, in order, each about the service and expecting False."""
    assert [(f.evidence.path, f.evidence.actual) for f in found] == expected
    for f in found:
        assert f.rule_id == rule_id
        assert f.resource_id == SERVICE_ID
        assert f.instance_id == SERVICE_ID
        assert f.evidence.expected == "False"
        assert f.remediable is True


PROTOCOL_RULES = [("TLS-001", CLIENT, BACKEND), ("TLS-002", BACKEND, CLIENT)]


# -- TLS-001 / TLS-002 -------------------------------------------------------------------------


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_compliant_snapshot_has_no_legacy_protocols(rule_id: str, keys: list[str], other: list[str]) -> None:
    assert evaluate_rule(rule_id, compliant()) == []
    assert evaluate_rule(rule_id, snap(HARDENED)) == []


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_each_enabled_protocol_is_a_finding_in_any_case(rule_id: str, keys: list[str], other: list[str]) -> None:
    custom = {**HARDENED, keys[0]: "True", keys[1]: "true", keys[2]: "TRUE"}
    found = evaluate_rule(rule_id, snap(custom))
    assert_findings(found, rule_id, [(keys[0], "True"), (keys[1], "true"), (keys[2], "TRUE")])
    assert "TLS 1.0" in found[0].message
    assert "SSL 3.0" in found[2].message


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
@pytest.mark.parametrize("off", ["False", "false", "FALSE", " false "])
def test_disabled_spellings_are_not_findings(rule_id: str, keys: list[str], other: list[str], off: str) -> None:
    assert evaluate_rule(rule_id, snap({**HARDENED, **dict.fromkeys(keys, off)}, created_at=LEGACY)) == []


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_only_its_own_side_counts(rule_id: str, keys: list[str], other: list[str]) -> None:
    assert evaluate_rule(rule_id, snap({**HARDENED, **dict.fromkeys(other, "True")})) == []


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_absent_switch_on_a_service_created_before_april_2018_defaults_to_enabled(
    rule_id: str, keys: list[str], other: list[str]
) -> None:
    found = evaluate_rule(rule_id, snap(without(keys), created_at=LEGACY))
    default = "(not set: Azure default True, service created 2017-06-01)"
    assert_findings(found, rule_id, [(k, default) for k in keys])


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
@pytest.mark.parametrize(
    ("created_at", "count"),
    [
        ("2018-04-01T23:30:00Z", 3),  # "on or before April 1, 2018"
        ("2018-04-02T00:00:00Z", 0),
        (MODERN, 0),
        (None, 0),  # creation date unknown: the default is unknown
        ("not a date", 0),
    ],
)
def test_absent_switch_follows_the_creation_date(
    rule_id: str, keys: list[str], other: list[str], created_at: str | None, count: int
) -> None:
    assert len(evaluate_rule(rule_id, snap(without(keys), created_at=created_at))) == count


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_explicit_false_wins_over_the_legacy_default(rule_id: str, keys: list[str], other: list[str]) -> None:
    custom = {**without(keys), keys[1]: "False"}
    found = evaluate_rule(rule_id, snap(custom, created_at=LEGACY))
    assert [f.evidence.path for f in found] == [keys[0], keys[2]]


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_uninterpretable_value_is_not_a_finding(rule_id: str, keys: list[str], other: list[str]) -> None:
    # A value that is neither true nor false is unknown, even where the default would be True.
    custom = {**HARDENED, keys[0]: "yes", keys[1]: ""}
    assert evaluate_rule(rule_id, snap(custom, created_at=LEGACY)) == []


@pytest.mark.parametrize(("rule_id", "keys", "other"), PROTOCOL_RULES)
def test_keys_match_case_insensitively_and_keep_azure_spelling(rule_id: str, keys: list[str], other: list[str]) -> None:
    odd = keys[0].lower()
    found = evaluate_rule(rule_id, snap({**without([keys[0]]), odd: "True"}))
    assert_findings(found, rule_id, [(odd, "True")])


def test_protocol_rule_metadata() -> None:
    assert REGISTRY["TLS-001"].severity is Severity.HIGH
    assert REGISTRY["TLS-002"].severity is Severity.MEDIUM
    for rule_id in ("TLS-001", "TLS-002"):
        assert REGISTRY[rule_id].remediable is True
        assert REGISTRY[rule_id].references.checkov == ("CKV_AZURE_173",)
        assert REGISTRY[rule_id].references.mcsb == ("DP-3",)


# -- TLS-003 ------------------------------------------------------------------------------------


def test_hardened_ciphers_pass() -> None:
    assert evaluate_rule("TLS-003", snap(HARDENED)) == []
    assert evaluate_rule("TLS-003", snap(HARDENED, created_at=LEGACY)) == []


def test_settable_ciphers_absent_default_to_enabled() -> None:
    # A new instance returns no cipher switches: all nine settable suites are on (TripleDes168 is
    # off by default for a service created after 2018-04-01).
    protocols_only = dict.fromkeys(CLIENT + BACKEND, "False")
    found = evaluate_rule("TLS-003", snap(protocols_only))
    default = "(not set: Azure default True, settable cipher suites default to enabled)"
    assert_findings(found, "TLS-003", [(k, default) for k in SETTABLE_CIPHERS])


def test_triple_des_absent_follows_the_creation_date() -> None:
    assert evaluate_rule("TLS-003", snap(without([TRIPLE_DES]))) == []
    found = evaluate_rule("TLS-003", snap(without([TRIPLE_DES]), created_at=LEGACY))
    assert_findings(found, "TLS-003", [(TRIPLE_DES, "(not set: Azure default True, service created 2017-06-01)")])
    assert evaluate_rule("TLS-003", snap(without([TRIPLE_DES]), created_at=None)) == []


@pytest.mark.parametrize("on", ["True", "true", "TRUE"])
def test_each_enabled_weak_cipher_is_one_finding(on: str) -> None:
    custom = {**HARDENED, TRIPLE_DES: on, SETTABLE_CIPHERS[4]: on}
    found = evaluate_rule("TLS-003", snap(custom))
    assert_findings(found, "TLS-003", [(TRIPLE_DES, on), (SETTABLE_CIPHERS[4], on)])
    assert "TripleDes168" in found[0].message
    assert found[0].severity is Severity.MEDIUM


def test_weak_cipher_list_is_a_parameter() -> None:
    custom = {**HARDENED, TRIPLE_DES: "True", SETTABLE_CIPHERS[8]: "True"}
    only = {"weak_ciphers": ("TLS_RSA_WITH_AES_128_CBC_SHA",)}
    assert_findings(evaluate_rule("TLS-003", snap(custom), only), "TLS-003", [(SETTABLE_CIPHERS[8], "True")])
    assert evaluate_rule("TLS-003", snap(custom), {"weak_ciphers": ()}) == []


def test_unknown_cipher_name_counts_only_when_set() -> None:
    params = {"weak_ciphers": ("TLS_RSA_WITH_AES_256_GCM_SHA384",)}
    key = GW + "Security.Ciphers.TLS_RSA_WITH_AES_256_GCM_SHA384"
    assert evaluate_rule("TLS-003", snap(HARDENED), params) == []  # no documented default
    assert_findings(evaluate_rule("TLS-003", snap({**HARDENED, key: "True"}), params), "TLS-003", [(key, "True")])


@pytest.mark.parametrize("sku", ["Consumption", "BasicV2", "standardv2", "PremiumV2"])
def test_tiers_with_fixed_ciphers_are_skipped(sku: str) -> None:
    custom = {**HARDENED, TRIPLE_DES: "True"}
    assert evaluate_rule("TLS-003", snap(custom, sku=sku)) == []
    assert len(evaluate_rule("TLS-003", snap(custom, sku=sku), {"skip_skus": ()})) == 1


def test_weak_cipher_rule_metadata() -> None:
    tls3 = REGISTRY["TLS-003"]
    assert tls3.remediable is True
    weak = tls3.defaults()["weak_ciphers"]
    assert isinstance(weak, tuple)
    assert set(weak) == {"TripleDes168"} | {key.rsplit(".", 1)[1] for key in SETTABLE_CIPHERS}
