"""scale: a scan of an enterprise estate against the twin with ARM throttling on.

Each instance has 5 APIs, 5 subscriptions and 3 named values (about 23 ARM reads). Two
shapes: *spread* (10 instances per subscription, so no subscription's bucket runs dry)
and *single* (every instance in one subscription: the scan is bound by ARM's refill).
The twin runs in its own process with Azure's buckets (reads 250, refilling 25/s, per
subscription and principal); each scan runs in a fresh process that streams its report
as JSON lines (what the CLI does with `--format jsonl`) and measures itself.

Printed per run, each beside its target:
- wall / lower bound. The bound comes from the twin's counters and its bucket settings:
  for each subscription, (reads - 250) / 25 seconds is the least time ARM lets those
  reads take; the bound is the largest over subscriptions. A spread estate has no
  throttling bound (no bucket runs dry), so there the client's own cost is what counts.
- peak RSS of the scanning process (`ru_maxrss`): <= 300 MB, and flat from N=100 up.
- open sockets at peak (the process's socket descriptors, sampled every 50 ms): <= the
  pool's limit (`shared.connections.POOL_CONNECTIONS`).
- wasted 429s: the twin's 429 answers over all attempts: < 5%.
- CPU per instance (user + system of the scanning process, less the socket sampler's own,
  / N): at most half of what it was before the shared pool (0.15 s on the same machine
  class, issue 14's table).

`make bench` runs the small version (N=100 spread, N=40 in one subscription, about a
minute); `make bench-scale` (`python -m bench scale --full`) runs N=100 and 1,000 in both
shapes (the 1,000-instance single subscription is bound at about 15 minutes by ARM's
refill alone). Results are written as JSON to bench/results/scale-<mode>.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PER_SUBSCRIPTION = 10  # spread: instances per subscription
READ_CAPACITY, READ_REFILL = 250.0, 25.0  # the twin's (ARM's) read bucket at scale 1
TARGET_RSS_MB = 300.0
TARGET_RSS_FLAT = 1.25  # peak RSS at the largest N over the smallest
TARGET_BOUND_RATIO = 1.1
TARGET_WASTED = 0.05
BEFORE_CPU_PER_INSTANCE = 0.15  # seconds, measured before the pool (issue 14)
TARGET_CPU_PER_INSTANCE = BEFORE_CPU_PER_INSTANCE / 2
SMALL = (("spread", 100), ("single", 40))
FULL = (("spread", 100), ("spread", 1000), ("single", 100), ("single", 1000))
PRODUCT = "apim-remediator"


@dataclass
class Run:
    shape: str
    instances: int
    wall: float
    bound: float
    cpu_per_instance: float
    peak_rss_mb: float
    peak_sockets: int
    requests: int
    throttled: int
    paced_waits: int
    findings: int

    @property
    def wasted(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0


def _subscription_id(n: int) -> str:
    return f"5ca1e000-0000-4000-8000-{n:012d}"


def _instance(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sku": {"name": "Developer", "capacity": 1},
        "apis": [{"id": f"api-{a}", "path": f"api-{a}", "protocols": ["https"]} for a in range(5)],
        "subscriptions": [{"generate": {"count": 5, "scope": "/apis/api-0"}}],
        "named_values": [{"id": f"nv-{v}", "value": f"value-{v}"} for v in range(3)],
    }


def _estate(shapes: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    """One estate for every run: resource group `rg-<shape>-<n>` per run, spread runs over
    their own subscriptions, single runs each in one subscription of their own."""
    base = yaml.safe_load((ROOT / "estates" / "test.yaml").read_text())
    subscriptions: list[dict[str, Any]] = []
    number = 1
    for shape, count in shapes:
        group = f"rg-{shape}-{count}"
        names = [f"{shape[:2]}{count}-{n:04d}" for n in range(count)]
        chunks = (
            [names[i : i + PER_SUBSCRIPTION] for i in range(0, count, PER_SUBSCRIPTION)]
            if shape == "spread"
            else [names]
        )
        for chunk in chunks:
            subscriptions.append(
                {
                    "id": _subscription_id(number),
                    "display_name": f"bench-{number}",
                    "resource_groups": [{"name": group, "apim": [_instance(n) for n in chunk]}],
                }
            )
            number += 1
    reader = "APIM Remediator (remediate)"
    return {
        "description": "bench/scale estate (generated)",
        "tenant_id": base["tenant_id"],
        "principals": base["principals"][:1],
        "custom_roles": base["custom_roles"],
        "role_assignments": [
            {"principal": PRODUCT, "role": reader, "scope": f"/subscriptions/{s['id']}"} for s in subscriptions
        ],
        "subscriptions": subscriptions,
    }


def _start_twin(workdir: Path, estate: dict[str, Any]) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    estate_file = workdir / "estate.yaml"
    estate_file.write_text(json.dumps(estate))
    env_file = workdir / "twin.env"
    twin = subprocess.Popen(
        [sys.executable, "-m", "twin", "serve", "--estate", str(estate_file), "--no-azurite",
         "--workdir", str(workdir), "--env-file", str(env_file)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not env_file.exists() or not env_file.read_text().endswith("\n"):
        if twin.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the twin did not start")
        time.sleep(0.2)
    return twin, dict(line.split("=", 1) for line in env_file.read_text().splitlines())


def _bound(entries: list[dict[str, Any]]) -> float:
    """The least time ARM's read buckets allow for the reads the log shows."""
    reads: dict[str, int] = {}
    for entry in entries:
        if entry["method"] in ("GET", "HEAD") and entry["subscription"] and entry["status"] != 429:
            reads[entry["subscription"]] = reads.get(entry["subscription"], 0) + 1
    return max((max(0.0, (n - READ_CAPACITY) / READ_REFILL) for n in reads.values()), default=0.0)


def _one_run(env: dict[str, str], shape: str, count: int) -> Run:
    control = env["APIMR_ARM_ENDPOINT"] + "/_twin"
    ca = env["REQUESTS_CA_BUNDLE"]
    # Fresh buckets (full, as for a scan that starts after a quiet spell) and an empty log.
    requests.put(f"{control}/throttle", json={"enabled": True, "scale": 1}, verify=ca, timeout=30).raise_for_status()
    requests.delete(f"{control}/log", verify=ca, timeout=30).raise_for_status()
    group = f"rg-{shape}-{count}"
    worker_env = {
        **os.environ,
        **env,
        "APIMR_RESOURCE_GROUPS": group,
        "PYTHONPATH": str(ROOT),
        # A scan touches no storage; the settings still want an account named.
        "APIMR_STORAGE_BLOB_ENDPOINT": "https://127.0.0.1/none",
        "APIMR_STORAGE_QUEUE_ENDPOINT": "https://127.0.0.1/none",
        "APIMR_STORAGE_TABLE_ENDPOINT": "https://127.0.0.1/none",
    }
    worker_env.pop("APIMR_KEY_VAULT_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "worker"],
        cwd=ROOT, env=worker_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"scale worker failed ({done.returncode}): {done.stderr[-2000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    log = requests.get(f"{control}/log?service=arm", verify=ca, timeout=120).json()["entries"]
    if measured["instances"] != count:
        raise RuntimeError(f"the scan saw {measured['instances']} instances, expected {count}")
    return Run(
        shape=shape,
        instances=count,
        wall=measured["wall"],
        bound=_bound(log),
        cpu_per_instance=measured["cpu"] / count,
        peak_rss_mb=measured["peak_rss_mb"],
        peak_sockets=measured["peak_sockets"],
        requests=len(log),
        throttled=sum(1 for e in log if e["status"] == 429),
        paced_waits=measured["paced_waits"],
        findings=measured["findings"],
    )


def _verdict(ok: bool) -> str:
    return "ok" if ok else "OVER TARGET"


def _print(run: Run, pool_limit: int) -> bool:
    checks = []
    line = f"scale {run.shape:<6} N={run.instances:<5} wall {run.wall:6.1f} s"
    if run.bound > 0:
        ratio = run.wall / run.bound
        ok = ratio <= TARGET_BOUND_RATIO
        checks.append(ok)
        line += f" / bound {run.bound:6.1f} s = {ratio:.2f}x (target <= {TARGET_BOUND_RATIO}x) {_verdict(ok)};"
    else:
        line += " (no subscription's bucket runs dry: no throttling bound);"
    rss_ok = run.peak_rss_mb <= TARGET_RSS_MB
    sockets_ok = run.peak_sockets <= pool_limit
    wasted_ok = run.wasted < TARGET_WASTED
    checks += [rss_ok, sockets_ok, wasted_ok]
    line += f"\n    peak RSS {run.peak_rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB) {_verdict(rss_ok)};"
    line += f" open sockets at peak {run.peak_sockets} (target <= {pool_limit}) {_verdict(sockets_ok)};"
    line += f"\n    wasted 429s {run.throttled}/{run.requests} = {run.wasted:.1%} (target < {TARGET_WASTED:.0%})"
    line += f" {_verdict(wasted_ok)}; paced waits {run.paced_waits};"
    cpu_line = f"\n    CPU per instance {run.cpu_per_instance * 1000:.0f} ms"
    if run.shape == "spread":
        cpu_ok = run.cpu_per_instance <= TARGET_CPU_PER_INSTANCE
        checks.append(cpu_ok)
        cpu_line += (
            f" (target <= {TARGET_CPU_PER_INSTANCE * 1000:.0f} ms, half of {BEFORE_CPU_PER_INSTANCE * 1000:.0f} ms"
            f" before) {_verdict(cpu_ok)}"
        )
    print(line + cpu_line + f"; {run.findings} findings", flush=True)
    return all(checks)


def run(*, full: bool = False) -> bool:
    from shared.connections import POOL_CONNECTIONS

    shapes = FULL if full else SMALL
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    twin, env = _start_twin(workdir, _estate(shapes))
    runs: list[Run] = []
    ok = True
    try:
        for shape, count in shapes:
            result = _one_run(env, shape, count)
            runs.append(result)
            ok = _print(result, POOL_CONNECTIONS) and ok
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)  # the twin's state and certificates
    spread = sorted((r for r in runs if r.shape == "spread"), key=lambda r: r.instances)
    if len(spread) > 1:
        growth = spread[-1].peak_rss_mb / spread[0].peak_rss_mb
        flat = growth <= TARGET_RSS_FLAT
        ok = ok and flat
        print(
            f"scale: peak RSS N={spread[-1].instances} / N={spread[0].instances} = {growth:.2f}x "
            f"(target <= {TARGET_RSS_FLAT}x: flat) {_verdict(flat)}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    mode = "full" if full else "small"
    payload = {
        "mode": mode,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": {
            "peak_rss_mb": TARGET_RSS_MB,
            "rss_flat": TARGET_RSS_FLAT,
            "wall_over_bound": TARGET_BOUND_RATIO,
            "wasted_429s": TARGET_WASTED,
            "cpu_per_instance_s": TARGET_CPU_PER_INSTANCE,
            "open_sockets": POOL_CONNECTIONS,
        },
        "runs": [{**asdict(r), "wasted": r.wasted} for r in runs],
    }
    (RESULTS / f"scale-{mode}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return ok


# -- the scanning process ------------------------------------------------------------------


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


async def _worker() -> dict[str, Any]:
    from handlers.scan import ScanRequest, scan
    from shared.azure import ClientFactory
    from shared.policy import Policy
    from shared.report_stream import JsonLinesWriter
    from shared.settings import load_settings
    from shared.source import AzureInstanceSource

    settings = load_settings()
    factory = ClientFactory(settings)
    peak = 0
    sampling = 0.0  # the sampler's own CPU, not the scan's
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak, sampling
        while not stop.is_set():
            before = time.process_time()
            peak = max(peak, _open_sockets())
            sampling += time.process_time() - before
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:  # noqa: ASYNC230 (the bench's own process; /dev/null)
        writer = JsonLinesWriter(sink)
        try:
            from datetime import UTC, datetime

            writer.begin(datetime.now(UTC), "-")
            report = await scan(
                ScanRequest(), AzureInstanceSource(factory, settings), Policy(), policy_file="-", on_result=writer.add
            )
            writer.end(report.finished)
        finally:
            wall = time.perf_counter() - started
            stop.set()
            await sampler
            await factory.aclose()
            factory.close()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime) - sampling
    if writer.tally.errors:
        raise RuntimeError(f"{writer.tally.errors} instance(s) could not be scanned")
    return {
        "instances": writer.tally.instances,
        "findings": writer.tally.findings,
        "wall": wall,
        "cpu": cpu,
        "peak_rss_mb": cpu_after.ru_maxrss / 1024,
        "peak_sockets": peak,
        "paced_waits": factory.pacer.stats["waited"],
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        print(json.dumps(asyncio.run(_worker())))
        sys.exit(0)
    sys.exit(0 if run(full="--full" in sys.argv[1:]) else 1)
