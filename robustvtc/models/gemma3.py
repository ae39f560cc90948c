"""Adapter for transformers' ``Gemma3ForConditionalGeneration`` (Gemma 3 4B / 12B / 27B, "-it" or "-pt").

Pixel space: one image at the SigLIP tower's resolution (896 x 896 for the released models); the processor's
optional pan-and-scan crops are not used, so the token count is fixed. Inside the adapter, in torch: the
processor's normalisation (mean = std = 0.5, from preprocessor_config.json), SigLIP (no CLS), its last hidden
state, and the first half of Gemma 3's projector -- the 4 x 4 average pool of the 64 x 64 patch grid --
-> ``VisualTokens.features`` (B, 256, D_vision); ``project`` is the other half (RMSNorm, linear map).

The decoder differs from the other families in two ways that the shared decoder (:mod:`.hf`) follows:
five of every six layers attend within a sliding window (1,024 tokens) and the rest globally, each layer type
with its own RoPE base; and the image's tokens attend to each other both ways while the text stays causal
(the ``token_type_ids`` mask of the processor). A compressor that drops image tokens leaves the kept ones
attending to each other both ways, as the model does when fed only those tokens.

Each LLM token is the average of 16 patches of a tower without CLS: no published compressor port defines a
CLS or received-attention score for it, so the adapter offers no capability and those methods are refused.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserInputError
from .base import VisualTokens
from .hf import CLIP_MEAN, CLIP_STD, HFAdapter, chat_template_prompt

GEMMA3_PROMPT = ("<start_of_turn>user\n\n\n<start_of_image><image_soft_token><end_of_image>\n\n{question}"
                 "<end_of_turn>\n<start_of_turn>model\n")


class Gemma3Adapter(HFAdapter):
    family = "gemma3"
    hf_class = "Gemma3ForConditionalGeneration"
    default_prompt = GEMMA3_PROMPT
    default_placeholder = "<image_soft_token>"
    capabilities = frozenset()
    bidirectional_visual = True

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_size: int | tuple[int, int] | None = None,
                 prompt_template: str | None = None, name: str | None = None, prompt_source: str = "argument"):
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std, prompt_template=prompt_template,
                         name=name, prompt_source=prompt_source)
        vcfg = model.config.vision_config
        self.image_size, self.patch_size = int(vcfg.image_size), int(vcfg.patch_size)
        if image_size not in (None, self.image_size, (self.image_size, self.image_size)):
            raise UserInputError(f"image_size {image_size!r}: gemma3 reads one {self.image_size}x{self.image_size} "
                                 f"image; accepted: {self.image_size}")
        self._projector = model.model.multi_modal_projector
        side = self._projector.tokens_per_side
        self.grid = (side, side)
        self.num_visual_tokens = side * side
        self.num_vision_layers = int(vcfg.num_hidden_layers)
        self.feature_layer = self.num_vision_layers - 1

    @classmethod
    def _template_prompt(cls, tokenizer, template: str | None, placeholder: str) -> str | None:
        """Gemma 3's chat template writes ``<start_of_image>`` for the image; its processor expands that to
        ``\\n\\n<start_of_image>`` + the image's soft tokens + ``<end_of_image>\\n\\n``, as done here."""
        boi = getattr(tokenizer, "boi_token", None) or "<start_of_image>"
        eoi = getattr(tokenizer, "eoi_token", None) or "<end_of_image>"
        prompt = chat_template_prompt(tokenizer, template, boi)
        return prompt.replace(boi, f"\n\n{boi}{placeholder}{eoi}\n\n") if prompt else None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def describe_input(self) -> str:
        s, p = self.image_size, self.patch_size
        return (f"one {s}x{s} image (no pan-and-scan), normalised, {s // p}x{s // p} SigLIP patches, average-pooled "
                f"to {self.grid[0]}x{self.grid[1]} tokens")

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """SigLIP's last hidden state, average-pooled as Gemma 3's projector pools it: (B, 256, D_vision)."""
        if signal_layers:
            raise UserInputError(f"the {self.family} adapter offers no attention signals (its LLM tokens are "
                                 "averages of 16 patches of a tower without CLS); accepted: signal_layers=()")
        if validate:
            pixels = self.check_pixels(pixels)
        hidden = self.model.model.vision_tower(pixel_values=self.normalize(pixels)).last_hidden_state
        b, _, d = hidden.shape
        side = self._projector.patches_per_image
        grid = hidden.transpose(1, 2).reshape(b, d, side, side)
        features = self._projector.avg_pool(grid).flatten(2).transpose(1, 2)
        return VisualTokens(features, None, self.grid, self.feature_layer, {}, self.num_vision_layers)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The rest of Gemma 3's projector: RMSNorm, then the (D_vision, D_llm) input projection."""
        normed = self._projector.mm_soft_emb_norm(features)
        return torch.matmul(normed, self._projector.mm_input_projection_weight).type_as(features)
