"""Every estate file we ship seeds a twin: a broken demo estate fails here, not in a demo."""

from __future__ import annotations

from pathlib import Path

import pytest

from twin.server import TwinServer

pytestmark = pytest.mark.integration

ESTATES = sorted((Path(__file__).resolve().parents[2] / "estates").glob("*.yaml"))


@pytest.mark.parametrize("estate", ESTATES, ids=[p.name for p in ESTATES])
def test_estate_seeds(estate: Path, tmp_path: Path) -> None:
    server = TwinServer(estate, tmp_path, with_azurite=False)
    server.start()
    try:
        assert server.state.subscriptions, f"{estate.name} seeds no subscription"
        assert server.state.principals, f"{estate.name} has no principal for the product"
    finally:
        server.stop()
