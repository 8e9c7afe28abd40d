"""Reports written while a scan runs: each instance's result goes out when it is done and
is not kept, so a scan of a large estate holds one tally, not every finding.

- `JsonLinesWriter`: one JSON object per line. A `scan` line first (tool, started,
  policy), an `instance` line per instance (the same object the JSON report's
  `instances` holds), a `summary` line last (finished, counts, worst severity, partial).
- `SarifStreamWriter`: the same SARIF 2.1.0 document `render_sarif` builds, written in
  pieces: the driver and its rules, then each result as it comes, then the invocation
  with its notifications (only instances with problems have any). Results come in the
  order instances finish, not sorted by severity; SARIF consumers do not depend on order.

`ScanTally` keeps what the exit code needs (`fails`, with the same meaning as
`ScanReport.fails`) without the findings themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

from shared import __version__
from shared.model import Severity
from shared.report import (
    SARIF_SCHEMA,
    InstanceResult,
    instance_json,
    sarif_invocation,
    sarif_notifications,
    sarif_result,
    sarif_rule_index,
    sarif_tool,
)
from shared.rules import REGISTRY, Rule


@dataclass
class ScanTally:
    """Counts over the instance results seen so far."""

    instances: int = 0
    errors: int = 0
    partial: bool = False
    findings: int = 0
    active: int = 0
    active_by_severity: dict[Severity, int] = field(default_factory=dict)

    def add(self, result: InstanceResult) -> None:
        self.instances += 1
        self.errors += 1 if result.error else 0
        self.partial = self.partial or bool(result.unreadable or result.rule_failures)
        self.findings += len(result.findings)
        for finding in result.findings:
            if not finding.exempt:
                self.active += 1
                self.active_by_severity[finding.severity] = self.active_by_severity.get(finding.severity, 0) + 1

    def worst(self) -> Severity | None:
        return max(self.active_by_severity, key=lambda s: s.rank) if self.active_by_severity else None

    def fails(self, threshold: Severity | None, *, allow_partial: bool = False) -> bool:
        """`ScanReport.fails` over the tally."""
        if self.errors:
            return True
        if threshold is None:
            return False
        if self.partial and not allow_partial:
            return True
        return any(severity.rank >= threshold.rank for severity in self.active_by_severity)


class ResultWriter(Protocol):
    tally: ScanTally

    def begin(self, started: datetime, policy_file: str) -> None: ...

    def add(self, result: InstanceResult) -> None: ...

    def end(self, finished: datetime) -> None: ...


class JsonLinesWriter:
    def __init__(self, out: TextIO, catalogue: Mapping[str, Rule] | None = None) -> None:
        self.out = out
        self.tally = ScanTally()
        self._started: datetime | None = None

    def _line(self, body: dict[str, Any]) -> None:
        self.out.write(json.dumps(body, separators=(",", ":")) + "\n")
        self.out.flush()

    def begin(self, started: datetime, policy_file: str) -> None:
        self._started = started
        tool = {"name": "apim-remediator", "version": __version__}
        self._line({"type": "scan", "tool": tool, "started": started.isoformat(), "policy": policy_file})

    def add(self, result: InstanceResult) -> None:
        self.tally.add(result)
        self._line({"type": "instance", **instance_json(result)})

    def end(self, finished: datetime) -> None:
        worst = self.tally.worst()
        self._line(
            {
                "type": "summary",
                "finished": finished.isoformat(),
                "instances": self.tally.instances,
                "not_scanned": self.tally.errors,
                "findings": self.tally.findings,
                "active_findings": self.tally.active,
                "worst": worst.value if worst is not None else None,
                "partial": self.tally.partial,
            }
        )


class SarifStreamWriter:
    def __init__(self, out: TextIO, catalogue: Mapping[str, Rule] | None = None) -> None:
        """`catalogue`: the rules the driver describes (`Policy.catalogue()`, custom rules
        included); default: the built-in catalogue."""
        self.out = out
        self.tally = ScanTally()
        self.catalogue = dict(REGISTRY if catalogue is None else catalogue)
        self.index = sarif_rule_index(self.catalogue)
        self.notifications: list[dict[str, Any]] = []
        self._started: datetime | None = None
        self._first = True
        self._unsuccessful = False

    def begin(self, started: datetime, policy_file: str) -> None:
        self._started = started
        head = json.dumps({"$schema": SARIF_SCHEMA, "version": "2.1.0"})[:-1]
        tool = json.dumps(sarif_tool(self.catalogue))
        self.out.write(f'{head}, "runs": [{{"tool": {tool}, "results": [\n')
        self.out.flush()

    def add(self, result: InstanceResult) -> None:
        self.tally.add(result)
        self._unsuccessful = self._unsuccessful or bool(result.error or result.rule_failures)
        self.notifications += sarif_notifications(result, self.index)
        for finding in result.findings:
            self.out.write(("" if self._first else ",\n") + json.dumps(sarif_result(finding, self.index)))
            self._first = False
        self.out.flush()

    def end(self, finished: datetime) -> None:
        assert self._started is not None, "begin() first"
        invocation = sarif_invocation(
            self._started, finished, successful=not self._unsuccessful, notifications=self.notifications
        )
        self.out.write(f'\n], "invocations": [{json.dumps(invocation)}]}}]}}\n')
        self.out.flush()


STREAM_WRITERS: dict[str, Callable[[TextIO, Mapping[str, Rule]], ResultWriter]] = {
    "jsonl": JsonLinesWriter,
    "sarif": SarifStreamWriter,
}
