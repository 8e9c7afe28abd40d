"""Self-hosted gateway tokens renewed through the Key Vault ledger, before they expire.

A self-hosted gateway authenticates to APIM's management plane with a token made from one
of the gateway's two keys (`generateToken`); a token lives at most 30 days and dies at once
when its key is regenerated. APIM raises `Microsoft.ApiManagement.GatewayTokenNearExpiry`
before it runs out. The ledger: one Key Vault secret per gateway, tagged `apim-gateway-id`
(the gateway's ARM id) and `apim-gateway-key-slot` (the key the token was made from); its
current version is the token the gateway must use, its `exp` the token's expiry.

The invariant every step keeps, as for subscription keys (`shared.rotation`): **the vault's
current token is one APIM accepts**. So

- onboarding (no ledger secret yet) makes a token from the primary key and stores it; no key
  is regenerated (a token the gateway was deployed with keeps working);
- renewal regenerates the key the current token was NOT made from (which drops any older
  token made from it), makes a token from that fresh key, stores it tagged with that slot and
  `exp` = the token's expiry; the slot in use is left alone, so the token the gateway holds
  keeps working until the next renewal regenerates its key;
- nothing is done while the current token has more than `renew_within_days` left (unless
  forced): a second delivery of the event, or a run after a finished renewal, is a no-op.

Never is the key the vault's current token was made from regenerated: its tag is read
again right before every regenerate. (The tag is trusted: a token is opaque to the product,
which cannot tell from it which key signed it. A secret without the tags is not the
product's and is never written.)

Crash safety is the subscription rotation's: one journal header per renewal (open until it
is done) and one entry per step, each written before the step runs; a regenerate journaled
but not confirmed is judged from the slot's key fingerprint (a truncated SHA-256, never the
key), a store from whether the vault's current version moved on to a version tagged with
the new slot. A run killed between regenerate and store is finished by the next (the
journal says which slot was regenerated; a token is made from it then). Each renewal runs
under a per-gateway lease; its id derives from the gateway and the vault version replaced,
so two triggers for one token are one renewal.

Tokens live in memory only, in `shared.rotation.Key` (repr `***`); they never enter a log
line, exception, journal row or result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from shared.errors import LeaseLost, PermanentError, RemediatorError, TransientError
from shared.journal import JournalEntry, Phase, Trigger
from shared.locks import InstanceBusy
from shared.rotation import (
    MAX_SECRET_NAME,
    SLOTS,
    Key,
    Lease,
    LedgerRef,
    RotationJournal,
    RotationRefused,
    Status,
    StepObserver,
    SubscriptionKeys,
    SubscriptionLocks,
    other,
)

LOG = logging.getLogger("apim_remediator.gateway_rotation")

GATEWAY_TAG = "apim-gateway-id"
GATEWAY_SLOT_TAG = "apim-gateway-key-slot"
TOKEN_CONTENT_TYPE = "application/vnd.apim-gateway-token"  # noqa: S105 (a content type, not a secret)
MAX_TOKEN_DAYS = 30.0  # generateToken: "Maximum token expiry time is set to 30 days"
RULE_ID = "GW-TOKEN"  # the journal's rule column for gateway token renewals (no detection rule)
HEADER = "gateway_rotation"
STEP = "gateway_rotation_step"

# Two slot keys: the same shape as a subscription's.
GatewayKeys = SubscriptionKeys


def _tag(tags: Mapping[str, str], name: str) -> str:
    return next((str(v).strip() for k, v in tags.items() if k.lower() == name), "")


@dataclass(frozen=True)
class TokenCopy:
    """The current version of a gateway ledger secret (value None: disabled or unreadable)."""

    name: str
    version: str
    tags: Mapping[str, str]
    value: Key | None
    expires: datetime | None = None

    @property
    def gateway_id(self) -> str:
        return _tag(self.tags, GATEWAY_TAG)

    @property
    def slot(self) -> str:
        return _tag(self.tags, GATEWAY_SLOT_TAG).lower()


def gateway_parts(gateway_id: str) -> tuple[str, str]:
    """(APIM service id, gateway name) of a gateway's ARM id."""
    match = re.fullmatch(
        r"(/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.ApiManagement/service/[^/]+)"
        r"/gateways/([^/]+)",
        gateway_id.strip().rstrip("/"),
        re.IGNORECASE,
    )
    if match is None:
        raise PermanentError(f"not an APIM gateway id: {gateway_id!r}")
    return match.group(1), match.group(2)


def gateway_secret_name(service_name: str, gateway: str, gateway_id: str) -> str:
    """The gateway's ledger secret name: readable, within Key Vault's rules (alphanumerics and
    dashes, at most 127) and collision-safe (ends in a hash of the lowercased ARM id)."""
    digest = hashlib.sha256(gateway_id.strip().lower().encode()).hexdigest()[:12]
    readable = re.sub(r"[^0-9A-Za-z]+", "-", f"apimgw-{service_name}-{gateway}").strip("-")
    readable = readable[: MAX_SECRET_NAME - len(digest) - 1].rstrip("-")
    return f"{readable}-{digest}"


def renewal_id(gateway_id: str, basis: str) -> str:
    raw = f"gateway|{gateway_id.strip().lower()}|{basis}"
    return "rot-gateway-" + hashlib.sha256(raw.encode()).hexdigest()[:32]


# -- narrow dependencies --------------------------------------------------------------------------


class GatewayApi(Protocol):
    """APIM self-hosted gateways (ARM)."""

    async def gateways(self, service_id: str) -> list[str]: ...

    async def list_keys(self, gateway_id: str) -> GatewayKeys: ...

    async def regenerate(self, gateway_id: str, slot: str) -> None: ...

    async def generate_token(self, gateway_id: str, slot: str, expiry: datetime) -> Key: ...


class TokenVault(Protocol):
    """The ledger vault, for gateway tokens."""

    vault_url: str

    async def gateway_ledger(self, service_id: str) -> list[LedgerRef]: ...

    async def current_token(self, name: str) -> TokenCopy | None: ...

    async def store_token(self, name: str, value: Key, *, tags: Mapping[str, str], expires: datetime) -> str: ...


# -- requests, plans and outcomes -----------------------------------------------------------------


@dataclass(frozen=True)
class GatewayTarget:
    instance_id: str  # the APIM service's ARM id
    gateway_id: str  # the gateway's ARM id
    trigger: Trigger
    token_days: float = MAX_TOKEN_DAYS  # the new token's lifetime (at most 30 days)
    renew_within_days: float = 7.0  # renew when the current token has at most this left
    force: bool = False  # renew even when the current token is not near expiry
    op_id: str | None = None  # None: derived from the gateway and the vault version replaced


@dataclass(frozen=True)
class GatewayResult:
    gateway_id: str
    action: str  # onboard | renew
    status: Status
    detail: str
    op_id: str = ""
    steps: tuple[str, ...] = ()
    writes: int = 0
    resumed: bool = False


@dataclass(frozen=True)
class GatewayStep:
    kind: str  # regenerate | store
    slot: str

    def describe(self, secret: str) -> str:
        if self.kind == "regenerate":
            return f"regenerate the gateway's {self.slot} key (tokens made from it stop working)"
        return f"make a token from the {self.slot} key and store it as the current version of '{secret}'"


@dataclass(frozen=True)
class GatewayPlan:
    kind: str  # onboard | renew
    secret: str
    steps: tuple[GatewayStep, ...]

    def describe(self) -> tuple[str, ...]:
        return tuple(s.describe(self.secret) for s in self.steps)


def plan_renewal(
    secret: str, copy: TokenCopy | None, now: datetime, *, renew_within: timedelta, force: bool
) -> GatewayPlan | str | None:
    """What to do for a gateway given its ledger secret's current version: a plan, a refusal
    reason (str), or None when the token is not due. Pure."""
    if copy is None:
        return GatewayPlan("onboard", secret, (GatewayStep("store", "primary"),))
    if copy.value is None:
        return f"the current version of Key Vault secret '{copy.name}' is disabled or unreadable; enable it first"
    if copy.slot not in SLOTS:
        return (
            f"Key Vault secret '{copy.name}' has {GATEWAY_SLOT_TAG}={copy.slot or '(empty)'}; "
            "it must be primary or secondary"
        )
    if not force and copy.expires is not None and copy.expires - now > renew_within:
        return None
    target = other(copy.slot)
    return GatewayPlan("renew", secret, (GatewayStep("regenerate", target), GatewayStep("store", target)))


def _data(entry: JournalEntry) -> dict[str, Any]:
    try:
        data = json.loads(entry.after or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _log(result: GatewayResult, target: GatewayTarget, level: int = logging.INFO) -> GatewayResult:
    LOG.log(
        level,
        "gateway token %s of %s: %s%s",
        result.action,
        target.gateway_id,
        result.status.value,
        f": {result.detail}" if result.detail else "",
        extra={
            "event": f"rotation.gateway.{result.status.value}",
            "resource_id": target.gateway_id,
            "instance_id": target.instance_id,
            "rule_id": RULE_ID,
            "action": result.action,
            "op_id": result.op_id,
            "trigger": target.trigger.kind.value,
            "dry_run": result.status is Status.WOULD,
        },
    )
    return result


@dataclass
class GatewayRotator:
    """Renews gateway tokens: one gateway at a time under its lease, every step journaled first."""

    api: GatewayApi
    vault: TokenVault
    journal: RotationJournal
    locks: SubscriptionLocks
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    lease_wait: float = 10.0
    # Told (step, gateway id) after each journal row and each change; never a value.
    observe: StepObserver | None = None

    def _seen(self, step: str, gateway_id: str) -> None:
        if self.observe is not None:
            self.observe(step, gateway_id)

    async def ledger_of(self, service_id: str) -> dict[str, LedgerRef]:
        """The instance's gateway ledger by lowercased gateway id; a gateway two secrets claim
        is kept with an empty name (refused by name)."""
        found: dict[str, LedgerRef] = {}
        for ref in await self.vault.gateway_ledger(service_id):
            key = ref.subscription_id.lower()
            found[key] = LedgerRef(name="", subscription_id=ref.subscription_id, slot="") if key in found else ref
        return found

    async def renew(
        self, target: GatewayTarget, *, apply: bool, ledger: Mapping[str, LedgerRef] | None = None
    ) -> GatewayResult:
        """Renew (or onboard) one gateway's token; dry run unless `apply`."""
        if not 0 < target.token_days <= MAX_TOKEN_DAYS:
            raise PermanentError(f"a gateway token lives more than 0 and at most 30 days, not {target.token_days:g}")
        try:
            if not apply:
                return _log(await self._dry_run(target, ledger), target)
            try:
                async with self.locks.hold(target.gateway_id, wait=self.lease_wait) as lease:
                    return _log(await self._locked(target, ledger, lease), target)
            except InstanceBusy as error:
                return _log(GatewayResult(target.gateway_id, "renew", Status.BUSY, str(error)), target)
        except LeaseLost:
            raise
        except RotationRefused as error:
            return _log(GatewayResult(target.gateway_id, "renew", Status.REFUSED, str(error)), target, logging.WARNING)
        except TransientError as error:
            detail = f"{error}; the journal keeps where it stopped and the next run finishes it"
            return _log(GatewayResult(target.gateway_id, "renew", Status.PENDING, detail), target, logging.WARNING)
        except PermanentError as error:
            return _log(GatewayResult(target.gateway_id, "renew", Status.FAILED, str(error)), target, logging.ERROR)

    async def resume_open(self, instance_id: str) -> list[GatewayResult]:
        """Finish every renewal of the instance a crashed run left open (under each one's lease)."""
        results = []
        seen: set[str] = set()
        for entry in await self.journal.unfinished(instance_id):
            header = _data(entry).get(HEADER)
            if not isinstance(header, dict) or entry.resource_id.lower() in seen:
                continue
            seen.add(entry.resource_id.lower())
            target = GatewayTarget(
                instance_id=instance_id,
                gateway_id=entry.resource_id,
                trigger=entry.trigger,
                token_days=float(header.get("token_days", MAX_TOKEN_DAYS)),
                op_id=entry.correlation_id,
                force=True,
            )
            results.append(await self.renew(target, apply=True))
        return results

    # -- reading ------------------------------------------------------------------------------

    async def _read(
        self, target: GatewayTarget, ledger: Mapping[str, LedgerRef] | None
    ) -> tuple[str, TokenCopy | None]:
        service_id, gateway = gateway_parts(target.gateway_id)
        if ledger is None:
            ledger = await self.ledger_of(service_id)
        ref = ledger.get(target.gateway_id.lower())
        if ref is not None and not ref.name:
            raise RotationRefused(
                f"several Key Vault secrets are tagged {GATEWAY_TAG}={target.gateway_id}: "
                "which one the gateway reads is ambiguous; keep one"
            )
        name = (
            ref.name
            if ref is not None
            else gateway_secret_name(service_id.rsplit("/", 1)[1], gateway, target.gateway_id)
        )
        copy = await self.vault.current_token(name)
        if copy is not None and copy.gateway_id.lower() != target.gateway_id.lower():
            raise RotationRefused(
                f"Key Vault secret '{name}' exists but is not tagged {GATEWAY_TAG}={target.gateway_id}: "
                "it is not the product's and is never written"
            )
        return name, copy

    def _plan(self, target: GatewayTarget, name: str, copy: TokenCopy | None) -> GatewayPlan | None:
        planned = plan_renewal(
            name, copy, self.clock(), renew_within=timedelta(days=target.renew_within_days), force=target.force
        )
        if isinstance(planned, str):
            raise RotationRefused(planned)
        return planned

    def _not_due(self, target: GatewayTarget, copy: TokenCopy | None) -> GatewayResult:
        left = f" (expires {copy.expires.isoformat()})" if copy is not None and copy.expires else ""
        return GatewayResult(
            target.gateway_id,
            "renew",
            Status.SKIPPED,
            f"the vault's token has more than {target.renew_within_days:g} days left{left}: not due",
        )

    async def _dry_run(self, target: GatewayTarget, ledger: Mapping[str, LedgerRef] | None) -> GatewayResult:
        name, copy = await self._read(target, ledger)
        planned = self._plan(target, name, copy)
        if planned is None:
            return self._not_due(target, copy)
        return GatewayResult(
            target.gateway_id,
            planned.kind,
            Status.WOULD,
            f"would {planned.kind} the token (Key Vault secret '{name}')",
            steps=planned.describe(),
            writes=len(planned.steps),
        )

    # -- apply --------------------------------------------------------------------------------

    async def _locked(
        self, target: GatewayTarget, ledger: Mapping[str, LedgerRef] | None, lease: Lease
    ) -> GatewayResult:
        open_headers = [
            e
            for e in await self.journal.unfinished(target.instance_id)
            if e.resource_id.lower() == target.gateway_id.lower() and HEADER in _data(e)
        ]
        if open_headers:
            # The open renewal answers this request too: a second one now would renew twice.
            return await self._resume(min(open_headers, key=lambda e: e.started_at), target, lease)
        if target.op_id is not None:
            entries = await self.journal.of_correlation(target.instance_id, target.op_id)
            if any(HEADER in _data(e) and e.phase is Phase.VERIFIED for e in entries):
                return GatewayResult(
                    target.gateway_id, "renew", Status.SKIPPED, f"already done by renewal {target.op_id}",
                    op_id=target.op_id,
                )  # fmt: skip
        name, copy = await self._read(target, ledger)
        planned = self._plan(target, name, copy)
        if planned is None:
            return self._not_due(target, copy)
        op = target.op_id or renewal_id(target.gateway_id, copy.version if copy else "new")
        lease.assert_held()
        header = await self.journal.record_intent(
            target.instance_id,
            correlation_id=op,
            rule_id=RULE_ID,
            resource_id=target.gateway_id,
            action=f"{planned.kind} the self-hosted gateway token of {target.gateway_id} via '{name}'",
            trigger=target.trigger,
            before=json.dumps(
                {"slot_in_use": copy.slot if copy else None, "vault_version": copy.version if copy else None}
            ),
            after=json.dumps(
                {
                    HEADER: {
                        "kind": planned.kind,
                        "secret": name,
                        "steps": [{"kind": s.kind, "slot": s.slot} for s in planned.steps],
                        "token_days": target.token_days,
                        "replaces": copy.version if copy else None,
                    }
                }
            ),
            etag_before=None,
        )
        self._seen("header", target.gateway_id)
        return await self._run(header, planned, target, lease, {}, copy.version if copy else None)

    async def _resume(self, header: JournalEntry, target: GatewayTarget, lease: Lease) -> GatewayResult:
        record = _data(header)[HEADER]
        try:
            steps = tuple(GatewayStep(str(s["kind"]), str(s["slot"])) for s in record["steps"])
            planned = GatewayPlan(str(record["kind"]), str(record["secret"]), steps)
            replaces = record.get("replaces")
        except (KeyError, TypeError) as error:
            lease.assert_held()
            await self.journal.record_outcome(header, Phase.FAILED, error=f"unreadable renewal record ({error!r})")
            raise PermanentError(f"gateway renewal {header.correlation_id}: its journal record is unreadable") from None
        done: dict[int, JournalEntry] = {}
        for entry in sorted(await self.journal.of_correlation(target.instance_id, header.correlation_id),
                            key=lambda e: e.started_at):  # fmt: skip
            step = _data(entry).get(STEP)
            if isinstance(step, dict) and isinstance(step.get("index"), int):
                done[step["index"]] = entry
        resumed = GatewayTarget(
            instance_id=target.instance_id,
            gateway_id=header.resource_id,
            trigger=header.trigger,
            token_days=float(record.get("token_days", MAX_TOKEN_DAYS)),
            op_id=header.correlation_id,
            force=True,
        )
        self._seen("resume", target.gateway_id)
        result = await self._run(header, planned, resumed, lease, done, replaces if isinstance(replaces, str) else None)
        return GatewayResult(
            result.gateway_id,
            result.action,
            result.status,
            f"resumed a renewal a crashed run left open: {result.detail}",
            op_id=result.op_id,
            steps=result.steps,
            writes=result.writes,
            resumed=True,
        )

    async def _run(
        self,
        header: JournalEntry,
        planned: GatewayPlan,
        target: GatewayTarget,
        lease: Lease,
        earlier: dict[int, JournalEntry],
        replaces: str | None,
    ) -> GatewayResult:
        writes = 0
        try:
            for index, step in enumerate(planned.steps):
                previous = earlier.get(index)
                if previous is not None and previous.phase is Phase.VERIFIED:
                    continue
                if step.kind == "regenerate":
                    writes += await self._regenerate(header, planned, target, index, step.slot, lease, previous)
                else:
                    writes += await self._store(header, planned, target, index, step.slot, lease, previous, replaces)
        except (TransientError, LeaseLost):
            raise  # the header stays open: the next run finishes it
        except RemediatorError as error:
            lease.assert_held()
            await self.journal.record_outcome(header, Phase.FAILED, error=str(error)[:1000], steps_done=writes)
            raise
        lease.assert_held()
        await self.journal.record_outcome(header, Phase.VERIFIED, steps_done=len(planned.steps))
        self._seen("done", target.gateway_id)
        detail = (
            "onboarded: a token made from the primary key is the first version"
            if planned.kind == "onboard"
            else f"renewed: the gateway now reads a token made from the {planned.steps[-1].slot} key"
        )
        return GatewayResult(
            target.gateway_id,
            planned.kind,
            Status.DONE,
            f"{detail} (Key Vault secret '{planned.secret}')",
            op_id=header.correlation_id,
            steps=planned.describe(),
            writes=writes,
        )

    async def _step_intent(
        self, header: JournalEntry, target: GatewayTarget, index: int, kind: str, slot: str, fingerprint: str
    ) -> JournalEntry:
        entry = await self.journal.record_intent(
            target.instance_id,
            correlation_id=header.correlation_id,
            rule_id=RULE_ID,
            resource_id=target.gateway_id,
            action=f"{kind} ({slot} key)",
            trigger=target.trigger,
            before=None,
            after=json.dumps({STEP: {"index": index, "kind": kind, "slot": slot, "fingerprint": fingerprint}}),
            etag_before=None,
        )
        self._seen(f"{kind}-intent", target.gateway_id)
        return entry

    async def _regenerate(
        self,
        header: JournalEntry,
        planned: GatewayPlan,
        target: GatewayTarget,
        index: int,
        slot: str,
        lease: Lease,
        previous: JournalEntry | None,
    ) -> int:
        keys = await self.api.list_keys(target.gateway_id)
        if previous is not None:
            journaled = _data(previous).get(STEP, {}).get("fingerprint")
            if journaled and keys.of(slot).fingerprint() != journaled:
                # The crashed run's regenerate landed.
                lease.assert_held()
                await self.journal.record_outcome(previous, Phase.VERIFIED, steps_done=1)
                self._seen("regenerated", target.gateway_id)
                return 0
        copy = await self.vault.current_token(planned.secret)
        # The one rule above all: never regenerate the key the vault's current token was made from.
        if copy is not None and copy.slot == slot:
            raise RotationRefused(
                f"the vault's current token in '{planned.secret}' is tagged as made from the {slot} key: "
                "regenerating it would cut the gateway off; nothing regenerated"
            )
        lease.assert_held()
        entry = previous or await self._step_intent(
            header, target, index, "regenerate", slot, keys.of(slot).fingerprint()
        )
        lease.assert_held()
        await self.api.regenerate(target.gateway_id, slot)
        self._seen("regenerate-sent", target.gateway_id)
        after = await self.api.list_keys(target.gateway_id)
        if after.of(slot).same(keys.of(slot)):
            raise PermanentError(f"regenerating the {slot} key of gateway {target.gateway_id} did not change it")
        lease.assert_held()
        await self.journal.record_outcome(entry, Phase.VERIFIED, steps_done=1)
        self._seen("regenerated", target.gateway_id)
        return 1

    async def _store(
        self,
        header: JournalEntry,
        planned: GatewayPlan,
        target: GatewayTarget,
        index: int,
        slot: str,
        lease: Lease,
        previous: JournalEntry | None,
        replaces: str | None,
    ) -> int:
        copy = await self.vault.current_token(planned.secret)
        if copy is not None and copy.gateway_id.lower() != target.gateway_id.lower():
            raise RotationRefused(
                f"Key Vault secret '{planned.secret}' is not tagged {GATEWAY_TAG}={target.gateway_id}: "
                "not the product's; nothing written"
            )
        if copy is not None and copy.version != replaces and copy.slot == slot and copy.value is not None:
            # Already there (a crashed run stored it after this renewal's regenerate): no second version.
            if previous is not None:
                lease.assert_held()
                await self.journal.record_outcome(previous, Phase.VERIFIED, steps_done=1)
            self._seen("stored", target.gateway_id)
            return 0
        lease.assert_held()
        entry = previous or await self._step_intent(header, target, index, "store", slot, "")
        expiry = (self.clock() + timedelta(days=target.token_days)).replace(second=0, microsecond=0)
        token = await self.api.generate_token(target.gateway_id, slot, expiry)
        tags = {GATEWAY_TAG: target.gateway_id, GATEWAY_SLOT_TAG: slot}
        lease.assert_held()
        await self.vault.store_token(planned.secret, token, tags=tags, expires=expiry)
        self._seen("store-sent", target.gateway_id)
        stored = await self.vault.current_token(planned.secret)
        if stored is None or not token.same(stored.value) or stored.slot != slot:
            raise TransientError(f"Key Vault secret '{planned.secret}' does not read back as stored; retried next run")
        lease.assert_held()
        await self.journal.record_outcome(entry, Phase.VERIFIED, steps_done=1)
        self._seen("stored", target.gateway_id)
        return 1


async def renew_all(
    rotator: GatewayRotator,
    targets: Sequence[GatewayTarget],
    *,
    apply: bool,
    ledger: Mapping[str, LedgerRef] | None = None,
) -> list[GatewayResult]:
    """Renew the gateways one after another (an instance has a handful)."""
    return [await rotator.renew(t, apply=apply, ledger=ledger) for t in targets]
