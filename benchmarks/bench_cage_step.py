"""Cost of one attack step: CAGE vs a full-token (VEAttack-style) step, and the encoder stopped at the feature
layer vs run to its end (what it did before it stopped there), on the same encoder and batch.

A step = encoder forward + objective + backward to the pixels + projection. CAGE adds the CLS-attention row of
one layer (recomputed from the hooked queries/keys, so attention stays SDPA), a rank and two softmaxes; the
target is cage / fulltoken <= 1.15. Every round times the four steps back to back (order alternating); the
table gives the median and inter-quartile range of the per-round ratios.

    python benchmarks/bench_cage_step.py                                  # built-in model, CPU
    python benchmarks/bench_cage_step.py --arch clip-l336 --batch 1 --rounds 9      # LLaVA-1.5's tower, CPU
    python benchmarks/bench_cage_step.py --arch clip-l336 --device cuda --batch 16 --rounds 41   # lent GPU
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from _bench import fmt, load, paired, ratio, real_size_llava
from robustvtc.attacks import CAGE, FullToken


def build_adapter(arch: str, device: str, dtype: str):
    if arch == "builtin":
        from robustvtc.models import load_model

        return load_model("builtin", device=device)
    # LLaVA-1.5's vision tower (CLIP ViT-L/14-336, 576 patches) from its config, random weights; the decoder is
    # not run by an encoder attack, so a one-layer slice keeps memory down
    return real_size_llava(device, dtype, llm_layers=1)


@contextmanager
def whole_tower(adapter):
    """The encoder run to its last layer, every hidden state kept (how it ran before it stopped at the feature
    layer); the features read are the same."""
    reader = adapter.reader

    def features(pixel_values, feature_layer, signal_layers=()):
        hidden, captured = reader.run(pixel_values, signal_layers)
        return hidden[reader.layer_index(feature_layer) + 1], captured
    reader.features = features
    try:
        yield
    finally:
        del reader.features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("builtin", "clip-l336"), default="builtin")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=21, help="paired rounds (after one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="clip-l336 only (bfloat16 on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = build_adapter(args.arch, args.device, args.dtype)
    gen = torch.Generator().manual_seed(0)
    size = adapter.image_size
    clean = torch.rand(args.batch, 3, size, size, generator=gen).to(args.device)
    delta = ((torch.rand(clean.shape, generator=gen) * 2 - 1) * 8 / 255).to(args.device)
    attacks = {"fulltoken": FullToken(adapter), "cage": CAGE(adapter)}
    with torch.no_grad():
        states = {k: a.prepare(clean, None, None, None) for k, a in attacks.items()}

    def step(name, whole=False):
        attack = attacks[name]

        def run():
            with (whole_tower(adapter) if whole else _nothing()):
                grad, _ = attack.gradient(clean, delta, states[name])
                attack._step(clean, delta, grad)
        return run
    cases = {"fulltoken": step("fulltoken"), "cage": step("cage"),
             "fulltoken, whole tower": step("fulltoken", True), "cage, whole tower": step("cage", True)}
    t = paired(cases, args.rounds)
    print(f"model {adapter.name} ({adapter.num_visual_tokens} tokens, feature layer {adapter.feature_layer + 1} of "
          f"{adapter.num_vision_layers}), batch {args.batch}, {args.device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} paired rounds, {load()}")
    for name, v in t.items():
        print(f"  {name:24s} median step {sorted(v)[len(v) // 2] * 1000:9.1f} ms")
    print(f"cage / fulltoken                          {fmt(ratio(t['cage'], t['fulltoken']))}  (target <= 1.15)")
    print(f"cage / fulltoken, whole tower             {fmt(ratio(t['cage, whole tower'], t['fulltoken, whole tower']))}")
    print(f"stop at feature layer / whole, fulltoken  {fmt(ratio(t['fulltoken'], t['fulltoken, whole tower']))}")
    print(f"stop at feature layer / whole, cage       {fmt(ratio(t['cage'], t['cage, whole tower']))}")


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    main()
