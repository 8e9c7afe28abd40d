"""Health: is this deployment configured well enough to run?

`GET /api/health` is anonymous, so what it answers is for anyone: the status
("healthy" or "misconfigured") and the product version, nothing else. The problems
(names and reasons; settings.py never phrases a secret, a URL's user info or its query
into one) go to the log, where operators with access to the Function App read them, and
the CLI prints the same list when it stops on them. Needs no Azure permission: it makes
no Azure call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from shared import __version__
from shared.errors import SettingsError
from shared.policy import PolicyError, load_policy
from shared.settings import load_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    version: str
    problems: tuple[str, ...] = ()  # for the log and the CLI; never in the anonymous answer

    @property
    def status_code(self) -> int:
        return 200 if self.healthy else 503

    def public_body(self) -> dict[str, object]:
        """What an anonymous caller may see: status and version only."""
        return {"status": "healthy" if self.healthy else "misconfigured", "version": self.version}


def check_health(env: Mapping[str, str] | None = None) -> HealthReport:
    """Validate the settings and the policy file they name; log what is wrong."""
    try:
        settings = load_settings(env)
        load_policy(settings.policy_file)
    except (SettingsError, PolicyError) as error:
        problems = tuple(error.problems)
        log.error("health: misconfigured, %d problem(s):\n%s", len(problems), "\n".join(f"  - {p}" for p in problems))
        return HealthReport(healthy=False, version=__version__, problems=problems)
    return HealthReport(healthy=True, version=__version__)
