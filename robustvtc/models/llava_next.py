"""Adapter for transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, "anyres" crops).

Pixel space: one (H, W) of the model's ``image_grid_pinpoints`` (default: the largest square one, 672 x 672
for llava-v1.6, i.e. 2 x 2 tiles), so the crop and token counts are fixed. Inside the adapter, in torch and
differentiably: the base crop is the whole image resized to the crop size (bicubic, antialiased, as the HF
processor's PIL resize), the tiles are the image cut into crop-size squares; every crop goes through the
CLIP tower exactly as in :class:`~robustvtc.models.llava.LlavaAdapter`.

Token order (``VisualTokens``, keep plans, in-LLM indices): the base crop's tokens in raster order, then the
high-resolution tokens in raster order over the whole tiled image -- the order in which transformers'
``pack_image_features`` feeds the LLM. A learned newline embedding ends every high-resolution row (nothing
is unpadded: the image is exactly a pinpoint). Newlines are structure: not counted in the budget, never pruned.

Budget: a pre-LLM method runs on each crop on its own (each crop's own CLS attention, as VisionZip and
FasterVLM do on LLaVA-NeXT), with the budget K split over the crops in proportion to their token counts:
all crops hold n tokens, so each keeps K // crops and the first ones (base first) one more until K is
reached; K must be at least the crop count. Base-crop tokens keep the order the method emits; the
high-resolution ones are sorted by the position of their main source (a crop's CLS before the crop's first
patch) so that each row still ends at its newline. In-LLM methods see all N tokens of the image at once.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from .base import KeepPlan, VisualEmbeds, VisualTokens
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    hf_class = "LlavaNextForConditionalGeneration"
    capabilities = frozenset({"cls_token"})
    reads_any_tower = False  # crops are read as [CLS, patches]

    def _set_geometry(self, image_size) -> None:
        cfg = self.model.config
        crop = int(cfg.vision_config.image_size)
        pinpoints = [tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints]
        if image_size is None:
            squares = [p for p in pinpoints if p[0] == p[1]]
            size = max(squares or pinpoints, key=lambda p: p[0] * p[1])
        else:
            size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(v) for v in image_size)
        if size not in pinpoints:
            raise UserInputError(f"image_size {size} is not one of the model's image_grid_pinpoints; accepted: "
                                 f"{', '.join(f'{h}x{w}' for h, w in pinpoints)}")
        if size[0] % crop or size[1] % crop:
            raise UserInputError(f"image_size {size} is not a multiple of the {crop}-pixel crop; accepted: pinpoints "
                                 "that tile into whole crops")
        self.image_size, self.crop_size = size, crop
        self.tiles = (size[0] // crop, size[1] // crop)
        g = crop // self.patch_size
        self.grid = (g, g)
        self.num_crops = 1 + self.tiles[0] * self.tiles[1]
        self.num_visual_tokens = self.num_crops * g * g
        self.row_width = self.tiles[1] * g  # tokens per high-resolution row
        y, x = torch.meshgrid(torch.arange(self.tiles[0] * g), torch.arange(self.row_width), indexing="ij")
        crop_index = 1 + (y // g) * self.tiles[1] + x // g
        high_res = crop_index * g * g + (y % g) * g + x % g
        self.crop_order = torch.cat([torch.arange(g * g), high_res.flatten()]).to(self.device)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size

    def describe_input(self) -> str:
        s, (r, c) = self.crop_size, self.tiles
        return (f"base crop = whole image resized to {s}x{s} (bicubic, antialiased) + {r}x{c} tiles of {s}x{s}, "
                f"normalised; {self.num_crops} x {self.grid[0]}x{self.grid[1]} patches, a newline after each of "
                f"the {r * self.grid[0]} high-resolution rows")

    # ------------------------------------------------------------------ vision side
    def crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B * crops, 3, s, s): per image the base crop, then the tiles in raster order."""
        s, (r, c) = self.crop_size, self.tiles
        b = pixels.shape[0]
        base = F.interpolate(pixels, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        tiles = pixels.reshape(b, 3, r, s, c, s).permute(0, 2, 4, 1, 3, 5).reshape(b, r * c, 3, s, s)
        return torch.cat([base.unsqueeze(1), tiles], dim=1).flatten(0, 1)

    def encode(self, pixels: torch.Tensor, signal_layers: Sequence[int] = (), validate: bool = True) -> VisualTokens:
        """All crops through the vision tower; tokens in LLM order, CLS (None for a tower without) and signals
        per crop."""
        if validate:
            pixels = self.check_pixels(pixels)
        b = pixels.shape[0]
        hidden, captured = self._encode_crops(self.normalize(self.crops(pixels)), signal_layers)
        cls, _, patches = self.reader.split(hidden)
        order = self.crop_order.to(hidden.device)
        features = patches.reshape(b, self.num_visual_tokens, -1)[:, order]
        cls = None if cls is None else cls.reshape(b, self.num_crops, -1)
        return VisualTokens(features, cls, self.grid, self.feature_layer, captured, self.num_vision_layers,
                            self.num_crops, order)

    # ------------------------------------------------------------------ compression and layout
    @property
    def compressed_parts(self) -> int:
        return self.num_crops

    def lay_out(self, parts):
        """Each crop's kept tokens in LLaVA-NeXT's layout (base crop, then the high-resolution tokens in raster
        order with a newline after every row), and one keep plan indexing tokens in LLM order (column N = the
        CLS of the crop a token came from)."""
        if len(parts) != self.num_crops:
            raise UserInputError(f"{self.family} compresses each of its {self.num_crops} crops; got kept tokens of "
                                 f"{len(parts)}")
        n, N = self.grid[0] * self.grid[1], self.num_visual_tokens
        token_of = torch.argsort(self.crop_order)  # crop-major index -> token index
        outputs = [(kept, plan, token_of[c * n:(c + 1) * n]) for c, (kept, plan) in enumerate(parts)]
        batch_size = outputs[0][1].weights.shape[0]
        embeds, sources, weights = [], [], []
        for b in range(batch_size):
            e, src, key, w = [], [], [], []
            for kept, plan, where in outputs:
                k = kept[b].shape[0]
                main = plan.primary_sources()[b, :k]
                is_cls = main == n
                token = where.to(main.device)[torch.where(is_cls, 0, main)]
                rows = torch.zeros(k, N + 1, dtype=plan.weights.dtype, device=main.device)
                rows[:, where.to(main.device)] = plan.weights[b, :k, :n]
                rows[:, N] = plan.weights[b, :k, n]
                e.append(kept[b])
                src.append(token)
                key.append(2 * token + (~is_cls).long())  # a CLS token sorts just before its crop's first patch
                w.append(rows)
            packed, packed_src, order = self._pack(torch.cat(e), torch.cat(src), torch.cat(key))
            embeds.append(packed)
            sources.append(packed_src)
            weights.append(torch.cat(w)[order])
        lengths = torch.tensor([x.shape[0] for x in weights], device=weights[0].device)
        width = int(lengths.max())
        stacked = torch.stack([F.pad(x, (0, 0, 0, width - x.shape[0])) for x in weights])
        plan = KeepPlan(stacked, outputs[0][1].space, None if bool((lengths == width).all()) else lengths)
        return VisualEmbeds(embeds, sources), plan

    def _pack(self, embeds: torch.Tensor, sources: torch.Tensor, keys: torch.Tensor):
        """LLaVA-NeXT's layout of kept tokens (K, D): base-crop tokens as given, then the high-resolution ones
        sorted by ``keys`` with a newline after every row. Returns (embeds, sources with -1 at newlines, the
        order of the input rows)."""
        n = self.grid[0] * self.grid[1]
        is_base = sources < n
        high = (~is_base).nonzero().flatten()
        high = high[keys[high].argsort(stable=True)]
        order = torch.cat([is_base.nonzero().flatten(), high])
        n_base, n_rows = order.numel() - high.numel(), self.tiles[0] * self.grid[0]
        row = (sources[high] - n) // self.row_width
        dev = embeds.device
        slot = torch.cat([torch.arange(n_base, device=dev),
                          n_base + torch.arange(high.numel(), device=dev) + row.to(dev)])  # newlines of rows above
        total = order.numel() + n_rows
        is_token = torch.zeros(total, dtype=torch.bool, device=dev).index_fill(0, slot, True)
        placed = embeds.new_zeros(total, embeds.shape[1]).index_copy(0, slot, embeds[order.to(dev)])
        newline = self.model.model.image_newline.to(dev, embeds.dtype)
        packed = torch.where(is_token.unsqueeze(1), placed, newline)
        packed_src = torch.full((total,), -1, dtype=torch.long, device=dev).index_copy(0, slot, sources[order].to(dev))
        return packed, packed_src, order

    def _plain_layout(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if visual.shape[0] != self.num_visual_tokens:
            raise UserInputError(f"{self.family} lays out all {self.num_visual_tokens} visual tokens, got "
                                 f"{visual.shape[0]}; compressed tokens come from Target.forward")
        index = torch.arange(visual.shape[0], device=visual.device)
        packed, sources, _ = self._pack(visual, index, 2 * index + 1)
        return packed, sources
