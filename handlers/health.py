"""Health: is this deployment configured well enough to run?

Reports the product version and, when the settings and the policy file are valid, a secret-free summary of
them; otherwise the list of settings problems (names and reasons, never values of secret
settings). Needs no Azure permission: it makes no Azure call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared import __version__
from shared.errors import SettingsError
from shared.policy import PolicyError, load_policy
from shared.settings import load_settings


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    version: str
    settings: Mapping[str, object] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def status_code(self) -> int:
        return 200 if self.healthy else 503

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"status": "healthy" if self.healthy else "misconfigured", "version": self.version}
        if self.healthy:
            body["settings"] = dict(self.settings)
        else:
            body["problems"] = list(self.problems)
        return body


def check_health(env: Mapping[str, str] | None = None) -> HealthReport:
    """Validate the settings and the policy file they name, and summarise them."""
    try:
        settings = load_settings(env)
        load_policy(settings.policy_file)
    except (SettingsError, PolicyError) as error:
        return HealthReport(healthy=False, version=__version__, problems=tuple(error.problems))
    return HealthReport(healthy=True, version=__version__, settings=settings.describe())
