"""Diagnostics behind the built-in model's training recipe (README, "Status"); not part of the package.

    python experiments/builtin_diagnostics.py probe    # how well the shipped feature-layer patches encode colour/shape
    python experiments/builtin_diagnostics.py lookup   # look-up learning with oracle patch labels, by visibility phase

``probe`` fits a linear classifier on the object patches of the shipped vision tower (80/20 split).
``lookup`` trains a fresh built-in LLM on colour questions whose visual tokens are oracle embeddings of each
patch's (colour, shape) label plus a learned position, with the training recipe's own visibility phases
(``pair``: the question's object and one other; ``objects``: every object; ``all``: every token), and prints
accuracy with every token visible -- the question being whether look-up learned among few objects carries over.
"""
from __future__ import annotations

import argparse
import time

import torch

from robustvtc.data import synthetic as S
from robustvtc.models import load_model
from robustvtc.training import _collate, _visible_indices, new_builtin

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


def lookup(phases: list[tuple[str, int]], batch_size: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    adapter = new_builtin(seed)
    model = adapter.model
    model.train().requires_grad_(True)
    dim = model.config.text_config.hidden_size
    label_embedding = torch.nn.Embedding((len(S.COLOURS) + 1) * (len(S.SHAPES) + 1), dim)
    position = torch.nn.Parameter(torch.randn(adapter.num_visual_tokens, dim) * 0.5)
    params = [*model.model.language_model.parameters(), *model.lm_head.parameters(),
              *label_embedding.parameters(), position]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    answer_id = {a: adapter.continuation_ids("what color is the circle ?", a)[0] for a in S.COLOURS}
    gen = torch.Generator().manual_seed(seed)

    def loss_and_accuracy(batch, phase):
        tokens = label_embedding(batch["patch_colour"] * (len(S.SHAPES) + 1) + batch["patch_shape"]) + position
        if phase != "all":
            idx = _visible_indices(batch, phase, gen)
            tokens = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, dim))
        hidden, _ = adapter.hidden_states(tokens, batch["questions"])
        logits = adapter.logits_at(hidden, torch.full((hidden.shape[0], 1), hidden.shape[1] - 1))[:, 0]
        target = torch.tensor([answer_id[a] for a in batch["answers"]])
        return ce(logits, target), (logits.argmax(-1) == target).float().mean().item()

    val = _collate([S.generate_sample(i, "val", qtype="color") for i in range(200)])
    step, t0 = 0, time.time()
    for phase, steps in phases:
        for _ in range(steps):
            batch = _collate([S.generate_sample(step * batch_size + j, "train", seed=7, qtype="color")
                              for j in range(batch_size)])
            loss, _ = loss_and_accuracy(batch, phase)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 50 == 0:
                with torch.no_grad():
                    _, acc = loss_and_accuracy(val, "all")
                print(f"step {step:4d} ({phase:7s}) train loss {loss.item():.3f}  val accuracy, every token visible: "
                      f"{acc:.3f}  {time.time() - t0:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--samples", type=int, default=1500)
    p = sub.add_parser("lookup")
    p.add_argument("--phases", default="pair:300,objects:150", help="phase:steps,... (pair, objects, all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "probe":
        probe(args.samples)
    else:
        phases = [(name, int(n)) for name, n in (item.split(":") for item in args.phases.split(","))]
        lookup(phases, args.batch_size, args.lr, args.seed)


if __name__ == "__main__":
    main()
