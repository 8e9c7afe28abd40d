"""Build the Function App's deployment package the way `azd deploy` / `func azure functionapp
publish` do: every file of the project folder except what `.funcignore` names, read with
gitignore semantics (pathspec's GitIgnoreSpec, the rules git itself applies).

    python -m devhost.package [OUT.zip]    (default: dist/app.zip)
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pathspec import GitIgnoreSpec

ROOT = Path(__file__).resolve().parents[1]


def package_files(root: Path = ROOT) -> Iterator[PurePosixPath]:
    """The project's files that go into the package, relative to `root`, sorted."""
    spec = GitIgnoreSpec.from_lines((root / ".funcignore").read_text().splitlines())

    def ignored(relative: PurePosixPath, is_dir: bool) -> bool:
        # A directory pattern (`name/`) matches only a path that says it is a directory.
        return spec.match_file(f"{relative}/" if is_dir else str(relative))

    def walk(folder: Path) -> Iterator[PurePosixPath]:
        for entry in sorted(folder.iterdir()):
            relative = PurePosixPath(entry.relative_to(root).as_posix())
            is_dir = entry.is_dir() and not entry.is_symlink()
            if ignored(relative, is_dir):
                continue
            if is_dir:
                yield from walk(entry)
            elif entry.is_file():
                yield relative

    yield from walk(root)


def build(out: Path, root: Path = ROOT) -> list[PurePosixPath]:
    """Write the package zip to `out`; return the files it holds."""
    files = list(package_files(root))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for relative in files:
            archive.write(root / relative, str(relative))
    return files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else ROOT / "dist" / "app.zip"
    try:
        files = build(out)
    except OSError as error:
        print(f"package: {error}", file=sys.stderr)
        return 2
    print(f"{out}: {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
