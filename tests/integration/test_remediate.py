"""The remediation engine end to end against the twin and Azurite: dry run by default,
apply only in remediate mode, verify, idempotence (a second run writes nothing), the
NET-001 refusal, the blast-radius cap, a concurrent change (412 -> re-plan, no lost
update), and a worker killed with SIGKILL mid-change (the next run settles the journal)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from handlers.remediate import RemediateRequest, RemediationDeps, Status, remediate
from shared.actions.executor import ArmResponse, OperationState
from shared.armapi import AzureArm, AzureSecrets
from shared.azure import ClientFactory
from shared.evidence_source import AzureEvidenceSource
from shared.journal import Journal, Phase, Trigger, TriggerKind
from shared.locks import InstanceLocks
from shared.policy import parse_policy
from shared.settings import load_settings
from shared.source import AzureInstanceSource
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import VAULT, compliant, drift, fragment_for

pytestmark = pytest.mark.integration

NET_REMEDIATE = "version: 1\nrules:\n  NET-001: {mode: remediate, params: {acknowledge_gateway_only: true}}\n"
APIM_WRITE = ("PUT", "PATCH", "POST", "DELETE")


def product_env(twin: TwinHandle, tmp_path: Path, policy: str) -> dict[str, str]:
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APIMR_", "AZURE_"))}
    env.update(twin.env)
    env.update(
        APIMR_KEY_VAULT_URL=twin.urls[f"vault:{VAULT}"],
        APIMR_RESOURCE_GROUPS="rg-drift",
        APIMR_POLICY_FILE=str(path),
        APIMR_LEASE_SECONDS="15",
    )
    return env


def seed(twin: TwinHandle, rule_id: str, name: str = "fixme") -> str:
    spec = compliant(name, twin.subscription_id)
    drift(rule_id, spec)
    fragment, ids = fragment_for({name: spec}, twin.subscription_id)
    twin.seed(fragment)
    return ids[name]


def cli(env: Mapping[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("apim-remediator")), *args]
    return subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout)


def apim_writes(twin: TwinHandle) -> list[str]:
    _, log = twin.control("GET", "/_twin/log?service=arm")
    return [
        f"{e['method']} {e['path']}"
        for e in log["entries"]
        if e["method"] in APIM_WRITE
        and "/providers/Microsoft." in e["path"]
        and "/listSecrets" not in e["path"]
        and "Microsoft.ResourceGraph" not in e["path"]  # a query, not a write
    ]


def public_access(twin: TwinHandle, service_id: str) -> str:
    response = twin.arm("GET", f"{service_id}?api-version=2024-05-01")
    return str(response.json()["properties"]["publicNetworkAccess"])


def test_dry_run_plans_and_writes_nothing(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = seed(twin, "NET-001")
    twin.control("DELETE", "/_twin/log")
    detect = "version: 1\nrules:\n  NET-001: {params: {acknowledge_gateway_only: true}}\n"
    result = cli(product_env(twin, tmp_path, detect), "remediate", "--instance", service_id)
    assert result.returncode == 0, result.stderr
    assert "dry run (nothing changed; --apply to act)" in result.stdout
    assert "WOULD     NET-001" in result.stdout
    assert "properties.publicNetworkAccess: Enabled -> Disabled" in result.stdout
    assert f"PATCH {service_id}?api-version=2024-05-01 If-Match:" in result.stdout
    assert "NET-001 is in detect mode: --apply would skip it" in result.stdout
    assert apim_writes(twin) == []


def test_apply_fixes_verifies_and_a_second_run_writes_nothing(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = seed(twin, "NET-001")
    env = product_env(twin, tmp_path, NET_REMEDIATE)
    result = cli(env, "remediate", "--instance", service_id, "--apply", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [fixed] = report["results"]
    assert (fixed["rule"], fixed["status"]) == ("NET-001", "fixed")
    assert report["remaining"] == []
    assert public_access(twin, service_id) == "Disabled"
    twin.control("DELETE", "/_twin/log")
    again = cli(env, "remediate", "--instance", service_id, "--apply")
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert apim_writes(twin) == []


def test_detect_mode_is_respected_on_apply(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = seed(twin, "NET-001")
    twin.control("DELETE", "/_twin/log")
    result = cli(product_env(twin, tmp_path, "version: 1\n"), "remediate", "--instance", service_id, "--apply")
    assert result.returncode == 0
    assert "NET-001 is in detect mode; set rules.NET-001.mode: remediate" in result.stdout
    assert apim_writes(twin) == []
    assert public_access(twin, service_id) == "Enabled"


def test_net001_without_private_connectivity_is_refused(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = seed(twin, "NET-002")
    twin.control("DELETE", "/_twin/log")
    result = cli(product_env(twin, tmp_path, NET_REMEDIATE), "remediate", "--instance", service_id, "--apply")
    assert result.returncode == 1
    assert "REFUSED   NET-001" in result.stdout
    assert "would cut every client off" in result.stdout
    assert apim_writes(twin) == []


def test_blast_radius_cap_stops_everything(twin: TwinHandle, tmp_path: Path) -> None:
    service_id = seed(twin, "NET-001")
    policy = NET_REMEDIATE + "limits:\n  max_writes_per_run: 0\n"
    twin.control("DELETE", "/_twin/log")
    result = cli(product_env(twin, tmp_path, policy), "remediate", "--instance", service_id, "--apply")
    assert result.returncode == 1
    assert (
        "STOPPED   1 writes planned (fixes that earlier ones unlock included), more than the policy allows "
        "in one run (0)" in result.stdout
    )
    assert apim_writes(twin) == []


# -- a concurrent change between plan and apply -------------------------------------------------


class ChangeFirst:
    """The real ArmApi, plus: just before our first PATCH, somebody else changes the service."""

    def __init__(self, arm: AzureArm, twin: TwinHandle, service_id: str) -> None:
        self.arm = arm
        self.twin = twin
        self.service_id = service_id
        self.patches = 0

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
        if method == "PATCH":
            self.patches += 1
            if self.patches == 1:
                # A person tags the instance through ARM at the same moment.
                operator = self.twin.credential("0b5e0c1a-0000-4000-8000-00000000c002", "twin-test-secret-operator")
                token = operator.get_token(self.twin.urls["arm"] + "/.default").token
                await asyncio.to_thread(self._person_patches, token)
        return await self.arm.send(method, path, api_version, body=body, if_match=if_match, max_wait=max_wait)

    async def operation_status(self, operation_url: str) -> OperationState:
        return await self.arm.operation_status(operation_url)

    def _person_patches(self, token: str) -> None:
        """PATCH the tags and wait for the long-running operation, as `az` would."""
        started = self.twin.arm(
            "PATCH",
            f"{self.service_id}?api-version=2024-05-01",
            token=token,
            json={"tags": {"owner": "platform-team", "change": "CHG-1234"}},
        )
        status_url = started.headers["Azure-AsyncOperation"]
        for _ in range(100):
            answer = self.twin.arm("GET", status_url[len(self.twin.urls["arm"]) :], token=token).json()
            if answer["status"] != "InProgress":
                assert answer["status"] == "Succeeded"
                return
        raise AssertionError("the person's change never finished")


@pytest.fixture
def factory(twin: TwinHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ClientFactory]:
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    built = ClientFactory(load_settings(product_env(twin, tmp_path, NET_REMEDIATE)))
    yield built
    built.close()


async def test_concurrent_service_change_survives_and_is_reported(twin: TwinHandle, factory: ClientFactory) -> None:
    """Azure does not evaluate If-Match on the service PATCH, so a person's change between our
    read and our write is not refused: our PATCH sends only what the fix changes (it
    survives), and the read after the update notices the service changed beyond our PATCH
    and says where (paths, not values) in the result and the journal."""
    service_id = seed(twin, "NET-001")
    twin.control("PUT", "/_twin/lro", {"polls": 0})
    arm = ChangeFirst(AzureArm(factory, poll_default=0.01), twin, service_id)
    journal = Journal(factory.table_service_async(), "journalconcurrency")
    deps = RemediationDeps(
        source=AzureInstanceSource(factory, factory.settings),
        arm=arm,
        secrets=AzureSecrets(factory),
        journal=journal,
        locks=InstanceLocks(factory.blob_service_async(), duration=15),
        policy=parse_policy(NET_REMEDIATE, source="policy.yaml"),
        key_vault_url=None,
        evidence=AzureEvidenceSource(factory),
    )
    report = await remediate(
        RemediateRequest(instance_id=service_id, trigger=Trigger(TriggerKind.CLI, "test"), apply=True), deps
    )
    [result] = report.results
    assert result.status is Status.FIXED
    assert "the service also changed meanwhile at tags.change, tags.owner" in result.detail
    statuses = [(e["method"], e["status"]) for e in twin.control("GET", "/_twin/log?service=arm")[1]["entries"]
                if e["method"] == "PATCH"]  # fmt: skip
    assert [s for _, s in statuses] == [202, 202]  # the person's write, then ours: one service write
    body = twin.arm("GET", f"{service_id}?api-version=2024-05-01").json()
    assert body["properties"]["publicNetworkAccess"] == "Disabled"
    assert body["tags"]["change"] == "CHG-1234"  # the person's change survived
    [entry] = await journal.history(service_id)
    assert entry.phase is Phase.VERIFIED
    assert "tags.change" in (entry.error or "")
    assert "CHG-1234" not in (entry.error or "")
    await factory.aclose()


# -- a worker killed with SIGKILL ---------------------------------------------------------------


def start_apply(env: Mapping[str, str], service_id: str) -> subprocess.Popen[str]:
    command = [str(Path(sys.executable).with_name("apim-remediator")), "remediate", "--instance", service_id,
               "--apply", "--format", "json", "--lease-wait", "40"]  # fmt: skip
    return subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_fired(twin: TwinHandle, deadline: float = 60) -> None:
    """Until the armed fault has been taken: the request it catches has arrived."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if twin.control("GET", "/_twin/faults")[1]["faults"] == []:
            return
        time.sleep(0.05)
    raise AssertionError("the worker never reached the faulted request")


@pytest.mark.parametrize("moment", ["before-the-write", "after-the-write"])
def test_worker_killed_mid_change_is_settled_by_the_next_run(twin: TwinHandle, tmp_path: Path, moment: str) -> None:
    service_id = seed(twin, "NET-001")
    env = product_env(twin, tmp_path, NET_REMEDIATE)
    if moment == "before-the-write":
        # Our PATCH reaches the front door and goes no further.
        fault = {"service": "arm", "method": "PATCH", "path": "/service/fixme$", "action": "hang", "delay": 60}
    else:
        # Azure accepts our PATCH (202) and runs it; the worker dies while it waits for the
        # operation's status, before it could record anything after its intent.
        fault = {"service": "arm", "method": "GET", "path": "/operationresults/", "action": "delay", "delay": 60}
    # Armed before the worker starts: only the worker sends these requests.
    twin.control("POST", "/_twin/faults", fault)
    worker = start_apply(env, service_id)
    try:
        wait_until_fired(twin)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    twin.control("DELETE", "/_twin/faults")
    expected = "Enabled" if moment == "before-the-write" else "Disabled"
    deadline = time.monotonic() + 10
    while public_access(twin, service_id) != expected:  # an accepted operation finishes unpolled
        assert time.monotonic() < deadline, f"publicNetworkAccess never became {expected}"
        time.sleep(0.1)
    # The next run waits out the dead worker's lease, settles its journal entry, finishes.
    result = cli(env, "remediate", "--instance", service_id, "--apply", "--format", "json", "--lease-wait", "40",
                 timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [settled] = report["recovered"]
    if moment == "before-the-write":
        assert "abandoned (intent), re-planned" in settled
        [fixed] = report["results"]
        assert fixed["status"] == "fixed"
    else:
        assert "completed by the crashed run; recorded" in settled
        assert report["results"] == []
    assert report["remaining"] == []
    assert public_access(twin, service_id) == "Disabled"


async def test_moving_a_secret_into_key_vault_leaves_it_in_no_journal_row_or_output(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.e2e.test_scan_estate import CANARY

    # Its own instance name: the journal (in Azurite) outlives the twin's per-test reset.
    service_id = seed(twin, "SEC-001", name="fixme-secret")
    env = product_env(twin, tmp_path, "version: 1\nrules:\n  SEC-001: {mode: remediate}\n")
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])
    factory = ClientFactory(load_settings(env))
    result = await asyncio.to_thread(cli, env, "remediate", "--instance", service_id, "--apply", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    [fixed] = json.loads(result.stdout)["results"]
    assert (fixed["rule"], fixed["status"]) == ("SEC-001", "fixed")
    assert CANARY not in result.stdout + result.stderr
    entries = await Journal(factory.table_service_async()).history(service_id)
    assert [e.phase for e in entries] == [Phase.VERIFIED]
    assert all(CANARY not in repr(e) for e in entries)
    # The secret did move: APIM now serves it from the vault.
    listed = twin.arm("POST", f"{service_id}/namedValues/db-password/listValue?api-version=2024-05-01").json()
    assert listed["value"] == f"{CANARY}-named-value-secret"
    await factory.aclose()
    factory.close()
