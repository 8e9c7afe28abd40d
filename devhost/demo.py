"""`make demo`: the product as a Functions app, end to end, on the local Functions host
(devhost) against the twin seeded from estates/demo.yaml.

1. A sweep tick: the timer lists the instances in scope and puts one message each on the
   work queue; the queue-triggered `work` function reconciles each instance and fixes
   what devhost/demo-policy.yaml puts in `remediate` mode.
   SEC-001 is refused in that run: ID-001 has just made the instance's identity, which cannot
   read the vault yet. The operator then grants it "Key Vault Secrets User" on the vault, as
   the refusal asks (the twin enforces Key Vault RBAC for APIM's reads too).
2. An operator (the estate's second principal) turns TLS 1.0 back on with a plain ARM
   PATCH; the twin's Event Grid delivers the write event to the `events` function, which
   fixes it while you watch (the seconds it took are printed). That run also moves the
   secret named value into Key Vault, and APIM reads it with its identity (Success).
3. The HTTP API with bearer tokens from the twin's Entra: a plan, an apply (a manual
   remediation of a rule the policy keeps in detect mode, which needs Remediator.Admin),
   and a read-only caller refused.
4. The backup timer's tick: native backups of both instances into Azurite, a manifest beside
   each; the next sweep closes BAK-001 (BAK-002 waits: the demo designates no restore target).
5. A stale subscription key (95 days, KEY-003) rotated through Key Vault over the HTTP API,
   while a client keeps reading the key from the vault and presenting it to the gateway:
   every probe must authenticate, before, during and after the rotation.
6. The incidents those runs posted: what the policy left to people, opened in Microsoft
   Sentinel (the twin's, on the platform workspace) and on a signed webhook (a receiver
   in this program that checks each delivery's HMAC signature), counted again by later
   runs, and resolved with a note when a run fixed them.

Exits non-zero if any step does not do what it says.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
from azure.identity import ClientSecretCredential

from devhost.host import DevHost, storage_settings_for
from handlers.context import AppContext
from shared.backup_store import BackupStore
from shared.incidents import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from shared.journal import Journal, Phase
from twin.server import TwinServer

ROOT = Path(__file__).resolve().parents[1]
ESTATE = ROOT / "estates" / "demo.yaml"
POLICY = Path(__file__).resolve().parent / "demo-policy.yaml"
SUB = "6a0e2f31-0000-4000-8000-0000000de001"
PROD = f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod/providers/Microsoft.ApiManagement/service/apim-contoso-prod"
INTERNAL = PROD.replace("apim-contoso-prod", "apim-contoso-internal")
API_AUDIENCE = "api://apim-remediator"
OPERATOR = ("0b5e0c1a-0000-4000-8000-00000000d3e2", "twin-demo-secret-operator")  # Remediator.Admin
READER = ("0b5e0c1a-0000-4000-8000-00000000d3e3", "twin-demo-secret-reader")  # Remediator.Read
TLS10 = "Microsoft.WindowsAzure.ApiManagement.Gateway.Security.Protocols.Tls10"
ARM_EVENTS = [
    "Microsoft.Resources.ResourceWriteSuccess",
    "Microsoft.Resources.ResourceActionSuccess",
    "Microsoft.Resources.ResourceDeleteSuccess",
]
API = "api-version=2024-05-01"
VAULT = "kv-apim-keys-prod"
BACKUP_ACCOUNT = "apimbackups"  # estates/demo.yaml storage_accounts
BACKUP_ID = (
    f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod/providers/Microsoft.Storage/storageAccounts/{BACKUP_ACCOUNT}"
)
VAULT_ID = f"/subscriptions/{SUB}/resourceGroups/rg-apim-prod/providers/Microsoft.KeyVault/vaults/{VAULT}"
MOVED_NV = "payments-api-key"
OBSERVABILITY = f"/subscriptions/{SUB}/resourceGroups/rg-observability"
WORKSPACE = f"{OBSERVABILITY}/providers/Microsoft.OperationalInsights/workspaces/law-platform"
HMAC_SECRET_NAME = "incident-webhook-hmac"  # noqa: S105 (a name, not a value)
HMAC_KEY = b"demo-incident-webhook-hmac-key"  # the value estates/demo.yaml puts in the vault
SENTINEL_API = "api-version=2024-09-01"


class IncidentChannel:
    """A team's incident webhook, as a receiver should be written: check the signature and
    the timestamp, drop a delivery id seen before, then acknowledge."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.refused = 0
        self.duplicates = 0
        self.runner: aiohttp.web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.read()
        stamp = request.headers.get(TIMESTAMP_HEADER, "")
        if not verify_signature(HMAC_KEY, stamp, body, request.headers.get(SIGNATURE_HEADER, ""), now=time.time()):
            self.refused += 1
            return aiohttp.web.Response(status=401)
        if any(d["delivery_id"] == request.headers.get(DELIVERY_HEADER) for d in self.received):
            self.duplicates += 1
        else:
            self.received.append(json.loads(body))
        return aiohttp.web.Response(status=204)

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_post("/incidents", self.handle)
        self.runner = aiohttp.web.AppRunner(app)
        await self.runner.setup()
        site = aiohttp.web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/incidents"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


LEDGER_ENTRY = "apim-prod--orders-mobile"


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def say(text: str) -> None:
    print(f"  {text}", flush=True)


class Arm:
    """Plain ARM requests as a person's tool makes them (blocking: run in a thread)."""

    def __init__(self, base: str, ca_file: str) -> None:
        self.base = base
        self.ca_file = ca_file

    def token(self, client: tuple[str, str], tenant: str, authority: str, scope: str) -> str:
        credential = ClientSecretCredential(
            tenant,
            client[0],
            client[1],
            authority=authority,
            disable_instance_discovery=True,
            connection_verify=self.ca_file,
        )
        return str(credential.get_token(scope).token)

    def request(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
        import requests

        response = requests.request(
            method,
            f"{self.base}{path}",
            headers={"Authorization": f"Bearer {token}"},
            json=body,
            verify=self.ca_file,
            timeout=30,
        )
        data = response.json() if response.content else None
        return response.status_code, data, dict(response.headers)


async def until(check: Callable[[], bool], within: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < within:
        if await asyncio.to_thread(check):
            return time.monotonic() - began
        await asyncio.sleep(0.1)
    return None


def app_settings(twin: TwinServer, policy: Path = POLICY, webhook: str = "") -> dict[str, str]:
    """The app settings a deployment against the twin has (the storage is Azurite)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
    env.update(twin.env())
    env.update(
        APIMR_KEY_VAULT_URL=twin.state.urls[f"vault:{VAULT}"],
        APIMR_POLICY_FILE=str(policy),
        APIMR_WORK_QUEUE="apimr-work",
        APIMR_SWEEP_SCHEDULE="0 0 */6 * * *",
        APIMR_BACKUP_SCHEDULE="0 */15 * * * *",
        APIMR_RESTORE_TEST_SCHEDULE="0 7-59/15 * * * *",
        # Backups go to the estate's storage account (Azurite); no job has run yet, so
        # BAK-001 and BAK-002 are open on both instances after the first sweep.
        APIMR_BACKUP_STORAGE_ACCOUNT=BACKUP_ACCOUNT,
        APIMR_BACKUP_BLOB_ENDPOINT=twin.state.extra["storage"][BACKUP_ACCOUNT]["blob_url"],
        APIMR_API_AUDIENCE=API_AUDIENCE,
        APIMR_API_TENANT_ID=twin.state.tenant_id,
        FUNCTIONS_WORKER_RUNTIME="python",
        APIMR_INCIDENT_SENTINEL_WORKSPACE=WORKSPACE,
        # The demo estate drifts in more ways at once than the default limit of 10 new
        # incidents per sweep; the demo shows each of them rather than the summary incident.
        APIMR_INCIDENT_MAX_NEW_PER_SWEEP="25",
    )
    if webhook:
        env.update(APIMR_INCIDENT_WEBHOOK_URL=webhook, APIMR_INCIDENT_WEBHOOK_SECRET_NAME=HMAC_SECRET_NAME)
    env.update(storage_settings_for(env))
    return env


async def subscribe_events(host: DevHost, arm: Arm) -> str | None:
    """Point the twin's Event Grid at the app's `events` webhook; the reason if refused."""
    subscribe = {"endpoint": host.eventgrid_url("events"), "name": "apim-remediator", "event_types": ARM_EVENTS}
    async with aiohttp.ClientSession() as session:
        control = f"{arm.base}/_twin/events/subscriptions"
        async with session.post(control, json=subscribe, ssl=_ssl(arm.ca_file)) as answer:
            if answer.status != 201:
                return f"the Event Grid subscription was refused: {answer.status} {await answer.text()}"
    return None


async def demo(twin: TwinServer) -> list[str]:
    failures: list[str] = []
    channel = IncidentChannel()
    await channel.start()
    env = app_settings(twin, webhook=channel.url)
    arm = Arm(env["APIMR_ARM_ENDPOINT"], env["REQUESTS_CA_BUNDLE"])
    authority = env["AZURE_AUTHORITY_HOST"]
    tenant = twin.state.tenant_id

    async with DevHost(ROOT, values=env, max_polling_interval=0.2, run_timers=False) as host:
        banner("the Functions app on the local Functions host (devhost; in Azure: the Functions runtime)")
        for name in sorted(host.functions):
            say(f"function {name}")
        context = AppContext.load(env)
        try:
            failures += await sweep_tick(host, context)
            failures += await operator_grants_the_vault(arm, authority, tenant)
            failures += await event_fix(host, arm, authority, tenant)
            failures += await http_api(host, arm, authority, tenant)
            failures += await backups(host, context, arm)
            failures += await key_rotation(host, arm, authority, tenant, env)
            failures += await incidents(host, context, arm, env, channel)
        finally:
            await context.aclose()
            await channel.stop()
    return failures


async def sweep_tick(host: DevHost, context: AppContext) -> list[str]:
    banner("1. a sweep tick: one queue message per instance, each reconciled by the `work` function")
    began = time.monotonic()
    await host.invoke("sweep")
    await host.drain(within=180)
    work = [i for i in host.invocations if i.function == "work"]
    say(f"sweep -> {len(work)} work message(s), all handled in {time.monotonic() - began:.1f} s")
    journal = Journal(context.factory.table_service_async())
    problems: list[str] = []
    for ref in await context.source().discover():
        entries = await journal.history(ref.id)
        fixed = sorted({rule for e in entries if e.phase is Phase.VERIFIED for rule in e.rule_id.split("+")})
        summary = await context.findings().summary(ref.id)
        left = summary.open_total if summary is not None else "?"
        say(f"{ref.name}: fixed and verified {', '.join(fixed) or 'nothing (compliant)'}; {left} finding(s) left")
        backups = sorted(f.rule_id for f in await context.findings().findings(ref.id) if f.rule_id.startswith("BAK-"))
        say(f"{ref.name}: {', '.join(backups) or 'no BAK finding'} open until the backup and restore-test jobs run")
        if backups != ["BAK-001", "BAK-002"]:
            problems.append(f"{ref.name}: BAK-001 and BAK-002 should be open before any backup, got {backups}")
    failed = [i for i in work if i.outcome != "Succeeded"]
    return [f"a work message failed: {failed[0].error}"] if failed or not work else problems


def named_value(arm: Arm, token: str) -> dict[str, Any]:
    _, body, _ = arm.request("GET", f"{PROD}/namedValues/{MOVED_NV}?{API}", token)
    properties: dict[str, Any] = (body or {}).get("properties") or {}
    return properties


async def operator_grants_the_vault(arm: Arm, authority: str, tenant: str) -> list[str]:
    """SEC-001 was refused in the run ID-001 made the identity in; the operator grants that
    identity "Key Vault Secrets User" on the product's vault, as the refusal says. (In Azure:
    `az role assignment create`; the twin serves no Microsoft.Authorization writes, so its
    control API adds the assignment, the way estates name a managed identity.)"""
    token = await asyncio.to_thread(arm.token, OPERATOR, tenant, authority, f"{arm.base}/.default")
    if (await asyncio.to_thread(named_value, arm, token)).get("keyVault"):
        return [f"SEC-001 moved {MOVED_NV} in the run that made the identity; it should have refused"]
    say(
        f"apim-contoso-prod: {MOVED_NV} still held by APIM: SEC-001 waits, as the identity ID-001 just made "
        f"cannot read {VAULT} yet"
    )
    grant = {"principal": {"managed_identity_of": PROD}, "role": "Key Vault Secrets User", "scope": VAULT_ID}
    async with aiohttp.ClientSession() as session:
        control = f"{arm.base}/_twin/estate"
        async with session.post(control, json={"role_assignments": [grant]}, ssl=_ssl(arm.ca_file)) as answer:
            if answer.status != 200:
                return [f"the operator's role assignment was refused: {answer.status} {await answer.text()}"]
    _, service, _ = await asyncio.to_thread(arm.request, "GET", f"{PROD}?{API}", token)
    principal = service["identity"]["principalId"]
    say(f"operator: grants 'Key Vault Secrets User' on {VAULT} to principal {principal} (the instance's identity)")
    return []


async def event_fix(host: DevHost, arm: Arm, authority: str, tenant: str) -> list[str]:
    banner("2. an operator turns TLS 1.0 back on; Event Grid -> `events` -> fixed")
    token = await asyncio.to_thread(arm.token, OPERATOR, tenant, authority, f"{arm.base}/.default")
    refused = await subscribe_events(host, arm)
    if refused:
        return [refused]
    say("Event Grid subscription to the app's webhook validated (handshake answered by `events`)")

    said = await operator_turns_tls10_on(arm, token)
    if isinstance(said, str):
        return [said]
    say("operator: PATCH customProperties ...Protocols.Tls10 = True -> Succeeded")
    fixed = await until(lambda: tls10(arm, token) == "false", 30)
    if fixed is None:
        return ["TLS 1.0 was not switched off again within 30 s of the operator's change"]
    say(f"apim-remediator: TLS 1.0 off again, verified, {time.monotonic() - said:.1f} s after the change landed")

    def moved() -> bool:
        status = (named_value(arm, token).get("keyVault") or {}).get("lastStatus") or {}
        return status.get("code") == "Success"

    if await until(moved, 30) is None:
        reference = named_value(arm, token).get("keyVault")
        return [f"SEC-001 did not move {MOVED_NV} into Key Vault with a reference APIM reads: {reference}"]
    say(f"apim-remediator: {MOVED_NV} moved into {VAULT} by that run; APIM read it with its identity: Success")
    return []


def tls10(arm: Arm, token: str) -> str:
    _, body, _ = arm.request("GET", f"{PROD}?{API}", token)
    return str(body["properties"]["customProperties"].get(TLS10, "")).lower()


async def operator_turns_tls10_on(arm: Arm, token: str) -> float | str:
    """The operator's plain ARM PATCH, waited for as `az` waits; the moment it landed
    (time.monotonic), or why it did not."""
    _, body, _ = await asyncio.to_thread(arm.request, "GET", f"{PROD}?{API}", token)
    custom = {**body["properties"]["customProperties"], TLS10: "True"}
    status, _, headers = await asyncio.to_thread(
        arm.request, "PATCH", f"{PROD}?{API}", token, {"properties": {"customProperties": custom}}
    )
    if status not in (200, 202):
        return f"the operator's PATCH was refused: {status}"
    operation = headers.get("Azure-AsyncOperation", "")

    def finished() -> bool:
        _, answer, _ = arm.request("GET", operation[len(arm.base) :], token)
        return bool(answer and answer.get("status") != "InProgress")

    if operation and await until(finished, 30) is None:
        return "the operator's change never finished"
    return time.monotonic()


async def http_api(host: DevHost, arm: Arm, authority: str, tenant: str) -> list[str]:
    banner("3. the HTTP API (function key + Entra ID bearer token with app roles)")
    failures: list[str] = []
    admin = await asyncio.to_thread(arm.token, OPERATOR, tenant, authority, f"{API_AUDIENCE}/.default")
    reader = await asyncio.to_thread(arm.token, READER, tenant, authority, f"{API_AUDIENCE}/.default")
    url = f"{host.api_url}/instances/{SUB}/rg-apim-prod/apim-contoso-prod/remediations"
    manual = {"force_rule_ids": ["MGMT-003"]}  # kept in detect mode by the policy: a person decides
    async with aiohttp.ClientSession(headers={"x-functions-key": host.keys.function}) as http:

        async def post(token: str, body: dict[str, Any]) -> tuple[int, Any, str]:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(url, json=body, headers=headers) as answer:
                return answer.status, await answer.json(), answer.headers.get("Location", "")

        status, plan, _ = await post(admin, {"dry_run": True, **manual})
        say(f"POST .../remediations (dry run, Remediator.Admin) -> {status}")
        for result in plan.get("results", []) if isinstance(plan, dict) else []:
            if result["rule"] == "MGMT-003":
                say(f"  {result['status'].upper()} {result['rule']}: {result['summary']}")
        if status != 200:
            failures.append(f"the plan answered {status}: {json.dumps(plan)[:300]}")

        status, _, location = await post(admin, {"dry_run": False, **manual})
        say(f"POST .../remediations (apply MGMT-003, Remediator.Admin) -> {status}, operation {location}")
        if status != 202:
            failures.append(f"the apply answered {status}")
        else:
            outcome = await poll(http, location, admin)
            results = [r for r in (outcome.get("result") or {}).get("results", []) if r["rule"] == "MGMT-003"]
            say(f"  operation {outcome.get('status')}: " + ", ".join(f"{r['rule']} {r['status']}" for r in results))
            if outcome.get("status") != "succeeded" or not any(r["status"] == "fixed" for r in results):
                failures.append(f"the apply did not fix MGMT-003: {json.dumps(outcome)[:400]}")

        status, denied, _ = await post(reader, {"dry_run": True, **manual})
        say(f"POST .../remediations (Remediator.Read only) -> {status} {denied.get('error', {}).get('message', '')}")
        if status != 403:
            failures.append(f"a read-only caller got {status}, not 403")
    return failures


async def backups(host: DevHost, context: AppContext, arm: Arm) -> list[str]:
    """The backup timer's tick backs both instances up (native Backup LROs into Azurite, a
    manifest beside each); the next sweep closes BAK-001. BAK-002 stays open: the demo
    designates no restore target, so no test-restore can prove a backup comes back."""
    banner("4. the backup timer ticks; the next sweep closes BAK-001 (BAK-002 waits for a restore target)")
    grants = [
        {"principal": {"managed_identity_of": name}, "role": "Storage Blob Data Contributor", "scope": BACKUP_ID}
        for name in (PROD, INTERNAL)
    ]
    async with aiohttp.ClientSession() as session:
        control = f"{arm.base}/_twin/estate"
        async with session.post(control, json={"role_assignments": grants}, ssl=_ssl(arm.ca_file)) as answer:
            if answer.status != 200:
                return [f"the operator's storage role assignments were refused: {answer.status} {await answer.text()}"]
    say(f"operator: grants 'Storage Blob Data Contributor' on {BACKUP_ACCOUNT} to both instances' identities")
    ticked = await host.invoke("backup")
    if ticked.outcome != "Succeeded":
        return [f"the backup timer failed: {ticked.error}"]
    store = BackupStore(context.factory.table_service_async())
    problems: list[str] = []
    refs = await context.source().discover()
    for ref in refs:
        runs = await store.runs(ref.id)
        run = runs[0] if runs else None
        if run is None or run.status.value != "succeeded":
            problems.append(f"{ref.name}: no successful backup ({run})")
            continue
        took = run.duration.total_seconds() if run.duration is not None else 0.0
        say(f"{ref.name}: backed up to {BACKUP_ACCOUNT}/apim-backups/{run.blob} in {took:.1f} s (+ manifest)")
    before = len([i for i in host.invocations if i.function == "work"])
    await host.invoke("sweep")
    await host.drain(within=180)
    if len([i for i in host.invocations if i.function == "work"]) <= before:
        problems.append("the second sweep reconciled nothing")
    for ref in refs:
        left = sorted(f.rule_id for f in await context.findings().findings(ref.id) if f.rule_id.startswith("BAK-"))
        say(f"{ref.name}: after the next sweep, {', '.join(left) or 'no BAK finding'} open")
        if left != ["BAK-002"]:
            problems.append(f"{ref.name}: BAK-001 should have closed and BAK-002 stayed open, got {left}")
    return problems


async def incidents(
    host: DevHost, context: AppContext, arm: Arm, env: dict[str, str], channel: IncidentChannel
) -> list[str]:
    banner("6. a later sweep tick, and the incidents the runs posted (Microsoft Sentinel and a signed webhook)")
    from handlers.incidents import list_incidents

    failures: list[str] = []
    await host.invoke("sweep")
    await host.drain(within=180)
    views = await list_incidents(context.incidents(), include_resolved=True)
    for view in views:
        i = view.incident
        delivery = ", ".join(
            f"{s.sink} " + ("delivered" if not s.pending_versions else f"PENDING {s.last_error}") for s in view.sinks
        )
        say(f"{i.status.value.upper():<8} {i.severity.value:<6} x{i.count} {i.title}  [{delivery}]")
        if i.note:
            say(f"         resolved: {i.note}")
    product = (env["AZURE_CLIENT_ID"], env["AZURE_CLIENT_SECRET"])
    token = await asyncio.to_thread(
        arm.token, product, env["AZURE_TENANT_ID"], env["AZURE_AUTHORITY_HOST"], f"{arm.base}/.default"
    )
    _, listed, _ = await asyncio.to_thread(
        arm.request, "GET", f"{WORKSPACE}/providers/Microsoft.SecurityInsights/incidents?{SENTINEL_API}", token
    )
    sentinel = (listed or {}).get("value", [])
    by_status: dict[str, int] = {}
    for item in sentinel:
        by_status[item["properties"]["status"]] = by_status.get(item["properties"]["status"], 0) + 1
    say(
        f"Sentinel (law-platform): {len(sentinel)} incident(s): "
        + ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    )
    changes: dict[str, int] = {}
    for posted in channel.received:
        changes[posted["change"]] = changes.get(posted["change"], 0) + 1
    say(
        f"webhook: {len(channel.received)} signed deliveries verified ("
        + ", ".join(f"{n} {change}" for change, n in sorted(changes.items()))
        + f"); refused {channel.refused}, duplicates {channel.duplicates}"
    )
    if not views or not sentinel:
        failures.append("no incident was posted")
    if len(sentinel) != len(views):
        failures.append(f"{len(views)} incident(s) in the product, {len(sentinel)} in Sentinel")
    if not any(not v.incident.open for v in views):
        failures.append("no incident was resolved, though runs fixed what they were about")
    if any(s.pending_versions for v in views for s in v.sinks):
        failures.append("an incident change was not delivered")
    if channel.refused or channel.duplicates:
        failures.append("the webhook saw a bad signature or a duplicate delivery")
    return failures


class KeyProbe:
    """A client of the mobile app: reads the key from the vault's current version and presents
    it to the gateway (the twin's gateway key check), over and over, counting refusals."""

    def __init__(self, env: dict[str, str], arm: Arm) -> None:
        from azure.keyvault.secrets import SecretClient

        credential = ClientSecretCredential(
            env["AZURE_TENANT_ID"],
            env["AZURE_CLIENT_ID"],
            env["AZURE_CLIENT_SECRET"],
            authority=env["AZURE_AUTHORITY_HOST"],
            disable_instance_discovery=True,
            connection_verify=arm.ca_file,
        )
        self.vault = SecretClient(
            env["APIMR_KEY_VAULT_URL"], credential, connection_verify=arm.ca_file, verify_challenge_resource=False
        )
        self.arm = arm
        self.ok = 0
        self.refused = 0
        self.stop = False

    def run(self) -> None:
        import requests

        session = requests.Session()
        while not self.stop:
            value = self.vault.get_secret(LEDGER_ENTRY).value
            answer = session.post(
                f"{self.arm.base}/_twin/gateway/check",
                json={"service_id": PROD, "key": value},
                verify=self.arm.ca_file,
                timeout=30,
            ).json()
            del value
            if answer.get("valid") and answer.get("subscription") == "orders-mobile":
                self.ok += 1
            else:
                self.refused += 1
            time.sleep(0.02)


async def key_rotation(host: DevHost, arm: Arm, authority: str, tenant: str, env: dict[str, str]) -> list[str]:
    banner("5. a stale key rotated through Key Vault (HTTP API) while a client keeps authenticating")
    failures: list[str] = []
    admin = await asyncio.to_thread(arm.token, OPERATOR, tenant, authority, f"{API_AUDIENCE}/.default")
    url = f"{host.api_url}/instances/{SUB}/rg-apim-prod/apim-contoso-prod/key-rotations"
    probe = KeyProbe(env, arm)
    running = asyncio.create_task(asyncio.to_thread(probe.run))
    try:
        await until(lambda: probe.ok + probe.refused >= 5, within=30)
        say(f"client: {probe.ok} request(s) authenticated with the vault's key before the rotation")
        async with aiohttp.ClientSession(headers={"x-functions-key": host.keys.function}) as http:
            headers = {"Authorization": f"Bearer {admin}"}
            async with http.post(url, json={"stale": True}, headers=headers) as answer:
                status, plan = answer.status, await answer.json()
            say(f"POST .../key-rotations (dry run, stale keys) -> {status}")
            for result in plan.get("results", []) if isinstance(plan, dict) else []:
                name = result["subscription"].rsplit("/", 1)[-1]
                say(f"  {result['status'].upper()} {result['action']} {name}")
                for step in result["steps"]:
                    say(f"    - {step}")
            async with http.post(url, json={"stale": True, "dry_run": False}, headers=headers) as answer:
                status, location = answer.status, answer.headers.get("Location", "")
            say(f"POST .../key-rotations (rotate) -> {status}, operation {location}")
            outcome = await poll(http, location, admin) if status == 202 else {}
        results = (outcome.get("result") or {}).get("results", [])
        for result in results:
            say(f"  operation {outcome.get('status')}: {result['subscription'].rsplit('/', 1)[-1]} {result['status']}: "
                f"{result['detail']}")  # fmt: skip
        if not any(r["status"] == "done" for r in results):
            failures.append(f"the stale key was not rotated: {json.dumps(outcome)[:400]}")
        after = probe.ok + probe.refused
        await until(lambda: probe.ok + probe.refused >= after + 10, within=30)
    finally:
        probe.stop = True
        await running
    say(f"client: {probe.ok} request(s) authenticated with the vault's current key, {probe.refused} refused")
    if probe.refused or not probe.ok:
        failures.append(f"the client was refused {probe.refused} time(s) during the rotation")
    return failures


async def poll(http: aiohttp.ClientSession, location: str, token: str) -> dict[str, Any]:
    for _ in range(600):
        async with http.get(location, headers={"Authorization": f"Bearer {token}"}) as answer:
            body: dict[str, Any] = await answer.json()
        if body.get("status") != "running":
            return body
        await asyncio.sleep(0.1)
    return {"status": "still running after 60 s"}


def _ssl(ca_file: str) -> Any:
    import ssl

    return ssl.create_default_context(cafile=ca_file)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="apim-remediator-demo-"))
    banner("starting the twin (a local Azure: ARM, Entra, Key Vault, Log Analytics, Event Grid, Azurite)")
    # Azure's LROs say Retry-After: 60; the demo shows the product, not the wait.
    twin = TwinServer(ESTATE, workdir, retry_after="0.05")
    twin.start()
    try:
        failures = asyncio.run(demo(twin))
    finally:
        twin.stop()
    banner("done" if not failures else "FAILED")
    for failure in failures:
        print(f"  {failure}")
    if failures:
        print(f"  The twin's state, certificates and Azurite's log are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)  # Azurite's data and a CA: nothing to keep
    if not failures:
        print("  Everything the policy allows was fixed through the queue (the secret once the operator")
        print("  granted the new identity the vault), an operator's change was undone through Event Grid,")
        print("  the HTTP API planned, applied and refused as its roles say, the backup timer's native")
        print("  backups closed BAK-001, a stale key was rotated through Key Vault without the client")
        print("  ever being refused, and what was left to people became incidents in Sentinel and on")
        print("  the webhook, resolved where a run fixed them.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
