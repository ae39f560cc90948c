"""Diagnostics and exploratory runs behind the built-in model's training recipe (docs/builtin-models.md); not part
of the package. One main torch thread each.

    python -m tools.experiments.builtin_diagnostics probe    # how well the feature-layer patches encode colour, shape
    python -m tools.experiments.builtin_diagnostics vision --steps 1400 --lr 3e-3 --cell --shape-weight 2 \
        --centre-weight 1 --save tower.pt              # the recipe's stage 1
    python -m tools.experiments.builtin_diagnostics llava --steps 800 --attend-weight 0   # stage 2 on the shipped tower
    python -m tools.experiments.builtin_diagnostics fastv    # FastV's accuracy by the decoder layer it ranks with
    python -m tools.experiments.builtin_diagnostics attention  # where the supervised heads look, by question type
    python -m tools.experiments.builtin_diagnostics count      # which counts the shipped model confuses

``probe`` fits a linear classifier on the object patches of the shipped vision tower (80/20 split).
``vision`` trains stage 1 alone and prints the shape/colour accuracy of its per-patch heads on the object
patches of 256 validation scenes (with ``--centre-weight``, also the recall and precision of its object-centre
head on the centre patches). ``llava`` runs the recipe's stage 2 (``tools/builtin_recipe.py``) with a fresh
projector and LLM on a frozen tower (the shipped model's, or one saved by ``vision --save``) and prints
validation accuracy per question type, with every token visible, every ``--eval-every`` steps.
``attention`` prints, per question type on the first 250 validation samples, the accuracy and the attention
mass that heads 0 and 1 of decoder layer 2 put on the question's first and last object (for counts, head 0 on
every object of the colour and head 1 on their centre patches plus the first token; the first token when there
is none) at the answer-predicting position.
``count`` prints the confusion matrix (rows: true count) of the first 200 validation count questions.
``fastv`` evaluates FastV (rule K: rank by layer K-1's last-token attention, prune before layer K) on the shipped
model for K = 1, 2, 3 at budgets 16 and 48, on the first 100 test samples.
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from robustvtc.data import synthetic as S
from robustvtc.models import load_model
from tools.builtin_recipe import (TrainConfig, _centre_patch, _collate, _loader, _optimizer, _step, _train_llava,
                                _vision_batch, _vision_heads, _vision_losses, new_builtin)

ce = torch.nn.functional.cross_entropy


def probe(samples: int) -> None:
    adapter = load_model("builtin")
    feats, colour, shape = [], [], []
    for start in range(0, samples, 100):
        batch = _collate(S.generate_dataset(100, "train", seed=5, start=start))
        with torch.no_grad():
            f = adapter.encode(batch["pixels"]).features
        on_object = batch["patch_shape"] > 0
        feats.append(f[on_object]), colour.append(batch["patch_colour"][on_object] - 1)
        shape.append(batch["patch_shape"][on_object] - 1)
    x = torch.cat(feats)
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    cut = int(len(x) * 0.8)
    for name, y in (("colour", torch.cat(colour)), ("shape", torch.cat(shape))):
        head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        opt = torch.optim.Adam(head.parameters(), lr=0.02)
        for _ in range(300):
            opt.zero_grad()
            ce(head(x[:cut]), y[:cut]).backward()
            opt.step()
        acc = (head(x[cut:]).argmax(-1) == y[cut:]).float().mean().item()
        print(f"{name}: held-out linear-probe accuracy {acc:.3f} on {len(x) - cut} object patches")


def vision(args) -> None:
    cfg = TrainConfig(vision_steps=args.steps, steps=0)
    torch.manual_seed(0)
    adapter = new_builtin(0)
    adapter.model.train().requires_grad_(True)
    tower = adapter.model.model.vision_tower
    heads = _vision_heads(adapter.model.config.vision_config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt, sched = _optimizer(params, args.steps, args.lr, cfg)
    val = _collate(S.generate_dataset(256, "val"))
    loader = _loader(partial(_vision_batch, cfg), 0, args.steps, workers=1)
    t0 = time.time()
    for step, batch in enumerate(loader):
        parts, _ = _vision_losses(adapter, heads, batch, args.shape_weight, args.cell, args.centre_weight)
        _step(sum(parts.values()), params, opt, sched)
        if (step + 1) % 100 == 0:
            tower.eval()
            with torch.no_grad():
                _, feats = _vision_losses(adapter, heads, val, args.shape_weight, args.cell, args.centre_weight)
                on = val["patch_shape"] > 0
                shape = (heads["patch_shape"](feats).argmax(-1)[on] == val["patch_shape"][on]).float().mean().item()
                colour = (heads["patch_colour"](feats).argmax(-1)[on] == val["patch_colour"][on]).float().mean().item()
                centre, found = val["centre_mask"], heads["patch_centre"](feats).squeeze(-1) > 0
                recall, precision = found[centre].float().mean().item(), centre[found].float().mean().item()
            tower.train()
            print(f"step {step + 1}  val object patches: shape {shape:.3f}  colour {colour:.3f}  centre patches: "
                  f"recall {recall:.3f}  precision {precision:.3f}  {time.time() - t0:.0f}s", flush=True)
    if args.save:
        torch.save(tower.state_dict(), args.save)


def llava(args) -> None:
    """Stage 2 of the recipe on a frozen tower; only the flags given differ from the shipped recipe."""
    cfg = TrainConfig(vision_steps=0, steps=args.steps, lr=args.lr, attend_weight=args.attend_weight,
                      align_weight=args.align, place_weight=args.place_weight, readout_weight=args.readout,
                      count_centres=args.count_centres,
                      pair_fraction=args.pair_fraction, objects_fraction=args.objects_fraction,
                      eval_every=args.eval_every)
    torch.manual_seed(0)
    adapter = new_builtin(0)
    tower = torch.load(args.tower) if args.tower else load_model("builtin").model.model.vision_tower.state_dict()
    adapter.model.model.vision_tower.load_state_dict(tower)
    adapter.model.train().requires_grad_(True)
    _train_llava(adapter, cfg, lambda line: print(line, flush=True), time.time())


def fastv(samples: int) -> None:
    from robustvtc.compression.fastv import FastV
    from robustvtc.target import Target

    adapter = load_model("builtin")
    test = S.generate_dataset(samples, "test")
    for layer in (1, 2, 3):
        for budget in (16, 48):
            target, correct = Target(adapter, FastV(layer=layer), budget), 0
            for i in range(0, samples, 50):
                chunk = test[i:i + 50]
                predictions = target.predict(S.to_pixels(chunk), [s.question for s in chunk], S.ANSWERS)
                correct += sum(p == s.answer for p, s in zip(predictions, chunk))
            print(f"FastV K={layer} budget {budget}: {100 * correct / samples:.1f} %")


def attention(samples: int, model: str) -> None:
    adapter = load_model(model, attn_implementation="eager")  # SDPA returns no attention weights
    captured = {}
    adapter.model.model.language_model.layers[2].self_attn.register_forward_hook(
        lambda module, args, out: captured.update(weights=out[1]))
    prefix = len(adapter._prompt_ids("")[0])
    rows: dict[str, list[list[float]]] = {}
    for s in S.generate_dataset(samples, "val"):
        with torch.no_grad():
            scores = adapter.candidate_logprobs(adapter.project(adapter.encode(S.to_pixels([s])).features), [s.question],
                                                S.ANSWERS)
        last = prefix + 144 + len(adapter._prompt_ids(s.question)[1]) - 1
        weights = captured["weights"][0, :2, last]  # (head, key)
        cover = torch.from_numpy(s.patch_coverage().reshape(len(s.objects), -1) > 0.02).float()
        if not s.referents:
            mass = weights[:, 0]
        elif s.qtype == "count":  # head 1 is trained to split its attention over the sink and the centres
            centres = torch.zeros(144)
            centres[[_centre_patch(s.objects[i]) for i in s.referents]] = 1.0
            mass = torch.stack([weights[0, prefix:prefix + 144] @ cover[list(s.referents)].amax(0),
                                weights[1, prefix:prefix + 144] @ centres + weights[1, 0]])
        else:
            mass = torch.stack([weights[0, prefix:prefix + 144] @ cover[s.referents[0]],
                                weights[1, prefix:prefix + 144] @ cover[s.referents[-1]]])
        correct = float(S.ANSWERS[int(scores.argmax())] == s.answer)
        rows.setdefault(s.qtype, []).append([correct, *mass.tolist()])
    for qtype, values in rows.items():
        acc, head0, head1 = torch.tensor(values).mean(0).tolist()
        print(f"{qtype:9s} n={len(values):3d}  accuracy {acc:.2f}  head 0 on first object {head0:.2f}  "
              f"head 1 on last object {head1:.2f}")


@torch.no_grad()
def count_confusion(adapter, samples: int) -> torch.Tensor:
    """(true count, answered count) over the first ``samples`` validation count questions, every token visible."""
    questions = [S.generate_sample(i, "val", qtype="count") for i in range(samples)]
    confusion = torch.zeros(len(S.NUMBERS), len(S.NUMBERS), dtype=torch.long)
    for i in range(0, samples, 50):
        chunk = questions[i:i + 50]
        scores = adapter.candidate_logprobs(adapter.project(adapter.encode(S.to_pixels(chunk)).features),
                                            [s.question for s in chunk], list(S.NUMBERS))
        for predicted, s in zip(scores.argmax(-1).tolist(), chunk):
            confusion[S.NUMBERS.index(s.answer), predicted] += 1
    return confusion


def print_confusion(confusion: torch.Tensor) -> None:
    total = int(confusion.sum())
    print(f"count questions ({total}): accuracy {confusion.diag().sum().item() / total:.3f}")
    print("true \\ answered  " + "  ".join(f"{n:>5s}" for n in S.NUMBERS))
    for n, row in zip(S.NUMBERS, confusion.tolist()):
        print(f"{n:>16s}  " + "  ".join(f"{v:5d}" for v in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--samples", type=int, default=1500)
    p = sub.add_parser("vision")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cell", action="store_true", help="add the per-patch grid-cell objective")
    p.add_argument("--shape-weight", type=float, default=1.0)
    p.add_argument("--centre-weight", type=float, default=0.0, help="weight of the per-patch object-centre objective")
    p.add_argument("--save", default=None, help="write the tower's state dict here")
    p = sub.add_parser("attention")
    p.add_argument("--samples", type=int, default=250)
    p.add_argument("--model", default="builtin", help="the shipped weights or a saved model directory")
    p = sub.add_parser("count")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--model", default="builtin", help="the shipped weights or a saved model directory")
    p = sub.add_parser("fastv")
    p.add_argument("--samples", type=int, default=100)
    p = sub.add_parser("llava")
    p.add_argument("--tower", default=None, help="a state dict written by `vision --save` (default: the shipped tower)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--attend-weight", type=float, default=TrainConfig.attend_weight)
    p.add_argument("--align", type=float, default=TrainConfig.align_weight, help="weight of the feature alignment")
    p.add_argument("--place-weight", type=float, default=TrainConfig.place_weight,
                   help="weight of the object tokens' grid row and column words in the alignment")
    p.add_argument("--readout", type=float, default=TrainConfig.readout_weight)
    p.add_argument("--no-count-centres", dest="count_centres", action="store_false",
                   help="head 1 of a count question looks at every patch of the colour, as head 0 does")
    p.add_argument("--pair-fraction", type=float, default=TrainConfig.pair_fraction)
    p.add_argument("--objects-fraction", type=float, default=TrainConfig.objects_fraction)
    p.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "probe":
        probe(args.samples)
    elif args.command == "vision":
        vision(args)
    elif args.command == "attention":
        attention(args.samples, args.model)
    elif args.command == "count":
        print_confusion(count_confusion(load_model(args.model), args.samples))
    elif args.command == "fastv":
        fastv(args.samples)
    else:
        llava(args)


if __name__ == "__main__":
    main()
