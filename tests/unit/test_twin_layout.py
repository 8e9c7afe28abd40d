"""The twin's module layout: the estate loader never imports a provider back (issue 10, item 6).

Providers (apim, keyvault, insights, loganalytics, graph) import `twin.estate` for
EstateError/SeedContext and register their seeders with it; if the loader imported them
again, the two would form an import circle that only works by import order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.importscan import imported_modules

ROOT = Path(__file__).resolve().parents[2]
TWIN = ROOT / "twin"
# What the estate loader may build on: the state and the principals, nothing that serves a route.
ESTATE_MAY_IMPORT = {"twin.state", "twin.tokens"}


def twin_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path.read_text()) if m.split(".")[0] == "twin"}


def test_the_estate_loader_imports_no_provider_anywhere_in_its_source() -> None:
    # Anywhere: a function-level import (the old lazy `_section_seeders`) counts too.
    assert twin_imports(TWIN / "estate.py") <= ESTATE_MAY_IMPORT


def test_importing_the_estate_loader_alone_loads_no_provider() -> None:
    code = "import sys, twin.estate; print(' '.join(sorted(m for m in sys.modules if m.startswith('twin'))))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) <= {"twin", "twin.estate", *ESTATE_MAY_IMPORT}


def test_every_provider_registers_its_estate_section() -> None:
    code = "import twin.server, twin.estate as e; print(' '.join(e.registered_sections()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["apim", "diagnostic_settings", "graph_resources", "key_vaults", "workspaces"]


def test_no_twin_module_imports_the_apim_package_from_inside_except_its_own_modules() -> None:
    # twin/apim/ is internal to APIM: other twin modules use only what `twin.apim` exports.
    outside = [p for p in TWIN.rglob("*.py") if "apim" not in p.relative_to(TWIN).parts]
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in twin_imports(p) if m.startswith("twin.apim.")) for p in outside
    }
    assert {k: v for k, v in offenders.items() if v} == {}
