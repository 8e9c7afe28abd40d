"""Per-instance leases (blob leases) so two workers never act on one APIM instance at once.

One empty blob per instance in a container (default "instance-locks", created if
missing), named `shared.journal.instance_key(instance_id)`. Holding the instance means
holding that blob's lease: Azure grants it to one lease id at a time, lets it expire by
itself when the holder dies (a process killed -9 blocks others for at most one lease
duration), and lets anyone break it.

Call-site contract::

    async with locks.hold(instance_id, wait=10.0) as lease:
        plan = ...
        lease.assert_held()          # before EVERY write to Azure
        await apply(plan)            # with If-Match, as always

The lease is renewed in the background (every half duration by default) while the block
runs. If a renewal fails (the lease was broken or taken over, or storage stayed
unreachable until the lease's expiry is near) the lease is marked lost and
`assert_held()` raises `LeaseLost` (a `PermanentError`): stop before the next write and
let the journal's unfinished entry be resumed by whoever holds the lease next. The lease
is only a guard against two workers racing; every write still uses If-Match, which is
what keeps a write that slips through safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, BlobLeaseClient
from azure.storage.blob.aio import BlobServiceClient as AsyncBlobServiceClient

from shared.errors import LeaseLost, PermanentError, TransientError
from shared.journal import instance_key
from shared.tables import storage_error

log = logging.getLogger(__name__)

DEFAULT_CONTAINER = "instance-locks"
MIN_DURATION = 15  # Azure's bounds for a finite blob lease, in seconds
MAX_DURATION = 60
# assert_held() refuses this long before the lease would expire without a renewal, so a
# write started just before expiry does not run on an expired lease.
SAFETY_MARGIN = 2.0
# After a transient renewal failure, try again this soon (the lease is still valid).
RETRY_RENEWAL_AFTER = 1.0
_MAX_BACKOFF = 2.0


class InstanceBusy(TransientError):
    """Another worker holds the instance's lease: defer (the queue message comes back later)."""

    def __init__(self, instance_id: str, waited: float) -> None:
        self.instance_id = instance_id
        self.waited = waited
        super().__init__(
            f"instance {instance_id} is busy: another worker holds its lease (waited {waited:.1f}s); try again later"
        )


class InstanceLease:
    """A held instance lease. Call `assert_held()` before each write."""

    def __init__(self, instance_id: str, blob_name: str, client: BlobLeaseClient, duration: int) -> None:
        self.instance_id = instance_id
        self.blob_name = blob_name
        self.duration = duration
        self._client = client
        self._valid_until = time.monotonic() + duration
        self._lost: str | None = None

    @property
    def held(self) -> bool:
        return self._lost is None and time.monotonic() < self._valid_until - SAFETY_MARGIN

    @property
    def lost_reason(self) -> str | None:
        """Why the lease is no longer held (None while it is)."""
        if self._lost is None and not self.held:
            return "not renewed before it expired"
        return self._lost

    def assert_held(self) -> None:
        """Raise `LeaseLost` if the lease is lost (or about to expire unrenewed)."""
        reason = self.lost_reason
        if reason is not None:
            raise LeaseLost(f"lease lost on instance {self.instance_id}: {reason}; stop before the next write")

    def _renewed(self, sent_at: float) -> None:
        # Counted from when the request was sent: the service's clock started no earlier.
        self._valid_until = sent_at + self.duration

    def _mark_lost(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            log.warning("lease on instance %s lost: %s", self.instance_id, reason)


class InstanceLocks:
    """Leases on APIM instances, one blob per instance in one container."""

    def __init__(
        self,
        blobs: AsyncBlobServiceClient,
        container: str = DEFAULT_CONTAINER,
        *,
        duration: int = 30,
        renew_interval: float | None = None,
    ) -> None:
        """`duration`: seconds a lease lives without renewal (15..60). `renew_interval`:
        seconds between renewals (default half the duration)."""
        if not MIN_DURATION <= duration <= MAX_DURATION:
            raise PermanentError(f"lease duration must be {MIN_DURATION}..{MAX_DURATION} seconds, got {duration}")
        interval = duration / 2 if renew_interval is None else renew_interval
        if not 0 < interval < duration - SAFETY_MARGIN:
            raise PermanentError(
                f"lease renewal interval must be between 0 and {duration - SAFETY_MARGIN:g} seconds, got {interval:g}"
            )
        self._container = blobs.get_container_client(container)
        self.container = container
        self.duration = duration
        self.renew_interval = interval

    @contextlib.asynccontextmanager
    async def hold(self, instance_id: str, wait: float = 10.0) -> AsyncIterator[InstanceLease]:
        """Hold the instance's lease for the block; `InstanceBusy` after `wait` seconds if
        another worker holds it. Renewed in the background; released on exit, whatever
        the exit."""
        blob_name = instance_key(instance_id)
        blob = self._container.get_blob_client(blob_name)
        lease = InstanceLease(instance_id, blob_name, await self._acquire(blob, instance_id, wait), self.duration)
        renewal = asyncio.create_task(self._keep_renewed(lease), name=f"renew lease {blob_name}")
        try:
            yield lease
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            await self._release(lease)

    async def _acquire(self, blob: BlobClient, instance_id: str, wait: float) -> BlobLeaseClient:
        what = f"lease container {self.container!r}"
        deadline = time.monotonic() + max(wait, 0.0)
        delay = 0.2
        created = False
        while True:
            try:
                return await blob.acquire_lease(lease_duration=self.duration)
            except ResourceNotFoundError as exc:
                if created:
                    raise storage_error(exc, what=what, operation=f"acquire lease on {instance_id}") from exc
                await self._create_blob(blob)
                created = True
                continue
            except HttpResponseError as exc:
                if getattr(exc, "error_code", None) != "LeaseAlreadyPresent":
                    raise storage_error(exc, what=what, operation=f"acquire lease on {instance_id}") from exc
            except AzureError as exc:
                raise storage_error(exc, what=what, operation=f"acquire lease on {instance_id}") from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InstanceBusy(instance_id, wait)
            # Jitter so workers that collided do not retry in lockstep.
            await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), remaining))  # noqa: S311
            delay = min(delay * 2, _MAX_BACKOFF)

    async def _create_blob(self, blob: BlobClient) -> None:
        what = f"lease container {self.container!r}"
        try:
            await self._container.create_container()
        except ResourceExistsError:
            pass  # another worker (or an earlier run) created it
        except AzureError as exc:
            raise storage_error(exc, what=what, operation="create container") from exc
        try:
            await blob.upload_blob(b"", overwrite=False)
        except ResourceExistsError:
            pass  # created meanwhile by another worker
        except HttpResponseError as exc:
            # Created and leased meanwhile by another worker: the acquire that follows waits.
            if exc.status_code != 412:
                raise storage_error(exc, what=what, operation="create lease blob") from exc
        except AzureError as exc:
            raise storage_error(exc, what=what, operation="create lease blob") from exc

    async def _keep_renewed(self, lease: InstanceLease) -> None:
        delay = self.renew_interval
        while True:
            await asyncio.sleep(delay)
            sent_at = time.monotonic()
            try:
                await lease._client.renew()
            except AzureError as exc:
                error = storage_error(exc, what=f"lease container {self.container!r}", operation="renew lease")
                if isinstance(error, TransientError) and lease.held:
                    log.warning("renewing the lease on instance %s failed, retrying: %s", lease.instance_id, error)
                    delay = RETRY_RENEWAL_AFTER
                    continue
                lease._mark_lost(f"renewal failed ({error})")
                return
            except Exception as exc:
                # Not a storage answer: the lease can no longer be vouched for. Recorded (and
                # surfaced by assert_held) rather than raised: raised here, it would replace
                # the block's own outcome when `hold` awaits this task on exit.
                log.exception("renewing the lease on instance %s failed unexpectedly", lease.instance_id)
                lease._mark_lost(f"renewal failed ({type(exc).__name__})")
                return
            lease._renewed(sent_at)
            delay = self.renew_interval

    async def _release(self, lease: InstanceLease) -> None:
        if lease._lost is not None:
            return  # broken or taken over: nothing of ours to release
        try:
            await lease._client.release()
        except AzureError as exc:
            # Not raised: the block's own outcome (success or its exception) is what the
            # caller must see, and an unreleased lease expires by itself within `duration`.
            log.warning(
                "releasing the lease on instance %s failed; it expires within %ss: %s",
                lease.instance_id,
                self.duration,
                storage_error(exc, what=f"lease container {self.container!r}", operation="release lease"),
            )
