"""Every benchmark in one run, and one table: each figure beside the raw library doing the same
work in the same run, the ratio, the target and PASS or MISS. Exits 1 on a miss or a benchmark
that fails.

Each benchmark runs in its own process (one model library's threads cannot slow the next one)
with default settings and writes its figures as JSON (``--json``); their own printouts go to the
terminal too. ``--only chat vision`` runs some of them.
Usage: python bench/run.py [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rows import Row, read_rows

HERE = Path(__file__).resolve().parent
BENCHMARKS: dict[str, list[str]] = {  # name: arguments (default settings; runs kept moderate)
    "chat": ["chat.py"],
    "api": ["api.py"],
    "vision": ["vision.py"],
    "image": ["generate.py", "--runs", "6", "--warmup", "1"],
    "voice": ["voice.py"],
    "swap": ["swap.py"],
    "batch": ["batch.py"],
}
QUICK_RUNS = {
    "chat": ["--runs", "4"],
    "api": ["--runs", "4"],
    "vision": ["--runs", "5"],
    "voice": ["--runs", "2"],
    "batch": ["--runs", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="fewer runs (noisier ratios)")
    args = parser.parse_args()
    rows: list[Row] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only or list(BENCHMARKS):
            output = Path(scratch) / f"{name}.json"
            command = [sys.executable, str(HERE / BENCHMARKS[name][0]), *BENCHMARKS[name][1:], "--json", str(output)]
            if args.quick:
                command += QUICK_RUNS.get(name, [])
            print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
            started = time.perf_counter()
            finished = subprocess.run(command, check=False)
            print(f"=== {name}: {time.perf_counter() - started:.0f} s, exit {finished.returncode}", flush=True)
            if finished.returncode != 0 or not output.is_file():
                failed.append(name)
                continue
            rows += read_rows(output)
    print()
    print(table(rows))
    misses = [row.name for row in rows if row.passed is False]
    for name in failed:
        print(f"FAILED: the {name} benchmark did not finish (see its output above)")
    print(f"\n{len(rows)} figures, {sum(row.passed is True for row in rows)} PASS, {len(misses)} MISS", end="")
    print(f", {len(failed)} benchmark(s) failed" if failed else "")
    sys.exit(1 if misses or failed else 0)


def table(rows: list[Row]) -> str:
    header = f"{'figure':78} {'unit':>8} {'raw':>10} {'app':>10} {'ratio':>7}  {'target':16} result"
    lines = [header, "-" * len(header)]
    for row in rows:
        raw = f"{row.raw:10.4g}" if row.raw is not None else f"{'-':>10}"
        app = f"{row.app:10.4g}" if row.app is not None else f"{'-':>10}"
        ratio = f"{row.ratio:7.3f}" if row.ratio is not None else f"{'-':>7}"
        verdict = {True: "PASS", False: "MISS", None: "(reported)"}[row.passed]
        lines.append(f"{row.name[:78]:78} {row.unit:>8} {raw} {app} {ratio}  {row.target:16} {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
