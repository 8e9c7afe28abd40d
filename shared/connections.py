"""One SSL context and one connection pool per process, shared by every SDK client.

Why: with a CA bundle configured (private clouds, every twin run) azure-core's aiohttp
transport builds a new `SSLContext` per request from the bundle's path, and aiohttp keys
its pooled connections by that context, so no connection is ever reused: every request
pays a TCP and TLS handshake and leaves an idle socket behind (a 1,000-instance scan held
about 2,950). Here the context is built once and given to one aiohttp connector; the
transports handed to the SDK clients send with `connection_verify=True`, so aiohttp uses
the connector's context and reuses its connections. The connector's limit bounds the
sockets open at once; a request beyond it waits for a free connection.

Each client gets its own thin transport object (so per-client timeouts stay per client)
over the one session; a client closing its transport leaves the shared session open. The
composition root (`ClientFactory`) owns the pool and closes it on shutdown
(`ClientFactory.aclose` / `close`).

The async session is created on first use inside the running event loop (aiohttp binds
a session to its loop), one per loop.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp
    import requests

# Sockets open at once per process, over all hosts. A scan keeps at most
# MAX_PARALLEL_INSTANCES x MAX_CONCURRENT_READS (4 x 8) ARM requests in flight; the rest
# leaves room for Key Vault, storage and token requests made meanwhile.
POOL_CONNECTIONS = 48
# Idle connections are closed after this long; ARM keeps them open for minutes.
KEEPALIVE_SECONDS = 30.0


class ConnectionPool:
    """The process's TLS configuration and HTTP connections (sync and async)."""

    def __init__(self, ca_bundle: str | None, *, limit: int = POOL_CONNECTIONS) -> None:
        self.ca_bundle = ca_bundle
        self.limit = limit
        self._ssl: ssl.SSLContext | None = None
        # One session per event loop (aiohttp binds a session to its loop); a loop that has
        # gone takes its entry with it.
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
            weakref.WeakKeyDictionary()
        )
        self._sync_session: requests.Session | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The one client context: the system store plus the configured CA bundle."""
        if self._ssl is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.ca_bundle:
                context.load_verify_locations(cafile=self.ca_bundle)
            self._ssl = context
        return self._ssl

    # -- async ----------------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        """The shared aiohttp session of the running loop (created on first use)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self.ssl_context(), limit=self.limit, keepalive_timeout=KEEPALIVE_SECONDS
            )
            # What azure-core's own transport sets: proxies from the environment, no cookies,
            # bodies left compressed (azure-core decodes them itself).
            session = aiohttp.ClientSession(
                connector=connector, trust_env=True, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
            )
            self._sessions[loop] = session
        return session

    def async_transport(self, **connection: Any) -> Any:
        """A transport for one async client over the shared session (`connection`: azure-core's
        connection options such as `connection_timeout`, `read_timeout`)."""
        return _pooled_aiohttp_transport(self, **connection)

    def open_sockets(self) -> int:
        """Connections the running loop's pool holds now (in use or idle), for benchmarks
        and tests."""
        session = self._sessions.get(asyncio.get_running_loop())
        if session is None or session.closed or session.connector is None:
            return 0
        # aiohttp keeps these private; a benchmark and test aid only, so absent means zero.
        connector: Any = session.connector
        idle = sum(len(conns) for conns in getattr(connector, "_conns", {}).values())
        return idle + len(getattr(connector, "_acquired", ()))

    async def aclose(self) -> None:
        """Close the running loop's session (another loop's belongs to that loop)."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None and not session.closed:
            await session.close()

    # -- sync -----------------------------------------------------------------------------

    def sync_transport(self, **connection: Any) -> Any:
        """A transport for one sync client over the shared `requests` session. urllib3 pools
        connections per host and CA file, so the bundle's path verifies without a new
        context per request."""
        import requests
        from azure.core.pipeline.transport import RequestsTransport

        if self._sync_session is None:
            self._sync_session = requests.Session()
        if self.ca_bundle:
            connection.setdefault("connection_verify", self.ca_bundle)
        return RequestsTransport(session=self._sync_session, session_owner=False, **connection)

    def close(self) -> None:
        session, self._sync_session = self._sync_session, None
        if session is not None:
            session.close()


@functools.cache
def _pooled_transport_class() -> Any:
    """Built on first use: azure-core's aiohttp transport is imported only when an async
    client is (cold start pays for what its first invocation uses)."""
    from azure.core.pipeline.transport import AioHttpTransport

    class PooledAioHttpTransport(AioHttpTransport):  # type: ignore[misc]
        """azure-core's aiohttp transport over the pool's session, which it never closes."""

        def __init__(self, pool: ConnectionPool, **connection: Any) -> None:
            # Verification comes from the connector's context; a path here would make
            # azure-core build a context per request again.
            connection.pop("connection_verify", None)
            super().__init__(session=None, session_owner=True, **connection)
            self._pool = pool

        async def open(self) -> None:
            self.session = self._pool.session()

        async def close(self) -> None:
            # The session belongs to the pool; only the reference goes.
            self.session = None  # type: ignore[assignment]

    return PooledAioHttpTransport


def _pooled_aiohttp_transport(pool: ConnectionPool, **connection: Any) -> Any:
    return _pooled_transport_class()(pool, **connection)
