"""Run every benchmark: `make bench`.

cold_start: a Functions worker pays for importing function_app.py and building the
composition root on its first invocation. Measured in fresh interpreters against the
bound of the same run: a fresh interpreter that only imports azure.functions (what any
Python function app pays). Prints the ratio; the target is at most 6x (measured 4.5x on
2026-11-23: most of it is importing the storage and identity SDKs, which every sweep needs).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 5
TARGET_RATIO = 6.0

BOUND = "import azure.functions"
COLD_START = """
import function_app
from shared.azure import ClientFactory
from shared.settings import load_settings
f = ClientFactory(load_settings())
sub = load_settings().subscription_ids[0]
f.apim(sub); f.apim_async(sub); f.monitor(sub); f.monitor_async(sub)
f.resource_graph(); f.resource_graph_async(); f.logs(); f.logs_async()
f.secrets("https://kv1.vault.azure.net"); f.secrets_async("https://kv1.vault.azure.net")
f.blob_service(); f.blob_service_async(); f.queue("scan"); f.queue_async("scan")
f.table_service(); f.table_service_async()
"""
ENV = {
    "APIMR_SUBSCRIPTION_IDS": "11111111-2222-3333-4444-555555555555",
    "APIMR_STORAGE_ACCOUNT": "apimrbench",
    "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000002",
    "AZURE_CLIENT_SECRET": "bench-only",
    "PATH": "/usr/bin:/bin",
}


def median_seconds(code: str) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=ENV)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    bound = median_seconds(BOUND)
    cold = median_seconds(COLD_START)
    ratio = cold / bound
    verdict = "ok" if ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"cold_start: {cold * 1000:.0f} ms vs bound {bound * 1000:.0f} ms", end=" ")
    print(f"= {ratio:.2f}x (target <= {TARGET_RATIO}x) {verdict}")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
