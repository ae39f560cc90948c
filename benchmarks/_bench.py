"""What the benchmarks share: paired rounds and their ratios, and models built from configs (nothing downloaded).

Every figure is a ratio taken within one round -- the cases run back to back, their order alternating between
rounds -- summarised by its median and inter-quartile range over rounds; absolute times are printed for
orientation only (a shared machine's load moves them between runs, not the paired ratios much).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

WORDS = ["user", ":", "assistant", "what", "color", "is", "the", "circle", "?", "red", "blue", "green", "yes", "no",
         "shape", "square", "triangle"]


def load() -> str:
    """The machine's load, for the figures' caption."""
    try:
        one, five, _ = os.getloadavg()
        return f"load {one:.2f} (5 min {five:.2f}) on {os.cpu_count()} cores"
    except OSError:
        return "load unknown"


def seconds(fn: Callable[[], object]) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def paired(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every case per round; the cases run back to back, in an order that alternates between rounds."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(seconds(cases[name]))
    return times


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the per-round ratios a / b."""
    r = [x / y for x, y in zip(a, b)]
    if len(r) < 2:
        return r[0], r[0], r[0]
    q1, _, q3 = statistics.quantiles(r, n=4)
    return statistics.median(r), q1, q3


def fmt(stats: tuple[float, float, float]) -> str:
    med, q1, q3 = stats
    return f"{med:.3f}x (IQR {q1:.3f}-{q3:.3f})"


def tokenizer():
    """A word-level tokenizer over :data:`WORDS` with LLaVA's specials (<image> = id 4)."""
    import transformers as T
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.add_special_tokens(special)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                     eos_token="</s>")


def real_size_llava(device: str, dtype: str = "bfloat16", llm_layers: int = 2, vision_layers: int = 24):
    """LLaVA-1.5-7B's shapes with random weights, from configs: the CLIP ViT-L/14-336 tower (24 layers, 576
    patches, feature layer -2) and a slice of ``llm_layers`` Llama-2-7B decoder layers (4096 wide, 32 heads,
    11008 MLP, 32000-token vocabulary). Real-size per-layer costs; a slice, so it fits any lent GPU."""
    import transformers as T

    from robustvtc.models.hf import resolve_dtype
    from robustvtc.models.llava import LlavaAdapter

    vision = T.CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=vision_layers, num_attention_heads=16, projection_dim=768)
    text = T.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, image_seq_length=576,
                        vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                             dtype=resolve_dtype(dtype))
    return LlavaAdapter(model, tokenizer(), name=f"llava-1.5-7b-shaped ({llm_layers} decoder layers, random)")
