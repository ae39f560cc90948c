"""CLI start-up: wall time of ``robustvtc --help``, ``list``, ``validate`` and ``report --view`` in fresh
processes, and whether each imported torch / transformers; optionally paired against another source tree
(e.g. a ``git worktree`` of an older revision) -- per round both trees run each command back to back.

    python benchmarks/bench_startup.py                               # this tree
    git worktree add /tmp/before HEAD~3
    python benchmarks/bench_startup.py --baseline /tmp/before --rounds 7 --results runs/quickstart
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _bench import fmt, load, paired, ratio

HERE = Path(__file__).resolve().parent.parent
PROBE = ("import runpy, sys\nsys.argv = ['robustvtc', *sys.argv[1:]]\ntry:\n    runpy.run_module('robustvtc', "
         "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('IMPORTED', 'torch' in sys.modules, "
         "'transformers' in sys.modules, file=sys.stderr)\n")


def command(tree: Path, args: list[str]):
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}

    def run():
        out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True,
                             cwd="/")
        line = [x for x in out.stderr.splitlines() if x.startswith("IMPORTED")]
        return line[-1].split()[1:] if line else ["?", "?"]
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--this", type=Path, default=HERE, help="the source tree measured (default: this one)")
    parser.add_argument("--baseline", type=Path, default=None, help="another source tree to pair against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", default=None, help="a campaign folder for report --view (skipped without)")
    args = parser.parse_args()
    commands = [["--help"], ["list", "scenarios"], ["list", "compressors"], ["validate", "quickstart"]]
    if args.results:
        results = str(Path(args.results).resolve())
        commands += [["report", results, "--view", "verdict"], ["report", results, "-o", "/tmp/robustvtc-bench-report"]]
    trees = {"this": args.this.resolve(), **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(f"CLI start-up, {args.rounds} paired rounds, {load()}")
    print("| command | " + " | ".join(f"{n} s (median) | torch, transformers ({n})" for n in trees)
          + (" | this / baseline |" if args.baseline else " |"))
    print("|---" * (1 + 2 * len(trees) + bool(args.baseline)) + "|")
    for cmd in commands:
        cases = {n: command(t, cmd) for n, t in trees.items()}
        imported = {n: c() for n, c in cases.items()}
        t = paired(cases, args.rounds, warmup=0)
        cells = [f"{sorted(t[n])[len(t[n]) // 2]:.2f} | {', '.join(imported[n])}" for n in trees]
        tail = f" | {fmt(ratio(t['this'], t['baseline']))} |" if args.baseline else " |"
        print(f"| robustvtc {' '.join(cmd)} | " + " | ".join(cells) + tail)


if __name__ == "__main__":
    main()
