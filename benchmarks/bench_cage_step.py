"""Cost of one CAGE step relative to one full-token (VEAttack-style) step on the same encoder and batch.

A step = encoder forward + objective + backward to the pixels + projection. CAGE adds the CLS-attention
row of one layer (recomputed from the hooked queries/keys, so attention stays SDPA), a rank and two
softmaxes; the target is a ratio <= 1.15. Runs alternate between the two attacks and the medians are
compared, so drift of a shared machine hits both alike.

    python benchmarks/bench_cage_step.py                      # built-in model (trained weights if present)
    python benchmarks/bench_cage_step.py --arch clip-l336 --batch 1 --repeats 5   # LLaVA-1.5's encoder scale
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustvtc.attacks import CAGE, FullToken


def build_adapter(arch: str, device: str):
    if arch == "builtin":
        from robustvtc.models import load_model

        return load_model("builtin", device=device)
    # random-weight LLaVA-1.5 vision tower (CLIP ViT-L/14-336, 576 patches) with a tiny LM: the encoder is
    # all an encoder attack runs
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from robustvtc.models.builtin import CLIP_MEAN, CLIP_STD
    from robustvtc.models.llava import LlavaAdapter

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    text = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").to(device)
    return LlavaAdapter(model, None, image_mean=CLIP_MEAN, image_std=CLIP_STD, name="clip-l336-random")


def step_seconds(attack, clean: torch.Tensor, state, delta: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if clean.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    grad, _ = attack.gradient(clean, delta, state)
    attack._step(clean, delta, grad)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("builtin", "clip-l336"), default="builtin")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per attack (after warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = build_adapter(args.arch, args.device)
    gen = torch.Generator().manual_seed(0)
    size = adapter.image_size
    clean = torch.rand(args.batch, 3, size, size, generator=gen).to(args.device)
    delta = ((torch.rand(clean.shape, generator=gen) * 2 - 1) * 8 / 255).to(args.device)
    attacks = {"fulltoken": FullToken(adapter), "cage": CAGE(adapter)}
    with torch.no_grad():
        states = {k: a.prepare(clean, None, None, None) for k, a in attacks.items()}
    times: dict[str, list[float]] = {k: [] for k in attacks}
    for i in range(args.repeats + 2):  # two warm-up rounds
        for name, attack in (attacks.items() if i % 2 == 0 else reversed(attacks.items())):
            t = step_seconds(attack, clean, states[name], delta)
            if i >= 2:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {adapter.name} ({adapter.num_visual_tokens} tokens), batch {args.batch}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {args.repeats} timed steps each")
    for name, value in med.items():
        print(f"  {name:10s} median step {value * 1000:8.1f} ms")
    print(f"ratio cage / fulltoken = {med['cage'] / med['fulltoken']:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
