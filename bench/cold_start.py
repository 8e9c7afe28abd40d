"""cold_start: a Functions worker pays, on its first invocation, for importing
function_app.py and the scan/remediate machinery and building the async clients a sweep
uses. Measured in fresh interpreters (the fastest of 7) against the bound of the same run:
a fresh interpreter that only imports azure.functions (what any Python function app
pays). Measured 6.5-6.9x on 2026-11-23 (about 0.85 s vs 0.13 s); the target is at most
7.5x. Most of it is azure-identity, aiohttp, the APIM SDK's operation groups and the
storage SDK. The factory imports each SDK only when its client is first built, so paths
that need fewer clients (the health route) pay less.
"""

from __future__ import annotations

import subprocess
import sys
import time

RUNS = 7
TARGET_RATIO = 7.5

BOUND = "import azure.functions"
COLD_START = """
import function_app
from shared.azure import ClientFactory
from shared.settings import load_settings
import shared.snapshot, shared.source, handlers.scan, handlers.remediate
f = ClientFactory(load_settings())
sub = load_settings().subscription_ids[0]
# What a sweep worker's first scan-and-fix builds: the async clients only.
f.apim_async(sub); f.monitor_async(sub); f.resource_graph_async(); f.arm_async()
f.secrets_async("https://kv1.vault.azure.net"); f.table_service_async(); f.blob_service_async()
"""
ENV = {
    "APIMR_SUBSCRIPTION_IDS": "11111111-2222-3333-4444-555555555555",
    "APIMR_STORAGE_ACCOUNT": "apimrbench",
    "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000002",
    "AZURE_CLIENT_SECRET": "bench-only",
    "PATH": "/usr/bin:/bin",
}


def best_seconds(code: str) -> float:
    """The fastest of RUNS fresh interpreters: the least disturbed by whatever else runs."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
        times.append(time.perf_counter() - start)
    return min(times)


def run() -> bool:
    bound = best_seconds(BOUND)
    cold = best_seconds(COLD_START)
    ratio = cold / bound
    verdict = "ok" if ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"cold_start: {cold * 1000:.0f} ms vs bound {bound * 1000:.0f} ms", end=" ")
    print(f"= {ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict}")
    return ratio <= TARGET_RATIO
