"""The zero-downtime proof of key rotation.

A probe thread keeps reading each ledger secret's current version from Key Vault and
presenting it to the twin's gateway key check, while a real worker process
(`tests/integration/rotation_worker.py`, the product's composition root) runs ROTATIONS
rotations over the instance's subscriptions with faults injected: Key Vault answering 503
to the store that follows a regenerate (more times than the client retries), ARM 429 with
Retry-After on regenerate and listSecrets, and the worker killed with SIGKILL at randomly
chosen steps and started again. At the end: no probe failed, no key was lost (every ledger
entry equals APIM's key in the slot its tag names), no rotation ran twice (exactly one
regenerate and one new vault version per finished rotation), the foreign secret is byte for
byte unchanged, and no key value appears in the worker's output or any journal row.

ROTATIONS and KILLS can be changed with APIMR_TEST_ROTATIONS / APIMR_TEST_KILLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.keyvault.secrets import SecretClient

from handlers.context import AppContext
from shared.journal import Journal
from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import CANARY, VAULT, compliant, fragment_for, with_subscription
from tests.integration.test_remediate import product_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROTATIONS = int(os.environ.get("APIMR_TEST_ROTATIONS", "200"))
KILLS = int(os.environ.get("APIMR_TEST_KILLS", "4"))  # each kill holds its subscriptions for a 15 s lease
SUBSCRIPTIONS = 20
CONCURRENCY = 10
STEPS = ("header", "regenerate-intent", "regenerate-sent", "regenerated", "store-intent", "store-sent", "stored")


class Probe(threading.Thread):
    """Reads every ledger secret's current version and asks the gateway whether it works."""

    def __init__(self, twin: TwinHandle, service_id: str, secrets: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.twin = twin
        self.service_id = service_id
        self.secrets = secrets  # secret name -> subscription name
        self.client = SecretClient(
            twin.urls[f"vault:{VAULT}"],
            twin.credential(),
            connection_verify=twin.ca_file,
            verify_challenge_resource=False,
        )
        self.session = requests.Session()
        self.stop = threading.Event()
        self.probes = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for name, sid in self.secrets.items():
                value = self.client.get_secret(name).value
                answer = self.session.post(
                    self.twin.urls["arm"] + "/_twin/gateway/check",
                    json={"service_id": self.service_id, "key": value},
                    verify=self.twin.ca_file,
                    timeout=30,
                ).json()
                self.probes += 1
                self.stop.wait(0.01)  # continuous, but leaving the twin (and the GIL) to the worker
                if not answer["valid"] or answer["subscription"] != sid:
                    self.failures.append(f"{name}: {answer['reason']} ({answer['subscription']})")


def _seed(twin: TwinHandle) -> tuple[str, list[str], dict[str, str]]:
    spec = compliant("soak", twin.subscription_id)
    for i in range(SUBSCRIPTIONS - 1):
        with_subscription(spec, f"client-{i:02d}")
    fragment, ids = fragment_for({"soak": spec}, twin.subscription_id)
    twin.seed(fragment)
    service_id = ids["soak"]
    sids = ["orders-mobile"] + [f"client-{i:02d}" for i in range(SUBSCRIPTIONS - 1)]
    return service_id, [f"{service_id}/subscriptions/{s}" for s in sids], {f"soak--{s}": s for s in sids}


def _versions(client: SecretClient, name: str) -> list[tuple[str, str]]:
    return sorted(
        (str(p.version), str(client.get_secret(name, p.version).value))
        for p in client.list_properties_of_secret_versions(name)
    )


def _journal_rows(env: dict[str, str], instance_id: str) -> list[dict[str, Any]]:
    """Every journal row of the instance, read through the product's own journal."""

    async def read() -> list[dict[str, Any]]:
        context = AppContext.load(env)
        try:
            entries = await Journal(context.factory.table_service_async()).history(instance_id, limit=100_000)
        finally:
            await context.aclose()
        return [dataclasses.asdict(e) for e in entries]

    return asyncio.run(read())


def _faults(twin: TwinHandle, stop: threading.Event, counts: dict[str, int]) -> None:
    """Keep one fault armed at a time until stopped: KV 503 on the store that follows a
    regenerate, or ARM 429 with Retry-After on the key actions."""
    rng = random.Random(7)
    while not stop.wait(0.5):
        _, armed = twin.control("GET", "/_twin/faults")
        if armed["faults"]:
            continue
        if rng.random() < 0.5:
            # More 503s than the client retries (APIMR_RETRY_TOTAL=2): the store fails, the
            # rotation stays open in the journal and the worker finishes it later.
            fault = {"service": "keyvault", "method": "PUT", "path": "/secrets/soak--", "status": 503,
                     "code": "ServiceUnavailable", "times": 3}  # fmt: skip
            counts["kv503"] += 1
        else:
            fault = {"service": "arm", "method": "POST", "path": "/(regenerate|listSecrets)", "status": 429,
                     "code": "TooManyRequests", "retry_after": 0.05, "times": 2}  # fmt: skip
            counts["arm429"] += 1
        twin.control("POST", "/_twin/faults", fault)


def test_rotations_under_faults_and_sigkill_never_refuse_the_vault_key(
    twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service_id, subscription_ids, secrets = _seed(twin)
    env = product_env(twin, tmp_path, "version: 1\n")
    env.update(APIMR_RETRY_TOTAL="2", APIMR_RETRY_BACKOFF_FACTOR="0.01", APIMR_RETRY_BACKOFF_MAX="0.1")
    env["PYTHONPATH"] = str(ROOT)
    vault = SecretClient(
        twin.urls[f"vault:{VAULT}"], twin.credential(), connection_verify=twin.ca_file, verify_challenge_resource=False
    )
    foreign_before = _versions(vault, "backend-key")
    versions_before = {name: len(_versions(vault, name)) for name in secrets}

    probe = Probe(twin, service_id, secrets)
    probe.start()
    stop_faults = threading.Event()
    fault_counts = {"kv503": 0, "arm429": 0}
    faults = threading.Thread(target=_faults, args=(twin, stop_faults, fault_counts), daemon=True)
    faults.start()
    rng = random.Random(12)
    kills: list[str] = []
    outputs: list[str] = []
    command = [sys.executable, "-m", "tests.integration.rotation_worker", service_id, str(ROTATIONS),
               str(CONCURRENCY), *subscription_ids]  # fmt: skip
    started = time.monotonic()
    restarts: list[float] = []
    try:
        while True:
            restarts.append(time.monotonic() - started)
            worker = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert worker.stdout is not None
            step, nth = rng.choice(STEPS), rng.randint(1, 12)
            killed = False
            seen = 0
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
            assert time.monotonic() - started < 600, "the worker never finished"
        assert worker.returncode == 0, "".join(outputs[-40:])
    finally:
        stop_faults.set()
        faults.join(timeout=5)
        twin.control("DELETE", "/_twin/faults")
        time.sleep(0.3)  # a few more probes after the last rotation
        probe.stop.set()
        probe.join(timeout=30)

    # Counts: rotations finished (journal), regenerates that APIM carried out, new vault versions.
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(key, twin.env[key])  # azure-identity reads these itself
    rows = _journal_rows(env, service_id)
    headers = [r for r in rows if "rotation" in json.loads(r.get("after") or "{}")]
    finished = [r for r in headers if r["phase"] == "verified"]
    _, log = twin.control("GET", "/_twin/log?service=arm")
    regenerates = [e for e in log["entries"] if "/regenerate" in e["path"] and e["status"] == 204]
    versions_after = {name: len(_versions(vault, name)) for name in secrets}
    new_versions = sum(versions_after[n] - versions_before[n] for n in secrets)
    print(
        f"\nrotation soak: {len(finished)} rotations finished, {len(regenerates)} regenerates, {new_versions} new "
        f"vault versions, {len(kills)} SIGKILLs at {kills}, {fault_counts['kv503']} Key Vault 503 bursts (3 each) and "
        f"{fault_counts['arm429']} ARM 429 bursts (2 each); {probe.probes} probes, {len(probe.failures)} failed; "
        f"worker starts at {[round(t, 1) for t in restarts]} s"
    )
    assert probe.failures == [], probe.failures[:5]
    assert probe.probes > len(secrets)
    assert len(kills) == KILLS
    assert len(finished) == len(headers) == ROTATIONS  # nothing left open, nothing failed
    assert len(regenerates) == ROTATIONS  # no double rotation: one regenerate each
    assert new_versions == ROTATIONS  # and one new vault version each

    # No key lost: every ledger entry is APIM's key in the slot its tag names.
    for name, sid in secrets.items():
        current = vault.get_secret(name)
        keys = twin.arm("POST", f"{service_id}/subscriptions/{sid}/listSecrets?api-version=2024-05-01").json()
        slot = current.properties.tags["apim-key-slot"]
        assert current.value == keys[f"{slot}Key"], name
        assert current.properties.tags["apim-subscription-id"].endswith(f"/subscriptions/{sid}")
        assert current.properties.expires_on is not None

    # The foreign secret in the same vault: byte for byte unchanged, no new version.
    assert _versions(vault, "backend-key") == foreign_before

    # No key value (the seeded canaries, every version ever stored) in the output or the journal.
    values = {v for name in secrets for _, v in _versions(vault, name)}
    assert any(v.startswith(CANARY) for v in values)
    text = "".join(outputs) + json.dumps(rows, default=str)
    leaked = [v[:6] for v in values if v in text]
    assert leaked == [], f"{len(leaked)} key value(s) appear in worker output or journal rows"
