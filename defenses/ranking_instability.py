"""Ranking-instability detector: a compression-aligned attack moves the CLS-attention ranking to its own
ends, and what it tunes to the exact patch grid need not survive a shift of a pixel or two, while the
ranking of a clean image does. The statistic is 1 - the mean top-k overlap between the importance of the
input and that of lightly shifted copies (aligned back on its grid); an input is flagged above a threshold
calibrated on clean images at a target false-positive rate. Deterministic.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from robustvtc.compression.base import topk_sorted
from robustvtc.errors import UserInputError

from .base import DEFENSES, DetectionDefense, float_in_range, int_in_range
from .translation_consensus import DIRECTIONS, shifted_views, view_scores_aligned

if TYPE_CHECKING:
    from robustvtc.target import Target


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) |top-k(a) ∩ top-k(b)| / k per row."""
    n = a.shape[-1]
    member = [torch.zeros(a.shape[0], n, dtype=torch.bool, device=a.device).scatter(1, topk_sorted(s, k), True)
              for s in (a, b)]
    return (member[0] & member[1]).sum(-1).float() / k


@DEFENSES.register()
class RankingInstability(DetectionDefense):
    """Args: shift: pixels per copy; views: shifted copies, 1..8; top: k of the overlap (None = the target's
    budget, or a quarter of the tokens for an uncompressed target); fpr: the false-positive rate
    :meth:`calibrate` aims at; threshold: set directly instead of calibrating."""

    name = "ranking_instability"
    paper = "importance-ranking stability under benign shifts (this toolkit)"

    def __init__(self, shift: int = 1, views: int = 4, top: int | None = None, fpr: float = 0.05,
                 threshold: float | None = None):
        self.shift = int_in_range(shift, "shift", 1)
        self.views = int_in_range(views, "views", 1, len(DIRECTIONS))
        self.top = None if top is None else int_in_range(top, "top", 1)
        self.fpr = float_in_range(fpr, "fpr", 0.0, 1.0)
        self.threshold = None if threshold is None else float_in_range(threshold, "threshold", 0.0, 1.0)

    def check(self, target: "Target") -> None:
        adapter = target.adapter
        if "cls_token" not in getattr(adapter, "capabilities", ()) or getattr(adapter, "num_crops", 1) != 1:
            raise UserInputError(f"defense {self.name!r} needs a single-crop encoder with a CLS token")

    def _k(self, target: "Target") -> int:
        n = target.adapter.num_visual_tokens
        if self.top is not None:
            return min(self.top, n)
        return target.budget if target.budget < n else max(1, n // 4)

    def _scores(self, target: "Target", pixels: torch.Tensor, validate: bool = True):
        """The input's CLS-attention importance (B, N) and each shifted copy's, aligned back to the input's grid."""
        views, shifts = shifted_views(pixels, self.shift, self.views)
        tokens = target.adapter.encode(torch.cat([pixels, views]), validate=validate)
        scores = tokens.cls_attention().float()
        b = pixels.shape[0]
        return scores[:b], view_scores_aligned(scores[b:], tokens.grid, tuple(pixels.shape[-2:]), shifts)

    @torch.no_grad()
    def statistic(self, target: "Target", pixels: torch.Tensor) -> torch.Tensor:
        """(B,) 1 - mean top-k overlap between the input's CLS-attention importance and its shifted copies'."""
        scores, aligned = self._scores(target, pixels)
        k = self._k(target)
        return 1 - torch.stack([topk_overlap(scores, a, k) for a in aligned]).mean(dim=0)

    def surrogate(self, target: "Target", pixels: torch.Tensor) -> torch.Tensor:
        """(B,) differentiable stand-in for the statistic: 1 - the mean Pearson correlation between the input's
        importance and each shifted copy's (aligned); the top-k overlap itself has no gradient."""
        scores, aligned = self._scores(target, pixels, validate=False)
        centre = lambda x: x - x.mean(dim=-1, keepdim=True)  # noqa: E731
        corr = [torch.nn.functional.cosine_similarity(centre(scores), centre(a), dim=-1) for a in aligned]
        return 1 - torch.stack(corr).mean(dim=0)
