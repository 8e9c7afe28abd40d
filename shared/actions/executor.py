"""Apply a plan's steps and verify them by re-reading (act, then verify).

Depends on two narrow protocols: `ArmApi` (one ARM request, waiting out long-running
operations) and `SecretApi` (set one Key Vault secret). `shared.armapi` implements both
against Azure; handler tests may use recording fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shared.actions import (
    APIM_API_VERSION,
    ArmWrite,
    CopySecretToVault,
    Digest,
    Expectation,
    RemediationPlan,
    Step,
)
from shared.errors import PermanentError, RemediatorError, TransientError, error_code_and_message


@dataclass(frozen=True)
class ArmResponse:
    status: int
    etag: str | None
    body: Any
    # A long-running operation still running when the caller stopped waiting (`max_wait`):
    # its status URL, to be journaled and polled by a later run.
    operation_url: str | None = None


@dataclass(frozen=True)
class OperationState:
    """Where a long-running operation stands: InProgress, Succeeded, Failed, Canceled, or
    Unknown (its status URL no longer answers: expired or never existed)."""

    status: str
    error: str = ""

    @property
    def running(self) -> bool:
        return self.status == "InProgress"


class ArmApi(Protocol):
    async def send(
        self,
        method: str,
        path: str,
        api_version: str,
        *,
        body: Mapping[str, Any] | None = None,
        if_match: str | None = None,
        max_wait: float | None = None,
    ) -> ArmResponse:
        """Send one request; for a long-running operation, return once it has finished, or,
        with `max_wait`, once that many seconds have passed (`operation_url` set)."""
        ...

    async def operation_status(self, operation_url: str) -> OperationState:
        """One read of a long-running operation's status URL."""
        ...


class SecretApi(Protocol):
    async def set_secret(self, vault_url: str, name: str, value: str, *, tags: Mapping[str, str]) -> str:
        """Store a new version; return its id. The value is never logged."""
        ...


class PreconditionFailed(TransientError):
    """412: the resource changed since the plan was made. Re-read and re-plan; never clobber."""


class VerificationFailed(PermanentError):
    """The write was accepted but a re-read does not show the planned state."""


def _error_text(response: ArmResponse) -> str:
    # ARM's {"error": {...}} or Microsoft.Insights' flat {code, message}: both name the cause.
    # ARM's refusals name the action and scope (AuthorizationFailed) or the linked action on
    # the linked scope (LinkedAuthorizationFailed, ~600 characters): keep them whole.
    code, message = error_code_and_message(response.body)
    return f"{response.status} {code}: {message[:1000]}".strip()


async def _still_absent(step: ArmWrite, arm: ArmApi) -> None:
    current = await arm.send("GET", step.resource_id, step.api_version)
    if current.status != 404:
        if current.status >= 400:
            raise PermanentError(f"reading {step.resource_id} before creating it: {_error_text(current)}")
        raise PreconditionFailed(f"{step.describe()}: somebody created it since the plan was made")


async def _fresh_etag(step: ArmWrite, arm: ArmApi, seen: dict[str, str]) -> str:
    """Read the resource, check the plan's premises still hold, return its ETag."""
    current = await arm.send("GET", step.resource_id, step.api_version)
    if current.status >= 400:
        raise PermanentError(f"reading {step.resource_id} before writing it: {_error_text(current)}")
    changed = [
        # A hashed premise may carry a secret: say that it changed, never what it is now.
        f"{g.path} changed"
        if isinstance(g.value, Digest)
        else f"{g.path} is {read_path(current.body, g.path)!r}, planned from {g.value!r}"
        for g in step.guard
        if not matches(read_path(current.body, g.path), g.value)
    ]
    if changed:
        raise PreconditionFailed(f"{step.describe()}: changed since the plan was made: {'; '.join(changed)}")
    if not current.etag:
        raise PermanentError(f"{step.describe()}: the resource has no ETag to make the write conditional")
    earlier = seen.get(step.resource_id.lower())
    if earlier is not None and earlier != current.etag:
        # An earlier step of this plan read the resource (SEC-001 copied its value): it
        # changed in between, so what we copied may be stale.
        raise PreconditionFailed(f"{step.describe()}: changed since an earlier step of this plan read it")
    return current.etag


async def _write(step: ArmWrite, arm: ArmApi, seen: dict[str, str]) -> None:
    if step.create_only:
        await _still_absent(step, arm)
    if_match = await _fresh_etag(step, arm, seen) if step.etag_from_read else step.if_match
    response = await arm.send(step.method, step.resource_id, step.api_version, body=step.body, if_match=if_match)
    if response.status == 412:
        raise PreconditionFailed(f"{step.describe()}: the resource changed since it was read (412)")
    if response.status in (408, 429) or response.status >= 500:
        raise TransientError(f"{step.describe()}: {_error_text(response)}")
    if response.status >= 400:
        raise PermanentError(f"{step.describe()}: {_error_text(response)}")


async def _copy_secret(step: CopySecretToVault, arm: ArmApi, secrets: SecretApi, seen: dict[str, str]) -> None:
    response = await arm.send("POST", f"{step.named_value_id}/listValue", APIM_API_VERSION)
    if response.status >= 400 or not isinstance(response.body, dict) or "value" not in response.body:
        raise PermanentError(f"reading the value of {step.named_value_id}: {_error_text(response)}")
    if response.etag:
        seen[step.named_value_id.lower()] = response.etag
    value = str(response.body["value"])
    try:
        await secrets.set_secret(
            step.vault_url, step.secret_name, value, tags={"apim-named-value-id": step.named_value_id}
        )
    finally:
        del value


async def apply_plan(
    plan: RemediationPlan,
    arm: ArmApi,
    secrets: SecretApi,
    *,
    before_each: Callable[[Step], Awaitable[None]] | None = None,
) -> None:
    """Run every step in order; `before_each` runs first (e.g. check the lease is still held)."""
    seen: dict[str, str] = {}  # resource id -> the ETag an earlier step of this plan read
    for done, step in enumerate(plan.steps):
        if before_each is not None:
            await before_each(step)
        try:
            if isinstance(step, ArmWrite):
                await _write(step, arm, seen)
            elif isinstance(step, CopySecretToVault):
                await _copy_secret(step, arm, secrets, seen)
            else:
                raise PermanentError(f"{step.description}: a key rotation is run by the rotator, not the executor")
        except RemediatorError as error:
            # The journal records outcomes per step: a 412 on step 2 after step 1 took
            # effect is a partial change, not an abandoned one.
            error.steps_done = done
            raise


def read_path(body: Any, path: str) -> Any:
    node = body
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        # ARM property names compare case-insensitively.
        match = next((k for k in node if k.lower() == part.lower()), None)
        if match is None:
            return None
        node = node[match]
    return node


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _subset_matches(actual: Any, expected: Mapping[str, Any]) -> bool:
    """Every key of `expected` is in `actual` (keys compared case-insensitively) with a
    matching value; other keys of `actual` are not looked at."""
    if not isinstance(actual, dict):
        return False
    lowered = {str(k).lower(): v for k, v in actual.items()}
    return all(str(k).lower() in lowered and matches(lowered[str(k).lower()], v) for k, v in expected.items())


def matches(actual: Any, expected: Any, *, subset: bool = False) -> bool:
    if isinstance(expected, Digest):
        return expected.matches(actual)
    if subset and isinstance(expected, dict):
        return _subset_matches(actual, expected)
    if isinstance(expected, dict) and isinstance(actual, dict):
        # A read may spell an unset property as null or leave it out: the same thing.
        return bool(_without_nulls(actual) == _without_nulls(expected))
    if isinstance(expected, str) and isinstance(actual, str):
        return actual.lower() == expected.lower()
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        return sorted(str(a).lower() for a in actual) == sorted(str(e).lower() for e in expected)
    if isinstance(expected, bool) and isinstance(actual, str):
        return actual.lower() == str(expected).lower()
    return bool(actual == expected)


async def unmet(expectations: tuple[Expectation, ...], arm: ArmApi) -> list[str]:
    """The expectations a fresh read does not meet, as readable lines (empty: converged)."""
    problems = []
    bodies: dict[tuple[str, str], ArmResponse] = {}
    for expectation in expectations:
        key = (expectation.resource_id.lower(), expectation.api_version)
        if key not in bodies:
            bodies[key] = await arm.send("GET", expectation.resource_id, expectation.api_version)
        response = bodies[key]
        if expectation.value is None and response.status == 404:
            continue
        if response.status >= 400:
            problems.append(f"{expectation.resource_id}: {_error_text(response)}")
            continue
        actual = read_path(response.body, expectation.path)
        if not matches(actual, expectation.value, subset=expectation.subset):
            problems.append(f"{expectation.resource_id} {expectation.path}: {actual!r}, expected {expectation.value!r}")
    return problems


async def verify_plan(plan: RemediationPlan, arm: ArmApi, *, attempts: int = 3, pause: float = 1.0) -> None:
    """Re-read until the planned state shows (a write can take a moment to read back)."""
    problems: list[str] = []
    for attempt in range(attempts):
        problems = await unmet(plan.expectations, arm)
        if not problems:
            return
        if attempt < attempts - 1:
            await asyncio.sleep(pause)
    raise VerificationFailed(f"{plan.rule_id} on {plan.resource_id} did not converge: {'; '.join(problems)}")
