"""Translation-consensus selection (TCS; the selection defense CIRA, Li et al. 2026, evaluate against CAGE).

An attacker tunes the perturbation to the exact patch grid; shifting the image by a fraction of a patch
re-cuts every patch, so adversarial importance peaks should not survive on every view while the objects
that truly draw CLS attention do. Importance is computed on ``views`` copies shifted by ``shift`` pixels
(CIRA: 4 views, 7 px on 336 px), each map is resampled back onto the unshifted token grid, and the
compressor ranks by the mean of those maps and the unshifted one -- combined before its top-K.
Differentiable (the views are encoded with gradients) and deterministic.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens

from .base import DEFENSES, ScoreDefense, ScoreTransform, int_in_range

if TYPE_CHECKING:
    from robustvtc.target import Target

DIRECTIONS = ((1, 1), (-1, -1), (1, -1), (-1, 1), (1, 0), (-1, 0), (0, 1), (0, -1))
CIRA_SHIFT = 7 / 336  # CIRA's 7 px on LLaVA-1.5's 336 px input


def shift_pixels(pixels: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image content moved down ``dy`` and right ``dx`` pixels, edges replicated (differentiable)."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return pixels
    h, w = pixels.shape[-2:]
    return F.pad(pixels, (p, p, p, p), mode="replicate")[..., p - dy: p - dy + h, p - dx: p - dx + w]


def _resample(x: torch.Tensor, offset: float, dim: int) -> torch.Tensor:
    """x sampled at positions i + offset along ``dim``: linear interpolation, edges replicated."""
    n = x.shape[dim]
    pos = torch.arange(n, dtype=torch.float64) + offset
    low = pos.floor()
    shape = [1] * x.dim()
    shape[dim] = n
    frac = (pos - low).to(x.device, x.dtype).view(shape)
    low = low.long().to(x.device)
    a, b = x.index_select(dim, low.clamp(0, n - 1)), x.index_select(dim, (low + 1).clamp(0, n - 1))
    return a * (1 - frac) + b * frac


def align_scores(scores: torch.Tensor, grid: tuple[int, int], offset_y: float, offset_x: float) -> torch.Tensor:
    """(..., gh * gw) scores of a view whose content moved by (offset_y, offset_x) tokens, resampled on the
    unshifted grid: unshifted token (i, j) sits at (i + offset_y, j + offset_x) in the view."""
    gh, gw = grid
    x = scores.reshape(*scores.shape[:-1], gh, gw)
    return _resample(_resample(x, offset_y, -2), offset_x, -1).reshape(scores.shape)


def shifted_views(pixels: torch.Tensor, shift: int, views: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(views * B, 3, H, W) shifted copies, view-major, and their pixel shifts (dy, dx)."""
    shifts = [(sy * shift, sx * shift) for sy, sx in DIRECTIONS[:views]]
    return torch.cat([shift_pixels(pixels, dy, dx) for dy, dx in shifts]), shifts


def view_scores_aligned(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                        shifts: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Per view, its (B, ...) scores out of view-major (views * B, ...) ``scores``, aligned on the unshifted grid."""
    per_view = scores.chunk(len(shifts))
    return [align_scores(s, grid, dy * grid[0] / size[0], dx * grid[1] / size[1])
            for s, (dy, dx) in zip(per_view, shifts)]


@DEFENSES.register()
class TranslationConsensus(ScoreDefense):
    """Args: shift: pixels per view (None = 7/336 of the input height, at least 1); views: shifted copies, 1..8
    (diagonal shifts first, then axis-aligned)."""

    name = "translation_consensus"
    paper = "CIRA (Li et al. 2026), translation-consensus selection against CAGE"

    def __init__(self, shift: int | None = None, views: int = 4):
        self.shift = None if shift is None else int_in_range(shift, "shift", 1)
        self.views = int_in_range(views, "views", 1, len(DIRECTIONS))

    def check(self, target: "Target") -> None:
        super().check(target)
        if getattr(target.adapter, "num_crops", 1) != 1:
            raise UserInputError(f"defense {self.name!r} shifts one crop; the {target.adapter.family} model tiles "
                                 "the image into several")

    def bind(self, target: "Target", pixels: torch.Tensor | None, layers: Sequence[int]) -> ScoreTransform:
        if pixels is None:
            raise UserInputError(f"defense {self.name!r} re-encodes shifted views of the image: pass the pixels")
        size = tuple(pixels.shape[-2:])
        shift = self.shift or max(1, round(CIRA_SHIFT * size[0]))
        batch, shifts = shifted_views(pixels, shift, self.views)
        views = target.adapter.encode(batch, layers, validate=False)

        def consensus(scores: torch.Tensor, tokens: VisualTokens, layer: int | None, reduce: str) -> torch.Tensor:
            aligned = view_scores_aligned(views.cls_attention(layer, reduce), tokens.grid, size, shifts)
            return torch.stack([scores, *aligned]).mean(dim=0)

        return consensus
