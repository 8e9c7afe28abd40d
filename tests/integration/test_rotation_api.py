"""The HTTP API's key-rotation route: a plan by default, a rotation as an operation, revoke
for Admin only, scope as every route has it, and no key in any answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TwinHandle
from tests.e2e.test_scan_estate import VAULT, key
from tests.integration.test_api import (
    ADMIN,
    API_ENV_KEYS,
    OPERATE,
    READ,
    ApiServer,
    api_env,
    call,
    path_of,
    poll,
    token,
)
from tests.integration.test_api import seed as seed_instance
from tests.integration.test_rotation import keys_of, regenerates

pytestmark = pytest.mark.integration


def test_key_rotation_route(twin: TwinHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service_id = seed_instance(twin, "api-rotate", "KEY-003")
    env = api_env(twin, tmp_path)
    env["APIMR_KEY_VAULT_URL"] = twin.urls[f"vault:{VAULT}"]
    for name in API_ENV_KEYS:
        monkeypatch.setenv(name, twin.env[name])
    route = path_of(service_id) + "/key-rotations"
    stale = f"{service_id}/subscriptions/stale"
    with ApiServer(env) as api:
        reader, operator, admin = (token(twin, role) for role in (READ, OPERATE, ADMIN))
        assert call(api, "POST", route, reader, json={}).status_code == 403

        plan = call(api, "POST", route, operator, json={})
        assert plan.status_code == 200, plan.text
        [would] = plan.json()["results"]
        assert (would["subscription"], would["status"], would["action"]) == (stale, "would", "rotate")
        assert regenerates(twin) == []

        refused = call(
            api, "POST", route, operator, json={"dry_run": False, "revoke": True, "subscriptions": ["stale"]}
        )
        assert refused.status_code == 403
        assert "Remediator.Admin" in refused.json()["error"]["message"]

        started = call(api, "POST", route, operator, json={"dry_run": False, "subscriptions": ["stale", "ghost"]})
        assert started.status_code == 202, started.text
        done = poll(api, started.headers["Location"], operator)
        assert done["status"] == "succeeded", done
        statuses = {r["subscription"].rsplit("/", 1)[-1]: r["status"] for r in done["result"]["results"]}
        assert statuses == {"stale": "done", "ghost": "refused"}
        assert len(regenerates(twin)) == 1

        bad = call(api, "POST", route, admin, json={"grace_seconds": -1})
        assert bad.status_code == 422
        text = plan.text + started.text + str(done) + bad.text
        assert key(service_id.rsplit("/", 1)[-1], "stale") not in text
        assert not any(v in text for v in keys_of(twin, stale).values())
