"""Adapter for transformers' ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision, SigLIP tower, "anyres_max_9").

Everything is LLaVA-NeXT's (:mod:`robustvtc.models.llava_next`): one fixed pinpoint resolution, a base crop
(the whole image resized to the crop size) + the tiles, each crop through the vision tower, the base crop's
tokens then the high-resolution rows each closed by the learned newline, a pre-LLM budget split over the
crops. Differences: the tower is read by its family (SigLIP: no CLS, every token kept under "full"), so the
CLS-based methods are refused; and OneVision's "anyres_max_9" shrinks the high-resolution grid by bilinear
interpolation when it holds more than about 9 crops' worth of tokens (ratio > 1.1), which no token-level
layout can follow -- pinpoints past that are refused, and the default is the largest square one below it
(1152 x 1152, 3 x 3 tiles, for the released models).
"""
from __future__ import annotations

import math

from ..errors import UserInputError
from .llava_next import LlavaNextAdapter

ONEVISION_PROMPT = "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    hf_class = "LlavaOnevisionForConditionalGeneration"
    default_prompt = ONEVISION_PROMPT
    capabilities = frozenset({"cls_token"})  # at most; a SigLIP tower has none
    reads_any_tower = True

    def __init__(self, model, tokenizer, **kwargs):
        aspect = getattr(model.config, "vision_aspect_ratio", "anyres_max_9")
        if not str(aspect).startswith("anyres_max_"):
            raise UserInputError(f"llava_onevision: vision_aspect_ratio {aspect!r} is not supported; accepted: "
                                 "anyres_max_N")
        self.max_crops = int(str(aspect)[len("anyres_max_"):])
        super().__init__(model, tokenizer, **kwargs)
        if self.reader.num_prefix != self._lead_from:
            raise UserInputError(f"llava_onevision reads towers whose every non-patch token is dropped; got a "
                                 f"{self.reader.layout.name} tower under {model.config.vision_feature_select_strategy!r}")

    def _fits(self, size) -> bool:
        crop = int(self.model.config.vision_config.image_size)
        return math.sqrt((size[0] // crop) * (size[1] // crop) / self.max_crops) <= 1.1

    def _set_geometry(self, image_size) -> None:
        cfg = self.model.config
        if image_size is None:
            pinpoints = [tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints]
            fitting = [p for p in pinpoints if self._fits(p)]
            squares = [p for p in fitting if p[0] == p[1]]
            if not fitting:
                raise UserInputError("llava_onevision: no image_grid_pinpoint fits anyres_max without interpolation")
            image_size = max(squares or fitting, key=lambda p: p[0] * p[1])
        size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        if not self._fits(size):
            raise UserInputError(f"image_size {size}: more tiles than anyres_max_{self.max_crops} keeps without "
                                 "interpolating the token grid; accepted: pinpoints of at most "
                                 f"{self.max_crops} tiles (x 1.21)")
        super()._set_geometry(size)
