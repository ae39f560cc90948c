"""Retrain the built-in model from scratch with the committed recipe (``make train-builtin``).

    python -m tools.train_builtin                       # -> runs/builtin-<UTC time>/, about 15 min on 2 cores
    python -m tools.train_builtin --out DIR             # a new or empty folder
    python -m tools.train_builtin --out robustvtc/models/builtin --replace-shipped   # replace the shipped weights
    python -m tools.train_builtin --out /tmp/b --vision-steps 2 --steps 3 --batch-size 4 --eval-samples 10  # smoke
    python -m tools.train_builtin --model builtin-deit  # the DeiT-tiny model (tools/builtin_deit_recipe.py), ~920 CPU-s
    python -m tools.train_builtin --model builtin-deit --out robustvtc/models/builtin_deit --replace-shipped

It writes to a new folder unless told otherwise: a folder that already holds files is refused, and the
package's own weights are replaced only with ``--replace-shipped``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from robustvtc.models.builtin import BUILTIN_DIR

SHIPPED = {"builtin": BUILTIN_DIR, "builtin-deit": BUILTIN_DIR.parent / "builtin_deit"}

from .builtin_recipe import TrainConfig, train_builtin


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= 0")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.train_builtin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHIPPED), default="builtin",
                        help="which built-in model: builtin (CLIP tower trained from scratch) or builtin-deit "
                             "(pretrained DeiT-tiny tower, frozen)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<model>-<UTC time>)")
    parser.add_argument("--replace-shipped", action="store_true",
                        help="allow --out to be the package's shipped built-in model folder")
    parser.add_argument("--vision-steps", type=_positive, help="override stage 1 (vision tower) steps")
    parser.add_argument("--steps", type=_positive, help="override stage 2 (projector + LLM) steps")
    parser.add_argument("--batch-size", type=_positive, help="images per stage-1 step and scenes per stage-2 step")
    parser.add_argument("--eval-samples", type=_positive, help="validation samples per evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=_positive, help="torch CPU threads (default: the recipe's 1)")
    args = parser.parse_args(argv)

    out = args.out or Path("runs") / f"{args.model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    shipped = out.resolve() in {p.resolve() for p in SHIPPED.values()}
    if shipped and not args.replace_shipped:
        parser.error(f"{out} holds the shipped built-in weights; add --replace-shipped to overwrite them")
    if not shipped and out.exists() and any(out.iterdir()):
        parser.error(f"{out} already holds files; accepted: a new or empty folder")
    if args.model == "builtin-deit":
        from .builtin_deit_recipe import DeiTTrainConfig

        deit = DeiTTrainConfig()
        cfg = replace(deit.stage2, seed=args.seed)
    else:
        cfg = TrainConfig(seed=args.seed)
    if args.steps:
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    if args.vision_steps is not None:
        cfg = replace(cfg, vision_steps=args.vision_steps)
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size, scenes=args.batch_size)
    if args.eval_samples:
        cfg = replace(cfg, eval_samples=args.eval_samples)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.model == "builtin-deit":
        from .builtin_deit_recipe import train_builtin_deit

        final = args.eval_samples or deit.final_eval_samples
        report = train_builtin_deit(out, replace(deit, stage2=cfg, final_eval_samples=final), log=log)
        print(f"{out}: trained in {report['train_seconds']} s; val accuracy "
              f"{report['val_accuracy_fp32']['all']:.3f} (fp32), stored as {report['stored']}")
        return 0
    report = train_builtin(out, cfg, log=log)
    print(f"{out}: trained in {report['train_seconds']} s; final val accuracy "
          f"{report['history'][-1]['val_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
