"""Run the catalogue over a snapshot under a policy: modes, parameters, exemptions.

Pure: a snapshot and a policy in, findings out. A rule in `off` mode is not run; every
other rule's findings carry the exemption that covers them (by policy or by tag), so
reports can show what is exempt and why instead of hiding it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date

from shared.model import Finding, Mode, Snapshot
from shared.policy import Policy
from shared.rules import REGISTRY


def evaluate_snapshot(snapshot: Snapshot, policy: Policy, *, today: date) -> list[Finding]:
    """Findings of every rule not switched off, each with its exemption if one applies."""
    findings: list[Finding] = []
    tags = dict(snapshot.service.tags)
    for rule_id in sorted(REGISTRY):
        if policy.mode_of(rule_id) is Mode.OFF:
            continue
        rule = REGISTRY[rule_id]
        for finding in rule.evaluate(snapshot, policy.params_of(rule_id)):
            # A policy exemption for the instance covers its sub-resources too; the tags are
            # the instance's, whichever sub-resource the finding is about.
            exemption = policy.exemption_for(rule_id, finding.resource_id, tags, today)
            findings.append(replace(finding, exemption=exemption) if exemption else finding)
    return findings
