"""Incidents end to end: the production AppContext reconciling a drifted instance against
the twin (Sentinel incidents on a workspace, RBAC-strict) and Azurite (the incidents table
and its outbox), posting to a real HTTP receiver on localhost that verifies the HMAC
signature with the key the product reads from Key Vault.

drift -> one incident; three more runs -> the same incident, count 4; the receiver down for
two runs -> delivered on the third, exactly once per state change; an analyst's edit in
Sentinel -> the next write meets 409 (stale ETag), reads again and keeps the analyst's
owner; the fix succeeds -> resolved with a note, Sentinel closed with a classification.
No secret value reaches any incident, delivery or log line."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from handlers.context import AppContext
from handlers.incidents import list_incidents, render_incidents
from handlers.reconcile import ReconcileRequest
from shared.incidents import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    IncidentStatus,
    fingerprint_of,
    incident_guid,
    verify_signature,
)
from shared.journal import Trigger, TriggerKind
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, RG, compliant, drift, fragment_for
from tests.integration.test_remediate import product_env

pytestmark = pytest.mark.integration

HMAC_KEY = f"{CANARY}-webhook-hmac-key"
SECRET_NAME = "incident-webhook-hmac"
SENTINEL_API = "api-version=2024-09-01"
# The estate sends no gateway logs: LOG-004 (logs stopped flowing) would be one more incident
# on every instance, which these lifecycle tests do not count. test_runtime_signals.py covers it.
DETECT = "version: 1\nrules:\n  LOG-004: {mode: off}\n"
REMEDIATE_TLS = (
    "version: 1\nrules:\n  LOG-004: {mode: off}\n  TLS-001: {mode: remediate}\n  TLS-002: {mode: remediate}\n"
    "  TLS-003: {mode: remediate}\n"
)


@dataclass
class Receiver:
    """A webhook receiver as a customer would write one: verify, then acknowledge."""

    key: bytes
    received: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    rejected: int = 0
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify_signature(
            self.key,
            request.headers.get(TIMESTAMP_HEADER, ""),
            body,
            request.headers.get(SIGNATURE_HEADER, ""),
            now=time.time(),
        )
        if not ok:
            self.rejected += 1
            return web.Response(status=401)
        self.bodies.append(body.decode())
        document = json.loads(body)
        assert document["delivery_id"] == request.headers[DELIVERY_HEADER]
        self.received.append(document)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def changes(self, fingerprint: str) -> list[tuple[str, int, str]]:
        """(change, version, status) of each delivery about one incident, in arrival order."""
        return [
            (d["change"], d["incident"]["version"], d["incident"]["status"])
            for d in self.received
            if d["incident"]["fingerprint"] == fingerprint
        ]


@dataclass
class World:
    twin: TwinHandle
    service_id: str
    workspace: str
    receiver: Receiver
    make: Callable[[str], AppContext]
    table: str


def sentinel_incidents(twin: TwinHandle, workspace: str) -> list[dict[str, Any]]:
    response = twin.arm("GET", f"{workspace}/providers/Microsoft.SecurityInsights/incidents?{SENTINEL_API}")
    assert response.status_code == 200, response.text
    return list(response.json()["value"])


@pytest_asyncio.fixture(loop_scope="function")
async def world(twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    name = f"inc-{uuid.uuid4().hex[:8]}"
    spec = compliant(name, twin.subscription_id)
    for rule_id in ("TLS-001", "TLS-002", "TLS-003", "SEC-001"):
        drift(rule_id, spec)
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    group = fragment["subscriptions"][0]["resource_groups"][0]
    group["key_vaults"][0]["secrets"].append({"name": SECRET_NAME, "value": HMAC_KEY})
    twin.seed(fragment)
    group_id = f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}"
    workspace = f"{group_id}/providers/Microsoft.OperationalInsights/workspaces/law"
    # What an operator deploys (infra/sentinel-role.bicep): the built-in role on the workspace.
    twin.grant("Microsoft Sentinel Responder", workspace)
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    receiver = Receiver(HMAC_KEY.encode())
    await receiver.start()
    table = f"inc{uuid.uuid4().hex[:12]}"
    built: list[AppContext] = []

    def make(policy: str) -> AppContext:
        env = product_env(twin, tmp_path, policy)
        env.update(
            APIMR_INCIDENT_SENTINEL_WORKSPACE=workspace,
            APIMR_INCIDENT_WEBHOOK_URL=f"http://127.0.0.1:{receiver.port}/hook",
            APIMR_INCIDENT_WEBHOOK_SECRET_NAME=SECRET_NAME,
            APIMR_INCIDENT_WEBHOOK_TIMEOUT="2",
        )
        ctx = AppContext.load(env)
        ctx.incidents_table = table
        built.append(ctx)
        return ctx

    yield World(twin, ids[name], workspace, receiver, make, table)
    await receiver.stop()
    for ctx in built:
        await ctx.aclose()


async def run(ctx: AppContext, service_id: str) -> None:
    await ctx.run_reconcile(ReconcileRequest(service_id, Trigger(TriggerKind.TIMER, "sweep test"), reason="sweep"))


async def test_incident_lifecycle_sentinel_and_webhook(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    twin, service_id, receiver = world.twin, world.service_id, world.receiver
    ctx = world.make(DETECT)
    tls = fingerprint_of("TLS", service_id)

    # Runs 1 and 2: the receiver is down (connection refused); Sentinel is up.
    await receiver.stop()
    for _ in range(2):
        await run(ctx, service_id)
    reporter = ctx.incidents()
    [tls_incident] = [i for i in await reporter.open_incidents(service_id) if i.fingerprint == tls]
    assert (tls_incident.count, tls_incident.status) == (2, IncidentStatus.ACTIVE)
    assert "TLS-001" in tls_incident.description
    assert "TLS-003" in tls_incident.description
    assert "left to people" in tls_incident.description
    assert "detect mode" in tls_incident.description
    [tls_state] = [s for s in await reporter.delivery_state(tls_incident) if s.sink == "webhook"]
    assert tls_state.pending_versions == (1, 2)
    webhook_states = [
        s
        for i in await reporter.open_incidents(service_id)
        for s in await reporter.delivery_state(i)
        if s.sink == "webhook"
    ]
    # A sink that is down is tried once per run (its first row, after its own retries), not per row.
    assert sum(s.attempts for s in webhook_states) == 2
    assert receiver.received == []

    # Run 3: the receiver is back: the waiting changes arrive, each once, in order.
    await receiver.start()
    await run(ctx, service_id)
    # Run 4: only a count bump (no state change): nothing new for the webhook.
    await run(ctx, service_id)

    [tls_incident] = [i for i in await reporter.open_incidents(service_id) if i.fingerprint == tls]
    assert tls_incident.count == 4
    tls_changes = receiver.changes(tls)
    assert tls_changes == [("opened", 1, "new"), ("activated", 2, "active")]
    assert receiver.rejected == 0

    # Sentinel: one incident per problem (TLS and SEC), the TLS one carrying count 4.
    incidents = sentinel_incidents(twin, world.workspace)
    by_name = {i["name"]: i for i in incidents}
    assert incident_guid(tls) in by_name
    assert len(incidents) == 2, [i["properties"]["title"] for i in incidents]
    tls_sentinel = by_name[incident_guid(tls)]
    assert tls_sentinel["properties"]["status"] == "Active"
    assert tls_sentinel["properties"]["severity"] == "High"
    assert "Seen 4 time(s)" in tls_sentinel["properties"]["description"]
    assert {"apim-remediator", "TLS"} <= {label["labelName"] for label in tls_sentinel["properties"]["labels"]}

    # An analyst takes the incident in Sentinel: our stored ETag is now stale.
    path = f"{world.workspace}/providers/Microsoft.SecurityInsights/incidents/{incident_guid(tls)}?{SENTINEL_API}"
    taken = twin.arm("GET", path).json()
    taken["properties"]["owner"] = {"assignedTo": "Dana Analyst", "email": "dana@contoso.example", "ownerType": "User"}
    assert twin.arm("PUT", path, json=taken).status_code == 200
    twin.control("DELETE", "/_twin/log")

    # The fix succeeds (TLS switched to remediate): resolved with a note, closed in Sentinel.
    fixing = world.make(REMEDIATE_TLS)
    await run(fixing, service_id)
    reporter = fixing.incidents()
    resolved = await reporter.store.get(tls)
    assert resolved is not None
    assert resolved.status is IncidentStatus.RESOLVED
    assert resolved.note.startswith("fixed by apim-remediator in run"), resolved.note
    assert "verified by a fresh read" in resolved.note

    _, log = twin.control("GET", "/_twin/log?service=arm")
    puts = [e["status"] for e in log["entries"] if e["method"] == "PUT" and incident_guid(tls) in e["path"]]
    assert puts == [409, 200]  # stale ETag refused, read again, written
    closed = twin.arm("GET", path).json()["properties"]
    assert closed["status"] == "Closed"
    assert closed["classification"] == "TruePositive"
    assert closed["classificationComment"] == resolved.note
    assert closed["owner"]["assignedTo"] == "Dana Analyst"  # the analyst's assignment survived

    tls_changes = receiver.changes(tls)
    assert tls_changes == [("opened", 1, "new"), ("activated", 2, "active"), ("resolved", 5, "resolved")]

    # Exactly once: more runs and an explicit delivery deliver nothing again.
    before = len(receiver.received)
    await run(fixing, service_id)
    again = await reporter.deliver_pending()
    assert again.delivered == ()
    assert again.failed == ()
    assert len(receiver.received) == before
    assert len({d["delivery_id"] for d in receiver.received}) == len(receiver.received)

    # The SEC-001 incident stays open (detect mode) and shows what the product did not do.
    sec = [i for i in await reporter.open_incidents(service_id) if i.family == "SEC"]
    assert len(sec) == 1
    assert sec[0].count == 6

    views = await list_incidents(reporter, include_resolved=True)
    shown = render_incidents(views)
    assert "RESOLVED" in shown
    assert "webhook: delivered" in shown
    assert "sentinel: delivered" in shown

    # Redaction: no secret value anywhere an incident went.
    everything = [
        *receiver.bodies,
        json.dumps(sentinel_incidents(twin, world.workspace)),
        caplog.text,
        shown,
        *(json.dumps(v.incident.to_json()) for v in views),
    ]
    for text in everything:
        assert CANARY not in text
        assert HMAC_KEY not in text


async def test_a_wrong_signature_is_refused_and_the_change_waits(world: World) -> None:
    """The receiver checks the signature: with another key every delivery is refused (401),
    and the change stays in the outbox instead of being marked delivered."""
    world.receiver.key = b"not-the-key-in-key-vault"
    ctx = world.make(DETECT)
    await run(ctx, world.service_id)
    assert world.receiver.rejected >= 1
    assert world.receiver.received == []
    reporter = ctx.incidents()
    states = [s for i in await reporter.open_incidents(world.service_id) for s in await reporter.delivery_state(i)]
    webhook = [s for s in states if s.sink == "webhook"]
    assert webhook
    assert all(s.pending_versions == (1,) for s in webhook)
    assert any("HTTP 401" in s.last_error for s in webhook)
    world.receiver.key = HMAC_KEY.encode()
    delivered = await reporter.deliver_pending()
    assert len(delivered.delivered) == 2  # both incidents' opening, on the webhook
    assert {d["change"] for d in world.receiver.received} == {"opened"}


async def test_sentinel_needs_its_role(world: World) -> None:
    """Without "Microsoft Sentinel Responder" on the workspace the twin refuses (403) as
    Azure would; the change waits in the outbox and nothing else fails."""
    world.twin.control("POST", "/_twin/reset")
    name = f"norole-{uuid.uuid4().hex[:6]}"
    spec = compliant(name, world.twin.subscription_id)
    drift("TLS-001", spec)
    fragment, ids = fragment_for({name: spec}, world.twin.subscription_id)
    fragment["subscriptions"][0]["resource_groups"][0]["key_vaults"][0]["secrets"].append(
        {"name": SECRET_NAME, "value": HMAC_KEY}
    )
    world.twin.seed(fragment)
    ctx = world.make(DETECT)
    await run(ctx, ids[name])
    reporter = ctx.incidents()
    [incident] = await reporter.open_incidents(ids[name])
    [sentinel] = [s for s in await reporter.delivery_state(incident) if s.sink == "sentinel"]
    assert sentinel.pending_versions == (1,)
    assert "403" in sentinel.last_error
    assert [d["change"] for d in world.receiver.received] == ["opened"]  # the webhook got it anyway
