"""The built-in model: a real ``LlavaForConditionalGeneration`` small enough to train and attack on a CPU.

A tiny CLIP vision tower (96 px, patch 8 -> 12x12 = 144 visual tokens + CLS) and a tiny Llama, with a
word-level tokenizer over the synthetic task's vocabulary. Budgets 16/32/48 of 144 mirror LLaVA-1.5's
64/128/192 of 576. The weights ship inside the package (``robustvtc/models/builtin/``) and are produced by
the recipe in the repository's ``tools/builtin_recipe.py`` (``make train-builtin``; not installed).
:func:`new_builtin` builds the same architecture with fresh random weights: the fast model of tests.
"""
from __future__ import annotations

import json
from pathlib import Path

from typing import TYPE_CHECKING

from ..data.synthetic import IMAGE_SIZE, PATCH_SIZE, question_vocabulary

if TYPE_CHECKING:
    from .llava import LlavaAdapter

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN_DEIT_DIR = Path(__file__).resolve().parent / "builtin_deit"  # "builtin-deit": pretrained DeiT-tiny tower,
# frozen; projector and LLM trained by tools/builtin_deit_recipe.py on the task rendered at 224 px (196 tokens)
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"  # llava-1.5-hf's format, so one adapter serves both
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def build_tokenizer():
    """Word-level fast tokenizer: lower-cased, split on whitespace and punctuation, BOS prepended."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, "user", ":", "assistant", *question_vocabulary()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def builtin_config(vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    grid = IMAGE_SIZE // PATCH_SIZE
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=128, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, image_seq_length=grid * grid,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def new_builtin(seed: int = 0) -> "LlavaAdapter":
    """A freshly initialised built-in model wrapped in its adapter."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from .llava import LlavaAdapter

    tok = build_tokenizer()
    cfg = builtin_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                         tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    return LlavaAdapter(model, tok, image_mean=CLIP_MEAN, image_std=CLIP_STD, prompt_template=PROMPT_TEMPLATE,
                        name="builtin")


def save_builtin(adapter: "LlavaAdapter", out_dir: Path, report: dict) -> None:
    """The model in Hugging Face format (weights, tokenizer, preprocessor) plus its training report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(out_dir)
    adapter.tokenizer.save_pretrained(out_dir)
    size = {"height": adapter.image_size, "width": adapter.image_size}
    pre = {"image_processor_type": "CLIPImageProcessor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
           "size": {"shortest_edge": adapter.image_size}, "crop_size": size, "do_center_crop": True,
           "do_resize": True, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
           "robustvtc_prompt_template": PROMPT_TEMPLATE}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
