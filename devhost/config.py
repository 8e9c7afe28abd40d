"""What the Functions host reads besides the code: app settings (`local.settings.json`
`Values` and the environment), `%SETTING%` references in binding properties, and host.json."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE = re.compile(r"%([^%]+)%")
# host.json timespans: "hh:mm:ss", "d.hh:mm:ss" or "hh:mm:ss.fff"; functionTimeout "-1" is unbounded.
TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d+))?$")


class ConfigError(ValueError):
    """The app's configuration cannot run: a missing setting, a malformed host.json value."""


class MissingSettingError(ConfigError):
    """A `%SETTING%` reference (or a binding connection) names a setting nobody set."""

    def __init__(self, setting: str, where: str) -> None:
        self.setting = setting
        super().__init__(
            f"{where}: the app setting '{setting}' is not set "
            "(set it in the environment or in local.settings.json 'Values')"
        )


def read_local_settings(path: Path) -> dict[str, str]:
    """The `Values` of a local.settings.json file (every value as a string)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read local settings ({error})") from error
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a JSON object with 'Values'")
    if document.get("IsEncrypted"):
        raise ConfigError(f"{path}: encrypted local settings are not supported (func settings decrypt)")
    values = document.get("Values", {})
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: 'Values' must be an object")
    return {str(k): "" if v is None else str(v) for k, v in values.items()}


def merge_settings(
    file_values: Mapping[str, str], environ: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """App settings as Core Tools builds them: the environment wins over local.settings.json
    (those file values are skipped, and reported); explicit overrides win over both.

    Returns the merged settings and the names of file values the environment shadowed.
    """
    shadowed = sorted(k for k in file_values if k in environ and environ[k] != file_values[k])
    merged = {**file_values, **environ}
    merged.update(overrides or {})
    return merged, shadowed


def resolve(value: str, settings: Mapping[str, str], where: str) -> str:
    """Replace every `%NAME%` in `value` with the app setting NAME, as the host does for
    binding properties; a missing or empty setting is an error naming it and the binding."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        found = settings.get(name)
        if not found:
            raise MissingSettingError(name, f"{where} references %{name}%")
        return found

    return REFERENCE.sub(substitute, value)


def parse_timespan(text: str, where: str) -> float | None:
    """Seconds in a host.json timespan; None for "-1" (no limit)."""
    if text.strip() == "-1":
        return None
    match = TIMESPAN.match(text.strip())
    if not match:
        raise ConfigError(f"host.json {where}: {text!r} is not a timespan like 00:05:00")
    days, hours, minutes, seconds, fraction = match.groups()
    total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds)
    return total + (float(f"0.{fraction}") if fraction else 0.0)


@dataclass(frozen=True)
class QueueOptions:
    """host.json `extensions.queues` with the host's defaults."""

    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    batch_size: int = 16
    new_batch_threshold: int | None = None  # None: batchSize / 2, as the host computes it
    max_dequeue_count: int = 5
    message_encoding: str = "base64"

    @property
    def threshold(self) -> int:
        return self.batch_size // 2 if self.new_batch_threshold is None else self.new_batch_threshold


@dataclass(frozen=True)
class HostConfig:
    """The parts of host.json this host honours."""

    route_prefix: str = "api"
    function_timeout: float | None = 300.0
    queues: QueueOptions = QueueOptions()

    @classmethod
    def load(cls, path: Path) -> HostConfig:
        if not path.exists():
            return cls()
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: cannot read host.json ({error})") from error
        return cls.from_document(document)

    @classmethod
    def from_document(cls, document: Any) -> HostConfig:
        if not isinstance(document, dict):
            raise ConfigError("host.json must be a JSON object")
        extensions = document.get("extensions") or {}
        http = extensions.get("http") or {}
        queues: dict[str, Any] = extensions.get("queues") or {}
        timeout = document.get("functionTimeout")
        prefix = http.get("routePrefix", "api")
        if not isinstance(prefix, str):
            raise ConfigError("host.json extensions.http.routePrefix must be a string")
        options = QueueOptions(
            max_polling_interval=_seconds(queues, "maxPollingInterval", 60.0),
            visibility_timeout=_seconds(queues, "visibilityTimeout", 0.0),
            batch_size=_integer(queues, "batchSize", 16, 1, 32),
            new_batch_threshold=(
                _integer(queues, "newBatchThreshold", 0, 0, 1_000_000) if "newBatchThreshold" in queues else None
            ),
            max_dequeue_count=_integer(queues, "maxDequeueCount", 5, 1, 1_000_000),
            message_encoding=str(queues.get("messageEncoding", "base64")).lower(),
        )
        if options.message_encoding not in ("base64", "none"):
            raise ConfigError(
                f"host.json extensions.queues.messageEncoding: {options.message_encoding!r} (base64|none)"
            )
        return cls(
            route_prefix=prefix.strip("/"),
            function_timeout=300.0 if timeout is None else parse_timespan(str(timeout), "functionTimeout"),
            queues=options,
        )


def _seconds(section: Mapping[str, Any], key: str, default: float) -> float:
    if key not in section:
        return default
    seconds = parse_timespan(str(section[key]), f"extensions.queues.{key}")
    if seconds is None:
        raise ConfigError(f"host.json extensions.queues.{key} cannot be -1")
    return seconds


def _integer(section: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"host.json extensions.queues.{key}: {value!r} must be an integer {low}-{high}")
    return value
