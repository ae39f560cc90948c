"""Diagnostics and exploratory runs behind the built-in model's training recipe (README, "Status"); not part
of the package. One torch thread each.

    python experiments/builtin_diagnostics.py probe    # how well the shipped feature-layer patches encode colour/shape
    python experiments/builtin_diagnostics.py lookup   # look-up learning with oracle patch labels, by visibility phase
    python experiments/builtin_diagnostics.py vision --steps 1000 --lr 3e-3 --cell --shape-weight 2 --save tower.pt
    python experiments/builtin_diagnostics.py llava --tower tower.pt --only color --phases pair:600 --align 1
    python experiments/builtin_diagnostics.py oracle --phases pair:600,objects:300,full:300

``probe`` fits a linear classifier on the object patches of the shipped vision tower (80/20 split).
``lookup`` trains a fresh built-in LLM on colour questions whose visual tokens are oracle embeddings of each
patch's (colour, shape) label plus a learned position, with the training recipe's own visibility phases
(``pair``: the question's object and one other; ``objects``: every object; ``all``: every token), and prints
accuracy with every token visible -- the question being whether look-up learned among few objects carries over.
``vision`` trains stage 1 alone and prints the shape/colour accuracy of its per-patch heads on the object
patches of 256 validation scenes. ``llava`` trains stage 2 (projector + LLM) on a saved tower and prints
validation accuracy per question type twice: with the pair curriculum's visibility and with every token.
``oracle`` does the same for every question type with oracle label embeddings, i.e. with a perfect tower.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from robustvtc.data import synthetic as S
from robustvtc.models import load_model
from robustvtc.training import (TrainConfig, _alignment_loss, _answer_loss, _collate, _keep_indices, _optimizer, _step,
                                _Stream, _vision_heads, _vision_losses, _visible_indices, new_builtin)

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
    loader = torch.utils.data.DataLoader(_Stream(cfg, 0, args.steps), batch_size=None, num_workers=1, prefetch_factor=4)
    t0 = time.time()
    for step, batch in enumerate(loader):
        parts, _ = _vision_losses(adapter, heads, batch, args.shape_weight, cell=args.cell)
        _step(sum(parts.values()), params, opt, sched)
        if (step + 1) % 100 == 0:
            tower.eval()
            with torch.no_grad():
                _, feats = _vision_losses(adapter, heads, val, args.shape_weight, cell=args.cell)
                on = val["patch_shape"] > 0
                shape = (heads["patch_shape"](feats).argmax(-1)[on] == val["patch_shape"][on]).float().mean().item()
                colour = (heads["patch_colour"](feats).argmax(-1)[on] == val["patch_colour"][on]).float().mean().item()
            tower.train()
            print(f"step {step + 1}  val object patches: shape {shape:.3f}  colour {colour:.3f}  {time.time() - t0:.0f}s",
                  flush=True)
    if args.save:
        torch.save(tower.state_dict(), args.save)


def llava(args, oracle: bool = False) -> None:
    """Stage 2 on a saved tower (or, with ``oracle``, on oracle label embeddings), phases as in the recipe."""
    phases = [(name, int(n)) for name, n in (item.split(":") for item in args.phases.split(","))]
    steps = sum(n for _, n in phases)
    cfg = TrainConfig(vision_steps=0, steps=steps, lr=args.lr)
    torch.manual_seed(0)
    adapter = new_builtin(0)
    model = adapter.model
    if oracle:
        model.train().requires_grad_(True)
        params = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
        label_embedding = torch.nn.Parameter(torch.randn(42, 128))
        position = torch.nn.Parameter(torch.randn(144, 128) * 0.5)
        params += [label_embedding, position]
    else:
        model.model.vision_tower.load_state_dict(torch.load(args.tower))
        model.train().requires_grad_(True)
        model.model.vision_tower.eval().requires_grad_(False)
        params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    gen = torch.Generator().manual_seed(0)
    opt, sched = _optimizer(params, steps, args.lr, cfg)
    answer_id = {a: adapter.continuation_ids("what color is the circle ?", a)[0] for a in S.ANSWERS}

    def tokens(batch):
        if oracle:
            return label_embedding[batch["patch_colour"] * 6 + batch["patch_shape"]] + position
        with torch.no_grad():
            return adapter.encode(batch["pixels"], validate=False).features

    val_samples = S.generate_dataset(250, "val")
    val = _collate(val_samples)
    val_tokens = None if oracle else tokens(val)
    chunk = 250 if oracle else 50  # as in the runs the README quotes (the chunk sets the pair padding)

    def evaluate(visibility: str) -> str:
        model.eval()
        correct = collections.defaultdict(list)
        with torch.no_grad():
            for i in range(0, 250, chunk):
                part = {k: (v[i:i + chunk] if torch.is_tensor(v) else v) for k, v in val.items()}
                x = tokens(part) if oracle else val_tokens[i:i + chunk]
                if visibility != "all":
                    idx = _visible_indices(part, visibility, torch.Generator().manual_seed(1))
                    x = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                visual = x if oracle else adapter.project(x)
                scores = adapter.candidate_logprobs(visual, val["questions"][i:i + chunk], S.ANSWERS)
                for p, s in zip(scores.argmax(-1).tolist(), val_samples[i:i + chunk]):
                    correct[s.qtype].append(S.ANSWERS[p] == s.answer)
        model.train()
        if not oracle:
            model.model.vision_tower.eval()
        total = sum(sum(v) for v in correct.values()) / 250
        return f"{visibility} {total:.3f} [" + " ".join(f"{k[:3]} {sum(v) / len(v):.2f}" for k, v in correct.items()) + "]"

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for step in range(steps):
                yield _collate([S.generate_sample(step * 32 + j, "train", 0, qtype=args.only) for j in range(32)])

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None, num_workers=1, prefetch_factor=4)
    schedule = [name for name, n in phases for _ in range(n)]
    t0, losses = time.time(), []
    for step, batch in enumerate(loader):
        phase = schedule[step]
        x = tokens(batch)
        if phase in ("pair", "objects"):
            idx = _visible_indices(batch, phase, gen)
        elif phase == "full" and torch.rand((), generator=gen).item() < 0.5:
            idx = _keep_indices(batch["object_mask"], int(torch.randint(16, 145, (), generator=gen)), gen)
        else:
            idx = None
        if idx is not None:
            x = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        visual = x if oracle else adapter.project(x)
        loss = _answer_loss(adapter, visual, batch["questions"], batch["answers"], answer_id)
        if args.align:
            loss = loss + args.align * _alignment_loss(visual, batch, idx, model.get_input_embeddings().weight, answer_id)
        _step(loss, params, opt, sched)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} {phase} loss {sum(losses[-100:]) / 100:.3f} | {evaluate('pair')} | "
                  f"{evaluate('all')} | {time.time() - t0:.0f}s", flush=True)


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
    p = sub.add_parser("vision")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cell", action="store_true", help="add the per-patch grid-cell objective")
    p.add_argument("--shape-weight", type=float, default=1.0)
    p.add_argument("--save", default=None, help="write the tower's state dict here")
    for name in ("llava", "oracle"):
        p = sub.add_parser(name)
        if name == "llava":
            p.add_argument("--tower", required=True, help="a state dict written by `vision --save`")
            p.add_argument("--align", type=float, default=0.0, help="weight of the feature-alignment loss")
        p.add_argument("--phases", default="pair:500,objects:250,full:500", help="phase:steps,... (pair, objects, full)")
        p.add_argument("--only", default=None, choices=S.QUESTION_TYPES, help="train on one question type")
        p.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "probe":
        probe(args.samples)
    elif args.command == "lookup":
        phases = [(name, int(n)) for name, n in (item.split(":") for item in args.phases.split(","))]
        lookup(phases, args.batch_size, args.lr, args.seed)
    elif args.command == "vision":
        vision(args)
    else:
        args.align = getattr(args, "align", 0.0)
        llava(args, oracle=args.command == "oracle")


if __name__ == "__main__":
    main()
