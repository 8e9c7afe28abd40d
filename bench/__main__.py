"""Run every benchmark: `make bench`. Each prints its measurement as a ratio against a
bound measured in the same run, and whether it meets its target; exit 1 if one misses.

`python -m bench scale [--full]` (`make bench-scale` is `--full`) runs only the scale
benchmark; without --full it is the small version `make bench` includes."""

from __future__ import annotations

import sys

from bench import cold_start, event_to_fix, scale, scan_fanout


def main(argv: list[str]) -> int:
    if argv[:1] == ["scale"]:
        return 0 if scale.run(full="--full" in argv[1:]) else 1
    if argv:
        print("usage: python -m bench [scale [--full]]", file=sys.stderr)
        return 2
    results = [cold_start.run(), scan_fanout.run(), event_to_fix.run(), scale.run()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
