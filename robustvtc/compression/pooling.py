"""Spatial average pooling of the visual token grid (UniPruneBench ``Pool_PreLLM``; LLaVA-OneVision's 2-D pool).

Rule: reshape the projected tokens to their grid and ``adaptive_avg_pool2d`` them to h x w, raster order.
Budget K is exact: the output grid is the factorisation h x w = K (h <= grid height, w <= grid width) whose
aspect ratio is closest to the grid's -- a square s x s for square K on a square grid, as the benchmark's
4/16/25 targets. A K with no such factorisation (e.g. a prime above the grid side) raises and names the
nearest accepted budgets, including the largest s x s <= K. Cells follow adaptive pooling: output row i
averages input rows floor(i H / h) .. ceil((i + 1) H / h) - 1 (cells overlap when h does not divide H).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


def pool_shape(budget: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The output grid (h, w), h * w = budget, closest in aspect ratio to ``grid``."""
    gh, gw = grid
    shapes = [(h, budget // h) for h in range(1, gh + 1) if budget % h == 0 and budget // h <= gw]
    if not shapes:
        accepted = sorted({h * w for h in range(1, gh + 1) for w in range(1, gw + 1)})
        below = max((a for a in accepted if a < budget), default=None)
        above = min((a for a in accepted if a > budget), default=None)
        side = math.isqrt(budget)
        raise UserInputError(f"pooling cannot make exactly {budget} tokens from a {gh}x{gw} grid; nearest accepted "
                             f"budgets: {below}, {above} (square: {side * side})")
    return min(shapes, key=lambda s: (round(abs(math.log(s[0] * gw / (s[1] * gh))), 9), s[0]))  # ties: wider


def pool_weights(grid: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """(h * w, H * W) adaptive-average-pooling matrix."""
    def axis(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1 / (hi - lo)
        return m

    return torch.kron(axis(grid[0], shape[0]), axis(grid[1], shape[1]))


@COMPRESSORS.register()
class Pooling(PreLLMCompressor):
    name = "pooling"
    fidelity = "exact adaptive average pool (UniPruneBench baseline, no paper code)"
    paper = "UniPruneBench pooling baseline (arXiv 2511.02650)"
    native_knob = "pooled grid h x w = budget (closest aspect to the token grid)"
    space = "projected"

    def check_budget(self, budget: int, num_tokens: int) -> int:
        budget = super().check_budget(budget, num_tokens)
        side = math.isqrt(num_tokens)
        if side * side == num_tokens:  # square grids (LLaVA) are checked early; others when the grid is known
            pool_shape(budget, (side, side))
        return budget

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        side = math.isqrt(num_tokens)
        out = {"budget": budget}
        if side * side == num_tokens:
            out["pool_grid"] = list(pool_shape(budget, (side, side)))
        return out

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        w = pool_weights(tokens.grid, pool_shape(budget, tokens.grid)).to(tokens.features.device)
        w = torch.cat([w, torch.zeros(budget, 1, device=w.device)], dim=1)  # CLS never pooled
        return KeepPlan(w.expand(tokens.batch_size, -1, -1), space="projected")
