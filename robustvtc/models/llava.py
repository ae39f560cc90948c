"""Adapter for transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 in llava-hf format, and the built-in model).

Pipeline: pixels in [0, 1] -> CLIP normalisation -> vision tower (queries/keys of chosen layers captured by
hooks, so SDPA stays on and attention maps cost one row) -> patch features of ``vision_feature_layer``
-> [pre-LLM compressor] -> multi-modal projector -> spliced between the prompt's text embeddings ->
Llama decoder run layer by layer (an in-LLM compressor may drop visual tokens before any layer) -> logits.
The text side is :class:`~robustvtc.models.hf.HFAdapter`'s.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserInputError
from .base import LayerSignals, VisualTokens
from .hf import CLIP_MEAN, CLIP_STD, HFAdapter

LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"


class LlavaAdapter(HFAdapter):
    """LLaVA: one CLIP crop per image, N = (size / patch)^2 tokens, CLS dropped before the projector."""

    family = "llava"
    hf_class = "LlavaForConditionalGeneration"
    default_prompt = LLAVA_PROMPT
    capabilities = frozenset({"cls_token", "encoder_rerun"})

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_size: int | tuple[int, int] | None = None,
                 prompt_template: str | None = None, name: str = "llava", prompt_source: str = "argument"):
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise UserInputError("only a single integer vision_feature_layer is supported, got "
                                 f"{cfg.vision_feature_layer!r}")
        if cfg.vision_feature_select_strategy != "default":
            raise UserInputError("only vision_feature_select_strategy='default' (CLS dropped) is supported, got "
                                 f"{cfg.vision_feature_select_strategy!r}")
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std, prompt_template=prompt_template,
                         name=name, prompt_source=prompt_source)
        vcfg = cfg.vision_config
        self.patch_size = int(vcfg.patch_size)
        self.num_vision_layers = int(vcfg.num_hidden_layers)
        layer = cfg.vision_feature_layer
        # hidden_states[layer] is the output of encoder layer (layer - 1) when counted from the embeddings.
        self.feature_layer = (layer + self.num_vision_layers + 1 if layer < 0 else layer) - 1
        self._set_geometry(image_size)

    def _set_geometry(self, image_size) -> None:
        """Input resolution, token grid and token count."""
        self.image_size = int(image_size or self.model.config.vision_config.image_size)
        if self.image_size < self.patch_size:
            raise UserInputError(f"model_kwargs.image_size: {image_size!r} is below the model's patch size "
                                 f"{self.patch_size}; accepted: an integer >= {self.patch_size}")
        self.grid = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        self.num_visual_tokens = self.grid[0] * self.grid[1]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def describe_input(self) -> str:
        return f"one {self.image_size}x{self.image_size} crop, normalised, {self.grid[0]}x{self.grid[1]} patches"

    # ------------------------------------------------------------------ vision side
    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """Run the vision tower; capture queries/keys of the feature layer and of ``signal_layers``."""
        if validate:
            pixels = self.check_pixels(pixels)
        hidden, captured = self._encode_crops(self.normalize(pixels), signal_layers)
        return VisualTokens(hidden[:, 1:], hidden[:, 0], self.grid, self.feature_layer, captured, self.num_vision_layers)

    def _encode_crops(self, crops: torch.Tensor, signal_layers: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """Normalised (B', 3, s, s) crops -> feature-layer hidden states (B', 1 + n, D), CLS first, and the
        captured queries/keys of the feature layer and ``signal_layers``."""
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers  # flattened in transformers 5
        wanted = {self.feature_layer}
        for layer in signal_layers:
            idx = layer + self.num_vision_layers if layer < 0 else layer
            if not 0 <= idx < self.num_vision_layers:
                raise UserInputError(f"encoder layer {layer} out of range; the encoder has {self.num_vision_layers} layers")
            wanted.add(idx)
        captured: dict[int, LayerSignals] = {}

        def make_hook(idx):
            def hook(module, args, kwargs):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                shape = (*h.shape[:-1], -1, module.head_dim)
                q = module.q_proj(h).view(shape).transpose(1, 2)
                k = module.k_proj(h).view(shape).transpose(1, 2)
                captured[idx] = LayerSignals(q, k, float(module.scale))
            return hook

        handles = [layers[i].self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in sorted(wanted)]
        try:
            out = tower(pixel_values=crops, output_hidden_states=True)
        finally:
            for hd in handles:
                hd.remove()
        return out.hidden_states[self.feature_layer + 1], captured

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Multi-modal projector: (B, K, D_vision) -> (B, K, D_llm)."""
        return self.model.model.multi_modal_projector(features)
