"""The composition root of one process: settings, policy and the client factory, built
once (cold start) and handed to the use cases as their narrow dependencies.

The Functions app (function_app.py) and the CLI both build their dependencies here, so a
use case runs the same way from a trigger, a command or a test. Handlers never construct
clients themselves; the factory memoises every client per process (async ones per event
loop), so building the dependency objects per invocation costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from handlers.manual import ManualDeps
from handlers.reconcile import LogSink, ReconcileDeps
from handlers.remediate import RemediationDeps
from shared.armapi import AzureArm, AzureSecrets
from shared.azure import ClientFactory
from shared.entra import SigningKeys, TokenValidator, https_fetcher
from shared.errors import SettingsError
from shared.evidence_source import AzureEvidenceSource
from shared.findings_store import FindingsStore
from shared.journal import Journal
from shared.locks import InstanceLocks
from shared.operations import OperationsStore
from shared.policy import Policy, load_policy
from shared.settings import Settings, load_settings
from shared.source import AzureInstanceSource


@dataclass
class AppContext:
    settings: Settings
    policy: Policy
    factory: ClientFactory
    # The API's token validator holds the authority's signing keys (cached): one per process.
    _validator: TokenValidator | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, env: dict[str, str] | None = None) -> AppContext:
        """Settings and policy from the environment (raises SettingsError / PolicyError)."""
        settings = load_settings(env)
        policy = load_policy(settings.policy_file, today=datetime.now(UTC).date())
        return cls(settings=settings, policy=policy, factory=ClientFactory(settings))

    def source(self) -> AzureInstanceSource:
        return AzureInstanceSource(self.factory, self.settings)

    def findings(self) -> FindingsStore:
        return FindingsStore(self.factory.table_service_async())

    def remediation_deps(self) -> RemediationDeps:
        return RemediationDeps(
            source=self.source(),
            arm=AzureArm(self.factory),
            secrets=AzureSecrets(self.factory),
            journal=Journal(self.factory.table_service_async()),
            locks=InstanceLocks(self.factory.blob_service_async(), duration=self.settings.lease_seconds),
            policy=self.policy,
            key_vault_url=self.settings.key_vault_url,
            evidence=AzureEvidenceSource(self.factory),
        )

    def manual_deps(self) -> ManualDeps:
        return ManualDeps(
            settings=self.settings,
            policy=self.policy,
            source=self.source(),
            arm=AzureArm(self.factory),
            findings=self.findings(),
            operations=self.operations(),
            remediation=self.remediation_deps(),
            reconcile=self.reconcile_deps(),
        )

    def operations(self) -> OperationsStore:
        return OperationsStore(self.factory.table_service_async())

    def token_validator(self) -> TokenValidator:
        """The HTTP API's bearer-token check (raises SettingsError when the API is not configured)."""
        if self._validator is None:
            api = self.settings.api
            if api is None:
                raise SettingsError(["APIMR_API_AUDIENCE and APIMR_API_TENANT_ID are required for the HTTP API"])
            keys = SigningKeys(
                self.settings.cloud.authority_host, api.tenant_id, https_fetcher(self.factory.https_context())
            )
            self._validator = TokenValidator(api, keys)
        return self._validator

    def reconcile_deps(self) -> ReconcileDeps:
        return ReconcileDeps(remediation=self.remediation_deps(), findings=self.findings(), sink=LogSink())

    async def aclose(self) -> None:
        await self.factory.aclose()
        self.factory.close()
