"""Adapter for transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 in llava-hf format, and the built-in model).

Pipeline: pixels in [0, 1] -> normalisation -> vision tower (queries/keys of chosen layers captured by
hooks, so SDPA stays on and attention maps cost one row) -> patch features of ``vision_feature_layer``
-> [pre-LLM compressor] -> multi-modal projector -> spliced between the prompt's text embeddings ->
Llama decoder run layer by layer (an in-LLM compressor may drop visual tokens before any layer) -> logits.
The text side is :class:`~robustvtc.models.hf.HFAdapter`'s.

The tower may be any :data:`~robustvtc.models.towers.TOWERS` family -- CLIP, SigLIP (no CLS), ViT, DeiT,
DINOv2 with or without registers -- read by :class:`~robustvtc.models.towers.TowerReader`. Non-patch tokens
that transformers' own forward feeds the LLM (registers and DeiT's distillation token under "default", which
drops only token 0; every non-patch token under "full") stay in front of the patches as
:attr:`VisualTokens.lead`, never compressed. A tower without CLS has no ``cls_token`` capability, so CLS-based
compressors and scores are refused with the compatible ones named.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserInputError
from .base import VisualTokens
from .hf import CLIP_MEAN, CLIP_STD, HFAdapter
from .towers import TowerReader

LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"


class LlavaAdapter(HFAdapter):
    """LLaVA: one crop per image, N = (size / patch)^2 patch tokens; CLS dropped before the projector ("default"),
    or every token kept ("full", SigLIP towers)."""

    family = "llava"
    hf_class = "LlavaForConditionalGeneration"
    default_prompt = LLAVA_PROMPT
    capabilities = frozenset({"cls_token", "encoder_rerun"})  # at most; an instance keeps those its tower offers
    reads_any_tower = True  # False: a subclass that assumes CLIP's layout (CLS then patches, "default")

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_size: int | tuple[int, int] | None = None,
                 prompt_template: str | None = None, name: str = "llava", prompt_source: str = "argument"):
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise UserInputError("only a single integer vision_feature_layer is supported, got "
                                 f"{cfg.vision_feature_layer!r}")
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise UserInputError("vision_feature_select_strategy must be 'default' (token 0 dropped) or 'full', got "
                                 f"{strategy!r}")
        self.reader = TowerReader(model.model.vision_tower, cfg.vision_config)  # refuses a tower it cannot read
        if strategy == "default" and not self.reader.has_cls:
            raise UserInputError(f"vision_feature_select_strategy='default' drops token 0, which in this "
                                 f"{self.reader.layout.name} tower (no CLS) is a patch; accepted: 'full'")
        if not self.reads_any_tower and (self.reader.num_prefix != 1 or strategy != "default"):
            raise UserInputError(f"{self.family} reads towers with a CLS token and nothing else before the patches, "
                                 f"under vision_feature_select_strategy='default'; got a {self.reader.layout.name} "
                                 f"tower under {strategy!r}")
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std, prompt_template=prompt_template,
                         name=name, prompt_source=prompt_source)
        self.capabilities = self.reader.capabilities & type(self).capabilities
        self._lead_from = 1 if strategy == "default" else 0  # first non-patch token the LLM reads
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
        cls, _, patches = self.reader.split(hidden)
        lead = hidden[:, self._lead_from:self.reader.num_prefix]
        return VisualTokens(patches, cls, self.grid, self.feature_layer, captured, self.num_vision_layers,
                            lead=lead if lead.shape[1] else None)

    def _encode_crops(self, crops: torch.Tensor, signal_layers: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """Normalised (B', 3, s, s) crops -> feature-layer hidden states (B', prefix + n, D), CLS first, and the
        captured queries/keys of the feature layer and ``signal_layers``; the tower stops at the deepest layer read."""
        return self.reader.features(crops, self.feature_layer, (self.feature_layer, *signal_layers))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Multi-modal projector: (B, K, D_vision) -> (B, K, D_llm)."""
        return self.model.model.multi_modal_projector(features)
