"""The read plan: each rule declares every snapshot part it touches (checked by running it
over a recording snapshot), and a policy's switched-off rules take their reads with them."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

from shared.model import Mode, Snapshot
from shared.policy import Policy
from shared.read_plan import OPTIONAL_PARTS, RULE_PARTS, parts_needed
from shared.rules import REGISTRY
from tests.factories import compliant, service, subscription


class Recording:
    """A snapshot that notes every part a rule looks at (an attribute or `readable(part)`)."""

    def __init__(self, inner: Snapshot) -> None:
        self._inner = inner
        self.seen: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name == "readable":

            def readable(part: str) -> bool:
                self.seen.add(part)
                return self._inner.readable(part)

            return readable
        self.seen.add(name)
        return getattr(self._inner, name)


def _snapshots() -> list[Snapshot]:
    base = compliant()
    return [
        base,
        compliant(
            service=service(public_network_access="Enabled"),
            subscriptions=(subscription("orders-mobile"), subscription("everything", scope="/apis")),
        ),
        replace(base, unreadable=tuple(f"{p}: 403 Forbidden" for p in sorted(OPTIONAL_PARTS))),
    ]


def test_optional_parts_are_the_snapshot_fields_besides_the_service() -> None:
    # `signals` (reconcile's signals reader) and `backups` (the product's own table) are not
    # read by read_snapshot.
    names = {f.name for f in fields(Snapshot)} - {
        "service", "read_at", "unreadable", "not_configured", "skipped", "signals", "backups"
    }  # fmt: skip
    assert names == OPTIONAL_PARTS


@pytest.mark.parametrize("rule_id", sorted(REGISTRY))
def test_each_rule_declares_every_part_it_reads(rule_id: str) -> None:
    assert rule_id in RULE_PARTS, f"{rule_id} is not in shared/read_plan.py RULE_PARTS (it would read everything)"
    rule = REGISTRY[rule_id]
    params = {p.name: p.default for p in rule.params}
    touched: set[str] = set()
    for snapshot in _snapshots():
        recording = Recording(snapshot)
        rule.evaluate(recording, params)  # type: ignore[arg-type]
        touched |= recording.seen & OPTIONAL_PARTS
    assert touched <= RULE_PARTS[rule_id]


def _policy(on: set[str]) -> Policy:
    return Policy(modes={r: (Mode.DETECT if r in on else Mode.OFF) for r in REGISTRY})


def test_the_default_policy_reads_every_part_a_rule_reads() -> None:
    needed = parts_needed(Policy())
    assert needed == OPTIONAL_PARTS - {"identity_providers"}, "no rule reads identity providers today"


def test_switched_off_families_take_their_reads_with_them() -> None:
    assert parts_needed(_policy({"TLS-001", "NET-001"})) == frozenset()
    assert parts_needed(_policy({"LOG-001"})) == {"diagnostic_settings"}
    assert parts_needed(_policy({"KEY-004"})) == {"key_hashes", "key_ledger", "subscriptions"}
    # policies are found through lists; API-006 also runs in each workspace
    assert parts_needed(_policy({"API-006"})) == {"policies", "apis", "products", "workspaces"}


def test_a_rule_without_a_declaration_reads_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(RULE_PARTS, "TLS-001")
    assert parts_needed(_policy({"TLS-001"})) == OPTIONAL_PARTS
