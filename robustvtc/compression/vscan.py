"""VScan (Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language
Models", TMLR 2026, arXiv 2505.22654) -- its visual-encoding stage.

Rule (reference code Tencent/SelfEvolvingAgent @ a82450e, ``VScan/llava/model/llava_arch.py``,
``encode_images``, ``window_cls_selection``, ``token_merging``), with V = ``visual_token_num``:

* scores: CLS->patch attention, mean over heads, of encoder layer 5 (0-based, "shallow") and of layer -2
  ("deep", LLaVA's feature layer);
* local scan: the grid cut into non-overlapping 6 x 6 windows (row-major; 16 on LLaVA-1.5's 24 x 24), the
  top k = int(V * (1 - global_ratio)) // windows patches of each window by shallow attention;
* global scan: deep attention with the local patches set to 0, its top V - int(V * (1 - global_ratio));
* merging, on the projected (LLM-input) features: every other patch joins the retained patch with the
  highest cosine similarity (first in raster order on ties) and each retained token becomes
  ``(token + sum(joined)) / (1 + count)``; tokens reach the LLM in raster order. V = N keeps everything.

Budget. Because k is floored per window, the reference keeps 16 k + V - int(V / 2) tokens, fewer than V
unless int(V / 2) is a multiple of the window count (64, 96, 128, 192 are). Our budget is the number of
tokens that reach the LLM, so a budget K maps to the smallest V whose reference count is K; budgets no V
reaches (on 24 x 24: 32 q + 17 .. 32 q + 31) are refused with the nearest accepted ones.

Not reproduced (gap): VScan's second stage, which the reference scripts enable (``--layer_list [16]
--image_token_list [32] --visual_token_num 96``): inside the LLM, before decoder layer 16, keep the top
visual tokens by layer 16's attention from the last instruction token, head mean (PDrop's score), with
positions renumbered. robustvtc's Target runs either a pre-LLM plan or an in-LLM hook, not both, so only
the reference's stage-1-only configuration (``--layer_list`` left at its default None) is run here;
``budget_mapping`` says so. The reference asserts a 24 x 24 grid; other grids use the same windows over
floor(H / 6) x floor(W / 6) cells (the remainder rows/columns only take part in the global scan).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


def window_count(grid: tuple[int, int], window: int) -> int:
    return (grid[0] // window) * (grid[1] // window)


@COMPRESSORS.register()
class VScan(PreLLMCompressor):
    name = "vscan"
    fidelity = "stage 1 only (VScan's in-LLM stage not run); exact vs official code"
    paper = "VScan, TMLR 2026, arXiv 2505.22654"
    native_knob = ("visual_token_num V (stage 1): local = windowed top-k at a shallow layer, global = top "
                   "of the deep layer; budget = tokens kept, the smallest V keeping that many (stage 2 not run)")
    requires = ("cls_token",)
    space = "projected"
    relaxable = True

    def __init__(self, global_ratio: float = 0.5, window: int = 6, shallow_layer: int = 5, deep_layer: int = -2,
                 relaxation: str = "none", temperature: float = 0.1):
        if not 0 <= global_ratio <= 1:
            raise UserInputError(f"global_ratio must lie in [0, 1], got {global_ratio!r}")
        if window < 1:
            raise UserInputError(f"window must be >= 1, got {window!r}")
        self.global_ratio, self.window = global_ratio, window
        self.shallow_layer, self.deep_layer = shallow_layer, deep_layer
        self._set_relaxation(relaxation, temperature)

    def signal_layers(self) -> tuple[int, ...]:
        return (self.shallow_layer, self.deep_layer)

    # ------------------------------------------------------------------ budget <-> visual_token_num
    def _local_request(self, v: int) -> int:
        return int(v * (1 - self.global_ratio))

    def kept_count(self, v: int, windows: int) -> int:
        """Tokens the reference keeps for ``visual_token_num = v``."""
        req = self._local_request(v)
        return (req // windows) * windows + v - req

    def visual_token_num(self, budget: int, grid: tuple[int, int]) -> int:
        n = grid[0] * grid[1]
        windows = window_count(grid, self.window)
        if windows == 0:
            raise UserInputError(f"vscan needs a grid of at least {self.window} x {self.window} patches, got {grid}")
        if budget == n:
            return n
        for v in range(budget, n):
            if self.kept_count(v, windows) == budget:
                return v
        reachable = sorted({self.kept_count(v, windows) for v in range(1, n)} | {n})
        lower = max((r for r in reachable if r < budget), default=None)
        upper = min((r for r in reachable if r > budget), default=None)
        near = ", ".join(str(r) for r in (lower, upper) if r is not None)
        raise UserInputError(f"vscan keeps 16 k + V - int(V / 2) tokens and cannot keep exactly {budget} on a "
                             f"{grid[0]}x{grid[1]} grid; nearest accepted budgets: {near}")

    def check_budget(self, budget: int, num_tokens: int) -> int:
        budget = super().check_budget(budget, num_tokens)
        side = int(num_tokens ** 0.5)
        if side * side == num_tokens and side >= self.window:  # a single square crop: check reachability now
            self.visual_token_num(budget, (side, side))
        return budget

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        out = {"budget": budget, "global_ratio": self.global_ratio, "window": self.window,
               "shallow_layer": self.shallow_layer, "llm_stage": "not run (layer_list None)"}
        side = int(num_tokens ** 0.5)
        if side * side == num_tokens and side >= self.window:
            v = self.visual_token_num(budget, (side, side))
            windows = window_count((side, side), self.window)
            local = (self._local_request(v) // windows) * windows if v < num_tokens else 0
            out.update({"visual_token_num": v, "local": local, "global": budget - local})
        return out

    # ------------------------------------------------------------------ selection + merging
    def select(self, tokens: VisualTokens, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K) retained patches in raster order and their relaxed gains (None when exact)."""
        B, N = tokens.batch_size, tokens.num_tokens
        H, W = tokens.grid
        v = self.visual_token_num(budget, tokens.grid)
        device = tokens.features.device
        if v == N:
            return torch.arange(N, device=device).expand(B, N), None
        ws = self.window
        windows = window_count(tokens.grid, ws)
        req = self._local_request(v)
        k = req // windows
        shallow = tokens.cls_attention(self.shallow_layer, reduce="mean")
        deep = tokens.cls_attention(self.deep_layer, reduce="mean")
        # window cells: (windows, ws * ws) raster indices, windows row-major, cells raster within a window
        ys, xs = torch.arange(ws, device=device).repeat_interleave(ws), torch.arange(ws, device=device).repeat(ws)
        cells = torch.stack([(i * ws + ys) * W + j * ws + xs
                             for i in range(H // ws) for j in range(W // ws)])
        win_scores = shallow[:, cells]  # (B, windows, ws * ws)
        local_pos = win_scores.detach().float().topk(k, dim=-1).indices  # (B, windows, k)
        local = cells.expand(B, -1, -1).gather(2, local_pos).flatten(1)  # (B, windows * k)
        masked = deep.scatter(1, local, 0.0)
        global_ = masked.detach().float().topk(v - req, dim=-1).indices
        index = torch.cat([local, global_], dim=1).sort(dim=1).values
        if self.relaxation == "none":
            return index, None
        gain = torch.ones(B, N, dtype=deep.dtype, device=device)
        if k:
            g_local = self.gains(win_scores.flatten(0, 1), local_pos.flatten(0, 1), k).view(B, -1)
            gain = gain.scatter(1, local, g_local)
        if v - req:
            gain = gain.scatter(1, global_, self.gains(masked, global_, v - req))
        return index, gain.gather(1, index)

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        if projected is None:
            raise ValueError("vscan merges projected features; call compress() or pass projected")
        N = tokens.num_tokens
        index, gain = self.select(tokens, budget)
        plan = KeepPlan.from_indices(index, N, space="projected")
        if index.shape[1] < N:
            plan = KeepPlan(merge_weights(projected[:, :N], index), space="projected")
        return plan.scale_rows(gain)


def merge_weights(projected: torch.Tensor, retained: torch.Tensor) -> torch.Tensor:
    """(B, T, N + 1) weights of VScan's ``token_merging``: every non-retained token averaged into the
    retained token (``retained``, (B, T) raster order) it is most cosine-similar to."""
    B, N, _ = projected.shape
    T = retained.shape[1]
    keep = torch.zeros(B, N, dtype=torch.bool, device=projected.device).scatter(1, retained, True)
    others = torch.arange(N, device=projected.device).expand(B, N)[~keep].view(B, N - T)
    x = F.normalize(projected.detach().float(), dim=-1)
    rows = torch.arange(B, device=projected.device).unsqueeze(-1)
    nearest = (x[rows, others] @ x[rows, retained].transpose(1, 2)).argmax(dim=-1)  # (B, N - T) slot
    counts = torch.ones(B, T, device=projected.device).scatter_add(1, nearest, torch.ones_like(nearest, dtype=torch.float))
    w = torch.zeros(B, T, N + 1, device=projected.device)
    w.scatter_(2, retained.unsqueeze(-1), 1.0)
    w[rows, nearest, others] = 1.0
    return w / counts.unsqueeze(-1)
