"""The product's function_app.py runs under devhost (the local stand-in for the Functions
host): every function's bindings are ones devhost drives, and every `%SETTING%` they name
resolves from local.settings.sample.json alone."""

from __future__ import annotations

from pathlib import Path

from devhost.config import read_local_settings
from devhost.functions import TRIGGERS, load_app

ROOT = Path(__file__).resolve().parents[2]


def test_product_app_loads_under_devhost_with_the_sample_settings() -> None:
    settings = read_local_settings(ROOT / "local.settings.sample.json")
    app = load_app(ROOT, "function_app.py", settings)
    assert "health" in app.functions
    for spec in app.functions.values():
        assert spec.trigger_type in TRIGGERS
        if spec.trigger_type == "httpTrigger":
            assert spec.route.segments is not None
        if spec.trigger_type == "timerTrigger":
            assert spec.schedule.expression
