"""Run the catalogue over a snapshot under a policy: modes, parameters, exemptions.

Pure: a snapshot and a policy in, findings out. A rule in `off` mode is not run; every
other rule's findings carry the exemption that covers them (by policy or by tag), so
reports can show what is exempt and why instead of hiding it.

A rule that raises is contained: `evaluate` records it as a `RuleFailure` (rule, instance,
reason) and runs the other rules, so one broken rule costs its own checks, never the
scan. The policy loader validates parameter formats so this should not happen; when it
does, the report says so instead of presenting the instance as checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import date

from shared.errors import RuleError
from shared.model import Finding, Mode, RuleFailure, Snapshot
from shared.policy import Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    findings: tuple[Finding, ...] = ()
    failures: tuple[RuleFailure, ...] = ()  # rules that raised: their checks are missing


def _reason(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:300] if first else type(error).__name__


def evaluate(snapshot: Snapshot, policy: Policy, *, today: date) -> Evaluation:
    """Findings of every rule not switched off (with exemptions), and the rules that raised."""
    findings: list[Finding] = []
    failures: list[RuleFailure] = []
    tags = dict(snapshot.service.tags)
    catalogue = policy.catalogue()  # the registry's rules and the policy file's custom rules
    for rule_id in sorted(catalogue):
        if policy.mode_of(rule_id) is Mode.OFF:
            continue
        rule = catalogue[rule_id]
        try:
            found = rule.evaluate(snapshot, policy.params_of(rule_id))
        except Exception as error:  # contained and reported (RuleFailure), never swallowed
            failure = RuleFailure(rule_id=rule_id, instance_id=snapshot.service.id, reason=_reason(error))
            log.error("%s", failure)
            log.debug("rule %s failed on %s", rule_id, snapshot.service.id, exc_info=error)
            failures.append(failure)
            continue
        for finding in found:
            # A policy exemption for the instance covers its sub-resources too; the tags are
            # the instance's, whichever sub-resource the finding is about.
            exemption = policy.exemption_for(rule_id, finding.resource_id, tags, today)
            findings.append(replace(finding, exemption=exemption) if exemption else finding)
    return Evaluation(findings=tuple(findings), failures=tuple(failures))


def evaluate_snapshot(snapshot: Snapshot, policy: Policy, *, today: date) -> list[Finding]:
    """The findings, when every rule ran; `RuleError` naming each rule that raised otherwise.

    For callers that act on the findings (remediation): an incomplete evaluation is no
    basis for a change. A scan uses `evaluate` and reports the failures instead.
    """
    result = evaluate(snapshot, policy, today=today)
    if result.failures:
        raise RuleError("; ".join(str(f) for f in result.failures))
    return list(result.findings)
