"""Cached vs uncached greedy generation on a tiny LLaVA with 576 image tokens (336 px, 14 px patches).

Uncached, every new token re-runs the whole prompt (the pre-cache path, ``generate(..., cache=False)``);
cached, the prompt runs once and each new token is decoded against the KV cache. Each round times both on
the same inputs back to back (paired), for 1, 10 and 32 new tokens (stop tokens disabled, so exactly that
many are generated); the table gives the median and the inter-quartile range of the per-round ratios
uncached / cached, and the median seconds of each.

    python benchmarks/bench_cached_generation.py                  # CPU, 7 rounds
    python benchmarks/bench_cached_generation.py --rounds 11 --llm-layers 8 --device cuda
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _bench import paired, ratio, tokenizer

def tiny_llava(llm_layers: int, width: int, device: str):
    """A random LLaVA (CLIP 336/14, 2 layers; Llama with ``llm_layers`` layers) with :func:`_bench.tokenizer`."""
    import transformers as T

    from robustvtc.models.llava import LlavaAdapter

    tok = tokenizer()
    vision = T.CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=2, hidden_size=64,
                                intermediate_size=128, num_attention_heads=4, projection_dim=64)
    text = T.LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, image_seq_length=576,
                        vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").to(device)
    return LlavaAdapter(model, tok, name="tiny LLaVA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 10, 32])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from robustvtc.target import Target

    adapter = tiny_llava(args.llm_layers, args.width, args.device)
    adapter.stop_ids = lambda: set()  # exactly n new tokens
    assert adapter.num_visual_tokens == 576
    pixels = torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    embeds = Target(adapter, "none").forward(pixels).embeds
    question = ["what color is the circle ?"]
    print(f"tiny LLaVA: 576 image tokens, Llama {args.llm_layers} x {args.width}, {args.device}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    print("| new tokens | uncached s (median) | cached s (median) | speed-up median | IQR |")
    print("|---|---|---|---|---|")
    for n in args.tokens:
        run = {c: (lambda c=c: adapter.generate_ids(embeds, question, n, cache=c)) for c in (False, True)}
        assert run[False]() == run[True]()  # warm-up, and the same tokens
        times = paired(run, args.rounds, warmup=0)
        med, q1, q3 = ratio(times[False], times[True])
        print(f"| {n} | {statistics.median(times[False]):.3f} | {statistics.median(times[True]):.3f} | "
              f"{med:.2f}x | {q1:.2f}-{q3:.2f} |")


if __name__ == "__main__":
    main()
