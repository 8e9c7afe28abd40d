"""Backups and test-restores against the twin and Azurite, through the product's own
composition root (real SDK clients): a backup writes a real blob and a manifest; a
test-restore brings it back into the designated target and verifies it; a tampered backup
fails verification with a readable diff; a run left mid-LRO resumes from its stored
continuation token; an LRO that ends Failed or Canceled is a recorded failure; restores
into a non-designated target or across tiers are refused before anything is restored;
BAK-001/002 fire until the jobs have run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from azure.storage.blob import BlobServiceClient

from handlers.backup import BackupOutcome, BackupRequest, run_backups
from handlers.context import AppContext
from handlers.restore_test import RestoreOutcome, RestoreRefused, RestoreTestRequest, run_restore_tests
from shared.backup import manifest_blob_name, manifest_from_json
from shared.backup_store import BackupStore
from shared.evaluation import evaluate
from shared.incidents import fingerprint_of
from shared.inventory import instance_ref
from shared.policy import RESTORE_TARGET_TAG
from tests.conftest import TwinHandle
from tests.integration.test_remediate import cli

pytestmark = pytest.mark.integration

RG = "rg-bk"
ACCOUNT = "apimrbackups"


def service_id(twin: TwinHandle, name: str) -> str:
    return f"/subscriptions/{twin.subscription_id}/resourceGroups/{RG}/providers/Microsoft.ApiManagement/service/{name}"


def seed_estate(twin: TwinHandle) -> dict[str, str]:
    """Instances named bk-src, bk-dst, ... plus a per-test suffix: the backups table in Azurite
    outlives the twin's reset, so each test backs up instances of its own."""
    suffix = uuid.uuid4().hex[:6]
    src = service_id(twin, f"bk-src-{suffix}")
    tagged = {RESTORE_TARGET_TAG: src}
    instances: list[dict[str, Any]] = [
        {
            "name": "bk-src",
            "sku": {"name": "Premium", "capacity": 1},
            "identity": {"type": "SystemAssigned"},
            "products": [{"id": "mobile", "displayName": "Mobile", "apis": ["orders"]}],
            "apis": [
                {
                    "id": "orders",
                    "path": "orders",
                    "operations": [
                        {"id": "list-orders", "method": "GET", "urlTemplate": "/orders"},
                        {"id": "create-order", "method": "POST", "urlTemplate": "/orders"},
                    ],
                },
                {"id": "legacy", "path": "legacy", "operations": [{"id": "ping", "method": "GET", "urlTemplate": "/"}]},
            ],
            "named_values": [
                {"id": "backend-key", "displayName": "backend-key", "value": "canary-nv-9f3", "secret": True}
            ],
            "subscriptions": [{"sid": "orders-app", "displayName": "Orders app", "scope": "/apis", "state": "active"}],
            "users": [{"id": "ada", "email": "ada@example.com", "firstName": "Ada", "lastName": "L"}],
        },
        {
            "name": "bk-dst",
            "sku": {"name": "Premium", "capacity": 1},
            "identity": {"type": "SystemAssigned"},
            "tags": tagged,
        },
        {
            "name": "bk-dev",
            "sku": {"name": "Developer", "capacity": 1},
            "identity": {"type": "SystemAssigned"},
            "tags": tagged,
        },
        {"name": "bk-untagged", "sku": {"name": "Premium", "capacity": 1}, "identity": {"type": "SystemAssigned"}},
        {"name": "bk-cons", "sku": {"name": "Consumption", "capacity": 0}, "identity": {"type": "SystemAssigned"}},
    ]
    for item in instances:
        item["name"] = f"{item['name']}-{suffix}"
    account_id = twin.server.state.extra["storage_ids"][ACCOUNT]
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": twin.subscription_id,
                    "resource_groups": [{"name": RG, "location": "westeurope", "apim": instances}],
                }
            ],
            "role_assignments": [
                {
                    "principal": {"managed_identity_of": i["name"]},
                    "role": "Storage Blob Data Contributor",
                    "scope": account_id,
                }
                for i in instances
            ],
        }
    )
    return {i["name"].rsplit("-", 1)[0]: service_id(twin, i["name"]) for i in instances}


def policy_text(ids: dict[str, str], target: str = "bk-dst") -> str:
    return (
        "version: 1\nbackups:\n  every_hours: 24\n  retention: {keep_last: 2, max_age_days: 30}\n"
        f"  restore_tests:\n    every_days: 7\n    targets:\n      {ids['bk-src']}: {ids[target]}\n"
    )


def env_for(
    twin: TwinHandle, tmp_path: Path, ids: dict[str, str], container: str, target: str = "bk-dst"
) -> dict[str, str]:
    path = tmp_path / f"policy-{target}.yaml"
    path.write_text(policy_text(ids, target))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
    env.update(twin.env)
    env.update(
        APIMR_POLICY_FILE=str(path),
        APIMR_RESOURCE_GROUPS=RG,
        APIMR_BACKUP_STORAGE_ACCOUNT=ACCOUNT,
        APIMR_BACKUP_BLOB_ENDPOINT=twin.server.state.extra["storage"][ACCOUNT]["blob_url"],
        APIMR_BACKUP_CONTAINER=container,
    )
    return env


def blobs(twin: TwinHandle, container: str) -> Any:
    info = twin.server.state.extra["storage"][ACCOUNT]
    service = BlobServiceClient(
        info["blob_url"],
        credential={"account_name": ACCOUNT, "account_key": info["account_key"]},
        connection_verify=twin.ca_file,
    )
    return service.get_container_client(container)


def arm_log(twin: TwinHandle) -> list[dict[str, Any]]:
    _, body = twin.control("GET", "/_twin/log?service=arm")
    return [e for e in body["entries"] if not e["path"].startswith("/_twin/")]


@pytest_asyncio.fixture(loop_scope="function")
async def world(twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    ids = seed_estate(twin)
    container = f"bk-{uuid.uuid4().hex[:10]}"
    env = env_for(twin, tmp_path, ids, container)
    context = AppContext.load(env)
    try:
        yield {"ids": ids, "container": container, "env": env, "context": context}
    finally:
        await context.aclose()


async def bak_findings(context: AppContext, instance_id: str) -> list[Any]:
    ref = instance_ref(instance_id, "westeurope", {})
    assert ref is not None
    snapshot = await context.source().read(ref)
    result = evaluate(snapshot, context.policy, today=datetime.now(UTC).date())
    return [f for f in result.findings if f.rule_id.startswith("BAK-")]


async def test_backup_writes_a_blob_and_a_test_restore_brings_it_back(twin: TwinHandle, world: dict[str, Any]) -> None:
    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    assert {f.rule_id for f in await bak_findings(context, src)} == {"BAK-001", "BAK-002"}

    result = await run_backups(BackupRequest(max_wait=30), context.backup_deps())
    by_id = {i.instance_id.lower(): i for i in result.instances}
    assert by_id[src.lower()].outcome is BackupOutcome.SUCCEEDED, by_id[src.lower()]
    # Consumption has no backup: reported, not failed.
    assert by_id[ids["bk-cons"].lower()].outcome is BackupOutcome.UNSUPPORTED
    blob = by_id[src.lower()].blob
    assert blob is not None
    assert re.fullmatch(r"bk-src-[0-9a-f]{6}/\d{8}T\d{6}Z\.apimbackup", blob)
    container = blobs(twin, world["container"])
    document = json.loads(container.download_blob(blob).readall())  # the real backup, written by "APIM"
    assert any(r["path"] == "/apis/orders/operations/list-orders" for r in document["resources"])
    manifest = manifest_from_json(container.download_blob(manifest_blob_name(blob)).readall())
    assert manifest.content.apis["orders"].operations == ("create-order", "list-orders")
    assert manifest.content.named_values == ("backend-key",)
    assert (manifest.content.subscription_count, manifest.content.user_count) == (2, 1)  # with the built-in master
    assert "customProperties" in manifest.not_in_backup
    assert "canary-nv-9f3" not in container.download_blob(manifest_blob_name(blob)).readall().decode()
    assert {f.rule_id for f in await bak_findings(context, src)} == {"BAK-002"}

    tested = await run_restore_tests(RestoreTestRequest(max_wait=30), context.backup_deps())
    [outcome] = tested.sources
    assert outcome.outcome is RestoreOutcome.PASSED, outcome
    assert outcome.target_id == ids["bk-dst"]
    assert outcome.recovery_s is not None
    restored = twin.arm("GET", f"{ids['bk-dst']}/apis/orders/operations?api-version=2024-05-01").json()
    assert sorted(o["name"] for o in restored["value"]) == ["create-order", "list-orders"]
    assert await bak_findings(context, src) == []
    runs = await BackupStore(context.factory.table_service_async()).runs(src)
    assert any(r.verified for r in runs if r.blob == blob and r.kind.value == "backup")


async def test_a_tampered_backup_fails_verification_with_a_readable_diff(
    twin: TwinHandle, world: dict[str, Any]
) -> None:
    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    result = await run_backups(BackupRequest(instance_ids=(src,), max_wait=30), context.backup_deps())
    blob = result.instances[0].blob
    assert blob is not None
    container = blobs(twin, world["container"])
    document = json.loads(container.download_blob(blob).readall())
    document["resources"] = [r for r in document["resources"] if not r["path"].startswith("/apis/legacy")]
    container.upload_blob(blob, json.dumps(document).encode(), overwrite=True)

    [outcome] = (await run_restore_tests(RestoreTestRequest(max_wait=30), context.backup_deps())).sources
    assert outcome.outcome is RestoreOutcome.FAILED
    assert outcome.error_code == "ContentMismatch"
    assert "API 'legacy' is missing" in outcome.differences
    [finding] = [f for f in await bak_findings(context, src) if f.rule_id == "BAK-002"]
    assert "API 'legacy' is missing" in finding.message
    # The failed test-restore is an incident carrying the same diff (issue 11).
    incident = await context.incidents().store.get(fingerprint_of("RESTORE-TEST", src))
    assert incident is not None
    assert incident.open
    assert "ContentMismatch" in incident.title
    assert "- API 'legacy' is missing" in incident.description


async def test_a_run_left_mid_lro_resumes_from_its_token_and_finishes(twin: TwinHandle, world: dict[str, Any]) -> None:
    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    twin.control("PUT", "/_twin/lro", json={"polls": 1000})
    first = await run_backups(BackupRequest(instance_ids=(src,), max_wait=0), context.backup_deps())
    assert first.instances[0].outcome is BackupOutcome.RUNNING
    [running] = await BackupStore(context.factory.table_service_async()).runs(src)
    assert running.status.value == "running"
    assert running.continuation
    assert "Authorization" not in running.continuation
    assert "canary" not in running.continuation
    # The worker that started it is gone; a fresh process (new context) picks it up.
    async_context = AppContext.load(world["env"])
    try:
        twin.control("PUT", "/_twin/lro", json={"polls": 1})
        second = await run_backups(BackupRequest(instance_ids=(src,), max_wait=30), async_context.backup_deps())
    finally:
        await async_context.aclose()
    assert second.instances[0].outcome is BackupOutcome.SUCCEEDED
    assert second.instances[0].run_id == running.run_id
    assert second.instances[0].duration_s is not None
    starts = [e for e in arm_log(twin) if e["method"] == "POST" and e["path"].lower().endswith("/backup")]
    assert len(starts) == 1  # resumed, not started again


@pytest.mark.parametrize(("action", "status"), [("lro_fail", "Failed"), ("lro_cancel", "Canceled")])
async def test_an_lro_that_ends_failed_or_canceled_is_a_recorded_failure(
    twin: TwinHandle, world: dict[str, Any], action: str, status: str
) -> None:
    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    twin.control(
        "POST", "/_twin/faults", json={"service": "arm", "path": "/backup$", "action": action, "code": "BackupBroke"}
    )
    result = await run_backups(BackupRequest(instance_ids=(src,), max_wait=30), context.backup_deps())
    [item] = result.instances
    assert item.outcome is BackupOutcome.FAILED
    assert item.error_code
    [run] = await BackupStore(context.factory.table_service_async()).runs(src)
    assert run.status.value == "failed"
    assert run.error_code == item.error_code
    [finding] = [f for f in await bak_findings(context, src) if f.rule_id == "BAK-001"]
    assert "last attempt failed" in finding.message


def test_a_non_designated_target_is_refused_with_no_azure_call(twin: TwinHandle, world: dict[str, Any]) -> None:
    ids = world["ids"]
    twin.control("DELETE", "/_twin/log")
    done = cli(world["env"], "restore-test", "--source", ids["bk-src"], "--target", ids["bk-untagged"])
    assert done.returncode == 2, done.stderr
    assert "is not the designated restore target" in done.stderr
    assert arm_log(twin) == []


async def test_across_tiers_or_without_the_tag_is_refused_before_any_restore(
    twin: TwinHandle, world: dict[str, Any], tmp_path: Path
) -> None:
    ids, context = world["ids"], world["context"]
    await run_backups(BackupRequest(instance_ids=(ids["bk-src"],), max_wait=30), context.backup_deps())
    twin.control("DELETE", "/_twin/log")
    for target, code in (("bk-dev", "TierMismatch"), ("bk-untagged", "RestoreRefused")):
        env = env_for(twin, tmp_path, ids, world["container"], target)
        other = AppContext.load(env)
        try:
            [outcome] = (
                await run_restore_tests(RestoreTestRequest(force=True, max_wait=30), other.backup_deps())
            ).sources
        finally:
            await other.aclose()
        assert outcome.outcome is RestoreOutcome.REFUSED, outcome
        assert outcome.error_code == code, outcome
    assert not [e for e in arm_log(twin) if e["path"].lower().endswith("/restore")]
    # Refused on what the inventory says (tags, tier): not one request about either target.
    refused = (ids["bk-dev"].lower(), ids["bk-untagged"].lower())
    assert not [e["path"] for e in arm_log(twin) if e["path"].lower().startswith(refused)]
    with pytest.raises(RestoreRefused):
        await run_restore_tests(
            RestoreTestRequest(source_ids=(ids["bk-src"],), target_id=ids["bk-dev"]), context.backup_deps()
        )


def test_the_http_api_backs_up_with_operate_and_test_restores_with_admin(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_api import ADMIN, API_ENV_KEYS, AUDIENCE, OPERATE, ApiServer, call, path_of, poll, token

    for key in API_ENV_KEYS:
        monkeypatch.setenv(key, twin.env[key])
    ids = seed_estate(twin)
    env = env_for(twin, tmp_path, ids, f"bk-{uuid.uuid4().hex[:10]}")
    env.update(APIMR_API_AUDIENCE=AUDIENCE, APIMR_API_TENANT_ID=twin.tenant_id)
    source = path_of(ids["bk-src"])
    with ApiServer(env) as server:
        started = call(server, "POST", f"{source}/backups", token(twin, OPERATE))
        assert started.status_code == 202, started.text
        done = poll(server, started.headers["Location"], token(twin, OPERATE))
        assert done["status"] == "succeeded", done
        assert [i["outcome"] for i in done["result"]["instances"]] == ["succeeded"]
        denied = call(server, "POST", f"{source}/restore-tests", token(twin, OPERATE))
        assert denied.status_code == 403
        started = call(server, "POST", f"{source}/restore-tests", token(twin, ADMIN))
        assert started.status_code == 202, started.text
        done = poll(server, started.headers["Location"], token(twin, ADMIN))
        assert [s["outcome"] for s in done["result"]["sources"]] == ["passed"], done


async def test_a_worker_killed_mid_lro_is_resumed_by_the_next_tick(twin: TwinHandle, world: dict[str, Any]) -> None:
    """The CLI is killed (SIGKILL: no cleanup) once its backup is running; the next tick
    resumes it from the stored continuation token and finishes it."""
    import asyncio
    import signal
    import sys

    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    twin.control("PUT", "/_twin/lro", json={"polls": 100000})
    command = [str(Path(sys.executable).with_name("apim-remediator")), "backup", "--instance", src, "--max-wait", "120"]
    worker = await asyncio.create_subprocess_exec(
        *command, env=world["env"], stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    store = BackupStore(context.factory.table_service_async())
    try:
        for _ in range(300):
            runs = await store.runs(src)
            if runs and runs[0].status.value == "running":
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the backup never reached `running`")
    finally:
        worker.send_signal(signal.SIGKILL)
        await asyncio.wait_for(worker.wait(), timeout=30)
    assert worker.returncode == -signal.SIGKILL
    [left] = await store.runs(src)
    assert left.status.value == "running"
    assert left.continuation
    twin.control("PUT", "/_twin/lro", json={"polls": 1})
    result = await run_backups(BackupRequest(instance_ids=(src,), max_wait=30), context.backup_deps())
    [item] = result.instances
    assert item.outcome is BackupOutcome.SUCCEEDED
    assert item.run_id == left.run_id
    assert item.duration_s is not None
    starts = [e for e in arm_log(twin) if e["method"] == "POST" and e["path"].lower().endswith("/backup")]
    assert len(starts) == 1


async def test_an_access_key_is_read_from_key_vault_and_never_kept(
    twin: TwinHandle, world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = world["ids"]
    key = twin.server.state.extra["storage"][ACCOUNT]["account_key"]
    twin.seed(
        {
            "subscriptions": [
                {
                    "id": twin.subscription_id,
                    "resource_groups": [
                        {
                            "name": RG,
                            "location": "westeurope",
                            "key_vaults": [{"name": "kv-bk-keys", "secrets": [{"name": "backup-key", "value": key}]}],
                        }
                    ],
                }
            ]
        }
    )
    env = dict(world["env"])
    env.update(
        APIMR_BACKUP_ACCESS="AccessKey",
        APIMR_BACKUP_ACCESS_KEY_SECRET=f"{twin.urls['vault:kv-bk-keys']}/secrets/backup-key",
    )
    context = AppContext.load(env)
    try:
        result = await run_backups(BackupRequest(instance_ids=(ids["bk-src"],), max_wait=30), context.backup_deps())
        runs = await BackupStore(context.factory.table_service_async()).runs(ids["bk-src"])
    finally:
        await context.aclose()
    assert result.instances[0].outcome is BackupOutcome.SUCCEEDED, result
    backups = [e for e in arm_log(twin) if e["path"].lower().endswith("/backup")]
    assert len(backups) == 1
    assert key not in caplog.text
    assert key not in repr(runs)
    assert key not in repr(result)


async def test_retention_prunes_by_count_but_keeps_the_newest_verified_backup(
    twin: TwinHandle, world: dict[str, Any]
) -> None:
    """keep_last: 2 (policy_text). Backup 1 is verified by a test-restore; after backups 2, 3
    and 4, backup 2 is pruned (blob and manifest), backup 1 stays as the newest verified one."""
    import asyncio

    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    container = blobs(twin, world["container"])
    made: list[str] = []
    for n in range(4):
        if n:
            await asyncio.sleep(1.05)  # blob names carry whole seconds
        result = await run_backups(BackupRequest(instance_ids=(src,), force=True, max_wait=30), context.backup_deps())
        [item] = result.instances
        assert item.outcome is BackupOutcome.SUCCEEDED, item
        assert item.blob is not None
        made.append(item.blob)
        if n == 0:
            [tested] = (await run_restore_tests(RestoreTestRequest(max_wait=30), context.backup_deps())).sources
            assert tested.outcome is RestoreOutcome.PASSED, tested
        if n == 3:
            assert item.pruned == (made[1],)
    present = {b.name for b in container.list_blobs(name_starts_with=made[0].split("/")[0] + "/")}
    assert present == {made[0], manifest_blob_name(made[0]), *made[2:], *(manifest_blob_name(b) for b in made[2:])}
    runs = {
        r.blob: r
        for r in await BackupStore(context.factory.table_service_async()).runs(src)
        if r.kind.value == "backup"
    }
    assert runs[made[1]].pruned
    assert runs[made[0]].verified
    assert not runs[made[0]].pruned


async def test_a_failed_backup_is_an_incident_until_the_next_backup_succeeds(
    twin: TwinHandle, world: dict[str, Any]
) -> None:
    """Issue 11's "a failed backup or test-restore": one incident per instance and job,
    counted again by each failed tick, resolved with a note by the next success."""
    ids, context = world["ids"], world["context"]
    src = ids["bk-src"]
    reporter = context.incidents()
    fingerprint = fingerprint_of("BACKUP", src)
    twin.control(
        "POST",
        "/_twin/faults",
        json={"service": "arm", "path": "/backup$", "action": "lro_fail", "code": "BackupBroke", "times": 0},
    )
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(1.1)  # blob names have whole seconds: one backup per second
        result = await run_backups(BackupRequest(instance_ids=(src,), force=True, max_wait=30), context.backup_deps())
        assert [i.outcome for i in result.instances] == [BackupOutcome.FAILED]
    incident = await reporter.store.get(fingerprint)
    assert incident is not None, "a failed backup opened no incident"
    assert (incident.status.value, incident.count) == ("active", 2)
    assert "BackupBroke" in incident.title + incident.description
    assert "apim-remediator backup" in incident.description  # what the operator can do
    twin.control("DELETE", "/_twin/faults")
    await asyncio.sleep(1.1)
    result = await run_backups(BackupRequest(instance_ids=(src,), force=True, max_wait=30), context.backup_deps())
    assert [i.outcome for i in result.instances] == [BackupOutcome.SUCCEEDED]
    resolved = await reporter.store.get(fingerprint)
    assert resolved is not None
    assert resolved.status.value == "resolved"
    assert "succeeded" in (resolved.note or "")
