"""The built-in model: a real ``LlavaForConditionalGeneration`` small enough to train and attack on a CPU.

A tiny CLIP vision tower (96 px, patch 8 -> 12x12 = 144 visual tokens + CLS) and a tiny Llama, with a
word-level tokenizer over the synthetic task's vocabulary. Budgets 16/32/48 of 144 mirror LLaVA-1.5's
64/128/192 of 576. The weights ship inside the package (``robustvtc/models/builtin/``) and are produced by
``robustvtc train-builtin`` (see :mod:`robustvtc.training`).
"""
from __future__ import annotations

from pathlib import Path

from ..data.synthetic import IMAGE_SIZE, PATCH_SIZE, question_vocabulary

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
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
