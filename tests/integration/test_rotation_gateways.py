"""Self-hosted gateway tokens through the Key Vault ledger, against the twin and Azurite with
the product's own clients: the twin's gateways (checked against the REST spec), onboarding,
renewal with the slot in use left alone, the near-expiry event delivered twice, a run killed
between regenerate and store, and a probe that keeps presenting the vault's current token to
the management plane's token check while renewals run under faults and crashes. Gateway keys
are canaries; no output, log line or journal row may carry a key or a token."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.keyvault.secrets import SecretClient

from handlers.events import EventStatus
from handlers.events import handle_event as deliver_event
from shared.gateway_rotation import GatewayTarget, gateway_secret_name
from shared.journal import Trigger, TriggerKind
from shared.rotation import Status
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, VAULT, compliant, fragment_for
from tests.integration.test_remediate import cli
from tests.integration.test_rotation import World, _grid, no_key_in

pytestmark = pytest.mark.integration

API = "api-version=2024-05-01"
NAME = "gwrot"


@pytest.fixture
def world(twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    built = World(twin, tmp_path, monkeypatch)
    yield built
    built.close()


def gw_key(gateway: str, slot: str) -> str:
    return f"{CANARY}-gw-{gateway}-{slot}"


def seed(twin: TwinHandle, name: str | None = None) -> str:
    """An instance with gateways `edge` and `branch` (canary keys). A fresh name each time: the
    journal in Azurite outlives the twin's reset between tests."""
    name = name or f"{NAME}{uuid.uuid4().hex[:6]}"
    spec = compliant(name, twin.subscription_id)
    spec["gateways"] = [
        {
            "id": g,
            "locationData": {"name": f"{g} site"},
            "primaryKey": gw_key(g, "primary"),
            "secondaryKey": gw_key(g, "secondary"),
        }
        for g in ("edge", "branch")
    ]
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    twin.seed(fragment)
    return ids[name]


def secret_of(service_id: str, gateway: str) -> str:
    return gateway_secret_name(service_id.rsplit("/", 1)[-1], gateway, f"{service_id}/gateways/{gateway}")


def keys_of(twin: TwinHandle, gateway_id: str) -> dict[str, str]:
    response = twin.arm("POST", f"{gateway_id}/listKeys?{API}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def token_ok(twin: TwinHandle, token: str) -> dict[str, Any]:
    status, body = twin.control("POST", "/_twin/gateway/token-check", {"token": token})
    assert status == 200, body
    return dict(body)


def regenerates(twin: TwinHandle) -> list[str]:
    _, log = twin.control("GET", "/_twin/log?service=arm")
    return [e["path"] for e in log["entries"] if e["path"].endswith("/regenerateKey") and e["status"] == 204]


def versions(vault: SecretClient, name: str) -> list[tuple[str, str, dict[str, str]]]:
    return sorted(
        (str(p.version), str(vault.get_secret(name, p.version).value), dict(p.tags or {}))
        for p in vault.list_properties_of_secret_versions(name)
    )


def test_the_twin_gateway_matches_the_rest_spec(twin: TwinHandle) -> None:
    """Shapes and status codes from specification/apimanagement/resource-manager/
    Microsoft.ApiManagement/stable/2024-05-01/apimgateways.json (Gateway_CreateOrUpdate 201/200,
    Gateway_ListKeys 200 GatewayKeysContract {primary, secondary} with ETag,
    Gateway_RegenerateKey 204 with {keyType}, Gateway_GenerateToken 200 GatewayTokenContract
    {value} with {keyType, expiry}, "Maximum token expiry time is set to 30 days")."""
    service_id = seed(twin)
    twin.grant("API Management Service Contributor", scope=service_id)  # an operator creates gateways
    gateway = f"{service_id}/gateways/lab"
    missing = twin.arm("PUT", f"{gateway}?{API}", json={"properties": {"description": "no location"}})
    assert missing.status_code == 400, missing.text
    assert "locationData" in missing.text
    created = twin.arm("PUT", f"{gateway}?{API}", json={"properties": {"locationData": {"name": "lab"}}})
    assert created.status_code == 201, created.text
    assert created.json()["type"] == "Microsoft.ApiManagement/service/gateways"
    assert "primary" not in json.dumps(created.json())  # keys only through listKeys
    again = twin.arm("PUT", f"{gateway}?{API}", json={"properties": {"locationData": {"name": "lab 2"}}})
    assert again.status_code == 200
    listed = twin.arm("POST", f"{gateway}/listKeys?{API}")
    assert listed.status_code == 200
    assert listed.headers.get("ETag")
    keys = listed.json()
    assert set(keys) == {"primary", "secondary"}
    bad = twin.arm("POST", f"{gateway}/regenerateKey?{API}", json={"keyType": "tertiary"})
    assert bad.status_code == 400, bad.text
    soon = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    too_far = (datetime.now(UTC) + timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert twin.arm("POST", f"{gateway}/generateToken?{API}", json={"keyType": "primary"}).status_code == 400
    far = twin.arm("POST", f"{gateway}/generateToken?{API}", json={"keyType": "primary", "expiry": too_far})
    assert far.status_code == 400, far.text
    made = twin.arm("POST", f"{gateway}/generateToken?{API}", json={"keyType": "primary", "expiry": soon})
    assert made.status_code == 200, made.text
    token = made.json()["value"]
    assert token_ok(twin, token)["valid"]
    # Regenerating the other key leaves the token alone; regenerating its own refuses it.
    assert twin.arm("POST", f"{gateway}/regenerateKey?{API}", json={"keyType": "secondary"}).status_code == 204
    assert token_ok(twin, token)["valid"]
    assert twin.arm("POST", f"{gateway}/regenerateKey?{API}", json={"keyType": "primary"}).status_code == 204
    refused = token_ok(twin, token)
    assert not refused["valid"]
    assert refused["reason"] == "signed by no current key of the gateway"
    assert keys_of(twin, gateway)["primary"] != keys["primary"]


def test_onboard_then_renew_keeps_the_gateway_connected(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin)
    env, vault = world.env, world.vault
    edge = f"{service_id}/gateways/edge"
    dry = cli(env, "rotate", "--instance", service_id, "--gateways")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run" in dry.stdout, dry.stdout
    assert dry.stdout.count("WOULD     onboard") == 2, dry.stdout
    onboarded = cli(env, "rotate", "--instance", service_id, "--gateways", "--apply", "--format", "json")
    assert onboarded.returncode == 0, onboarded.stdout + onboarded.stderr
    report = {r["gateway"].rsplit("/", 1)[-1]: r for r in json.loads(onboarded.stdout)["gateways"]}
    assert {g: (r["action"], r["status"]) for g, r in report.items()} == {
        "edge": ("onboard", "done"),
        "branch": ("onboard", "done"),
    }
    name = secret_of(service_id, "edge")
    [(_, first, tags)] = versions(vault, name)
    assert tags == {"apim-gateway-id": edge, "apim-gateway-key-slot": "primary"}
    assert token_ok(twin, first) == {"valid": True, "gateway": edge, "reason": "ok"}
    expires = vault.get_secret(name).properties.expires_on
    assert expires is not None
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert regenerates(twin) == []  # onboarding regenerates nothing

    not_due = cli(env, "rotate", "--instance", service_id, "--gateways", "--apply")
    assert not_due.returncode == 0, not_due.stdout
    assert not_due.stdout.count("not due") == 2, not_due.stdout

    renewed = cli(env, "rotate", "--instance", service_id, "--gateways", "--gateway", "edge", "--force", "--apply")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert "DONE      renew    edge" in renewed.stdout, renewed.stdout
    assert [p.rsplit("/", 2)[-2] for p in regenerates(twin)] == ["edge"]
    second = vault.get_secret(name).value
    assert second is not None
    assert second != first
    assert vault.get_secret(name).properties.tags["apim-gateway-key-slot"] == "secondary"
    assert token_ok(twin, second)["valid"]
    assert token_ok(twin, first)["valid"]  # the slot in use was left alone
    assert keys_of(twin, edge)["primary"] == gw_key("edge", "primary")

    # The next renewal regenerates the primary: the first token dies, the vault's still works.
    again = cli(env, "rotate", "--instance", service_id, "--gateways", "--gateway", "edge", "--force", "--apply")
    assert again.returncode == 0, again.stdout + again.stderr
    third = vault.get_secret(name).value
    assert third is not None
    assert token_ok(twin, third)["valid"]
    assert not token_ok(twin, first)["valid"]
    assert len(versions(vault, name)) == 3

    unknown = cli(env, "rotate", "--instance", service_id, "--gateways", "--gateway", "nowhere", "--apply")
    assert unknown.returncode == 1, unknown.stdout
    assert "is not a gateway of" in unknown.stdout, unknown.stdout
    everything = dry.stdout + onboarded.stdout + not_due.stdout + renewed.stdout + again.stdout + unknown.stdout
    everything += dry.stderr + onboarded.stderr + renewed.stderr + again.stderr
    no_key_in(everything, first, second, third, *keys_of(twin, edge).values(), gw_key("edge", "secondary"))


def _near_expiry_token(twin: TwinHandle, world: World, service_id: str, gateway: str) -> str:
    """The ledger holds a token from the primary key with 3 days left (made through ARM as an
    operator would), and the gateway has presented it (the management plane's heartbeat)."""
    gateway_id = f"{service_id}/gateways/{gateway}"
    expiry = (datetime.now(UTC) + timedelta(days=3)).replace(second=0, microsecond=0)
    made = twin.arm(
        "POST",
        f"{gateway_id}/generateToken?{API}",
        json={"keyType": "primary", "expiry": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")},
    )
    assert made.status_code == 200, made.text
    token = str(made.json()["value"])
    world.vault.set_secret(
        secret_of(service_id, gateway),
        token,
        tags={"apim-gateway-id": gateway_id, "apim-gateway-key-slot": "primary"},
        expires_on=expiry,
    )
    assert token_ok(twin, token)["valid"]
    return token


def test_gateway_token_near_expiry_delivered_twice_renews_once(twin: TwinHandle, world: World) -> None:
    service_id = seed(twin)
    old = _near_expiry_token(twin, world, service_id, "edge")
    _, scan = twin.control("POST", "/_twin/gateway/expiry-scan")
    [event] = scan["events"]
    assert event["eventType"] == "Microsoft.ApiManagement.GatewayTokenNearExpiry"
    assert event["subject"] == "/gateways/edge"
    assert event["topic"] == service_id
    assert event["data"]["gatewayInfo"]["gatewayId"] == f"{service_id}/gateways/edge"
    assert set(event["data"]["tokenInfo"]) == {"expiredAtUtc"}
    _, rescan = twin.control("POST", "/_twin/gateway/expiry-scan")
    assert rescan["events"] == []  # once per token

    async def deliver() -> list[Any]:
        deps = world.context().events_deps()
        outcomes = [
            await deliver_event(_grid(event), deps),
            await deliver_event(_grid(event), deps),  # Event Grid delivers again
            await deliver_event(_grid({**event, "id": event["id"] + "-copy"}), deps),  # raised again
        ]
        from handlers.rotate_keys import RotationRequest

        outcomes.append(
            await deps.rotate(RotationRequest("x", event["eventType"], event["subject"], event["topic"], event["data"]))
        )
        return outcomes

    *delivered, direct = asyncio.run(deliver())
    statuses = [o.status.value if o.status is not EventStatus.ROTATION else o.detail.split(":")[0] for o in delivered]
    assert statuses == ["done", "duplicate", "skipped"], delivered
    assert direct.status == "skipped"
    assert "not due" in direct.detail
    assert len(regenerates(twin)) == 1
    name = secret_of(service_id, "edge")
    assert len(versions(world.vault, name)) == 2
    new = world.vault.get_secret(name).value
    assert new is not None
    assert token_ok(twin, new)["valid"]
    assert token_ok(twin, old)["valid"]
    assert world.vault.get_secret(name).properties.tags["apim-gateway-key-slot"] == "secondary"


def test_the_event_does_nothing_outside_remediate_mode(twin: TwinHandle, world: World, tmp_path: Path) -> None:
    service_id = seed(twin)
    _near_expiry_token(twin, world, service_id, "edge")
    _, scan = twin.control("POST", "/_twin/gateway/expiry-scan")
    [event] = scan["events"]
    from handlers.context import AppContext
    from tests.integration.test_remediate import product_env

    env = product_env(twin, tmp_path, "version: 1\nrules:\n  KEY-003: {mode: detect}\n")

    async def deliver() -> Any:
        context = AppContext.load(env)
        try:
            return await deliver_event(_grid(event), context.events_deps())
        finally:
            await context.aclose()

    outcome = asyncio.run(deliver())
    assert "detect mode" in outcome.detail, outcome
    assert regenerates(twin) == []


class Crash(BaseException):
    """Stands for SIGKILL inside one process: nothing after it runs."""


def _crash_at(step: str) -> Any:
    def observe(seen: str, _: str) -> None:
        if seen == step:
            raise Crash(step)

    return observe


def test_a_run_killed_between_regenerate_and_store_is_finished_by_the_next(
    twin: TwinHandle, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service_id = seed(twin)
    old = _near_expiry_token(twin, world, service_id, "edge")
    edge = f"{service_id}/gateways/edge"
    target = GatewayTarget(service_id, edge, Trigger(TriggerKind.CLI, "test"))
    name = secret_of(service_id, "edge")

    async def run() -> tuple[Any, Any, Any]:
        rotator = world.context().gateway_rotator()
        assert rotator is not None
        rotator.observe = _crash_at("regenerate-sent")  # the key changed; nothing after it ran
        with pytest.raises(Crash):
            await rotator.renew(target, apply=True)
        # The secondary was regenerated; the vault still holds the primary's token, which works.
        assert world.vault.get_secret(name).value == old
        assert token_ok(twin, old)["valid"]
        rotator.observe = None
        open_rows = await rotator.journal.unfinished(service_id)
        resumed = await rotator.renew(target, apply=True)
        rows = await rotator.journal.of_correlation(service_id, resumed.op_id)  # type: ignore[attr-defined]
        return open_rows, resumed, rows

    open_rows, resumed, rows = asyncio.run(run())
    # The header and the regenerate, both left open: the next run judges the regenerate by the
    # slot's key fingerprint (it landed) and does not repeat it.
    assert len(open_rows) == 2
    assert resumed.status is Status.DONE, resumed
    assert resumed.resumed
    assert len(regenerates(twin)) == 1  # the next run made the token from the regenerated key
    new = world.vault.get_secret(name).value
    assert new is not None
    assert token_ok(twin, new)["valid"]
    assert len(versions(world.vault, name)) == 2
    logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert any(getattr(r, "event", "") == "rotation.gateway.done" for r in caplog.records)
    journal = json.dumps([r.__dict__ for r in rows], default=str)
    no_key_in(logged + journal, old, new, *keys_of(twin, edge).values(), gw_key("edge", "primary"))


RENEWALS = 12
STEPS = ("header", "regenerate-intent", "regenerate-sent", "regenerated", "store-intent", "store-sent", "stored")


class Probe(threading.Thread):
    """Reads the ledger secret's current version and presents it to the management plane."""

    def __init__(self, twin: TwinHandle, name: str) -> None:
        super().__init__(daemon=True)
        self.twin, self.name = twin, name
        self.client = SecretClient(
            twin.urls[f"vault:{VAULT}"], twin.credential(), connection_verify=twin.ca_file,
            verify_challenge_resource=False,
        )  # fmt: skip
        self.session = requests.Session()
        self.stop = threading.Event()
        self.probes = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            token = self.client.get_secret(self.name).value or ""
            answer = self.session.post(
                self.twin.urls["arm"] + "/_twin/gateway/token-check",
                json={"token": token},
                verify=self.twin.ca_file,
                timeout=30,
            ).json()
            self.probes += 1
            if not answer["valid"]:
                self.failures.append(answer["reason"])
            self.stop.wait(0.01)


def test_the_probe_never_sees_a_refused_token_while_renewals_crash_and_fail(
    twin: TwinHandle, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    service_id = seed(twin)
    _near_expiry_token(twin, world, service_id, "edge")
    edge = f"{service_id}/gateways/edge"
    name = secret_of(service_id, "edge")
    rng = random.Random(12)
    counts = {"done": 0, "crashed": 0, "pending": 0, "kv503": 0, "arm429": 0}
    probe = Probe(twin, name)
    probe.start()

    async def renew_many() -> None:
        rotator = world.context().gateway_rotator()
        assert rotator is not None
        for i in range(RENEWALS):
            fault = rng.choice(["crash", "kv503", "arm429", None])
            if fault == "kv503":
                counts["kv503"] += 1
                fault_503 = {"service": "keyvault", "method": "PUT", "path": "/secrets/apimgw-", "status": 503,
                             "code": "ServiceUnavailable", "times": 8}  # fmt: skip
                twin.control("POST", "/_twin/faults", fault_503)
            if fault == "arm429":
                counts["arm429"] += 1
                twin.control("POST", "/_twin/faults", {"service": "arm", "method": "POST", "path": "/regenerateKey",
                                                      "status": 429, "code": "TooManyRequests", "retry_after": 0.05,
                                                      "times": 1})  # fmt: skip
            rotator.observe = _crash_at(rng.choice(STEPS)) if fault == "crash" else None
            target = GatewayTarget(service_id, edge, Trigger(TriggerKind.CLI, f"soak {i}"), force=True)
            try:
                result = await rotator.renew(target, apply=True)
            except Crash:
                counts["crashed"] += 1
            else:
                counts["pending" if result.status is Status.PENDING else "done"] += 1
                assert result.status in (Status.DONE, Status.PENDING), result
            twin.control("DELETE", "/_twin/faults")
            rotator.observe = None
            # Whatever was left open is finished before the next renewal starts.
            for finished in await rotator.resume_open(service_id):
                assert finished.status in (Status.DONE, Status.SKIPPED), finished

    try:
        asyncio.run(renew_many())
    finally:
        probe.stop.set()
        probe.join(timeout=30)
    with capsys.disabled():
        print(f"\ngateway renewals: {counts}; probes {probe.probes}, refused {len(probe.failures)}")
    assert probe.failures == [], probe.failures[:5]
    assert probe.probes > 0
    # No renewal ran twice: one regenerate per new vault version (plus the seeded one).
    assert len(regenerates(twin)) == len(versions(world.vault, name)) - 1
    final = world.vault.get_secret(name)
    assert final.value is not None
    assert token_ok(twin, final.value)["valid"]


def test_every_gateway_is_listed_across_pages(twin: TwinHandle, world: World) -> None:
    """APIM pages gateways 100 at a time ($top/$skip with a nextLink): all 105 are renewed."""
    spec = compliant("gwmany", twin.subscription_id)
    spec["gateways"] = [{"id": f"gw-{i:03d}"} for i in range(105)]
    fragment, ids = fragment_for({"gwmany": spec}, twin.subscription_id)
    twin.seed(fragment)
    first = twin.arm("GET", f"{ids['gwmany']}/gateways?{API}").json()
    assert len(first["value"]) == 100
    assert first.get("nextLink")

    async def listed() -> list[str]:
        rotator = world.context().gateway_rotator()
        assert rotator is not None
        return await rotator.api.gateways(ids["gwmany"])

    found = asyncio.run(listed())
    assert sorted(g.rsplit("/", 1)[-1] for g in found) == [f"gw-{i:03d}" for i in range(105)]


KILLED_RENEWALS = 10
KILLS = 2  # each kill holds the gateway for its 15 s lease


def test_a_worker_killed_with_sigkill_mid_renewal_never_leaves_a_refused_token(
    twin: TwinHandle, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real worker process (tests/integration/gateway_worker.py) renews two gateways'
    tokens KILLED_RENEWALS times and is killed with SIGKILL at KILLS random steps, then
    started again; a probe keeps presenting both vault tokens to the management plane."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    service_id = seed(twin)
    gateways = [f"{service_id}/gateways/{g}" for g in ("edge", "branch")]
    for g in ("edge", "branch"):
        _near_expiry_token(twin, world, service_id, g)
    env = {**world.env, "PYTHONPATH": str(root), "APIMR_RETRY_TOTAL": "2", "APIMR_RETRY_BACKOFF_FACTOR": "0.01"}
    env.pop("PYTEST_CURRENT_TEST", None)
    probes = [Probe(twin, secret_of(service_id, g)) for g in ("edge", "branch")]
    for probe in probes:
        probe.start()
    rng = random.Random(3)
    kills: list[str] = []
    outputs: list[str] = []
    command = [sys.executable, "-m", "tests.integration.gateway_worker", service_id, str(KILLED_RENEWALS), *gateways]
    started = time.monotonic()
    try:
        while True:
            worker = subprocess.Popen(
                command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert worker.stdout is not None
            step, nth = rng.choice(STEPS), rng.randint(1, 3)
            seen, killed = 0, False
            for line in worker.stdout:
                outputs.append(line)
                if len(kills) < KILLS and line.startswith(f"step {step} "):
                    seen += 1
                    if seen == nth:
                        worker.send_signal(signal.SIGKILL)
                        kills.append(step)
                        killed = True
                        break
            worker.wait(timeout=120)
            if not killed:
                break
            assert time.monotonic() - started < 400, "the worker never finished"
        assert worker.returncode == 0, "".join(outputs[-40:])
    finally:
        for probe in probes:
            probe.stop.set()
            probe.join(timeout=30)
    names = [secret_of(service_id, g) for g in ("edge", "branch")]
    stored = sum(len(versions(world.vault, n)) - 1 for n in names)
    with capsys.disabled():
        print(
            f"\ngateway SIGKILL soak: {stored} renewals stored, {len(regenerates(twin))} regenerates, "
            f"{len(kills)} SIGKILLs at {kills}; probes {sum(p.probes for p in probes)}, "
            f"refused {sum(len(p.failures) for p in probes)}; {os.cpu_count()} cpus"
        )
    assert [f for p in probes for f in p.failures] == []
    assert all(p.probes > 0 for p in probes)
    assert len(kills) == KILLS
    assert stored == KILLED_RENEWALS  # each renewal stored exactly one token
    assert len(regenerates(twin)) == KILLED_RENEWALS  # and regenerated exactly one key
    tokens = {v for n in names for _, v, _ in versions(world.vault, n)}
    for n in names:
        current = world.vault.get_secret(n).value
        assert current is not None
        assert token_ok(twin, current)["valid"]
    keys = [v for g in gateways for v in keys_of(twin, g).values()]
    no_key_in("".join(outputs), *tokens, *keys, gw_key("edge", "primary"), gw_key("branch", "primary"))
