"""How long `dualign --help` and each `dualign COMMAND --help` take, beside a bare interpreter start.

Each is a fresh process (as a user runs it), timed ``--repeat`` times; the table gives the median
wall seconds and its ratio to ``python -c pass`` measured in the same run. The target is under
1 s for every line; on a busy machine both columns grow, the ratio less.

    .venv/bin/python bench/cli_help.py
    .venv/bin/python bench/cli_help.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from dualign.cli import COMMANDS, ORDER


def wall(argv: list[str], repeat: int) -> float:
    """Median wall seconds of running ``argv`` to completion."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (median)")
    args = parser.parse_args()
    bare = wall([sys.executable, "-c", "pass"], args.repeat)
    names = sorted((name for name, *_ in COMMANDS), key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    print(f"{'command':<28}{'wall s':>8}{'× bare':>9}")
    print(f"{'python -c pass':<28}{bare:>8.2f}{1.0:>9.1f}")
    for name in ["", *names]:
        t = wall([sys.executable, "-m", "dualign", *([name] if name else []), "--help"], args.repeat)
        print(f"{('dualign ' + name).strip() + ' --help':<28}{t:>8.2f}{t / bare:>9.1f}")


if __name__ == "__main__":
    main()
