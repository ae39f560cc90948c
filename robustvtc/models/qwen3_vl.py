"""Adapter for transformers' ``Qwen3VLForConditionalGeneration`` (and ``Qwen3VLMoeForConditionalGeneration``,
whose vision path is the same).

Pixels, patches and M-RoPE positions are Qwen2-VL's (:mod:`robustvtc.models.qwen2_vl`; 16-pixel patches,
2 x 2 merge: 32 px per token). Visual tokens are the main PatchMerger's outputs (the LLM-input embeddings);
no CLS. Qwen3-VL also feeds its LLM *DeepStack* features: the outputs of extra mergers on intermediate vision
blocks, added to the hidden states at the visual positions after decoder layers 0, 1, 2. They travel with the
visual tokens (``VisualTokens.aux``): a keep plan merges them exactly as it merges the tokens, and an in-LLM
method that drops a visual token drops its DeepStack features too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserInputError
from .base import VisualEmbeds, VisualTokens
from .qwen2_vl import Qwen2VLAdapter


@dataclass
class DeepStackEmbeds(VisualEmbeds):
    """Visual embeddings with, per image, the DeepStack features of every visual row: (L_b, layers, D);
    structural rows (source -1) get zeros."""

    deepstack: list[torch.Tensor] = None


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    hf_class = "Qwen3VLForConditionalGeneration"
    # VisionZip's CLS-free port (received attention) is published for Qwen2.5-VL only; none is captured here
    capabilities = frozenset()

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.deepstack_layers = len(model.config.vision_config.deepstack_visual_indexes)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """The main merger's tokens (B, N, D_llm) and, as ``aux``, the DeepStack features (B, N, layers, D_llm)."""
        if signal_layers:
            raise UserInputError(f"the {self.family} vision encoder has no CLS token, so no attention signals are "
                                 "captured; accepted: signal_layers=()")
        if validate:
            pixels = self.check_pixels(pixels)
        b = pixels.shape[0]
        gh, gw = self.grid
        thw = torch.tensor([[1, gh * self.merge, gw * self.merge]] * b, device=pixels.device)
        out = self.model.model.visual(self.patchify(self.normalize(pixels)), grid_thw=thw)
        features = out.pooler_output.reshape(b, self.num_visual_tokens, -1)
        deepstack = torch.stack([f.reshape(b, self.num_visual_tokens, -1) for f in out.deepstack_features], dim=2)
        return VisualTokens(features, None, self.grid, self.feature_layer, {}, self.num_vision_layers, aux=deepstack)

    def attach_aux(self, embeds, tokens: VisualTokens, plan):
        """The DeepStack features of every laid-out visual row: merged by ``plan`` (None: all tokens in order)."""
        if tokens.aux is None:
            return embeds
        rows = self._visual_rows(embeds)
        aux = tokens.aux
        if plan is None:
            kept = aux
        else:
            if plan.space == "encoder":
                raise UserInputError(f"{self.family}: an in-encoder merge has no DeepStack features")
            w = plan.weights[..., :tokens.num_tokens].to(aux.dtype)
            kept = torch.einsum("bkn,bnld->bkld", w, aux)
        deep = []
        for b, src in enumerate(rows.sources):
            d = kept.new_zeros(src.numel(), *kept.shape[2:])
            real = (src >= 0).nonzero().flatten()
            d[real] = kept[b, :real.numel()]
            deep.append(d)
        return DeepStackEmbeds(rows.embeds, rows.sources, deep)

    def _layer_residuals(self, rows: VisualEmbeds, mask: torch.Tensor, questions: Sequence[str]):
        if not isinstance(rows, DeepStackEmbeds):
            return None
        B, L = mask.shape
        out = torch.zeros(self.deepstack_layers, B, L, rows.embeds[0].shape[-1], device=mask.device, dtype=self.dtype)
        for b, (deep, q) in enumerate(zip(rows.deepstack, questions)):
            start = L - int(mask[b].sum()) + len(self._prompt_ids(q)[0])
            out[:, b, start:start + deep.shape[0]] = deep.transpose(0, 1).to(out.device, out.dtype)
        return list(out.unbind(0))


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same vision path and interface; the decoder's MoE blocks are internal to its layers."""

    family = "qwen3_vl_moe"
    hf_class = "Qwen3VLMoeForConditionalGeneration"
