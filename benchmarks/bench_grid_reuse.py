"""The grid against its physical limit: evaluating 3 compressors x 3 budgets on one batch vs one encoder pass plus
one LLM pass per cell, each measured alone.

Per round (cases back to back, order alternating), on the same batch:

* grid -- ``evaluate_grid`` on the 9 targets as the runner calls it (one shared encoder pass, kept maps);
* one target -- the same on one target;
* the limit's parts -- the encoder pass alone, and each cell's LLM pass alone (compression + projection done
  beforehand: the decoder scoring the answers, nothing else).

The table gives per-round ratios, median and inter-quartile range: grid / limit (1.00 = nothing is paid
beyond what the grid cannot avoid), grid / one target, and how the limit splits between encoder and LLM. On the
built-in model the encoder dominates; on a real model the LLM passes do, so grid / one tends to 9 there and only
grid / limit says whether anything is wasted.

    python benchmarks/bench_grid_reuse.py                                    # built-in model, CPU
    python benchmarks/bench_grid_reuse.py --arch real-size --device cuda --batch 8 --rounds 21   # lent GPU
    python benchmarks/bench_grid_reuse.py --campaign                         # also one chunk's campaign units
"""
from __future__ import annotations

import argparse

import torch

from _bench import fmt, load, paired, ratio, real_size_llava
from robustvtc.campaign.grid import evaluate_grid, make_target

COMPRESSORS = ("fastervlm", "visionzip", "pooling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("builtin", "real-size"), default="builtin",
                        help="real-size: LLaVA-1.5-7B's CLIP-L/336 tower + a slice of 7B decoder layers (GPU)")
    parser.add_argument("--llm-layers", type=int, default=4, help="real-size: decoder layers in the slice")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="real-size only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--campaign", action="store_true", help="also time one chunk's campaign units (built-in)")
    parser.add_argument("--steps", type=int, default=10, help="attack steps of the campaign level")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "builtin":
        from robustvtc.data import synthetic as S
        from robustvtc.models import load_model

        adapter = load_model("builtin", device=args.device)
        chunk = S.generate_dataset(args.batch, "test")
        pixels = S.to_pixels(chunk).to(adapter.device)
        questions, answers = [s.question for s in chunk], list(S.ANSWERS)
        budgets = (16, 32, 48)
    else:
        adapter = real_size_llava(args.device, args.dtype, args.llm_layers)
        pixels = torch.rand(args.batch, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(args.device)
        questions, answers = ["what color is the circle ?"] * args.batch, ["red", "blue", "green", "yes", "no"]
        budgets = (64, 128, 192)  # of LLaVA-1.5's 576 tokens

    def predict(target, px, tokens):
        return target.predict(px, questions, answers, tokens=tokens)
    grid = [make_target(adapter, c, b) for c in COMPRESSORS for b in budgets]
    layers = sorted({layer for t in grid for layer in t.signal_layers})
    with torch.no_grad():
        tokens = adapter.encode(pixels, layers)
        forwards = [t.forward(pixels, tokens) for t in grid]

    def llm_pass(fwd):
        def run():
            with torch.no_grad():
                adapter.candidate_logprobs(fwd.embeds, questions, answers, in_llm=fwd.in_llm)
        return run
    cases = {"grid": lambda: evaluate_grid(grid, pixels, predict, keep_maps=True),
             "one target": lambda: evaluate_grid(grid[:1], pixels, predict, keep_maps=True),
             "encoder": lambda: torch.no_grad()(adapter.encode)(pixels, layers),
             **{f"llm {i}": llm_pass(f) for i, f in enumerate(forwards)}}
    t = paired(cases, args.rounds)
    llm = [sum(t[f"llm {i}"][r] for i in range(len(grid))) for r in range(args.rounds)]
    limit = [e + m for e, m in zip(t["encoder"], llm)]
    med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
    print(f"model {adapter.name}, {adapter.num_visual_tokens} tokens, {len(grid)} cells "
          f"({', '.join(COMPRESSORS)} x {budgets}), batch {args.batch}, {args.device}, threads "
          f"{torch.get_num_threads()}, {args.rounds} paired rounds, {load()}")
    print(f"  medians: grid {med['grid'] * 1e3:.1f} ms, one target {med['one target'] * 1e3:.1f} ms, encoder "
          f"{med['encoder'] * 1e3:.1f} ms, LLM pass per cell {sum(med[f'llm {i}'] for i in range(len(grid))) / len(grid) * 1e3:.1f} ms")
    print(f"grid / limit (1 encoder pass + {len(grid)} LLM passes)  {fmt(ratio(t['grid'], limit))}")
    print(f"grid / one target                          {fmt(ratio(t['grid'], t['one target']))}")
    print(f"limit / one target                         {fmt(ratio(limit, t['one target']))}")
    print(f"encoder share of the limit                 {fmt(ratio(t['encoder'], limit))}")
    if args.campaign:
        campaign_level(adapter, args)


def campaign_level(adapter, args) -> None:
    """One chunk's units (set-up, clean evaluation, the CAGE batch crafted once and evaluated on the grid) with
    3 x 3 cells vs with one cell: the attack, the expensive part, is paid once."""
    from robustvtc.campaign import Campaign, parse_scenario

    def unit(compressors, budgets):
        spec = parse_scenario({"compressors": list(compressors), "budgets": list(budgets), "samples": args.batch,
                               "batch_size": args.batch, "steps": args.steps, "attacks": ["cage"]})

        def run():  # a fresh campaign each time: nothing cached from the previous round
            campaign = Campaign(spec, adapter)
            return [list(campaign.run_unit(u)) for u in campaign.units()]
        return run
    t = paired({"one cell": unit(["fastervlm"], [16]), "3 x 3 grid": unit(COMPRESSORS, [16, 32, 48])},
               max(3, args.rounds // 2))
    print(f"campaign chunk (clean + cage, {args.steps} steps, + the full-token model), 3 x 3 grid / one cell  "
          f"{fmt(ratio(t['3 x 3 grid'], t['one cell']))}")


if __name__ == "__main__":
    main()
