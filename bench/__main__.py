"""Run every benchmark: `make bench`. Each prints its measurement as a ratio against a
bound measured in the same run, and whether it meets its target; exit 1 if one misses."""

from __future__ import annotations

import sys

from bench import cold_start, event_to_fix, scan_fanout


def main() -> int:
    results = [cold_start.run(), scan_fanout.run(), event_to_fix.run()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
