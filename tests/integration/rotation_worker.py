"""A rotation worker process for the crash tests: `python -m tests.integration.rotation_worker
INSTANCE_ID TARGET CONCURRENCY SUBSCRIPTION_ID...`.

Runs the product's own composition root (settings from the environment, `AppContext.rotator`)
and rotates the given subscriptions round robin until the journal holds TARGET finished
rotations of the instance, finishing first what a killed predecessor left open. It prints one
line per step the rotator reports (`step <name> <subscription>`), flushed, so the test can
kill it with SIGKILL at a chosen step, and `finished <n>` at the end. Logging goes to stdout
at INFO, so the test's scan for keys covers every log line too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from handlers.context import AppContext
from shared.journal import Journal, JournalEntry, Phase, Trigger, TriggerKind
from shared.rotation import Action, RotationTarget, Status


def _is_header(entry: JournalEntry) -> bool:
    try:
        return "rotation" in json.loads(entry.after or "{}")
    except ValueError:
        return False


async def _count(journal: Journal, instance_id: str) -> tuple[int, set[str]]:
    """Finished rotations, and the subscriptions with one open."""
    entries = [e for e in await journal.history(instance_id, limit=100_000) if _is_header(e)]
    done = sum(1 for e in entries if e.phase is Phase.VERIFIED)
    open_subs = {e.resource_id.lower() for e in entries if e.is_open}
    return done, open_subs


async def run(instance_id: str, target: int, concurrency: int, subscriptions: list[str]) -> int:
    context = AppContext.load()
    rotator = context.rotator()
    assert rotator is not None, "APIMR_KEY_VAULT_URL is required"
    rotator.lease_wait = 0.0  # a subscription a killed worker still holds is retried later
    rotator.observe = lambda step, sub: print(f"step {step} {sub.rsplit('/', 1)[-1]}", flush=True)
    journal = Journal(context.factory.table_service_async())
    trigger = Trigger(TriggerKind.CLI, "rotation worker")
    turn = 0
    try:
        ledger = await rotator.ledger_of(instance_id)  # listed once: the soak onboards nothing
        done, open_subs = await _count(journal, instance_id)
        # A subscription whose lease a killed predecessor still holds (up to the lease's 15 s)
        # is set aside for a moment while the others go on.
        busy_until: dict[str, float] = {}
        while done < target or open_subs:
            now = time.monotonic()
            free = [s for s in subscriptions if busy_until.get(s, 0.0) <= now]
            room = max(0, target - done - len(open_subs))
            batch = [s for s in free if s.lower() in open_subs][:concurrency]
            for _ in range(len(subscriptions)):
                if len(batch) >= concurrency or room <= 0:
                    break
                candidate = subscriptions[turn % len(subscriptions)]
                turn += 1
                if candidate in free and candidate not in batch and candidate.lower() not in open_subs:
                    batch.append(candidate)
                    room -= 1
            if not batch:
                await asyncio.sleep(0.5)
                continue
            results = await asyncio.gather(
                *(
                    rotator.rotate(
                        RotationTarget(instance_id, sub, Action.ROTATE, trigger, max_age_days=90),
                        apply=True,
                        ledger=ledger,
                    )
                    for sub in batch
                )
            )
            for sub, result in zip(batch, results, strict=True):
                print(f"result {result.status.value} {sub.rsplit('/', 1)[-1]}", flush=True)
                if result.status is Status.BUSY:
                    busy_until[sub] = time.monotonic() + 2.0
            if any(r.status in (Status.FAILED, Status.REFUSED) for r in results):
                print("stopped: a rotation failed or was refused", flush=True)
                return 1
            if all(r.status is Status.DONE for r in results):
                done += len(results)
                open_subs -= {r.subscription_id.lower() for r in results}
            else:
                # Something stayed open or busy: the journal says where things stand.
                await asyncio.sleep(0.1)
                done, open_subs = await _count(journal, instance_id)
        done, _ = await _count(journal, instance_id)
        print(f"finished {done}", flush=True)
        return 0
    finally:
        await context.aclose()


if __name__ == "__main__":
    # Every log line (the product's rotation events, the SDKs' request logs) goes to the output
    # the test scans for key values.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    instance, count, width, *subs = sys.argv[1:]
    sys.exit(asyncio.run(run(instance, int(count), int(width), subs)))
