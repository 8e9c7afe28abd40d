"""The deployment package holds only what the app runs, and the app indexes from it alone.

Built the way `azd deploy` builds it (`devhost/package.py`: the project folder minus
`.funcignore`, with gitignore semantics), extracted, and imported in a fresh interpreter
from which the checkout itself is removed from `sys.path` (the editable install points at
it), so a module the package lacks fails the import instead of being found in the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from devhost import package

ROOT = Path(__file__).resolve().parents[2]
RUNS = {"function_app.py", "host.json", "requirements.txt", "handlers", "shared"}
NEVER = ("twin/", "tests/", "estates/", "bench/", "devhost/", "node_modules/", "infra/", "docs/", ".venv")

PROBE = r"""
import importlib, json, pkgutil, sys
root, pkg = sys.argv[1], sys.argv[2]
sys.path[:] = [p for p in sys.path if p not in ("", ".", root)]
sys.path.insert(0, pkg)
import function_app
names = sorted(fn.get_function_name() for fn in function_app.app.get_functions())
# Everything the app may import lazily (the API on its first request, the CLI) comes from it too.
for top in ("handlers", "shared"):
    module = importlib.import_module(top)
    for info in pkgutil.walk_packages(module.__path__, top + "."):
        importlib.import_module(info.name)
ours = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()
        if n.split(".")[0] in ("function_app", "handlers", "shared", "twin", "tests", "devhost", "bench")}
print(json.dumps({"functions": names, "modules": ours}))
"""


def test_the_package_holds_only_what_the_app_runs(tmp_path: Path) -> None:
    out = tmp_path / "app.zip"
    files = package.build(out, ROOT)
    names = zipfile.ZipFile(out).namelist()
    assert sorted(names) == sorted(str(f) for f in files)
    assert {n.split("/")[0] for n in names} == RUNS
    assert "shared/baseline.yaml" in names  # data the app reads at run time
    assert not [n for n in names if n.startswith(NEVER) or "__pycache__" in n or n.endswith(".pyc")]


def test_the_app_indexes_and_imports_from_the_package_alone(tmp_path: Path) -> None:
    out = tmp_path / "app.zip"
    package.build(out, ROOT)
    extracted = tmp_path / "wwwroot"
    zipfile.ZipFile(out).extractall(extracted)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT), str(extracted)],
        cwd=extracted,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"health", "sweep", "work", "poison", "events", "http_app_func"} <= set(report["functions"])
    outside = {n: f for n, f in report["modules"].items() if not f or not f.startswith(str(extracted))}
    assert outside == {}, outside
    assert not [n for n in report["modules"] if n.split(".")[0] in ("twin", "tests", "devhost", "bench")]


def test_funcignore_directory_patterns_match_directories_only(tmp_path: Path) -> None:
    (tmp_path / ".funcignore").write_text("# comment\nbuild/\n*.log\n/top.txt\n")
    for name in ("build/a.py", "src/build/b.py", "other/build", "app.log", "src/deep/x.log", "top.txt", "src/top.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    kept = {str(p) for p in package.package_files(tmp_path)}
    # `build/` ignores the directories named build; a file named build stays; `/top.txt` is anchored.
    assert kept == {".funcignore", "other/build", "src/top.txt"}
