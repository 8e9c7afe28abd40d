"""infra/ as the deploy reads it: every Bicep file parses (pycep, the parser checkov uses; the
Bicep compiler cannot be downloaded here), the app settings are exactly the settings the code
reads, the Event Grid filters are exactly the event types the `events` function routes, and
the role deployed per subscription is the file the twin loads for the least-privilege runs."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from handlers.events import ROUTES
from shared.settings import SETTING_NAMES
from tests.functions.test_function_app import indexed

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
# The Functions host's own settings (identity-based AzureWebJobsStorage, Application Insights).
HOST_SETTINGS = {
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
}


@functools.cache
def parsed(path: Path) -> dict[str, Any]:
    return dict(BicepParser().parse(file_path=path))


def test_there_are_templates_to_check() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in BICEP_FILES}
    assert {"main.bicep", "events.bicep", "subscription-role.bicep", "modules/app.bicep"} <= names


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_bicep_file_parses(path: Path) -> None:
    tree = parsed(path)
    assert tree.get("resources") or tree.get("modules"), f"{path.name} declares nothing"


def test_every_module_path_exists() -> None:
    for path in BICEP_FILES:
        for name, module in (parsed(path).get("modules") or {}).items():
            target = path.parent / module["detail"]["path"]
            assert target.is_file(), f"{path.name}: module {name} points at missing {target}"


def app_settings() -> list[str]:
    site = parsed(INFRA / "modules" / "app.bicep")["resources"]["app"]
    assert site["type"] == "Microsoft.Web/sites"
    return [entry["name"] for entry in site["config"]["properties"]["siteConfig"]["appSettings"]]


def test_app_settings_are_exactly_the_settings_the_code_reads() -> None:
    names = app_settings()
    assert len(names) == len(set(names)), "an app setting is listed twice"
    ours = {n for n in names if n.startswith("APIMR_")}
    assert ours == set(SETTING_NAMES), (
        f"missing from main.bicep's app: {sorted(set(SETTING_NAMES) - ours)}; "
        f"not read by shared/settings.py: {sorted(ours - set(SETTING_NAMES))}"
    )
    assert set(names) - ours == HOST_SETTINGS


def test_main_deploys_the_app_module_and_the_role_the_twin_loads() -> None:
    modules = parsed(INFRA / "main.bicep")["modules"]
    assert modules["app"]["detail"]["path"] == "modules/app.bicep"
    # The least-privilege tests run under infra/subscription-role.bicep (twin.rbac reads it).
    assert modules["scopeRoles"]["detail"]["path"] == "subscription-role.bicep"
    loop = modules["scopeRoles"]["config"]["loop_type"]["detail"]
    assert loop == {"item_name": "sub", "array_name": "scopeSubscriptionIds"}


def test_event_grid_filters_cover_exactly_the_routed_event_types() -> None:
    events = parsed(INFRA / "events.bicep")
    variables = {name: v["value"] for name, v in events["variables"].items()}
    delivered: list[str] = []
    used = set()
    for module in events["modules"].values():
        params = module["config"].get("params") or module["config"]["config"]["params"]
        if "includedEventTypes" in params:
            used.add(params["includedEventTypes"])
    for module_path in ("modules/subscription-events.bicep",):
        nested = parsed(INFRA / module_path)["modules"]["topic"]["config"]["params"]
        assert nested["includedEventTypes"] == "includedEventTypes"  # passed through unchanged
    for name in used:
        delivered.extend(variables[name])
    assert len(delivered) == len(set(delivered))
    assert {t.lower() for t in delivered} == set(ROUTES), (
        f"routed but not subscribed: {sorted(set(ROUTES) - {t.lower() for t in delivered})}; "
        f"subscribed but not routed: {sorted({t.lower() for t in delivered} - set(ROUTES))}"
    )
    topic = parsed(INFRA / "modules" / "system-topic.bicep")["resources"]["toApp"]["config"]["properties"]
    assert topic["filter"]["includedEventTypes"] == "includedEventTypes"
    assert topic["destination"]["endpointType"] == "AzureFunction"
    assert topic["destination"]["properties"]["resourceId"] == "${functionAppId}/functions/events"


def test_the_events_destination_is_the_apps_event_grid_function() -> None:
    triggers = {
        fn.get_function_name()
        for fn in indexed()  # the library indexes an app once: share test_function_app's
        if any('"eventGridTrigger"' in raw for raw in fn.get_raw_bindings())
    }
    assert triggers == {"events"}
