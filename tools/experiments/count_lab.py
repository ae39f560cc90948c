"""Why the built-in model confused two with three, and what fixed it: stage 2 of the recipe on a given tower,
with the count objectives switched off one at a time, then validation accuracy per type and the count
confusion matrix. Not part of the package; it patches a private piece of ``tools/builtin_recipe.py`` for one run.
One main torch thread.

    python experiments/count_lab.py --steps 700                                       # the recipe's stage 2
    python experiments/count_lab.py --steps 700 --no-count-centres --no-count-readout

The default tower is the shipped one, which ``builtin_diagnostics.py vision --steps 1400 --lr 3e-3 --cell
--shape-weight 2 --centre-weight 1 --save tower.pt`` reproduces bit for bit (``--tower tower.pt``).

Options (the recipe otherwise):
* ``--no-count-centres``: head 1 of a count question looks at every patch of the colour, as head 0 does,
  instead of splitting its attention evenly over the sink and the counted objects' centre patches;
* ``--no-count-readout``: the readout is not asked for the count.

It prints validation accuracy per type on 500 samples (every token visible) and the confusion matrix
(rows: true count) of the first 200 validation count questions.
"""
from __future__ import annotations

import argparse
import time

import torch

import tools.builtin_recipe as T
from robustvtc.models import load_model

from tools.experiments.builtin_diagnostics import count_confusion, print_confusion


def drop_count_readout() -> None:
    base = T._referent_labels

    def labels(scenes, most):
        places, kinds = base(scenes, most)
        kinds[..., -1] = -100  # the count is the last label column
        return places, kinds
    T._referent_labels = labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", default=None, help="a state dict written by `builtin_diagnostics.py vision "
                                                      "--save` (default: the shipped tower)")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--no-count-centres", dest="count_centres", action="store_false")
    parser.add_argument("--no-count-readout", dest="count_readout", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.count_readout:
        drop_count_readout()
    cfg = T.TrainConfig(vision_steps=0, steps=args.steps, eval_every=args.steps, count_centres=args.count_centres)
    torch.manual_seed(0)
    adapter = T.new_builtin(0)
    tower = torch.load(args.tower) if args.tower else load_model("builtin").model.model.vision_tower.state_dict()
    adapter.model.model.vision_tower.load_state_dict(tower)
    adapter.model.train().requires_grad_(True)
    T._train_llava(adapter, cfg, lambda line: print(line, flush=True) if int(line.split()[1]) % 100 == 0 else None,
                   time.time())
    adapter.model.eval()
    by_type = T.quick_accuracy(adapter, 500)
    print("validation accuracy (500 samples): " + "  ".join(f"{k} {v:.3f}" for k, v in by_type.items()))
    print_confusion(count_confusion(adapter, 200))


if __name__ == "__main__":
    main()
