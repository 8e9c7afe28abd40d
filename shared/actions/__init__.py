"""Remediations: one per remediable rule, registered by rule id.

A remediation PLANS; it never writes. `plan(finding, snapshot, context)` returns a
`RemediationPlan` — a readable before -> after diff and the exact ARM requests (method,
resource, api-version, body, the ETag read for the plan as If-Match) plus what a re-read
must show afterwards — or a `Refusal` naming why acting would be unsafe (e.g. disabling
public network access on an instance with no private path would cut every client off).
The executor (`shared.actions.executor`) applies plans; the engine (handlers/remediate.py)
journals, leases, orders and verifies. Importing this package registers every module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.evidence import PlanEvidence
from shared.model import Finding, Snapshot

APIM_API_VERSION = "2024-05-01"
# Every api-version the product calls Microsoft.ApiManagement with: the raw requests above
# and the SDK client's default (azure-mgmt-apimanagement 5.0.0; a test holds them together).
# MGMT-003 never sets a minimum api-version newer than the oldest of these.
PRODUCT_APIM_API_VERSIONS = ("2024-05-01",)
INSIGHTS_API_VERSION = "2021-05-01-preview"


@dataclass(frozen=True)
class Change:
    """One line of the readable diff."""

    path: str
    before: str
    after: str


@dataclass(frozen=True, repr=False)
class Digest:
    """A guard value compared by its SHA-256, for a property whose value may carry secrets
    (a backend URL with user:password@ or ?sig=...): the plan, the dry run and the journal
    hold the hash, never the value, and nothing prints even the hash."""

    sha256: str

    @classmethod
    def of(cls, value: str) -> Digest:
        return cls(hashlib.sha256(value.encode()).hexdigest())

    def matches(self, actual: Any) -> bool:
        return isinstance(actual, str) and hashlib.sha256(actual.encode()).hexdigest() == self.sha256

    def __repr__(self) -> str:
        return "(as planned, compared by SHA-256)"


@dataclass(frozen=True)
class Expectation:
    """After the write, `GET resource_id` must show `value` at the dotted `path`."""

    resource_id: str
    api_version: str
    path: str  # dotted, e.g. "properties.publicNetworkAccess"
    value: Any  # compared case-insensitively for strings; None = the path is absent or null; a Digest by hash
    # With a dict value: only the keys given must read back (keys and string values compared
    # case-insensitively); other keys of the map are not this expectation's business.
    subset: bool = False


@dataclass(frozen=True)
class ArmWrite:
    """One ARM request, exactly as it will be sent."""

    method: str  # PATCH | PUT | DELETE | POST
    resource_id: str  # path below the ARM endpoint, with any action suffix (e.g. /listValue)
    api_version: str
    body: Mapping[str, Any] | None
    if_match: str | None  # the ETag the plan was made from; None only where Azure takes no If-Match
    description: str
    # Sub-resources whose ETag the snapshot does not carry (APIM lists return none): the
    # executor GETs the resource just before writing, checks that `guard` (the state the
    # plan was made from) still holds — else it is a 412 and the engine re-plans — and
    # sends that read's ETag as If-Match. Never "*": a concurrent change is never clobbered.
    etag_from_read: bool = False
    guard: tuple[Expectation, ...] = ()
    # A PUT that creates: the executor checks the resource is still absent just before it
    # (Azure offers no If-None-Match here), so one somebody made meanwhile is not replaced.
    create_only: bool = False

    def describe(self) -> str:
        return f"{self.method} {self.resource_id}?api-version={self.api_version}"

    def describe_condition(self) -> str:
        if self.create_only:
            return "only if it still does not exist"
        if self.etag_from_read:
            checks = (
                ", ".join(
                    f"{g.path} unchanged (compared by SHA-256)"
                    if isinstance(g.value, Digest)
                    else f"{g.path}={g.value!r}"
                    for g in self.guard
                )
                or "nothing else"
            )
            return f"If-Match: the ETag of a read just before (which must still show {checks})"
        return f"If-Match: {self.if_match}" if self.if_match else ""


@dataclass(frozen=True)
class CopySecretToVault:
    """Read a named value's secret (POST listValue) and store it as a Key Vault secret.

    The value passes from one call to the other inside the executor and is never
    journaled, logged or planned.
    """

    named_value_id: str
    vault_url: str
    secret_name: str
    description: str


@dataclass(frozen=True)
class RotateKey:
    """One write of a subscription key rotation through the Key Vault ledger (KEY-002/003/004).

    Not sent by the executor: the engine hands the plan's rotation to `shared.rotation`, which
    journals each of its steps and holds the subscription's lease. A plan has one per write."""

    subscription_id: str
    action: str  # onboard | rotate
    secret_name: str
    description: str


Step = ArmWrite | CopySecretToVault | RotateKey


@dataclass(frozen=True)
class RemediationPlan:
    rule_id: str
    instance_id: str
    resource_id: str  # what the finding was about
    summary: str  # "Disable TLS 1.0 for clients" — the "would ..." sentence of a dry run
    changes: tuple[Change, ...]
    steps: tuple[Step, ...]
    expectations: tuple[Expectation, ...]

    def would(self) -> str:
        return f"would {self.summary[0].lower()}{self.summary[1:]}"


@dataclass(frozen=True)
class Refusal:
    """Acting would be unsafe or impossible; says why and what would unblock it."""

    rule_id: str
    instance_id: str
    resource_id: str
    reason: str


@dataclass(frozen=True)
class PlanContext:
    """What a planner may know besides the finding and the snapshot."""

    params: Mapping[str, Any]  # the rule's parameters from the policy
    key_vault_url: str | None  # the product's Key Vault (settings), e.g. for SEC-001
    # What the engine gathered before planning (gateway-log key usage, backend TLS probes):
    # a fix that can cut callers off acts on evidence, and refuses when it is missing.
    evidence: PlanEvidence = field(default_factory=PlanEvidence)
    # Rules the engine fixed earlier in this run (or, in a dry run, planned to): e.g. SEC-001
    # after ID-001 knows the identity is brand new and cannot have access to the vault yet.
    fixed_in_run: frozenset[str] = frozenset()


Planner = Callable[[Finding, Snapshot, PlanContext], "RemediationPlan | Refusal"]


@dataclass(frozen=True)
class Remediation:
    rule_id: str
    plan: Planner = field(compare=False)
    # Rules whose remediation must run first on the same instance (e.g. SEC-001 needs the
    # managed identity ID-001 gives the service before Key Vault references can resolve).
    depends_on: tuple[str, ...] = ()
    # Several findings of this rule on one resource become one plan (one PATCH of the whole
    # customProperties map rather than three racing ones).
    combine: bool = False
    combiner: Callable[[Sequence[Finding], Snapshot, PlanContext], RemediationPlan | Refusal] | None = field(
        default=None, compare=False
    )
    # The plan is one PATCH of the service resource: the engine folds every such plan of a
    # run into one service update (`service_settings.combine_service_plans`).
    service_level: bool = False
    # What the snapshot reads like once this remediation has landed, so a dry run (and the
    # blast-radius check) can plan what it unlocks (ID-001's identity lets SEC-001 plan).
    project: Callable[[Snapshot], Snapshot] | None = field(default=None, compare=False)


REMEDIATIONS: dict[str, Remediation] = {}


def remediation(
    rule_id: str,
    *,
    depends_on: Sequence[str] = (),
    service_level: bool = False,
    project: Callable[[Snapshot], Snapshot] | None = None,
) -> Callable[[Planner], Planner]:
    """Register the planner for one rule's findings (one plan per finding)."""

    def register(fn: Planner) -> Planner:
        if rule_id in REMEDIATIONS:
            raise ValueError(f"remediation for {rule_id} registered twice")
        REMEDIATIONS[rule_id] = Remediation(
            rule_id=rule_id, plan=fn, depends_on=tuple(depends_on), service_level=service_level, project=project
        )
        return fn

    return register


def combined_remediation(
    rule_id: str, *, depends_on: Sequence[str] = (), service_level: bool = False
) -> Callable[
    [Callable[[Sequence[Finding], Snapshot, PlanContext], RemediationPlan | Refusal]],
    Callable[[Sequence[Finding], Snapshot, PlanContext], RemediationPlan | Refusal],
]:
    """Register a planner that gets ALL of one rule's findings on one instance at once."""

    def register(
        fn: Callable[[Sequence[Finding], Snapshot, PlanContext], RemediationPlan | Refusal],
    ) -> Callable[[Sequence[Finding], Snapshot, PlanContext], RemediationPlan | Refusal]:
        if rule_id in REMEDIATIONS:
            raise ValueError(f"remediation for {rule_id} registered twice")

        def single(finding: Finding, snapshot: Snapshot, context: PlanContext) -> RemediationPlan | Refusal:
            return fn([finding], snapshot, context)

        REMEDIATIONS[rule_id] = Remediation(
            rule_id=rule_id,
            plan=single,
            depends_on=tuple(depends_on),
            combine=True,
            combiner=fn,
            service_level=service_level,
        )
        return fn

    return register


def order_rules(rule_ids: Sequence[str]) -> list[str]:
    """Rule ids with every remediation after the ones it depends on (stable otherwise)."""
    pending = sorted(set(rule_ids))
    ordered: list[str] = []
    placed: set[str] = set()
    while pending:
        progressed = False
        for rule_id in list(pending):
            needs = REMEDIATIONS[rule_id].depends_on if rule_id in REMEDIATIONS else ()
            if all(dep in placed or dep not in pending for dep in needs):
                ordered.append(rule_id)
                placed.add(rule_id)
                pending.remove(rule_id)
                progressed = True
        if not progressed:
            raise ValueError(f"remediation dependencies form a cycle among {pending}")
    return ordered


def _load_modules() -> None:
    import shared.actions.certificates
    import shared.actions.keys
    import shared.actions.service_settings
    import shared.actions.sub_resources  # noqa: F401


_load_modules()
