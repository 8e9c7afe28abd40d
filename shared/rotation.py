"""Dual-key rotation of APIM subscription keys through the Key Vault key ledger.

The ledger: one Key Vault secret per tracked APIM subscription, tagged
`apim-subscription-id` (the subscription's ARM id) and `apim-key-slot` (primary |
secondary); its current version is the key clients must use. The invariant every step
keeps: **the vault's current version is a key APIM accepts**. So

- onboarding stores the subscription's current primary key as the first version;
- rotation regenerates the slot clients are NOT using, reads it back (listSecrets), stores
  it as the new version (tagged with that slot, expiry = now + max age); the slot in use
  stays valid until the next rotation regenerates it;
- a vault copy that matches neither key (regenerated outside the product) is restored
  first (store what APIM holds in the slot the tag names), then rotated;
- a vault copy that matches the OTHER slot (a mislabelled tag) is refused: rotating would
  regenerate the key clients hold;
- revoking (a leaked key) rotates, waits a grace period (default 0), then regenerates the
  old slot too.

No slot is ever regenerated while the vault's current version holds it (checked right
before every regenerate, whatever the journal says).

Crash safety: a rotation is one journal entry (the "header", open until the rotation is
done) plus one entry per step, each written before the step runs. A step that was
journaled but whose outcome was not is judged from Azure's state, never repeated blindly:
a regenerate landed when the slot's key fingerprint (a truncated SHA-256, never the key)
differs from the one journaled before it; a store landed when the vault's current version
equals the key. So the next run finishes what a killed one began — the journal says which
slot was regenerated, listSecrets gives the key back — and nothing is done twice. Each
rotation runs under a per-subscription lease, so two triggers never rotate one
subscription at once. A rotation's id (`op`) is derived from what triggered it (the
subscription and the vault version being replaced), so two deliveries of one trigger are
one rotation.

Keys live in memory only, in `Key` (whose repr and str are `***`); they never enter a log
line, exception, journal row or result.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from shared.errors import LeaseLost, PermanentError, RemediatorError, TransientError
from shared.journal import JournalApi, JournalEntry, Phase, Trigger
from shared.locks import InstanceBusy

LOG = logging.getLogger("apim_remediator.rotation")

SLOTS = ("primary", "secondary")
SUBSCRIPTION_TAG = "apim-subscription-id"
SLOT_TAG = "apim-key-slot"
MAX_AGE_TAG = "apim-key-max-age-days"
CONTENT_TYPE = "application/vnd.apim-subscription-key"
MAX_SECRET_NAME = 127  # Key Vault: 1-127 characters, alphanumerics and dashes
FINGERPRINT_CHARS = 16


class Key:
    """A subscription key in memory: compared in constant time, shown as `***`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A truncated SHA-256: tells two keys apart in the journal without carrying either."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:FINGERPRINT_CHARS]

    def same(self, other: Key | None) -> bool:
        return other is not None and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __repr__(self) -> str:
        return "Key(***)"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class SubscriptionKeys:
    primary: Key
    secondary: Key

    def of(self, slot: str) -> Key:
        return self.primary if slot == "primary" else self.secondary

    def slot_of(self, key: Key | None) -> str | None:
        return next((s for s in SLOTS if self.of(s).same(key)), None)

    def __repr__(self) -> str:
        return "SubscriptionKeys(***)"


@dataclass(frozen=True)
class VaultCopy:
    """The current version of a ledger secret (value None: disabled or unreadable)."""

    name: str
    version: str
    tags: Mapping[str, str]
    value: Key | None
    created: datetime | None = None

    @property
    def subscription_id(self) -> str:
        return _tag(self.tags, SUBSCRIPTION_TAG)

    @property
    def slot(self) -> str:
        return _tag(self.tags, SLOT_TAG).lower()


@dataclass(frozen=True)
class LedgerRef:
    """A listed ledger secret: its name and what its tags say."""

    name: str
    subscription_id: str
    slot: str
    version: str = ""


def _tag(tags: Mapping[str, str], name: str) -> str:
    return next((str(v).strip() for k, v in tags.items() if k.lower() == name), "")


def other(slot: str) -> str:
    return "secondary" if slot == "primary" else "primary"


def ledger_secret_name(service_name: str, sid: str, subscription_id: str) -> str:
    """A Key Vault secret name for a subscription's ledger entry: readable, within Key
    Vault's rules (alphanumerics and dashes, at most 127), and collision-safe (a hash of the
    lowercased ARM id ends it, so two ids that sanitise alike still differ)."""
    digest = hashlib.sha256(subscription_id.strip().lower().encode()).hexdigest()[:12]
    readable = re.sub(r"[^0-9A-Za-z]+", "-", f"apimkey-{service_name}-{sid}").strip("-")
    readable = readable[: MAX_SECRET_NAME - len(digest) - 1].rstrip("-")
    return f"{readable}-{digest}"


def subscription_parts(subscription_id: str) -> tuple[str, str]:
    """(APIM service id, subscription name) of an APIM subscription ARM id."""
    match = re.fullmatch(
        r"(/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ApiManagement/service/[^/]+)"
        r"/subscriptions/([^/]+)",
        subscription_id.strip().rstrip("/"),
        re.IGNORECASE,
    )
    if match is None:
        raise PermanentError(f"not an APIM subscription id: {subscription_id!r}")
    return match.group(1), match.group(2)


def operation_id(kind: str, subscription_id: str, basis: str) -> str:
    """A rotation's id from what triggered it: the same trigger delivered twice is one rotation."""
    raw = f"{kind}|{subscription_id.strip().lower()}|{basis}"
    return f"rot-{kind}-" + hashlib.sha256(raw.encode()).hexdigest()[:32]


# -- narrow dependencies ------------------------------------------------------------------------


class KeyApi(Protocol):
    """APIM subscription keys (ARM)."""

    async def list_keys(self, subscription_id: str) -> SubscriptionKeys: ...

    async def regenerate(self, subscription_id: str, slot: str) -> None: ...


class LedgerVault(Protocol):
    """The key-ledger vault."""

    vault_url: str

    async def ledger(self, service_id: str) -> list[LedgerRef]: ...

    async def current(self, name: str) -> VaultCopy | None: ...

    async def store(self, name: str, value: Key, *, tags: Mapping[str, str], expires: datetime) -> str: ...


class RotationJournal(JournalApi, Protocol):
    """The journal calls of the engine, plus finding a rotation's rows by its correlation id."""

    async def of_correlation(self, instance_id: str, correlation_id: str) -> list[JournalEntry]: ...


class Lease(Protocol):
    def assert_held(self) -> None: ...


class SubscriptionLocks(Protocol):
    def hold(self, instance_id: str, *, wait: float = ...) -> AbstractAsyncContextManager[Lease]: ...


# -- requests and outcomes ----------------------------------------------------------------------


class Action(StrEnum):
    ONBOARD = "onboard"  # KEY-002: track an untracked subscription (no-op when tracked)
    ROTATE = "rotate"  # KEY-003 / KEY-004: onboard, or restore then rotate, or rotate
    REVOKE = "revoke"  # a leaked key: rotate, then regenerate the old slot too


class Status(StrEnum):
    WOULD = "would"  # dry run
    DONE = "done"  # rotated / onboarded / restored, verified
    SKIPPED = "skipped"  # nothing to do (already tracked, already rotated by this trigger)
    REFUSED = "refused"  # unsafe: the reason says why and what would unblock it
    PENDING = "pending"  # a transient failure mid-way: journaled, the next run finishes it
    BUSY = "busy"  # another worker holds the subscription's lease
    FAILED = "failed"  # a permanent failure: an incident


RULE_OF = {Action.ONBOARD: "KEY-002", Action.ROTATE: "KEY-003", Action.REVOKE: "KEY-003"}


@dataclass(frozen=True)
class RotationTarget:
    instance_id: str  # the APIM service's ARM id
    subscription_id: str  # the APIM subscription's ARM id
    action: Action
    trigger: Trigger
    max_age_days: float = 90.0
    grace_seconds: float = 0.0  # revoke: how long the old key keeps working after the vault moved on
    op_id: str | None = None  # None: derived from the subscription and the vault version replaced
    # A trigger about one vault version (SecretNearExpiry): act only while it is still current.
    only_if_version: str | None = None
    rule_id: str | None = None  # the finding that asked, when one did


@dataclass(frozen=True)
class RotationResult:
    subscription_id: str
    action: str
    status: Status
    detail: str
    op_id: str = ""
    steps: tuple[str, ...] = ()
    writes: int = 0
    resumed: bool = False


class RotationRefused(PermanentError):
    """Rotating would cut clients off (or write what is not the product's): the reason says why."""


@dataclass(frozen=True)
class StepPlan:
    kind: str  # store | regenerate | wait
    slot: str

    def describe(self, secret: str) -> str:
        if self.kind == "store":
            return f"store APIM's {self.slot} key as the new current version of Key Vault secret '{secret}'"
        if self.kind == "regenerate":
            return f"regenerate the {self.slot} key (listSecrets reads it back)"
        return f"wait the grace period before revoking the {self.slot} key"


@dataclass(frozen=True)
class RotationPlan:
    kind: str  # onboard | rotate | restore_and_rotate | revoke
    secret: str
    steps: tuple[StepPlan, ...]
    slot_in_use: str
    slot_after: str

    def describe(self) -> tuple[str, ...]:
        return tuple(s.describe(self.secret) for s in self.steps)

    @property
    def writes(self) -> int:
        return sum(1 for s in self.steps if s.kind != "wait")


def plan_rotation(
    action: Action, secret: str, copy: VaultCopy | None, keys: SubscriptionKeys
) -> RotationPlan | str | None:
    """What to do for `action` given the vault copy and APIM's keys: a plan, a refusal
    reason (str), or None when there is nothing to do. Pure."""
    if copy is None:
        return RotationPlan("onboard", secret, (StepPlan("store", "primary"),), "", "primary")
    if action is Action.ONBOARD:
        return None
    if copy.value is None:
        return f"the current version of Key Vault secret '{copy.name}' is disabled or unreadable; enable it first"
    tagged = copy.slot
    if tagged not in SLOTS:
        return f"Key Vault secret '{copy.name}' has {SLOT_TAG}={tagged or '(empty)'}; it must be primary or secondary"
    holds = keys.slot_of(copy.value)
    target = other(tagged)
    rotate = (StepPlan("regenerate", target), StepPlan("store", target))
    revoke = (StepPlan("wait", tagged), StepPlan("regenerate", tagged)) if action is Action.REVOKE else ()
    if holds == tagged:
        kind = "revoke" if action is Action.REVOKE else "rotate"
        return RotationPlan(kind, secret, rotate + revoke, tagged, target)
    if holds is not None:
        return (
            f"the vault copy in '{copy.name}' is APIM's {holds} key but is tagged {SLOT_TAG}={tagged} (KEY-004, "
            f"mislabelled): rotating would regenerate the {holds} key clients use; correct the tag to {holds} first"
        )
    restore = (StepPlan("store", tagged),)
    return RotationPlan("restore_and_rotate", secret, restore + rotate + revoke, tagged, target)


def _log(result: RotationResult, target: RotationTarget, level: int = logging.INFO) -> RotationResult:
    LOG.log(
        level,
        "rotation %s of %s: %s%s",
        result.action,
        target.subscription_id,
        result.status.value,
        f": {result.detail}" if result.detail else "",
        extra={
            "event": f"rotation.{result.status.value}",
            "resource_id": target.subscription_id,
            "instance_id": target.instance_id,
            "rule_id": target.rule_id or RULE_OF[target.action],
            "action": result.action,
            "op_id": result.op_id,
            "trigger": target.trigger.kind.value,
            "dry_run": result.status is Status.WOULD,
        },
    )
    return result


def _data(entry: JournalEntry) -> dict[str, Any]:
    try:
        data = json.loads(entry.after or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def is_rotation_entry(entry: JournalEntry) -> bool:
    """Whether a journal entry belongs to a key rotation (settled by the rotator, not the engine)."""
    data = _data(entry)
    # Gateway token renewals (shared/gateway_rotation.py) journal under their own keys.
    return any(k in data for k in ("rotation", "rotation_step", "gateway_rotation", "gateway_rotation_step"))


StepObserver = Callable[[str, str], None]


@dataclass
class _Seen:
    """What the previous step of the same run read last (APIM's keys, the vault copy)."""

    keys: SubscriptionKeys | None = None
    copy: VaultCopy | None = None


@dataclass
class Rotator:
    """Runs rotations: one subscription at a time under its lease, every step journaled first."""

    keys: KeyApi
    vault: LedgerVault
    journal: RotationJournal
    locks: SubscriptionLocks
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    lease_wait: float = 10.0
    # Told (step, subscription id) after each journal row and each change: progress for a
    # worker's output and the crash tests. Never a value.
    observe: StepObserver | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def _seen(self, step: str, subscription_id: str) -> None:
        if self.observe is not None:
            self.observe(step, subscription_id)

    # -- the entry points -------------------------------------------------------------------

    async def rotate(
        self,
        target: RotationTarget,
        *,
        apply: bool,
        ledger: Mapping[str, LedgerRef] | None = None,
        before_write: Callable[[], None] | None = None,
    ) -> RotationResult:
        """Rotate (onboard, restore, revoke) one subscription; dry run unless `apply`.

        `ledger`: the instance's ledger by lowercased subscription id, when the caller has
        listed it already (a batch lists it once). `before_write`: called before every write
        (the engine's lease check and write budget)."""
        try:
            if not apply:
                return _log(await self._dry_run(target, ledger), target)
            try:
                async with self.locks.hold(target.subscription_id, wait=self.lease_wait) as lease:
                    return _log(await self._locked(target, ledger, lease, before_write), target)
            except InstanceBusy as error:
                result = RotationResult(target.subscription_id, target.action.value, Status.BUSY, str(error))
                return _log(result, target)
        except LeaseLost:
            raise
        except RotationRefused as error:
            result = RotationResult(target.subscription_id, target.action.value, Status.REFUSED, str(error))
            return _log(result, target, logging.WARNING)
        except TransientError as error:
            result = RotationResult(
                target.subscription_id,
                target.action.value,
                Status.PENDING,
                f"{error}; the journal keeps where it stopped and the next run finishes it",
            )
            return _log(result, target, logging.WARNING)
        except PermanentError as error:
            result = RotationResult(target.subscription_id, target.action.value, Status.FAILED, str(error))
            return _log(result, target, logging.ERROR)

    async def resume_open(self, instance_id: str) -> list[RotationResult]:
        """Finish every rotation of the instance a crashed run left open (under each one's lease)."""
        results = []
        seen: set[str] = set()
        for entry in await self.journal.unfinished(instance_id):
            rotation = _data(entry).get("rotation")
            if not isinstance(rotation, dict) or entry.resource_id.lower() in seen:
                continue
            seen.add(entry.resource_id.lower())
            target = RotationTarget(
                instance_id=instance_id,
                subscription_id=entry.resource_id,
                action=Action(str(rotation.get("action", "rotate"))),
                trigger=entry.trigger,
                max_age_days=float(rotation.get("max_age_days", 90)),
                grace_seconds=float(rotation.get("grace_seconds", 0)),
                op_id=entry.correlation_id,
                rule_id=entry.rule_id,
            )
            results.append(await self.rotate(target, apply=True))
        return results

    # -- dry run ----------------------------------------------------------------------------

    async def _read(
        self, target: RotationTarget, ledger: Mapping[str, LedgerRef] | None
    ) -> tuple[str, VaultCopy | None, SubscriptionKeys]:
        service_id, sid = subscription_parts(target.subscription_id)
        if ledger is None:
            ledger = await self.ledger_of(service_id)
        ref = ledger.get(target.subscription_id.lower())
        if ref is None:
            name = ledger_secret_name(service_id.rsplit("/", 1)[1], sid, target.subscription_id)
            copy = await self.vault.current(name)
            # Ours when its tags name this subscription (onboarded since the ledger was listed).
            if copy is not None and copy.subscription_id.lower() != target.subscription_id.lower():
                raise RotationRefused(
                    f"Key Vault secret '{name}' exists but is not tagged {SUBSCRIPTION_TAG}="
                    f"{target.subscription_id}: it is not the product's and is never written"
                )
        elif not ref.name:
            raise RotationRefused(
                f"several Key Vault secrets are tagged {SUBSCRIPTION_TAG}={target.subscription_id}: "
                "which one clients read is ambiguous; keep one"
            )
        else:
            name = ref.name
            copy = await self.vault.current(name)
            if copy is not None and copy.subscription_id.lower() != target.subscription_id.lower():
                raise RotationRefused(f"Key Vault secret '{name}' changed owner meanwhile; not written")
        keys = await self.keys.list_keys(target.subscription_id)
        return name, copy, keys

    async def ledger_of(self, service_id: str) -> dict[str, LedgerRef]:
        """The instance's ledger by lowercased subscription id; a subscription two secrets
        claim is left out of it and refused by name."""
        found: dict[str, LedgerRef] = {}
        doubled: set[str] = set()
        for ref in await self.vault.ledger(service_id):
            key = ref.subscription_id.lower()
            if key in found:
                doubled.add(key)
            found[key] = ref
        for key in doubled:
            found[key] = LedgerRef(name="", subscription_id=found[key].subscription_id, slot="")
        return found

    async def _dry_run(self, target: RotationTarget, ledger: Mapping[str, LedgerRef] | None) -> RotationResult:
        name, copy, keys = await self._read(target, ledger)
        planned = self._plan(target, name, copy, keys)
        if planned is None:
            return RotationResult(target.subscription_id, target.action.value, Status.SKIPPED, "already tracked")
        return RotationResult(
            target.subscription_id,
            planned.kind,
            Status.WOULD,
            f"would {planned.kind.replace('_', ' ')} (Key Vault secret '{name}')",
            steps=planned.describe(),
            writes=planned.writes,
        )

    def _plan(
        self, target: RotationTarget, name: str, copy: VaultCopy | None, keys: SubscriptionKeys
    ) -> RotationPlan | None:
        planned = plan_rotation(target.action, name, copy, keys)
        if isinstance(planned, str):
            raise RotationRefused(planned)
        return planned

    # -- apply ------------------------------------------------------------------------------

    async def _locked(
        self,
        target: RotationTarget,
        ledger: Mapping[str, LedgerRef] | None,
        lease: Lease,
        before_write: Callable[[], None] | None,
    ) -> RotationResult:
        # First what a crashed run left open for this subscription: finished before anything new.
        open_headers = [
            e
            for e in await self.journal.unfinished(target.instance_id)
            if e.resource_id.lower() == target.subscription_id.lower() and "rotation" in _data(e)
        ]
        if open_headers:
            # The open rotation answers this request too: a second one now would rotate twice.
            return await self._resume(min(open_headers, key=lambda e: e.started_at), target, lease, before_write)
        if target.op_id is not None and await self._finished(target, target.op_id):
            return RotationResult(
                target.subscription_id,
                target.action.value,
                Status.SKIPPED,
                f"already done by rotation {target.op_id} (the same trigger, delivered again)",
                op_id=target.op_id,
            )
        name, copy, keys = await self._read(target, ledger)
        if target.only_if_version and (copy is None or copy.version != target.only_if_version):
            return RotationResult(
                target.subscription_id,
                target.action.value,
                Status.SKIPPED,
                f"the vault version {target.only_if_version} the trigger named is no longer current: already rotated",
            )
        planned = self._plan(target, name, copy, keys)
        if planned is None:
            return RotationResult(target.subscription_id, target.action.value, Status.SKIPPED, "already tracked")
        # A derived id names the vault version being replaced: while that version is current, no
        # rotation of it has finished (finishing one stores a new version), so no lookup is needed.
        op = target.op_id or operation_id(target.action.value, target.subscription_id, copy.version if copy else "new")
        lease.assert_held()
        header = await self.journal.record_intent(
            target.instance_id,
            correlation_id=op,
            rule_id=target.rule_id or RULE_OF[target.action],
            resource_id=target.subscription_id,
            action=f"{planned.kind.replace('_', ' ')} the key of {target.subscription_id} via '{name}'",
            trigger=target.trigger,
            before=json.dumps({"slot_in_use": planned.slot_in_use, "vault_version": copy.version if copy else None}),
            after=json.dumps(
                {
                    "rotation": {
                        "action": target.action.value,
                        "kind": planned.kind,
                        "secret": name,
                        "steps": [{"kind": s.kind, "slot": s.slot} for s in planned.steps],
                        "max_age_days": target.max_age_days,
                        "grace_seconds": target.grace_seconds,
                    }
                }
            ),
            etag_before=None,
        )
        self._seen("header", target.subscription_id)
        return await self._run(header, planned, target, lease, before_write, {})

    async def _finished(self, target: RotationTarget, op: str) -> bool:
        entries = await self.journal.of_correlation(target.instance_id, op)
        return any("rotation" in _data(e) and e.phase is Phase.VERIFIED for e in entries)

    async def _resume(
        self,
        header: JournalEntry,
        target: RotationTarget,
        lease: Lease,
        before_write: Callable[[], None] | None,
    ) -> RotationResult:
        rotation = _data(header)["rotation"]
        try:
            steps = tuple(StepPlan(str(s["kind"]), str(s["slot"])) for s in rotation["steps"])
            planned = RotationPlan(str(rotation["kind"]), str(rotation["secret"]), steps, "", "")
        except (KeyError, TypeError) as error:
            lease.assert_held()
            await self.journal.record_outcome(header, Phase.FAILED, error=f"unreadable rotation record ({error!r})")
            raise PermanentError(f"rotation {header.correlation_id}: its journal record is unreadable") from None
        entries = await self.journal.of_correlation(target.instance_id, header.correlation_id)
        done: dict[int, JournalEntry] = {}
        for entry in sorted(entries, key=lambda e: e.started_at):
            step = _data(entry).get("rotation_step")
            if isinstance(step, dict) and isinstance(step.get("index"), int):
                done[step["index"]] = entry
        resumed_target = RotationTarget(
            instance_id=target.instance_id,
            subscription_id=header.resource_id,
            action=Action(str(rotation.get("action", "rotate"))),
            trigger=header.trigger,
            max_age_days=float(rotation.get("max_age_days", target.max_age_days)),
            grace_seconds=float(rotation.get("grace_seconds", 0)),
            op_id=header.correlation_id,
            rule_id=header.rule_id,
        )
        self._seen("resume", target.subscription_id)
        result = await self._run(header, planned, resumed_target, lease, before_write, done)
        return RotationResult(
            result.subscription_id,
            result.action,
            result.status,
            f"resumed a rotation a crashed run left open: {result.detail}",
            op_id=result.op_id,
            steps=result.steps,
            writes=result.writes,
            resumed=True,
        )

    async def _run(
        self,
        header: JournalEntry,
        planned: RotationPlan,
        target: RotationTarget,
        lease: Lease,
        before_write: Callable[[], None] | None,
        earlier: dict[int, JournalEntry],
    ) -> RotationResult:
        writes = 0
        seen = _Seen()
        try:
            for index, step in enumerate(planned.steps):
                previous = earlier.get(index)
                if previous is not None and previous.phase is Phase.VERIFIED:
                    continue
                if step.kind == "wait":
                    if target.grace_seconds > 0:
                        await self.sleep(target.grace_seconds)
                    continue
                if step.kind == "regenerate":
                    writes += await self._regenerate(
                        header, planned, target, index, step.slot, lease, before_write, previous, seen
                    )
                else:
                    writes += await self._store(
                        header, planned, target, index, step.slot, lease, before_write, previous, seen
                    )
        except RotationRefused as error:
            lease.assert_held()
            await self.journal.record_outcome(header, Phase.FAILED, error=str(error)[:1000], steps_done=writes)
            raise
        except (TransientError, LeaseLost):
            raise  # the header stays open: the next run (or whoever holds the lease next) finishes it
        except RemediatorError as error:
            lease.assert_held()
            await self.journal.record_outcome(header, Phase.FAILED, error=str(error)[:1000], steps_done=writes)
            raise
        lease.assert_held()
        await self.journal.record_outcome(header, Phase.VERIFIED, steps_done=len(planned.steps))
        self._seen("done", target.subscription_id)
        detail = {
            "onboard": "onboarded: APIM's primary key is the first version",
            "rotate": f"rotated: clients now read the {planned.steps[-1].slot} key",
            "restore_and_rotate": "restored the key APIM holds, then rotated",
            "revoke": "rotated, then regenerated the old key",
        }.get(planned.kind, planned.kind)
        return RotationResult(
            target.subscription_id,
            planned.kind,
            Status.DONE,
            f"{detail} (Key Vault secret '{planned.secret}')",
            op_id=header.correlation_id,
            steps=planned.describe(),
            writes=writes,
        )

    async def _step_intent(
        self, header: JournalEntry, target: RotationTarget, index: int, kind: str, slot: str, fingerprint: str
    ) -> JournalEntry:
        entry = await self.journal.record_intent(
            target.instance_id,
            correlation_id=header.correlation_id,
            rule_id=header.rule_id,
            resource_id=target.subscription_id,
            action=f"{kind} the {slot} key",
            trigger=target.trigger,
            before=None,
            after=json.dumps(
                {"rotation_step": {"index": index, "kind": kind, "slot": slot, "fingerprint": fingerprint}}
            ),
            etag_before=None,
        )
        self._seen(f"{kind}-intent", target.subscription_id)
        return entry

    async def _regenerate(
        self,
        header: JournalEntry,
        planned: RotationPlan,
        target: RotationTarget,
        index: int,
        slot: str,
        lease: Lease,
        before_write: Callable[[], None] | None,
        previous: JournalEntry | None,
        seen: _Seen,
    ) -> int:
        keys = await self.keys.list_keys(target.subscription_id)
        if previous is not None:
            journaled = _data(previous).get("rotation_step", {}).get("fingerprint")
            if journaled and keys.of(slot).fingerprint() != journaled:
                # The crashed run's regenerate landed: listSecrets has the new key.
                lease.assert_held()
                await self.journal.record_outcome(previous, Phase.VERIFIED, steps_done=1)
                self._seen("regenerated", target.subscription_id)
                return 0
        copy = await self.vault.current(planned.secret)
        # The one rule above all: never regenerate the key the vault's current version holds.
        if copy is not None and copy.value is not None and keys.of(slot).same(copy.value):
            raise RotationRefused(
                f"the vault's current version of '{planned.secret}' holds APIM's {slot} key: regenerating it would "
                "cut clients off; nothing regenerated"
            )
        lease.assert_held()
        entry = previous or await self._step_intent(
            header, target, index, "regenerate", slot, keys.of(slot).fingerprint()
        )
        if before_write is not None:
            before_write()
        lease.assert_held()
        await self.keys.regenerate(target.subscription_id, slot)
        self._seen("regenerate-sent", target.subscription_id)
        after = await self.keys.list_keys(target.subscription_id)
        if after.of(slot).same(keys.of(slot)):
            raise PermanentError(f"regenerating the {slot} key of {target.subscription_id} did not change it")
        # Under the lease nothing of ours moves until the next step: it may start from these reads.
        seen.keys, seen.copy = after, copy
        lease.assert_held()
        await self.journal.record_outcome(entry, Phase.VERIFIED, steps_done=1)
        self._seen("regenerated", target.subscription_id)
        return 1

    async def _store(
        self,
        header: JournalEntry,
        planned: RotationPlan,
        target: RotationTarget,
        index: int,
        slot: str,
        lease: Lease,
        before_write: Callable[[], None] | None,
        previous: JournalEntry | None,
        seen: _Seen,
    ) -> int:
        keys = seen.keys or await self.keys.list_keys(target.subscription_id)
        value = keys.of(slot)
        copy = seen.copy if seen.keys is not None else await self.vault.current(planned.secret)
        seen.keys = seen.copy = None
        if copy is not None and copy.subscription_id.lower() != target.subscription_id.lower():
            raise RotationRefused(
                f"Key Vault secret '{planned.secret}' is not tagged {SUBSCRIPTION_TAG}={target.subscription_id}: "
                "not the product's; nothing written"
            )
        if copy is not None and copy.slot == slot and value.same(copy.value):
            # Already there (a crashed run stored it): done, no second version.
            if previous is not None:
                lease.assert_held()
                await self.journal.record_outcome(previous, Phase.VERIFIED, steps_done=1)
            self._seen("stored", target.subscription_id)
            return 0
        lease.assert_held()
        entry = previous or await self._step_intent(header, target, index, "store", slot, value.fingerprint())
        tags = {
            SUBSCRIPTION_TAG: target.subscription_id,
            SLOT_TAG: slot,
            MAX_AGE_TAG: f"{target.max_age_days:g}",
        }
        if before_write is not None:
            before_write()
        lease.assert_held()
        await self.vault.store(
            planned.secret, value, tags=tags, expires=self.clock() + timedelta(days=target.max_age_days)
        )
        self._seen("store-sent", target.subscription_id)
        stored = await self.vault.current(planned.secret)
        if stored is None or not value.same(stored.value) or stored.slot != slot:
            raise TransientError(f"Key Vault secret '{planned.secret}' does not read back as stored; retried next run")
        lease.assert_held()
        await self.journal.record_outcome(entry, Phase.VERIFIED, steps_done=1)
        self._seen("stored", target.subscription_id)
        return 1


async def rotate_all(
    rotator: Rotator,
    targets: Sequence[RotationTarget],
    *,
    apply: bool,
    concurrency: int = 8,
    ledger: Mapping[str, LedgerRef] | None = None,
) -> list[RotationResult]:
    """Rotate many subscriptions with at most `concurrency` at once, in the targets' order."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(target: RotationTarget) -> RotationResult:
        async with gate:
            return await rotator.rotate(target, apply=apply, ledger=ledger)

    return list(await asyncio.gather(*(one(t) for t in targets)))
