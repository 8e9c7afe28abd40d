"""The policy file: every validation error names file, line, key and what is allowed; the
loaded Policy answers modes, parameters, exemptions and scope as docs/policy.md says.

Tests register their own throwaway rules (TST-*) so they do not depend on the catalogue.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import date
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from shared.errors import PermanentError
from shared.model import Exemption, Finding, Mode, Severity, Snapshot
from shared.policy import (
    DEFAULT_MAX_WRITES_PER_RUN,
    Policy,
    PolicyError,
    load_policy,
    parse_policy,
    tag_problems,
)
from shared.rules import REGISTRY, Param, References, Rule, rule

ROOT = Path(__file__).resolve().parents[2]
TODAY = date(2026, 11, 23)
SUB = "11111111-2222-3333-4444-555555555555"
SERVICE = f"/subscriptions/{SUB}/resourceGroups/rg-legacy/providers/Microsoft.ApiManagement/service/apim-one"
OTHER = f"/subscriptions/{SUB}/resourceGroups/rg-prod/providers/Microsoft.ApiManagement/service/apim-two"


def _nothing(r: Rule, snapshot: Snapshot, params: Mapping[str, Any]) -> list[Finding]:
    return []


@pytest.fixture(autouse=True)
def test_rules() -> Iterator[None]:
    """TST-001 (remediable, one parameter of each type) and TST-002 (no remediation, no parameters)."""
    refs = References()
    rule(
        "TST-001",
        title="Test rule with parameters",
        severity=Severity.HIGH,
        rationale="test",
        references=refs,
        params=[
            Param("count", 5, "an integer", minimum=1),
            Param("ratio", 0.5, "a number", minimum=0.0),
            Param("enabled", True, "a boolean"),
            Param("level", "low", "a string with choices", choices=("low", "high")),
            Param("note", "x", "a free string"),
            Param("names", ("a",), "a list of strings"),
            Param("verbs", ("GET",), "a list of strings with choices", choices=("GET", "POST")),
        ],
        remediable=True,
    )(_nothing)
    rule("TST-002", title="Test rule", severity=Severity.LOW, rationale="test", references=refs)(_nothing)
    try:
        yield
    finally:
        REGISTRY.pop("TST-001", None)
        REGISTRY.pop("TST-002", None)


def load(text: str, today: date = TODAY) -> Policy:
    return parse_policy(dedent(text), source="policy.yaml", today=today)


def problems(text: str, today: date = TODAY) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(text, today)
    return info.value.problems


QUOTE = " (YAML reads it as a non-string: quote it)"
TOP_KEYS = "version, scope, defaults, rules, exemptions, limits, tag_exemptions, backups, custom_rules"


def known() -> str:
    return ", ".join(sorted(REGISTRY))


# -- a valid policy --------------------------------------------------------------------------


FULL = """\
    version: 1
    scope:
      subscriptions: [11111111-2222-3333-4444-555555555555]
      resource_groups: [RG-Legacy, rg-prod]
      tags: {env: prod, critical: true}
    defaults:
      mode: off
    rules:
      TST-001:
        mode: remediate
        params:
          count: 7
          ratio: 2
          enabled: false
          level: high
          names: [x, y]
      TST-002: {mode: detect}
    exemptions:
      - rule: TST-001
        resource: /subscriptions/*/resourceGroups/rg-legacy/providers/Microsoft.ApiManagement/service/*
        reason: partner integration, APIMOPS-123
        expires: 2027-03-31
    limits:
      max_writes_per_run: 3
    tag_exemptions: false
"""


def test_a_full_policy_loads() -> None:
    policy = load(FULL)
    assert policy.source == "policy.yaml"
    assert policy.default_mode is Mode.OFF
    assert policy.mode_of("TST-001") is Mode.REMEDIATE
    assert policy.mode_of("TST-002") is Mode.DETECT
    assert dict(policy.params_of("TST-001")) == {
        "count": 7,
        "ratio": 2.0,
        "enabled": False,
        "level": "high",
        "note": "x",
        "names": ("x", "y"),
        "verbs": ("GET",),
    }
    assert isinstance(policy.params_of("TST-001")["ratio"], float)
    assert policy.max_writes_per_run == 3
    assert policy.tag_exemptions is False
    assert policy.scope.subscriptions == (SUB,)
    assert policy.scope.resource_groups == ("rg-legacy", "rg-prod")
    assert policy.scope.tags == (("env", "prod"), ("critical", "true"))
    [exemption] = policy.exemptions
    assert (exemption.rule, exemption.reason, exemption.expires, exemption.line) == (
        "TST-001",
        "partner integration, APIMOPS-123",
        date(2027, 3, 31),
        19,
    )


def test_unlisted_rules_take_the_default_mode_and_default_params() -> None:
    policy = load("version: 1\nrules:\n  TST-001: {params: {count: 9}}\n")
    assert policy.mode_of("TST-001") is Mode.DETECT
    assert policy.mode_of("TST-002") is Mode.DETECT
    assert policy.params_of("TST-001")["count"] == 9
    assert policy.params_of("TST-001")["level"] == "low"
    assert dict(policy.params_of("TST-002")) == {}
    assert policy.max_writes_per_run == DEFAULT_MAX_WRITES_PER_RUN == 20
    assert policy.tag_exemptions is True


def test_params_are_read_only_and_defaults_are_not_mutated() -> None:
    policy = load("version: 1\nrules:\n  TST-001: {params: {count: 9}}\n")
    with pytest.raises(TypeError):
        policy.params_of("TST-001")["count"] = 1  # type: ignore[index]
    assert REGISTRY["TST-001"].defaults()["count"] == 5
    assert Policy().params_of("TST-001")["count"] == 5


def test_off_is_the_word_off_not_yaml_false() -> None:
    assert load("version: 1\nrules:\n  TST-001: {mode: off}\n").mode_of("TST-001") is Mode.OFF
    assert load("version: 1\nrules:\n  TST-001: {mode: 'off'}\n").mode_of("TST-001") is Mode.OFF


def test_sections_may_be_empty() -> None:
    policy = load("version: 1\nscope:\ndefaults:\nrules:\nexemptions:\nlimits:\n")
    assert policy == Policy(source="policy.yaml")


def test_the_default_policy_detects_everything() -> None:
    policy = Policy()
    assert policy.mode_of("TST-001") is Mode.DETECT
    assert policy.in_scope("any", "any", {})
    with pytest.raises(KeyError):
        policy.mode_of("NOPE-001")
    with pytest.raises(KeyError):
        policy.params_of("NOPE-001")


# -- validation errors, one class each -------------------------------------------------------


def test_unknown_rule_id() -> None:
    assert problems("version: 1\nrules:\n  TST-009: {mode: detect}\n") == [
        f"policy.yaml:3: rules.TST-009: unknown rule id; known: {known()}"
    ]


def test_unknown_rule_id_suggests_the_close_one() -> None:
    assert problems("version: 1\nrules:\n  tst-001: {mode: detect}\n") == [
        f"policy.yaml:3: rules.tst-001: unknown rule id (did you mean TST-001?); known: {known()}"
    ]


def test_bad_mode() -> None:
    assert problems("version: 1\nrules:\n  TST-001:\n    mode: sometimes\n") == [
        "policy.yaml:4: rules.TST-001.mode: unknown mode 'sometimes'; allowed: off, detect, remediate"
    ]
    assert problems("version: 1\nrules:\n  TST-001: {mode: Detect}\n") == [
        "policy.yaml:3: rules.TST-001.mode: unknown mode 'Detect'; allowed: off, detect, remediate"
    ]


def test_remediate_on_a_rule_without_remediation() -> None:
    assert problems("version: 1\nrules:\n  TST-002: {mode: remediate}\n") == [
        "policy.yaml:3: rules.TST-002.mode: rule TST-002 has no remediation; use detect (or off)"
    ]


def test_remediate_cannot_be_the_default() -> None:
    assert problems("version: 1\ndefaults:\n  mode: remediate\n") == [
        "policy.yaml:3: defaults.mode: remediate cannot be a default: opt each rule in under rules: "
        "(e.g. TLS-001: {mode: remediate}); allowed here: off, detect"
    ]
    assert problems("version: 1\ndefaults: {mode: never}\n") == [
        "policy.yaml:2: defaults.mode: unknown mode 'never'; allowed: off, detect"
    ]


def test_rule_entry_keys() -> None:
    assert problems("version: 1\nrules:\n  TST-001: {mode: detect, reason: x}\n  TST-002:\n") == [
        "policy.yaml:3: rules.TST-001.reason: unknown key; allowed: mode, params",
        "policy.yaml:4: rules.TST-002: expected a mapping, got nothing",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("count: ninety", "rules.TST-001.params.count: expected an integer >= 1, got 'ninety'"),
        ("count: 0", "rules.TST-001.params.count: expected an integer >= 1, got 0"),
        ("count: 2.5", "rules.TST-001.params.count: expected an integer >= 1, got 2.5"),
        ("count: true", "rules.TST-001.params.count: expected an integer >= 1, got true"),
        ("count: [1]", "rules.TST-001.params.count: expected an integer >= 1, got a list"),
        ("ratio: -0.1", "rules.TST-001.params.ratio: expected a number >= 0, got -0.1"),
        ("ratio: half", "rules.TST-001.params.ratio: expected a number >= 0, got 'half'"),
        ("enabled: 1", "rules.TST-001.params.enabled: expected true or false, got 1"),
        ("enabled: 'true'", "rules.TST-001.params.enabled: expected true or false, got 'true'"),
        ("level: medium", "rules.TST-001.params.level: expected one of low, high, got 'medium'"),
        ("note: 12", f"rules.TST-001.params.note: expected a string, got 12{QUOTE}"),
        ("note: no", f"rules.TST-001.params.note: expected a string, got no{QUOTE}"),
        ("note: 2021-08-01", f"rules.TST-001.params.note: expected a string, got 2021-08-01{QUOTE}"),
        ("note: [a]", "rules.TST-001.params.note: expected a string, got a list"),
        ("names: abc", "rules.TST-001.params.names: expected a list of strings, got 'abc'"),
        ("names: [a, 3]", "rules.TST-001.params.names[1]: expected a string, got 3"),
        ("verbs: [GET, PUT]", "rules.TST-001.params.verbs[1]: expected one of GET, POST, got 'PUT'"),
        (
            "colour: red",
            "rules.TST-001.params.colour: unknown parameter; allowed: count, ratio, enabled, level, note, names, verbs",
        ),
    ],
)
def test_bad_parameter(value: str, message: str) -> None:
    text = f"version: 1\nrules:\n  TST-001:\n    params:\n      {value}\n"
    assert problems(text) == [f"policy.yaml:5: {message}"]


def test_parameters_on_a_rule_without_any() -> None:
    assert problems("version: 1\nrules:\n  TST-002:\n    params: {count: 1}\n") == [
        "policy.yaml:4: rules.TST-002.params.count: rule TST-002 takes no parameters"
    ]


def test_quoted_strings_and_numbers_that_fit() -> None:
    text = "version: 1\nrules:\n  TST-001:\n    params: {note: 'no', ratio: 1, names: [], level: 'high'}\n"
    params = load(text).params_of("TST-001")
    assert (params["note"], params["ratio"], params["names"], params["level"]) == ("no", 1.0, (), "high")


def test_expired_exemption() -> None:
    text = """\
        version: 1
        exemptions:
          - rule: TST-001
            resource: /subscriptions/x
            reason: legacy
            expires: 2025-01-01
    """
    assert problems(text) == [
        "policy.yaml:6: exemptions[0].expires: 2025-01-01 is in the past (today is 2026-11-23); renew or remove it"
    ]


def test_an_exemption_that_expires_today_still_loads() -> None:
    text = "version: 1\nexemptions:\n  - {rule: TST-001, resource: /s, reason: r, expires: 2026-11-23}\n"
    assert load(text, today=date(2026, 11, 23)).exemptions[0].expires == date(2026, 11, 23)
    assert problems(text, today=date(2026, 11, 24)) == [
        "policy.yaml:3: exemptions[0].expires: 2026-11-23 is in the past (today is 2026-11-24); renew or remove it"
    ]


def test_exemption_fields() -> None:
    text = """\
        version: 1
        exemptions:
          - rule: TST-404
            resource: rg-legacy
            reason: ""
            expires: 2027-02-30
          - resource: /subscriptions/x
            until: 2027-01-01
          - just a string
          - {rule: "*", resource: "**", reason: ok, expires: "2027-01-01T10:00:00"}
    """
    assert problems(text) == [
        f"policy.yaml:3: exemptions[0].rule: unknown rule id; known: *, {known()}",
        "policy.yaml:4: exemptions[0].resource: expected an ARM resource id or glob starting with /subscriptions/ "
        "(or *), got 'rg-legacy'",
        "policy.yaml:5: exemptions[0].reason: expected a non-empty reason (why, and a ticket), got ''",
        "policy.yaml:6: exemptions[0].expires: expected a date like 2027-03-31, got 2027-02-30",
        "policy.yaml:7: exemptions[1].rule: is required",
        "policy.yaml:7: exemptions[1].reason: is required",
        "policy.yaml:7: exemptions[1].expires: is required (an exemption without an end is a permanent hole)",
        "policy.yaml:8: exemptions[1].until: unknown key; allowed: rule, resource, reason, expires",
        "policy.yaml:9: exemptions[2]: expected a mapping with rule, resource, reason, expires, got 'just a string'",
        "policy.yaml:10: exemptions[3].expires: expected a date like 2027-03-31, got '2027-01-01T10:00:00'",
    ]


def test_quoted_dates_and_star_rules_load() -> None:
    text = "version: 1\nexemptions:\n  - {rule: '*', resource: '**', reason: all, expires: '2027-01-01'}\n"
    [exemption] = load(text).exemptions
    assert (exemption.rule, exemption.expires) == ("*", date(2027, 1, 1))


def test_a_bare_star_gets_a_hint() -> None:
    [message] = problems("version: 1\nexemptions:\n  - rule: *\n")
    assert message.startswith("policy.yaml:3: not valid YAML:")
    assert 'quote it, as in rule: "*"' in message


def test_duplicate_keys() -> None:
    text = """\
        version: 1
        rules:
          TST-001: {mode: remediate}
          TST-002: {mode: detect}
          TST-001: {mode: off}
        limits: {max_writes_per_run: 1, max_writes_per_run: 2}
        version: 1
    """
    assert problems(text) == [
        "policy.yaml:5: rules.TST-001: duplicate key (first at line 3); YAML would silently keep only the last one",
        "policy.yaml:6: limits.max_writes_per_run: duplicate key (first at line 6); "
        "YAML would silently keep only the last one",
        "policy.yaml:7: version: duplicate key (first at line 1); YAML would silently keep only the last one",
    ]


def test_top_level_must_be_a_mapping() -> None:
    assert problems("- version: 1\n") == [
        "policy.yaml:1: expected a mapping at the top level (version, rules, ...), got a list"
    ]
    assert problems("just text\n") == [
        "policy.yaml:1: expected a mapping at the top level (version, rules, ...), got 'just text'"
    ]


def test_unknown_top_level_keys() -> None:
    assert problems("version: 1\nlimit: {max_writes_per_run: 1}\nRules: {}\n") == [
        f"policy.yaml:2: limit: unknown key; allowed: {TOP_KEYS}",
        f"policy.yaml:3: Rules: unknown key; allowed: {TOP_KEYS}",
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "~\n"])
def test_empty_file(text: str) -> None:
    assert problems(text) == ["policy.yaml: the file is empty; a policy is a mapping that starts with 'version: 1'"]


def test_version() -> None:
    assert problems("rules: {}\n") == ["policy.yaml:1: version: is required; allowed: 1"]
    assert problems("version: 2\n") == ["policy.yaml:1: version: unsupported version 2; allowed: 1"]
    assert problems("version: '1'\n") == ["policy.yaml:1: version: unsupported version '1'; allowed: 1"]
    assert problems("version: 1.0\n") == ["policy.yaml:1: version: unsupported version 1.0; allowed: 1"]


def test_not_yaml() -> None:
    assert problems("version: 1\nrules: {TST-001: [\n") == [
        "policy.yaml:3: not valid YAML: while parsing a flow node expected the node content, but found '<stream end>'"
    ]


def test_merge_keys_are_refused() -> None:
    text = "version: 1\nrules:\n  TST-001: &d {mode: detect}\n  TST-002:\n    <<: *d\n"
    assert problems(text) == ["policy.yaml:5: rules.TST-002: merge keys (<<) are not supported; write the keys out"]


def test_limits_and_tag_switch() -> None:
    assert problems("version: 1\nlimits:\n  max_writes_per_run: -1\n  burst: 3\ntag_exemptions: maybe\n") == [
        "policy.yaml:3: limits.max_writes_per_run: expected an integer >= 0, got -1",
        "policy.yaml:4: limits.burst: unknown key; allowed: max_writes_per_run",
        "policy.yaml:5: tag_exemptions: expected true or false, got 'maybe'",
    ]
    assert load("version: 1\nlimits: {max_writes_per_run: 0}\n").max_writes_per_run == 0


def test_scope_errors() -> None:
    text = """\
        version: 1
        scope:
          subscriptions: [not-a-guid, 11111111-2222-3333-4444-555555555555]
          resource_groups: rg-one
          tags: [env]
          regions: [westeurope]
    """
    assert problems(text) == [
        "policy.yaml:3: scope.subscriptions[0]: expected a subscription id (a GUID), got 'not-a-guid'",
        "policy.yaml:4: scope.resource_groups: expected a list of resource group names, got 'rg-one'",
        "policy.yaml:5: scope.tags: expected a mapping, got a list",
        "policy.yaml:6: scope.regions: unknown key; allowed: subscriptions, resource_groups, tags",
    ]


def test_every_problem_is_listed_in_line_order() -> None:
    text = """\
        version: 1
        limits: {max_writes_per_run: lots}
        rules:
          TST-009: {mode: detect}
          TST-001: {mode: maybe, params: {count: ninety}}
        exemptions:
          - {rule: TST-001, resource: /s, reason: r, expires: 2020-01-01}
    """
    with pytest.raises(PolicyError) as info:
        load(text)
    assert [p.line for p in info.value.details] == [2, 4, 5, 5, 7]
    assert info.value.details[3].column > info.value.details[2].column
    assert str(info.value).startswith("5 problem(s) in the policy file policy.yaml (reference: docs/policy.md):\n  - ")
    assert isinstance(info.value, PermanentError)


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nrules:\n  TST-001: {mode: never}\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path, today=TODAY)
    assert info.value.problems == [
        f"{path}:3: rules.TST-001.mode: unknown mode 'never'; allowed: off, detect, remediate"
    ]
    path.write_text("version: 1\nrules:\n  TST-001: {mode: remediate}\n", encoding="utf-8")
    assert load_policy(str(path), today=TODAY).mode_of("TST-001") is Mode.REMEDIATE


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path, today=TODAY)
    assert info.value.problems == [f"{path}: cannot read the policy file: No such file or directory"]


# -- exemptions ------------------------------------------------------------------------------


def exempting(resource: str, rule_id: str = "TST-001", expires: str = "2027-03-31") -> Policy:
    return load(
        f"version: 1\nexemptions:\n  - {{rule: '{rule_id}', resource: '{resource}', reason: why, expires: {expires}}}\n"
    )


def test_exemption_by_exact_id_covers_the_resource_and_its_children() -> None:
    policy = exempting(SERVICE)
    expected = Exemption(reason="why", source="policy", expires="2027-03-31")
    assert policy.exemption_for("TST-001", SERVICE, {}, TODAY) == expected
    assert policy.exemption_for("TST-001", SERVICE.upper(), {}, TODAY) == expected
    assert policy.exemption_for("TST-001", SERVICE + "/apis/echo", {}, TODAY) == expected
    assert policy.exemption_for("TST-001", SERVICE + "-2", {}, TODAY) is None
    assert policy.exemption_for("TST-001", OTHER, {}, TODAY) is None
    assert policy.exemption_for("TST-002", SERVICE, {}, TODAY) is None


def test_exemption_by_glob() -> None:
    policy = exempting("/subscriptions/*/resourceGroups/rg-legacy/providers/Microsoft.ApiManagement/service/*")
    assert policy.exemption_for("TST-001", SERVICE, {}, TODAY) is not None
    assert policy.exemption_for("TST-001", SERVICE + "/subscriptions/sub-1", {}, TODAY) is not None
    assert policy.exemption_for("TST-001", OTHER, {}, TODAY) is None
    # `*` stays within one segment: it cannot stand for a subscription plus a resource group.
    assert (
        exempting("/subscriptions/*/providers/Microsoft.ApiManagement/service/*").exemption_for(
            "TST-001", SERVICE, {}, TODAY
        )
        is None
    )
    assert exempting("/subscriptions/**/service/apim-?ne").exemption_for("TST-001", SERVICE, {}, TODAY) is not None
    assert exempting("**").exemption_for("TST-001", OTHER, {}, TODAY) is not None


def test_exemption_for_every_rule() -> None:
    policy = exempting(SERVICE, rule_id="*")
    assert policy.exemption_for("TST-001", SERVICE, {}, TODAY) is not None
    assert policy.exemption_for("TST-002", SERVICE, {}, TODAY) is not None
    assert policy.exemption_for("TST-002", OTHER, {}, TODAY) is None


def test_exemption_expiry_boundary() -> None:
    policy = exempting(SERVICE, expires="2026-12-01")
    assert policy.exemption_for("TST-001", SERVICE, {}, date(2026, 12, 1)) is not None
    assert policy.exemption_for("TST-001", SERVICE, {}, date(2026, 12, 2)) is None


def test_exemption_by_tag() -> None:
    policy = Policy()
    tags = {"Apim-Remediator-Exempt": " tst-001 , TST-404", "apim-remediator-exempt-reason": "owned by team X"}
    assert policy.exemption_for("TST-001", SERVICE, tags, TODAY) == Exemption(reason="owned by team X", source="tag")
    assert policy.exemption_for("TST-001", SERVICE + "/apis/a", tags, TODAY) is not None
    assert policy.exemption_for("TST-002", SERVICE, tags, TODAY) is None
    every = {"apim-remediator-exempt": "*"}
    assert policy.exemption_for("TST-002", SERVICE, every, TODAY) == Exemption(
        reason="tag apim-remediator-exempt on the APIM instance", source="tag"
    )
    assert policy.exemption_for("TST-002", SERVICE, {"apim-remediator-exempt": ""}, TODAY) is None
    assert policy.exemption_for("TST-002", SERVICE, {"env": "prod"}, TODAY) is None


def test_policy_exemptions_win_over_the_tag_and_the_tag_can_be_switched_off() -> None:
    tags = {"apim-remediator-exempt": "TST-001"}
    found = exempting(SERVICE).exemption_for("TST-001", SERVICE, tags, TODAY)
    assert found is not None
    assert found.source == "policy"
    off = load("version: 1\ntag_exemptions: false\n")
    assert off.exemption_for("TST-001", SERVICE, tags, TODAY) is None


def test_tag_problems() -> None:
    assert tag_problems({}) == []
    assert tag_problems({"apim-remediator-exempt": "TST-001, *"}) == []
    assert tag_problems({"APIM-REMEDIATOR-EXEMPT": "tst-001,TST-0O2,BOGUS"}) == [
        "tag apim-remediator-exempt: 'TST-0O2' is not a known rule id and exempts nothing (did you mean TST-002?); "
        "expected rule ids separated by commas, or *",
        "tag apim-remediator-exempt: 'BOGUS' is not a known rule id and exempts nothing; "
        "expected rule ids separated by commas, or *",
    ]
    assert tag_problems({"apim-remediator-exempt": " , "}) == [
        "tag apim-remediator-exempt is empty; expected rule ids separated by commas, or *"
    ]
    assert Policy().tag_problems({"apim-remediator-exempt": "BOGUS"}) == tag_problems(
        {"apim-remediator-exempt": "BOGUS"}
    )
    ignored = load("version: 1\ntag_exemptions: false\n")
    assert ignored.tag_problems({"apim-remediator-exempt": "TST-001"}) == [
        "tag apim-remediator-exempt is ignored: the policy sets tag_exemptions: false"
    ]
    assert ignored.tag_problems({"env": "prod"}) == []


# -- scope -----------------------------------------------------------------------------------


def test_scope_narrows() -> None:
    policy = load(FULL)
    prod = {"ENV": "prod", "critical": "true", "owner": "x"}
    assert policy.in_scope(SUB.upper(), "rg-LEGACY", prod)
    assert policy.in_scope(SUB, "rg-prod", prod)
    assert not policy.in_scope("99999999-2222-3333-4444-555555555555", "rg-prod", prod)
    assert not policy.in_scope(SUB, "rg-other", prod)
    assert not policy.in_scope(SUB, "rg-prod", {"env": "prod"})
    assert not policy.in_scope(SUB, "rg-prod", {"env": "Prod", "critical": "true"})


def test_no_scope_admits_everything() -> None:
    assert load("version: 1\nscope: {subscriptions: [], tags: {}}\n").in_scope(SUB, "rg", {})


# -- the shipped baseline and the docs -------------------------------------------------------


def test_the_shipped_baseline_loads_and_only_detects() -> None:
    path = ROOT / "shared" / "baseline.yaml"
    policy = load_policy(path, today=TODAY)
    assert policy == Policy(source=str(path))
    assert all(policy.mode_of(rule_id) is Mode.DETECT for rule_id in REGISTRY)
    assert policy.exemptions == ()
    from shared.settings import DEFAULT_POLICY_FILE

    assert Path(DEFAULT_POLICY_FILE) == path


def docs_example() -> str:
    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "docs/policy.md should hold exactly one ```yaml block: the complete example"
    return str(blocks[0])


def test_the_docs_example_loads() -> None:
    """Against the real catalogue: a rule id or parameter the catalogue lacks makes the docs wrong."""
    policy = parse_policy(docs_example(), source="docs/policy.md", today=TODAY)
    assert policy.scope.resource_groups == ("rg-apim-prod", "rg-apim-shared")
    assert policy.scope.tags == (("env", "prod"),)
    assert policy.mode_of("TLS-001") is Mode.REMEDIATE
    assert policy.params_of("KEY-003")["max_age_days"] == 60
    assert [r.id for r in policy.custom_rules] == ["X-PROD-001"]
    assert policy.params_of("MGMT-003")["min_api_version"] == "2021-08-01"
    assert policy.mode_of("NET-001") is Mode.OFF
    assert policy.params_of("THR-001")["factor"] == 10.0
    assert policy.params_of("THR-003")["max_client_ips"] == 25
    assert [e.rule for e in policy.exemptions] == ["NET-001", "*"]
    assert policy.max_writes_per_run == 20
    assert policy.tag_exemptions is True
    assert policy.backups.keep_last == 7
    assert policy.backups.restore_target_of(
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-apim-prod/providers/"
        "Microsoft.ApiManagement/service/apim-prod"
    ) == (
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-apim-dr/providers/"
        "Microsoft.ApiManagement/service/apim-restore-test"
    )


# -- parameter formats: a value the rule could not use is refused at load time ---------------


WORKSPACE = (
    "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-logs"
    "/providers/Microsoft.OperationalInsights/workspaces/law-apim"
)


@pytest.mark.parametrize(
    ("rule_id", "value", "message"),
    [
        # The reproduction from issue 8: a string the loader took and MGMT-003 raised on.
        (
            "MGMT-003",
            "min_api_version: '2021-13-45'",
            "rules.MGMT-003.params.min_api_version: expected an api-version date YYYY-MM-DD, got '2021-13-45'",
        ),
        (
            "MGMT-003",
            "min_api_version: latest",
            "rules.MGMT-003.params.min_api_version: expected an api-version date YYYY-MM-DD, got 'latest'",
        ),
        (
            "LOG-001",
            "workspace_id: law-apim",
            "rules.LOG-001.params.workspace_id: expected empty, or a Log Analytics workspace id "
            "/subscriptions/.../providers/Microsoft.OperationalInsights/workspaces/NAME, got 'law-apim'",
        ),
        (
            "KEY-003",
            "max_age_days: 1000000000",
            "rules.KEY-003.params.max_age_days: expected an integer >= 1 and <= 36500, got 1000000000",
        ),
    ],
)
def test_parameter_formats_are_checked_at_load_time(rule_id: str, value: str, message: str) -> None:
    text = f"version: 1\nrules:\n  {rule_id}:\n    params:\n      {value}\n"
    assert problems(text) == [f"policy.yaml:5: {message}"]


def test_values_in_the_parameter_formats_load() -> None:
    text = (
        "version: 1\nrules:\n"
        "  MGMT-003: {params: {min_api_version: '2022-08-01'}}\n"
        f"  LOG-001: {{params: {{workspace_id: '{WORKSPACE}'}}}}\n"
        "  KEY-003: {params: {max_age_days: 36500}}\n"
    )
    loaded = load(text)
    assert loaded.params_of("MGMT-003")["min_api_version"] == "2022-08-01"
    assert loaded.params_of("LOG-001")["workspace_id"] == WORKSPACE
    assert loaded.params_of("KEY-003")["max_age_days"] == 36500


def test_every_default_fits_its_own_parameter_schema() -> None:
    for rule_id, registered in REGISTRY.items():
        for param in registered.params:
            values = param.default if isinstance(param.default, tuple) else (param.default,)
            for value in values:
                if param.format is not None and isinstance(value, str):
                    assert param.format.accepts(value), (rule_id, param.name, value)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    assert param.minimum is None or value >= param.minimum, (rule_id, param.name)
                    assert param.maximum is None or value <= param.maximum, (rule_id, param.name)


# -- backups -----------------------------------------------------------------------------------

_APIM = "/subscriptions/3f2a1b0c-0000-4000-8000-000000000101/resourceGroups/rg/providers/Microsoft.ApiManagement"
_APIM += "/service"
SRC = f"{_APIM}/src"
DST = f"{_APIM}/dst"


def test_backups_section_reads_cadence_retention_and_targets() -> None:
    policy = load(
        "version: 1\nbackups:\n  every_hours: 12\n  retention: {keep_last: 3, max_age_days: 10}\n"
        f"  restore_tests:\n    every_days: 2\n    targets:\n      {SRC}: {DST}\n"
    )
    assert (policy.backups.every_hours, policy.backups.keep_last, policy.backups.max_age_days) == (12, 3, 10)
    assert policy.backups.restore_test_every_days == 2
    assert policy.backups.restore_target_of(SRC.upper()) == DST
    assert policy.backups.restore_target_of(DST) is None


def test_backups_section_errors_name_the_place() -> None:
    assert problems(
        "version: 1\nbackups:\n  every_hours: 0\n  retention: {keep_last: 1, max_age_days: 31}\n"
        f"  restore_tests:\n    targets:\n      {SRC}: {SRC}\n      /not/an/id: {DST}\n"
    ) == [
        "policy.yaml:3: backups.every_hours: expected an integer >= 1 and <= 720, got 0",
        "policy.yaml:4: backups.retention.max_age_days: expected an integer >= 1 and <= 30, got 31",
        f"policy.yaml:7: backups.restore_tests.targets.{SRC}: a source cannot be its own restore-test target "
        "(a restore overwrites it)",
        "policy.yaml:8: backups.restore_tests.targets./not/an/id: expected an APIM service resource id as the key "
        "(the backup source)",
    ]
