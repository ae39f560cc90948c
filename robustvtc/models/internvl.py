"""Adapter for transformers' ``InternVLForConditionalGeneration`` (InternVL3 / InternVL3.5 "-hf" checkpoints).

Pixel space: one tile at the vision tower's resolution (448 x 448 for the released models): the processor's
dynamic tiling (up to 12 tiles + a thumbnail) is not used, so the token count is fixed, N = (448 / 14 / 2)^2
= 256. Inside the adapter, in torch: ImageNet normalisation (from preprocessor_config.json), InternViT,
hidden states of ``vision_feature_layer``, CLS dropped ("default"), the 2 x 2 pixel shuffle of the
model (``downsample_ratio`` 0.5) -> ``VisualTokens.features`` (B, 256, 4 * D_vision), then the projector.

InternViT has a CLS token, but each LLM token is a pixel-shuffled group of 4 patches; no published
compressor port defines a group's CLS attention, so the adapter offers no ``cls_token`` capability and the
CLS-based methods are refused. Positions are contiguous (the LLM is a Qwen2/Qwen3 decoder).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserInputError
from .base import VisualTokens
from .hf import CLIP_MEAN, CLIP_STD, HFAdapter
from .towers import output_of

INTERNVL_PROMPT = "<|im_start|>user\n<img><IMG_CONTEXT></img>\n{question}<|im_end|>\n<|im_start|>assistant\n"


class InternVLAdapter(HFAdapter):
    family = "internvl"
    hf_class = "InternVLForConditionalGeneration"
    default_prompt = INTERNVL_PROMPT
    default_placeholder = "<IMG_CONTEXT>"
    capabilities = frozenset()

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, image_size: int | tuple[int, int] | None = None,
                 prompt_template: str | None = None, name: str | None = None, prompt_source: str = "argument"):
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
            raise UserInputError("internvl: only vision_feature_select_strategy='default' and one integer "
                                 f"vision_feature_layer are supported, got {cfg.vision_feature_select_strategy!r}, "
                                 f"{cfg.vision_feature_layer!r}")
        super().__init__(model, tokenizer, image_mean=image_mean, image_std=image_std, prompt_template=prompt_template,
                         name=name, prompt_source=prompt_source)
        vcfg = cfg.vision_config
        tile = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        patch = vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0]
        if image_size not in (None, tile, (tile, tile)):
            raise UserInputError(f"image_size {image_size!r}: internvl reads one {tile}x{tile} tile; accepted: {tile}")
        self.image_size, self.patch_size, self.ratio = int(tile), int(patch), float(cfg.downsample_ratio)
        side = self.image_size // self.patch_size
        g = int(side * self.ratio)
        self.grid = (g, g)
        self.num_visual_tokens = g * g
        self.num_vision_layers = int(vcfg.num_hidden_layers)
        layer = cfg.vision_feature_layer
        self.feature_layer = (layer + self.num_vision_layers + 1 if layer < 0 else layer) - 1

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size

    def describe_input(self) -> str:
        s, p = self.image_size, self.patch_size
        return (f"one {s}x{s} tile (no dynamic tiling), normalised, {s // p}x{s // p} patches, CLS dropped, pixel "
                f"shuffle to {self.grid[0]}x{self.grid[1]} tokens")

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """InternViT -> feature-layer patches (CLS dropped) -> pixel shuffle: (B, N, 4 * D_vision); no signals."""
        if signal_layers:
            raise UserInputError(f"the {self.family} adapter offers no CLS attention signals (its LLM tokens are "
                                 "pixel-shuffled groups of 4 patches); accepted: signal_layers=()")
        if validate:
            pixels = self.check_pixels(pixels)
        tower, inputs = self.model.model.vision_tower, {"pixel_values": self.normalize(pixels)}
        if self.model.config.vision_feature_layer == -1:  # the tower's last_hidden_state, as transformers reads it
            hidden = tower(**inputs).last_hidden_state[:, 1:]
        else:  # an earlier layer's output: the tower stops there
            hidden = output_of(tower, tower.encoder.layer[self.feature_layer], inputs)[:, 1:]
        b, n, d = hidden.shape
        side = int(n ** 0.5)
        shuffled = self.model.model.pixel_shuffle(hidden.reshape(b, side, side, d), scale_factor=self.ratio)
        features = shuffled.reshape(b, -1, shuffled.shape[-1])
        return VisualTokens(features, None, self.grid, self.feature_layer, {}, self.num_vision_layers)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)
