"""Runtime signals: what the gateway logs in Log Analytics say about one instance right now.

Configuration rules cannot see an attack in progress; these can. A signals reader
(production: `shared.signals_source`) runs the queries of `shared.signal_queries` against
the workspace the instance's diagnostic setting targets and returns one frozen
`RuntimeSignals`, which `Snapshot.signals` carries to the pure rules (LOG-004, THR-001..005
in `shared.rules.runtime`).

A query that failed or came back partial is recorded in its `QueryRun.problem`: the rules
that need it stay silent and LOG-004 reports it as a monitoring finding. Nothing here holds
a key, a header or a body: callers are IP addresses and APIM subscription ids (names).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The rules that read `Snapshot.signals`. They run on the signals schedule, not on every
# reconcile: between runs, their open findings stay as the last signals run left them.
SIGNAL_RULES = frozenset({"LOG-004", "THR-001", "THR-002", "THR-003", "THR-004", "THR-005"})

# Query names (QueryRun.name)
LOG_FLOW = "log_flow"
REQUEST_RATE = "request_rate"
AUTH_FAILURES = "auth_failures"
KEY_SPREAD = "key_spread"
OBJECT_WALK = "object_walk"
API_CALLERS = "api_callers"
LLM_TOKENS = "llm_tokens"


@dataclass(frozen=True)
class QueryRun:
    """One named query as it was sent, and whether it answered in full."""

    name: str
    kql: str  # the text sent (parameters substituted); never carries a secret
    window_minutes: int
    workspaces: tuple[str, ...]  # names of the workspaces it ran on
    problem: str | None = None  # failed or partial on a workspace: its results prove nothing


@dataclass(frozen=True)
class DayCount:
    """A count in the signal's window, `days_back` days ago (0: the window ending now)."""

    days_back: int
    value: int


@dataclass(frozen=True)
class CallerFailures:
    """401/403 answers to one caller IP with one APIM subscription (empty: none) in the window."""

    caller_ip: str
    subscription: str
    failures: int


@dataclass(frozen=True)
class KeySpread:
    """One APIM subscription seen from `ips` distinct client IPs in the window."""

    subscription: str
    ips: int
    requests: int
    sample_ips: tuple[str, ...]


@dataclass(frozen=True)
class ObjectWalk:
    """One caller requesting `ids` distinct URL paths of one operation in the window."""

    caller_ip: str
    api: str
    operation: str
    ids: int
    requests: int
    subscriptions: tuple[str, ...]


@dataclass(frozen=True)
class ApiCallers:
    """One API called from `ips` distinct client IPs in the window."""

    api: str
    ips: int
    requests: int
    sample_ips: tuple[str, ...]


@dataclass(frozen=True)
class RuntimeSignals:
    """What one signals run read for one instance (see the module docstring)."""

    table: str  # ApiManagementGatewayLogs | AzureDiagnostics: the shape the queries read
    workspaces: tuple[str, ...] = ()  # names of the workspaces queried
    queried_at: datetime | None = None  # the workspace's now() when LOG_FLOW ran
    # Why nothing was read (no setting sends gateway logs to a workspace, the settings could
    # not be read): every signal rule is silent; LOG-001 reports a missing setting.
    missing: str | None = None
    runs: tuple[QueryRun, ...] = ()
    log_rows: int = 0  # gateway log rows in LOG-004's window
    last_row: datetime | None = None  # the newest gateway log row in the lookback
    requests_by_day: tuple[DayCount, ...] = ()
    auth_failures: tuple[CallerFailures, ...] = ()
    key_spread: tuple[KeySpread, ...] = ()
    object_walks: tuple[ObjectWalk, ...] = ()
    api_callers: tuple[ApiCallers, ...] = ()
    llm_log: bool = False  # a setting sends GatewayLlmLogs to a resource-specific workspace
    tokens_by_day: tuple[DayCount, ...] = ()

    def run(self, name: str) -> QueryRun | None:
        return next((r for r in self.runs if r.name == name), None)

    def answered(self, name: str) -> QueryRun | None:
        """The run of `name` when it ran and answered in full; None otherwise."""
        found = self.run(name)
        return found if found is not None and found.problem is None else None
