"""The rule catalogue: pure functions Snapshot -> [Finding], registered by id.

A rule module declares each rule with `@rule(...)`: id, title, severity, rationale,
references, parameters (with types and defaults, validated by the policy loader) and
whether a remediation exists. Rules never call Azure and never raise for odd input: a
property Azure did not return is "unknown", not drift, unless the rule says why.

Importing `shared.rules` imports every family module, so `REGISTRY` is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.model import Evidence, Finding, Severity, Snapshot
from shared.rules._workspaces import in_workspace, workspace_view

ParamValue = int | float | str | bool | tuple[str, ...]


@dataclass(frozen=True)
class ParamFormat:
    """The shape a string parameter (or each item of a list) must have beyond its type.

    The policy loader checks it, so a value the rule could not use is refused at load time
    with the file, line and key, instead of failing the rule during a scan.
    """

    description: str  # what is accepted, for messages and docs: "an api-version date YYYY-MM-DD"
    accepts: Callable[[str], bool] = field(compare=False)


@dataclass(frozen=True)
class Param:
    """A rule parameter: its type is the type of its default (tuple = list of strings)."""

    name: str
    default: ParamValue
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    format: ParamFormat | None = None

    @property
    def type_name(self) -> str:
        if isinstance(self.default, bool):
            return "boolean"
        if isinstance(self.default, int):
            return "integer"
        if isinstance(self.default, float):
            return "number"
        if isinstance(self.default, tuple):
            return "list of strings"
        return "string"


@dataclass(frozen=True)
class References:
    azure_policy: tuple[str, ...] = ()  # built-in policy definition ids (or names)
    mcsb: tuple[str, ...] = ()  # Microsoft cloud security benchmark controls, e.g. "NS-2"
    owasp_api: tuple[str, ...] = ()  # OWASP API Security Top 10 2023, e.g. "API8:2023"
    checkov: tuple[str, ...] = ()  # e.g. "CKV_AZURE_107"
    docs: tuple[str, ...] = ()  # Microsoft Learn pages


Evaluate = Callable[[Snapshot, Mapping[str, Any]], list[Finding]]


@dataclass(frozen=True)
class Rule:
    id: str
    family: str
    title: str
    severity: Severity
    rationale: str
    references: References
    params: tuple[Param, ...]
    remediable: bool
    evaluate: Evaluate = field(compare=False)
    # The Log Analytics queries a runtime rule reads (name, KQL template), for the docs.
    queries: tuple[tuple[str, str], ...] = ()
    # Whether the rule also runs inside each workspace (`_workspaces.workspace_view`), and
    # what the docs say about workspaces (why it does not, or what differs there).
    in_workspaces: bool = False
    workspace_note: str = ""

    def defaults(self) -> dict[str, ParamValue]:
        return {p.name: p.default for p in self.params}

    def finding(
        self,
        snapshot: Snapshot,
        *,
        message: str,
        path: str,
        actual: object,
        expected: object,
        resource_id: str | None = None,
        severity: Severity | None = None,
        remediable: bool | None = None,
        entry: str = "",
    ) -> Finding:
        """A finding of this rule about `resource_id` (default: the service). `severity` and
        `remediable` override the rule's for this finding (e.g. a heuristic finding that
        the rule's remediation does not cover); `entry` names the list entry at `path` it is
        about when one resource and path can carry several findings."""
        return Finding(
            rule_id=self.id,
            resource_id=resource_id or snapshot.service.id,
            instance_id=snapshot.service.id,
            severity=severity or self.severity,
            title=self.title,
            message=message,
            evidence=Evidence(path=path, actual=_text(actual), expected=_text(expected)),
            remediable=self.remediable if remediable is None else remediable,
            entry=entry,
        )


def _text(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


REGISTRY: dict[str, Rule] = {}


def rule(
    rule_id: str,
    *,
    title: str,
    severity: Severity,
    rationale: str,
    references: References,
    params: Sequence[Param] = (),
    remediable: bool = False,
    queries: Sequence[tuple[str, str]] = (),
    in_workspaces: bool = False,
    workspace_note: str = "",
) -> Callable[[Callable[[Rule, Snapshot, Mapping[str, Any]], list[Finding]]], Rule]:
    """Register a rule. The decorated function gets (the Rule, the snapshot, its params).

    With `in_workspaces` the function also runs over each workspace's view of the snapshot
    (its APIs, products, subscriptions, named values, backends and policies in place of the
    service's); those findings name the workspace and are detect-only."""

    def register(fn: Callable[[Rule, Snapshot, Mapping[str, Any]], list[Finding]]) -> Rule:
        if rule_id in REGISTRY:
            raise ValueError(f"rule {rule_id} registered twice")
        family = rule_id.split("-", 1)[0]
        holder: list[Rule] = []

        def evaluate(snapshot: Snapshot, values: Mapping[str, Any]) -> list[Finding]:
            found = fn(holder[0], snapshot, values)
            if in_workspaces:
                for workspace in snapshot.workspaces:
                    view = workspace_view(snapshot, workspace)
                    found += [f for f in (in_workspace(x, workspace) for x in fn(holder[0], view, values)) if f]
            return found

        registered = Rule(
            id=rule_id,
            family=family,
            title=title,
            severity=severity,
            rationale=rationale,
            references=references,
            params=tuple(params),
            remediable=remediable,
            evaluate=evaluate,
            queries=tuple(queries),
            in_workspaces=in_workspaces,
            workspace_note=workspace_note,
        )
        holder.append(registered)
        REGISTRY[rule_id] = registered
        return registered

    return register


def evaluate_rule(rule_id: str, snapshot: Snapshot, params: Mapping[str, Any] | None = None) -> list[Finding]:
    """Run one rule with its defaults overridden by `params` (tests and the engine use this)."""
    found = REGISTRY[rule_id]
    values: dict[str, Any] = found.defaults()
    values.update(params or {})
    return found.evaluate(snapshot, values)


def _load_families() -> None:
    # Each family module registers its rules on import.
    from shared.rules import (  # noqa: F401
        api,
        backup,
        certs,
        identity,
        keys,
        logs,
        mgmt,
        named_values,
        network,
        runtime,
        tls,
    )


_load_families()
