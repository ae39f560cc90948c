"""Train the example learned scorer on the built-in model's features; writes scorer.safetensors (seconds, CPU).

Targets: for each training image, the share of the answer's saliency each visual token carries --
|d(answer loss)/d(feature) . feature| summed over channels, with all tokens reaching the LLM, normalised to sum
to 1 per image. The scorer is fitted to them listwise (cross-entropy between that distribution and the
softmax of its scores, ListNet), so its top-K are the tokens the answer leans on.

    python examples/learned_scorer/train.py                      # -> examples/learned_scorer/scorer.safetensors
    python examples/learned_scorer/train.py --samples 1024 --epochs 60 -o my_scorer.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, so "examples.learned_scorer" imports

from examples.learned_scorer.scorer import ScorerNet  # noqa: E402
from robustvtc.data.synthetic import generate_dataset, to_pixels  # noqa: E402
from robustvtc.models import load_model  # noqa: E402
from robustvtc.target import Target  # noqa: E402


def saliency_targets(adapter, samples, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (S, N, D), target distributions (S, N)) over ``samples``."""
    target = Target(adapter)
    feats, dists = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        pixels = to_pixels(chunk)
        with torch.no_grad():
            tokens = adapter.encode(pixels)
        x = tokens.features.detach().clone().requires_grad_(True)
        fwd = target.forward(pixels, dataclasses.replace(tokens, features=x))
        loss = adapter.answer_loss(fwd.embeds, [s.question for s in chunk], [s.answer for s in chunk]).sum()
        (grad,) = torch.autograd.grad(loss, x)
        sal = (grad * x).sum(-1).abs().detach()
        feats.append(x.detach())
        dists.append(sal / sal.sum(-1, keepdim=True).clamp_min(1e-12))
    return torch.cat(feats), torch.cat(dists)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--samples", type=int, default=512, help="training images (synthetic train split)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=str(HERE / "scorer.safetensors"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    adapter = load_model(args.model)
    samples = generate_dataset(args.samples, split="train", seed=args.seed)
    feats, dists = saliency_targets(adapter, samples)
    net = ScorerNet(feats.shape[-1], args.hidden)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    n_val = max(1, len(feats) // 8)
    tr, va = slice(n_val, None), slice(0, n_val)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(feats) - n_val, generator=gen) + n_val
        for j in range(0, len(order), 64):
            idx = order[j:j + 64]
            loss = -(dists[idx] * net(feats[idx]).log_softmax(-1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        val = -(dists[va] * net(feats[va]).log_softmax(-1)).sum(-1).mean().item()
        entropy = -(dists[va] * dists[va].clamp_min(1e-12).log()).sum(-1).mean().item()
        k = feats.shape[1] // 4
        top = net(feats[va]).topk(k, dim=-1).indices
        mass = dists[va].gather(1, top).sum(-1).mean().item()
    net.save(args.output, model=args.model, samples=str(args.samples), epochs=str(args.epochs))
    print(f"wrote {args.output}: {feats.shape[-1]}-d features -> {args.hidden} -> 1; held-out cross-entropy "
          f"{val:.3f} (target entropy {entropy:.3f}); its top-{k} of {feats.shape[1]} tokens hold "
          f"{100 * mass:.1f}% of the answer saliency; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
