"""Key rotation against the twin and Azurite, through the product's own clients: onboarding,
rotation, restore of an out-of-step copy, refusal of a mislabelled one, revoke, scope,
foreign secrets, crash resume, the engine's KEY remediations and the Event Grid triggers
delivered twice. Keys are the estate's canaries; no output may carry one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.secrets import SecretClient

from handlers.context import AppContext
from handlers.events import EventStatus, GridEvent, handle_event
from shared.incidents import fingerprint_of
from shared.journal import Phase, Trigger, TriggerKind
from shared.rotation import Action, RotationTarget, Status, ledger_secret_name
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, VAULT, compliant, drift, fragment_for, key, with_subscription
from tests.integration.test_remediate import cli, product_env

pytestmark = pytest.mark.integration

API = "api-version=2024-05-01"


class World:
    """What a test needs once it has seeded its estate (the ledger vault exists only then)."""

    def __init__(self, twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.twin, self.tmp_path = twin, tmp_path
        for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
            monkeypatch.setenv(name, twin.env[name])  # azure-identity reads these itself (in-process tests)
        self._context: AppContext | None = None

    @property
    def env(self) -> dict[str, str]:
        # Events act only in remediate mode; the CLI and the API act on request whatever the mode.
        policy = "version: 1\nrules:\n  KEY-002: {mode: remediate}\n  KEY-003: {mode: remediate}\n"
        return product_env(self.twin, self.tmp_path, policy)

    @property
    def vault(self) -> SecretClient:
        return SecretClient(
            self.twin.urls[f"vault:{VAULT}"],
            self.twin.credential(),
            connection_verify=self.twin.ca_file,
            verify_challenge_resource=False,
        )

    def context(self) -> AppContext:
        if self._context is None:
            self._context = AppContext.load(self.env)
        return self._context

    def close(self) -> None:
        if self._context is not None:
            asyncio.run(self._context.aclose())


@pytest.fixture
def world(twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    built = World(twin, tmp_path, monkeypatch)
    yield built
    built.close()


def seed(twin: TwinHandle, *rules: str, name: str = "rot", extra: Any = None) -> str:
    spec = compliant(name, twin.subscription_id)
    for rule_id in rules:
        drift(rule_id, spec)
    if extra is not None:
        extra(spec)
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    twin.seed(fragment)
    return ids[name]


def keys_of(twin: TwinHandle, sub_id: str) -> dict[str, str]:
    body = twin.arm("POST", f"{sub_id}/listSecrets?{API}").json()
    return {"primary": body["primaryKey"], "secondary": body["secondaryKey"]}


def versions(vault: SecretClient, name: str) -> list[tuple[str, str, dict[str, str]]]:
    return sorted(
        (str(p.version), str(vault.get_secret(name, p.version).value), dict(p.tags or {}))
        for p in vault.list_properties_of_secret_versions(name)
    )


def gateway_ok(twin: TwinHandle, service_id: str, value: str) -> bool:
    status, body = twin.control("POST", "/_twin/gateway/check", {"service_id": service_id, "key": value})
    assert status == 200, body
    return bool(body["valid"])


def regenerates(twin: TwinHandle) -> list[str]:
    _, log = twin.control("GET", "/_twin/log?service=arm")
    return [e["path"] for e in log["entries"] if "/regenerate" in e["path"] and e["status"] == 204]


def no_key_in(text: str, *values: str) -> None:
    leaked = [v[:6] for v in values if v and v in text]
    assert leaked == [], f"key values leaked into output: {leaked}"


def test_dry_run_then_apply_onboards_rotates_and_restores(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin, "KEY-002", "KEY-003", "KEY-004")
    env, vault = world.env, world.vault
    untracked, stale, regenerated = (f"{service_id}/subscriptions/{s}" for s in ("untracked", "stale", "regenerated"))
    before = {s: keys_of(twin, s) for s in (untracked, stale, regenerated)}

    dry = cli(env, "rotate", "--instance", service_id)
    assert dry.returncode == 0, dry.stderr
    assert "dry run (nothing changed; --apply to act)" in dry.stdout
    assert "WOULD     onboard" in dry.stdout
    assert "WOULD     restore_and_rotate" in dry.stdout
    assert regenerates(twin) == []

    applied = cli(env, "rotate", "--instance", service_id, "--apply", "--format", "json")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    report = {r["subscription"].rsplit("/", 1)[-1]: r for r in json.loads(applied.stdout)["results"]}
    assert {k: (r["action"], r["status"]) for k, r in report.items()} == {
        "untracked": ("onboard", "done"),
        "stale": ("rotate", "done"),
        "regenerated": ("restore_and_rotate", "done"),
    }
    # Onboarding: APIM's primary key is the first version, tagged, with an expiry; no key changed.
    name = ledger_secret_name("rot", "untracked", untracked)
    [(_, value, tags)] = versions(vault, name)
    assert value == before[untracked]["primary"] == keys_of(twin, untracked)["primary"]
    assert tags == {"apim-subscription-id": untracked, "apim-key-slot": "primary", "apim-key-max-age-days": "90"}
    assert vault.get_secret(name).properties.expires_on is not None
    # Rotation: the secondary was regenerated and is what clients read; the primary still works.
    after = keys_of(twin, stale)
    assert after["primary"] == before[stale]["primary"]
    assert after["secondary"] != before[stale]["secondary"]
    current = vault.get_secret("rot--stale")
    assert (current.value, current.properties.tags["apim-key-slot"]) == (after["secondary"], "secondary")
    assert gateway_ok(twin, service_id, before[stale]["primary"])  # valid until the next rotation
    # Restore then rotate: first the key APIM holds in the tagged slot, then the new one.
    history = versions(vault, "rot--regenerated")
    assert len(history) == 3
    assert {v for _, v, _ in history} >= {before[regenerated]["primary"], keys_of(twin, regenerated)["secondary"]}
    assert sorted(p.split("/")[-1] for p in regenerates(twin)) == ["regenerateSecondaryKey"] * 2

    scan = cli(env, "scan", "--instance", service_id)
    assert not any(f"KEY-00{n}" in scan.stdout for n in (2, 3, 4)), scan.stdout
    again = cli(env, "rotate", "--instance", service_id, "--apply")
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    every_key = [v for s in before.values() for v in s.values()] + [v for _, v, _ in history]
    no_key_in(dry.stdout + dry.stderr + applied.stdout + applied.stderr + again.stdout + again.stderr, *every_key)


def test_a_mislabelled_copy_is_refused_with_the_reason_and_nothing_changes(twin: TwinHandle, world: World) -> None:
    def mislabel(spec: dict[str, Any]) -> None:
        with_subscription(spec, "mislabelled")

    service_id = seed(twin, extra=mislabel)
    env, vault = world.env, world.vault
    sub = f"{service_id}/subscriptions/mislabelled"
    # The vault holds the primary key but its tag says secondary: rotating would regenerate the primary.
    current = vault.get_secret("rot--mislabelled")
    vault.set_secret(
        "rot--mislabelled", current.value, tags={"apim-subscription-id": sub, "apim-key-slot": "secondary"}
    )
    before = versions(vault, "rot--mislabelled")
    result = cli(env, "rotate", "--instance", service_id, "--subscription", "mislabelled", "--apply")
    assert result.returncode == 1
    assert "REFUSED" in result.stdout
    assert "mislabelled" in result.stdout
    assert "rotating would regenerate the primary key clients use" in result.stdout
    assert versions(vault, "rot--mislabelled") == before
    assert regenerates(twin) == []
    assert gateway_ok(twin, service_id, key("rot", "mislabelled"))
    no_key_in(result.stdout + result.stderr, key("rot", "mislabelled"))
    # A rotation that could not finish is an incident (issue 11), with the reason and no key.
    incident = asyncio.run(world.context().incidents().store.get(fingerprint_of("ROTATION", sub)))
    assert incident is not None
    assert incident.open
    assert "rotating would regenerate the primary key clients use" in incident.description
    no_key_in(incident.description + incident.title, key("rot", "mislabelled"))


def test_revoke_rotates_then_regenerates_the_old_key(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin)
    env, vault = world.env, world.vault
    sub = f"{service_id}/subscriptions/orders-mobile"
    leaked = key("rot", "orders-mobile")
    result = cli(env, "rotate", "--instance", service_id, "--subscription", "orders-mobile", "--revoke", "--apply")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DONE      revoke" in result.stdout
    keys = keys_of(twin, sub)
    assert leaked not in keys.values()
    assert not gateway_ok(twin, service_id, leaked)
    assert vault.get_secret("rot--orders-mobile").value == keys["secondary"]
    assert gateway_ok(twin, service_id, keys["secondary"])
    no_key_in(result.stdout + result.stderr, leaked, *keys.values())


def test_scope_unknown_subscriptions_and_foreign_secrets(twin: TwinHandle, world: World) -> None:
    sid = "squatted"

    def squatted(spec: dict[str, Any]) -> None:
        with_subscription(spec, sid, tracked=False)

    service_id = seed(twin, extra=squatted)
    env, vault = world.env, world.vault
    sub = f"{service_id}/subscriptions/{sid}"
    # Someone else's secret already has the name onboarding would choose, untagged: never written.
    taken = ledger_secret_name("rot", sid, sub)
    vault.set_secret(taken, f"{CANARY}-someone-elses", tags={"owner": "team-x"})
    foreign = {name: versions(vault, name) for name in ("backend-key", taken)}

    result = cli(env, "rotate", "--instance", service_id, "--subscription", sid, "--subscription", "nope", "--apply")
    assert result.returncode == 1
    assert "out of scope: 'nope' is not a subscription of" in result.stdout
    assert f"Key Vault secret '{taken}' exists but is not tagged apim-subscription-id" in result.stdout
    assert {name: versions(vault, name) for name in foreign} == foreign

    outside = service_id.replace("/resourceGroups/rg-drift/", "/resourceGroups/rg-apim-prod/")
    refused = cli(env, "rotate", "--instance", outside, "--apply")
    assert refused.returncode == 2
    assert "not an APIM instance in the configured scope" in refused.stderr
    assert regenerates(twin) == []


class Crash(BaseException):
    """Stands for SIGKILL inside one process: nothing after it runs."""


def test_a_run_killed_between_regenerate_and_store_is_finished_by_the_next(
    twin: TwinHandle, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service_id = seed(twin)
    vault = world.vault
    sub = f"{service_id}/subscriptions/orders-mobile"
    target = RotationTarget(service_id, sub, Action.ROTATE, Trigger(TriggerKind.CLI, "test"))

    def crash_after(step: str) -> Any:
        def observe(seen: str, _: str) -> None:
            if seen == step:
                raise Crash(step)

        return observe

    async def run() -> tuple[Any, Any]:
        rotator = world.context().rotator()
        assert rotator is not None
        rotator.observe = crash_after("regenerated")
        with pytest.raises(Crash):
            await rotator.rotate(target, apply=True)
        # The vault still holds the primary (valid); the secondary was regenerated.
        assert vault.get_secret("rot--orders-mobile").value == key("rot", "orders-mobile")
        rotator.observe = None
        open_rows = await rotator.journal.unfinished(service_id)
        resumed = await rotator.rotate(target, apply=True)
        return open_rows, resumed

    open_rows, resumed = asyncio.run(run())
    assert {json.loads(e.after or "{}").get("rotation_step", {}).get("kind") for e in open_rows} >= {None}
    assert resumed.status is Status.DONE
    assert resumed.resumed
    assert len(regenerates(twin)) == 1  # the next run stored the key listSecrets gave back
    keys = keys_of(twin, sub)
    assert vault.get_secret("rot--orders-mobile").value == keys["secondary"]
    assert [v for _, v, _ in versions(vault, "rot--orders-mobile")].count(keys["secondary"]) == 1
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert any(getattr(r, "event", "") == "rotation.done" for r in caplog.records)
    no_key_in(logged, key("rot", "orders-mobile"), *keys.values())


def test_the_engine_remediates_key_rules_through_the_rotator(twin: TwinHandle, tmp_path: Path, world: World) -> None:
    service_id = seed(twin, "KEY-003")
    env, vault = world.env, world.vault
    policy = "version: 1\nrules:\n  KEY-003: {mode: remediate}\n"
    env = product_env(twin, tmp_path, policy)
    del world
    plan = cli(env, "remediate", "--instance", service_id)
    assert "WOULD     KEY-003" in plan.stdout
    assert "/regenerateSecondaryKey (the slot not in use)" in plan.stdout
    result = cli(env, "remediate", "--instance", service_id, "--apply", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    [fixed] = [r for r in json.loads(result.stdout)["results"] if r["rule"] == "KEY-003"]
    assert fixed["status"] == "fixed", fixed
    assert vault.get_secret("rot--stale").value == keys_of(twin, f"{service_id}/subscriptions/stale")["secondary"]
    again = cli(env, "remediate", "--instance", service_id, "--apply")
    assert "nothing to do" in again.stdout
    assert len(regenerates(twin)) == 1
    no_key_in(plan.stdout + result.stdout + again.stdout + result.stderr, key("rot", "stale"))


def _grid(event: dict[str, Any]) -> GridEvent:
    return GridEvent(
        event["id"], event["eventType"], event["subject"], event["topic"], datetime.now(UTC), event["data"]
    )


def test_secret_near_expiry_and_subscription_created_delivered_twice_act_once(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin)
    vault = world.vault
    # The ledger secret nears expiry (seeded 10 days old with 80 days left: move 60 days on).
    status, _ = twin.control("POST", "/_twin/clock/advance", {"days": 60})
    assert status == 200
    _, scan = twin.control("POST", "/_twin/keyvault/expiry-scan")
    [near] = [e for e in scan["events"] if e["subject"] == "rot--orders-mobile"]
    assert near["eventType"] == "Microsoft.KeyVault.SecretNearExpiry"
    # An operator creates a subscription: APIM raises SubscriptionCreated.
    created_id = f"{service_id}/subscriptions/newcomer"
    response = twin.arm(
        "PUT",
        f"{created_id}?{API}",
        json={"properties": {"scope": "/products/mobile", "displayName": "newcomer", "state": "active"}},
    )
    assert response.status_code == 201, response.text
    _, listed = twin.control("GET", "/_twin/events?type=Microsoft.ApiManagement.SubscriptionCreated")
    [created] = [e for e in listed["value"] if e["data"]["resourceUri"].endswith("/newcomer")]

    async def deliver() -> list[Any]:
        deps = world.context().events_deps()
        route = deps.rotate
        outcomes = []
        for event in (near, created):
            outcomes.append(await handle_event(_grid(event), deps))
            outcomes.append(await handle_event(_grid(event), deps))  # Event Grid delivers again
            outcomes.append(await handle_event(_grid({**event, "id": event["id"] + "-copy"}), deps))  # a twin event
        from handlers.rotate_keys import RotationRequest

        # Straight to the rotation route too (no message ledger in front): still once.
        outcomes.append(
            await route(RotationRequest("x", near["eventType"], near["subject"], near["topic"], near["data"]))
        )
        return outcomes

    outcomes = asyncio.run(deliver())
    *delivered, direct = outcomes
    # One rotation, one onboarding; the redeliveries are duplicates, the copies find nothing to do.
    statuses = [o.status.value if o.status is not EventStatus.ROTATION else o.detail.split(":")[0] for o in delivered]
    assert statuses == ["done", "duplicate", "skipped", "done", "duplicate", "skipped"], delivered
    assert direct.status == "skipped"
    assert len(regenerates(twin)) == 1
    assert len(versions(vault, "rot--orders-mobile")) == 2
    onboarded = ledger_secret_name("rot", "newcomer", created_id)
    assert len(versions(vault, onboarded)) == 1
    assert vault.get_secret(onboarded).value == keys_of(twin, created_id)["primary"]


def test_journal_rows_of_a_rotation_hold_no_key(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin, "KEY-003")
    sub = f"{service_id}/subscriptions/stale"
    before = keys_of(twin, sub)

    async def run() -> list[Any]:
        rotator = world.context().rotator()
        assert rotator is not None
        result = await rotator.rotate(
            RotationTarget(service_id, sub, Action.ROTATE, Trigger(TriggerKind.CLI, "test")), apply=True
        )
        assert result.status is Status.DONE
        return await rotator.journal.of_correlation(service_id, result.op_id)  # type: ignore[attr-defined, no-any-return]

    rows = asyncio.run(run())
    assert [r.phase for r in rows] == [Phase.VERIFIED] * 3  # header, regenerate, store
    text = json.dumps([r.__dict__ for r in rows], default=str)
    no_key_in(text, *before.values(), *keys_of(twin, sub).values())


def test_two_triggers_at_once_rotate_a_subscription_once(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin, "KEY-003")
    sub = f"{service_id}/subscriptions/stale"
    target = RotationTarget(service_id, sub, Action.ROTATE, Trigger(TriggerKind.EVENT, "e-1"), op_id="rot-same-trigger")

    async def both() -> list[Status]:
        first, second = world.context().rotator(), world.context().rotator()
        assert first is not None
        assert second is not None
        results = await asyncio.gather(first.rotate(target, apply=True), second.rotate(target, apply=True))
        return sorted(r.status for r in results)

    statuses = asyncio.run(both())
    # The lease lets one in; the other waits for it, then finds the trigger's rotation done.
    assert statuses == sorted([Status.DONE, Status.SKIPPED]), statuses
    assert len(regenerates(twin)) == 1
    assert len(versions(world.vault, "rot--stale")) == 2
