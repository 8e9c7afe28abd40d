"""scan_fanout: a sweep reads many instances; the scan must fan out, not queue.

The twin runs in its own process (as Azure would: not competing with the scanner for the
interpreter) with a latency model of 100 ms per ARM answer (a typical ARM read; with 20
ms the scan is bound by the client's own CPU, about 50 ms per instance of SDK
deserialisation and mapping, and the ratio sits near 0.45x). The bound is measured in the
same run: the time to scan ONE instance, times the number of instances — what a scan that
read instances one after another would take. The measurement is the time to scan all of
them. Target: at most 0.5x the bound (the scan reads up to 4 instances at once, each with
up to 8 requests in flight). Also printed: ARM requests per instance (the snapshot reads
each sub-resource once).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

INSTANCES = 12
LATENCY = 0.1  # a typical ARM GET answers in 50-200 ms
TARGET_RATIO = 0.5
ROOT = Path(__file__).resolve().parents[1]


def _estate(sub_id: str) -> dict[str, Any]:
    apim = [
        {
            "name": f"bench-{n:02d}",
            "sku": {"name": "Developer", "capacity": 1},
            "apis": [{"id": "orders", "path": "orders", "protocols": ["https"]}],
            "subscriptions": [{"generate": {"count": 30, "scope": "/apis/orders"}}],
        }
        for n in range(INSTANCES)
    ]
    return {"subscriptions": [{"id": sub_id, "resource_groups": [{"name": "rg-bench", "apim": apim}]}]}


async def _scan(env: dict[str, str], instance_ids: tuple[str, ...]) -> float:
    from handlers.scan import ScanRequest, scan
    from shared.azure import ClientFactory
    from shared.policy import Policy
    from shared.settings import load_settings
    from shared.source import AzureInstanceSource

    settings = load_settings(env)
    factory = ClientFactory(settings)
    try:
        started = time.perf_counter()
        report = await scan(
            ScanRequest(instance_ids=instance_ids), AzureInstanceSource(factory, settings), Policy(), policy_file="-"
        )
        elapsed = time.perf_counter() - started
        assert len(report.instances) == len(instance_ids)
        assert all(r.error is None for r in report.instances), [r.error for r in report.instances]
        return elapsed
    finally:
        await factory.aclose()
        factory.close()


def _start_twin(workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    env_file = workdir / "twin.env"
    twin = subprocess.Popen(
        [sys.executable, "-m", "twin", "serve", "--estate", "estates/test.yaml", "--no-azurite",
         "--workdir", str(workdir), "--env-file", str(env_file)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not env_file.exists() or not env_file.read_text().endswith("\n"):
        if twin.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the twin did not start")
        time.sleep(0.1)
    return twin, dict(line.split("=", 1) for line in env_file.read_text().splitlines())


def run() -> bool:
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    twin, env = _start_twin(workdir)
    try:
        control = env["APIMR_ARM_ENDPOINT"] + "/_twin"
        ca = env["REQUESTS_CA_BUNDLE"]
        sub_id = env["APIMR_SUBSCRIPTION_IDS"].split(",")[0]
        requests.post(f"{control}/estate", json=_estate(sub_id), verify=ca, timeout=60).raise_for_status()
        requests.put(f"{control}/latency", json={"arm": LATENCY}, verify=ca, timeout=10).raise_for_status()
        env.update(APIMR_RESOURCE_GROUPS="rg-bench", APIMR_STORAGE_BLOB_ENDPOINT="https://127.0.0.1/none",
                   APIMR_STORAGE_QUEUE_ENDPOINT="https://127.0.0.1/none",
                   APIMR_STORAGE_TABLE_ENDPOINT="https://127.0.0.1/none")  # fmt: skip
        for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
            os.environ[key] = env[key]
        base = f"/subscriptions/{sub_id}/resourceGroups/rg-bench/providers/Microsoft.ApiManagement/service/"
        ids = tuple(base + f"bench-{n:02d}" for n in range(INSTANCES))
        asyncio.run(_scan(env, ids[:1]))  # warm up: token, connections
        one = statistics.median(asyncio.run(_scan(env, ids[:1])) for _ in range(3))
        requests.delete(f"{control}/log", verify=ca, timeout=10)
        everything = asyncio.run(_scan(env, ids))
        counters = requests.get(f"{control}/counters", verify=ca, timeout=10).json()
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)  # Azurite's data and a CA
    bound = one * INSTANCES
    ratio = everything / bound
    verdict = "ok" if ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"scan_fanout: {INSTANCES} instances in {everything:.2f} s vs bound {bound:.2f} s", end=" ")
    print(f"= {ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict};", end=" ")
    print(f"{counters['total'] / INSTANCES:.1f} ARM requests per instance")
    return ratio <= TARGET_RATIO
