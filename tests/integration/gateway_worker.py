"""A gateway renewal worker process for the SIGKILL test: `python -m
tests.integration.gateway_worker INSTANCE_ID TARGET GATEWAY_ID...`.

Runs the product's own composition root (`AppContext.gateway_rotator`) and force-renews the
given gateways round robin until the journal holds TARGET finished renewals of the instance,
finishing first what a killed predecessor left open. Prints `step <name> <gateway>` per step
(flushed) so the test can SIGKILL it at a chosen step, and `finished <n>` at the end. Logging
goes to stdout at INFO, so the test's scan for tokens and keys covers every log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from handlers.context import AppContext
from shared.gateway_rotation import HEADER, GatewayTarget
from shared.journal import Journal, JournalEntry, Phase, Trigger, TriggerKind
from shared.rotation import Status


def _is_header(entry: JournalEntry) -> bool:
    try:
        return HEADER in json.loads(entry.after or "{}")
    except ValueError:
        return False


async def _finished(journal: Journal, instance_id: str) -> int:
    entries = [e for e in await journal.history(instance_id, limit=100_000) if _is_header(e)]
    return sum(1 for e in entries if e.phase is Phase.VERIFIED)


async def run(instance_id: str, target: int, gateways: list[str]) -> int:
    context = AppContext.load()
    rotator = context.gateway_rotator()
    assert rotator is not None, "APIMR_KEY_VAULT_URL is required"
    rotator.lease_wait = 0.0  # a gateway a killed worker still holds is retried a moment later
    rotator.observe = lambda step, gw: print(f"step {step} {gw.rsplit('/', 1)[-1]}", flush=True)
    journal = Journal(context.factory.table_service_async())
    turn = 0
    try:
        while True:
            for result in await rotator.resume_open(instance_id):
                print(f"resumed {result.status.value} {result.gateway_id.rsplit('/', 1)[-1]}", flush=True)
            # Counted after what a killed predecessor left open was finished: that one counts too.
            done = await _finished(journal, instance_id)
            if await journal.unfinished(instance_id):
                await asyncio.sleep(1.0)  # a lease a killed worker holds runs out (15 s) first
                continue
            if done >= target:
                break
            gateway = gateways[turn % len(gateways)]
            turn += 1
            trigger = Trigger(TriggerKind.CLI, "gateway worker")
            result = await rotator.renew(GatewayTarget(instance_id, gateway, trigger, force=True), apply=True)
            print(f"result {result.status.value} {gateway.rsplit('/', 1)[-1]}", flush=True)
            if result.status in (Status.FAILED, Status.REFUSED):
                print(f"stopped: {result.detail}", flush=True)
                return 1
            if result.status in (Status.BUSY, Status.PENDING):
                await asyncio.sleep(1.0)
        print(f"finished {await _finished(journal, instance_id)}", flush=True)
        return 0
    finally:
        await context.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    instance, count, *names = sys.argv[1:]
    sys.exit(asyncio.run(run(instance, int(count), names)))
