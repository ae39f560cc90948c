"""Grid reuse: what a campaign pays to evaluate 3 compressors x 3 budgets instead of one target.

Two levels, each timed as medians over alternating repeats (drift of a shared machine hits both alike):

* evaluation -- ``evaluate_grid`` on 9 targets (one encoder pass shared, kept maps recorded, as the runner
  does) vs on 1 target; also vs 9 separate evaluations (what no reuse would cost);
* campaign -- one chunk's units (set-up, clean evaluation, the adversarial batch crafted once and evaluated
  on the grid) with 3 x 3 cells vs with one cell: the attack, the expensive part, is paid once.

Ratios well under 9 mean the grid is cheap to widen.

    python benchmarks/bench_grid_reuse.py                   # built-in model (trained weights if present)
    python benchmarks/bench_grid_reuse.py --batch 8 --repeats 3 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustvtc.campaign import Campaign, parse_scenario
from robustvtc.data import synthetic as S
from robustvtc.campaign.grid import evaluate_grid, make_target

COMPRESSORS, BUDGETS = ("fastervlm", "visionzip", "pooling"), (16, 32, 48)


def builtin(device: str):
    from robustvtc.models import load_model

    return load_model("builtin", device=device)


def seconds(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def medians(cases: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each case; one warm-up, then the cases alternate."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="attack steps of the campaign-unit level")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = builtin(args.device)
    chunk = S.generate_dataset(args.batch, "test")
    pixels = S.to_pixels(chunk).to(adapter.device)
    questions = [s.question for s in chunk]

    def predict(target, px, tokens):
        return target.predict(px, questions, S.ANSWERS, tokens=tokens)
    n = adapter.num_visual_tokens
    grid = [make_target(adapter, c, n if c == "none" else b) for c in COMPRESSORS for b in ([n] if c == "none" else BUDGETS)]
    one = grid[:1]
    t = medians({"one target": lambda: evaluate_grid(one, pixels, predict, keep_maps=True),
                 "grid, shared encoder": lambda: evaluate_grid(grid, pixels, predict, keep_maps=True),
                 "grid, no reuse": lambda: [evaluate_grid([g], pixels, predict, keep_maps=True) for g in grid]},
                args.repeats)
    print(f"model {adapter.name}, batch {args.batch}, device {args.device}, threads {torch.get_num_threads()}, "
          f"medians of {args.repeats}")
    print(f"evaluation: one target {t['one target'] * 1e3:.1f} ms; {len(grid)} targets shared "
          f"{t['grid, shared encoder'] * 1e3:.1f} ms; {len(grid)} separate {t['grid, no reuse'] * 1e3:.1f} ms")
    print(f"  grid / one = {t['grid, shared encoder'] / t['one target']:.2f}x  (no reuse: "
          f"{t['grid, no reuse'] / t['one target']:.2f}x)")

    def unit(compressors, budgets):
        spec = parse_scenario({"compressors": list(compressors), "budgets": list(budgets), "samples": args.batch,
                               "batch_size": args.batch, "steps": args.steps, "attacks": ["cage"]})
        def run():  # a fresh campaign each time: nothing cached from the previous repeat
            campaign = Campaign(spec, adapter)
            return [list(campaign.run_unit(u)) for u in campaign.units()]
        return run
    u = medians({"one cell": unit(["fastervlm"], [16]), "3 x 3 grid": unit(COMPRESSORS, BUDGETS)},
                max(1, args.repeats // 2))
    print(f"campaign chunk (clean + cage, {args.steps} steps, + the full-token model): one cell "
          f"{u['one cell']:.2f} s; 3 x 3 grid {u['3 x 3 grid']:.2f} s")
    print(f"  grid / one = {u['3 x 3 grid'] / u['one cell']:.2f}x")


if __name__ == "__main__":
    main()
