"""One exception hierarchy for the product.

Handlers turn these into HTTP status codes, incident records or retries. Transient and
permanent failures are different types so a caller never has to parse a message to know
whether to retry. Messages never carry secret values: raise with names and ids only.
"""

from __future__ import annotations


class RemediatorError(Exception):
    """Base of every error the product raises on purpose."""

    # Raised while a multi-step remediation plan was applied: how many of its steps had
    # taken effect before this error (the journal records outcomes per step).
    steps_done: int = 0


class SettingsError(RemediatorError):
    """App settings are missing or malformed; lists every problem at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the app settings "
            f"(fix them in local.settings.json or the Function App's configuration):\n{lines}"
        )


class TransientError(RemediatorError):
    """Worth retrying later: throttling, timeouts, a service that is briefly down."""


class PermanentError(RemediatorError):
    """Retrying will not help: becomes an incident or a clear error to the caller."""


class RuleError(PermanentError):
    """A rule raised while evaluating a snapshot (a bug, or a parameter it cannot use): the
    findings are incomplete, so nothing may be concluded (or remediated) from them."""


class OutOfScopeError(PermanentError):
    """The request names a resource outside the configured scope."""


class LeaseLost(PermanentError):
    """The lease on an instance was lost: whoever held it must stop at once (no further
    write and no further journal row), since another worker may now hold it."""


class NotFoundError(PermanentError):
    """The request names something that does not exist (HTTP 404 for the API)."""


def error_code_and_message(body: object) -> tuple[str, str]:
    """The code and message of an Azure error body, whichever shape it has.

    ARM and most providers wrap them (`{"error": {"code", "message"}}`); Microsoft.Insights
    (diagnostic settings) answers the flat `{"code", "message"}` of its spec's ErrorResponse.
    Empty strings when the body says neither.
    """
    if not isinstance(body, dict):
        return "", ""
    wrapped = body.get("error")
    error = wrapped if isinstance(wrapped, dict) else body
    code, message = error.get("code"), error.get("message")
    return (code if isinstance(code, str) else ""), (message if isinstance(message, str) else "")
