"""Full-token vs compression-aligned (CAGE) attacks on a ViT classifier that prunes or merges tokens inside its
encoder (robustvtc.classifier): top-1 agreement with the clean full-token prediction at kept budgets 8/16/32/64
of 196, per reduction method (EViT, ToMe, random), with 95 % Clopper-Pearson intervals and the paired
fulltoken - cage gap (Newcombe interval, exact McNemar p).

    python benchmarks/vit_classifier_attacks.py --model ../shared/models/deit-tiny-patch16-224 --images 100

Images: the synthetic task's test scenes rendered at 96 px and resized to 224 (no labels, so agreement only;
pass an ImageNet-labelled folder through the Python API for accuracy). Both attacks are grey-box on the
encoder up to the first EViT layer (index 3), one schedule (steps, alpha = eps/4, random start, seed 0).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustvtc.classifier import ViTClassifier, attack_table, paired_gaps  # noqa: E402
from robustvtc.data.synthetic import generate_dataset, to_pixels  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/deit-tiny-patch16-224"))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", default="4/255")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budgets", default="8,16,32,64")
    parser.add_argument("--methods", default="evit,tome,random")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    clf = ViTClassifier.from_pretrained(args.model)
    px = to_pixels(generate_dataset(args.images, "test"))
    px = torch.nn.functional.interpolate(px, size=clf.image_size, mode="bilinear", align_corners=False).clamp(0, 1)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = attack_table(clf, px, methods=args.methods.split(","), budgets=budgets, eps=args.eps, steps=args.steps)
    gaps = {(g["method"], g["budget"]): g for g in paired_gaps(rows)}
    by = {(r["attack"], r["method"], r["budget"]): r for r in rows}

    def cell(attack, method, k):
        r = by[(attack, method, k)]
        lo, hi = r["agreement_ci"]
        return f"{100 * r['agreement']:.0f} ({100 * lo:.0f}-{100 * hi:.0f})"

    print(f"{clf.name}: {args.images} images, eps {args.eps}, {args.steps} steps; top-1 agreement (%) with the clean "
          "full-token prediction, 95 % CI; gap = fulltoken - cage agreement (positive: CAGE does more harm)\n")
    print("| method | budget | clean | fulltoken | cage | gap (95 % CI) | McNemar p |")
    print("|---|---|---|---|---|---|---|")
    cells = [("none", clf.num_visual_tokens)] + [(m, k) for m in args.methods.split(",") for k in budgets]
    for method, k in cells:
        g = gaps[(method, k)]
        print(f"| {method} | {k} | {cell('clean', method, k)} | {cell('fulltoken', method, k)} | "
              f"{cell('cage', method, k)} | {100 * g['gap']:+.0f} ({100 * g['gap_ci'][0]:+.0f} to "
              f"{100 * g['gap_ci'][1]:+.0f}) | {g['p']:.3f} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
