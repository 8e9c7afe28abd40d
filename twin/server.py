"""Run the twin: every service on its own HTTPS port on 127.0.0.1, Azurite beside it.

Ports: login (token service), arm (ARM + control API), logs (Log Analytics), one per Key
Vault. `TwinServer.start()` runs the services on an event loop in a background thread,
so tests and the CLI share one implementation.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from twin import apim, arm, control, eventgrid, graph, insights, keyvault, loganalytics, login, rbac, sentinel
from twin.azurite import Azurite
from twin.certs import CertFiles, make_certs
from twin.estate import EstateError, apply_estate, load_estate_file
from twin.state import TwinState
from twin.tokens import TokenIssuer
from twin.web import AuthPolicy, make_app

KEYVAULT_AUDIENCE = "https://vault.azure.net"
STORAGE_AUDIENCE = "https://storage.azure.com"
# Real ARM accepts tokens for either of its audiences; the Azure CLI asks for the classic one.
CLASSIC_ARM_AUDIENCE = "https://management.core.windows.net"
PRODUCT_STORAGE_ACCOUNT = "apimrstate"


class TwinServer:
    def __init__(
        self,
        estate: Path,
        workdir: Path,
        *,
        with_azurite: bool = True,
        tenant_id: str | None = None,
        azurite_ports: tuple[int, int, int] | None = None,
        azurite_accounts: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """`azurite_ports` + `azurite_accounts`: use an Azurite somebody else runs.
        `retry_after`: the LROs' Retry-After instead of Azure's whole seconds (tests, the demo)."""
        self.estate_path = estate
        self.workdir = workdir
        self.with_azurite = with_azurite
        data = load_estate_file(estate)
        self.estate = data
        self.state = TwinState(tenant_id=str(data.get("tenant_id") or tenant_id or uuid.uuid4()))
        if retry_after is not None:
            try:
                seconds = float(retry_after)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds <= 3600:
                raise ValueError(f"retry_after must be 0..3600 seconds, got {retry_after!r}")
            self.state.default_retry_after = self.state.lro.retry_after = retry_after
        self.issuer = TokenIssuer(self.state.tenant_id)
        self.certs: CertFiles = make_certs(workdir / "certs")
        self.azurite: Azurite | None = None
        if azurite_ports is not None:
            if not azurite_accounts:
                raise ValueError("an external Azurite needs its accounts ('name:key;...')")
            self.azurite = Azurite.running(workdir, self.certs, azurite_ports, azurite_accounts)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self._vault_sites: dict[str, str] = {}
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as error:  # reported to the starting thread
                self._error = error
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="twin", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=120):
            self.stop()
            raise RuntimeError("the twin did not start within 120 s")
        if self._error is not None:
            self.stop()
            raise RuntimeError(f"the twin failed to start: {self._error}") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.azurite is not None:
            self.azurite.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the twin's loop (state is owned by it) and return its result."""
        assert self._loop is not None

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout=60)

    # -- services ----------------------------------------------------------------------------

    async def _site(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.certs.server_context())
        await site.start()
        self._runners.append(runner)
        port = runner.addresses[0][1]
        return f"https://127.0.0.1:{port}"

    async def _start(self) -> None:
        state = self.state
        state.extra["ca_file"] = str(self.certs.ca)
        login_app = make_app(state, "login", self.issuer, None)
        login.setup(login_app)
        state.urls["login"] = await self._site(login_app)

        arm_policy = AuthPolicy(
            audiences=lambda: [state.urls["arm"], CLASSIC_ARM_AUDIENCE],
            open_prefixes=("/_twin/", "/metadata/endpoints"),
            challenge_for=rbac.arm_challenge(state.urls["login"]),
            authorize=rbac.authorize_arm,
        )
        arm_app = make_app(state, "arm", self.issuer, arm_policy)
        for module in (arm, control, apim, insights, graph, sentinel, eventgrid, keyvault):
            module.setup(arm_app)
        loganalytics.setup_arm(arm_app)  # the workspace resource; its query API has its own port
        state.urls["arm"] = await self._site(arm_app)

        logs_app = make_app(
            state,
            "logs",
            self.issuer,
            AuthPolicy(audiences=lambda: [state.urls["logs"]], authorize=rbac.authorize_logs),
        )
        loganalytics.setup(logs_app)
        state.urls["logs"] = await self._site(logs_app)

        try:
            apply_estate(state, self.estate, source=str(self.estate_path), top_level=True)
        except EstateError:
            raise
        if PRODUCT_STORAGE_ACCOUNT not in state.extra.setdefault("storage_accounts", []):
            state.extra["storage_accounts"].insert(0, PRODUCT_STORAGE_ACCOUNT)
        if self.with_azurite:
            if self.azurite is None:
                self.azurite = Azurite(self.workdir, self.certs, list(state.extra["storage_accounts"]))
            else:
                missing = set(state.extra["storage_accounts"]) - set(self.azurite.accounts)
                if missing:
                    raise EstateError(f"the running Azurite lacks the estate's storage accounts {sorted(missing)}")
            await asyncio.get_running_loop().run_in_executor(None, self.azurite.start)
            state.extra["storage"] = {
                name: {
                    "blob_url": self.azurite.url("blob", name),
                    "queue_url": self.azurite.url("queue", name),
                    "table_url": self.azurite.url("table", name),
                    "account_key": self.azurite.keys[name],
                }
                for name in self.azurite.accounts
            }
        await self._ensure_vault_sites()
        state.after_seed = self._ensure_vault_sites
        state.mark_seeded()

    async def _ensure_vault_sites(self) -> None:
        state = self.state
        for name in state.extra.get("vaults", {}):
            if name in self._vault_sites:
                continue
            challenge = (
                f'Bearer authorization="{state.urls["login"]}/{state.tenant_id}", resource="{KEYVAULT_AUDIENCE}"'
            )
            policy = AuthPolicy(
                audiences=[KEYVAULT_AUDIENCE], challenge=challenge, authorize=rbac.vault_authorizer(name)
            )
            app = make_app(state, "keyvault", self.issuer, policy)
            keyvault.setup_vault(app, name)
            url = await self._site(app)
            self._vault_sites[name] = url
            state.urls[f"vault:{name}"] = url
            keyvault.bind_vault_url(state, name)

    async def _shutdown(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    # -- what clients need -------------------------------------------------------------------

    def product_principal(self) -> tuple[str, str]:
        """(client_id, secret) of the estate's first principal: the product's identity."""
        client_id, (secret, _) = next(iter(self.state.principals.items()))
        return client_id, secret

    def env(self) -> dict[str, str]:
        """The standard variables any Azure client needs, plus the product's settings."""
        urls = self.state.urls
        client_id, secret = self.product_principal()
        values = {
            "AZURE_TENANT_ID": self.state.tenant_id,
            "AZURE_CLIENT_ID": client_id,
            "AZURE_CLIENT_SECRET": secret,
            "AZURE_AUTHORITY_HOST": urls["login"],
            "REQUESTS_CA_BUNDLE": str(self.certs.ca),
            "SSL_CERT_FILE": str(self.certs.ca),
            "APIMR_CLOUD": "Custom",
            "APIMR_ARM_ENDPOINT": urls["arm"],
            "APIMR_AUTHORITY_HOST": urls["login"],
            "APIMR_LOG_ANALYTICS_ENDPOINT": urls["logs"],
            "APIMR_KEYVAULT_VERIFY_CHALLENGE_RESOURCE": "false",
            "APIMR_SUBSCRIPTION_IDS": ",".join(s["subscriptionId"] for s in self.state.subscriptions.values()),
            "APIMR_CA_BUNDLE": str(self.certs.ca),
        }
        storage = self.state.extra.get("storage", {}).get(PRODUCT_STORAGE_ACCOUNT)
        if storage:
            values["APIMR_STORAGE_BLOB_ENDPOINT"] = storage["blob_url"]
            values["APIMR_STORAGE_QUEUE_ENDPOINT"] = storage["queue_url"]
            values["APIMR_STORAGE_TABLE_ENDPOINT"] = storage["table_url"]
        return values

    def write_env_file(self, path: Path) -> None:
        lines = [f"{key}={value}" for key, value in self.env().items()]
        path.write_text("\n".join(lines) + "\n")
