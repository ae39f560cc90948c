"""Compressor interface: a published token-compression rule that turns N visual tokens into K.

Three stages, one meaning of budget (the number of visual tokens that reach the LLM; in-LLM methods: kept
after their last pruning layer):

* pre-LLM compressors return a :class:`KeepPlan` (which sources each kept token is made of, with merge
  weights); the plan is applied to the features so kept values stay differentiable w.r.t. pixels while
  the selection itself is discrete;
* in-encoder compressors (ToMe) re-run the vision encoder with merging inside its layers;
* in-LLM compressors choose which visual tokens survive at one or more decoder layers.

Score-based methods offer an opt-in differentiable relaxation of their discrete selection
(``relaxation="straight_through"`` or ``"soft_topk"``); the default ``"none"`` is the exact published rule.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import UserInputError
from ..models.base import InLLMContext, KeepPlan, VisualTokens  # noqa: F401  (KeepPlan: re-exported)

RELAXATIONS = ("none", "straight_through", "soft_topk")


class Compressor:
    """Base class; subclasses declare their metadata as class attributes (garak-style) and are registered."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    stage: ClassVar[str] = "pre_llm"  # "pre_llm", "in_encoder" or "in_llm"
    text_aware: ClassVar[bool] = False
    randomized: ClassVar[bool] = False
    native_knob: ClassVar[str] = "budget"  # the method's own control and how the budget maps to it
    # how closely the rule follows the published one, where it departs ("" = re-stated from the official code);
    # shown by `robustvtc list compressors`
    fidelity: ClassVar[str] = ""
    relaxable: ClassVar[bool] = False  # offers relaxation="straight_through"/"soft_topk"
    normalized_plan: ClassVar[bool] = True  # keep-plan rows sum to 1 (False: the method adds, not averages)
    # model capabilities the method needs (keys of robustvtc.models.base.CAPABILITIES, e.g. "cls_token");
    # adapters that lack one refuse the method
    requires: ClassVar[tuple[str, ...]] = ()

    relaxation: str = "none"
    temperature: float = 0.1

    def signal_layers(self) -> tuple[int, ...]:
        """Encoder layers whose queries/keys the method needs besides the feature layer."""
        return ()

    def check_budget(self, budget: int, num_tokens: int) -> int:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise UserInputError(f"budget must be an integer, got {budget!r}")
        if not 1 <= budget <= num_tokens:
            raise UserInputError(f"budget {budget} out of range; accepted: 1..{num_tokens} (the model's visual token count)")
        return budget

    def check_model(self, adapter) -> None:
        """Refuse, in one line, a model whose structure the method cannot act on (beyond missing ``requires``
        signals, which :func:`robustvtc.compression.check_compatible` checks)."""

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        """How ``budget`` maps onto the method's own knobs, for results. ``num_layers``: depth of the stage
        the method acts in (LLM layers for in-LLM methods, encoder layers for in-encoder ones)."""
        return {"budget": budget}

    def _set_relaxation(self, relaxation: str, temperature: float) -> None:
        if relaxation not in RELAXATIONS:
            raise UserInputError(f"unknown relaxation {relaxation!r}; accepted: {', '.join(RELAXATIONS)}")
        if not temperature > 0:
            raise UserInputError(f"temperature must be > 0, got {temperature!r}")
        self.relaxation, self.temperature = relaxation, float(temperature)

    def gains(self, scores: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor | None:
        """Relaxed weights (B, len(index)) of the tokens ``index`` kept by a top-``k`` of ``scores``; None if exact."""
        return relaxed_gains(scores, index, k, self.relaxation, self.temperature)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class PreLLMCompressor(Compressor):
    stage = "pre_llm"
    space: ClassVar[str] = "vision"  # "projected": the method plans on (and merges) LLM-input embeddings

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        """The keep plan; ``projected`` (B, N + 1, D_llm) is given to methods with ``space = "projected"``."""
        raise NotImplementedError

    def compress(self, tokens: VisualTokens, budget: int,
                 project) -> tuple[torch.Tensor | list[torch.Tensor], KeepPlan]:
        """Kept LLM-input embeddings (B, K, D_llm) and the plan; ``project`` is the adapter's projector.

        Adaptive plans (``plan.lengths`` set) give a list of per-image (K_b, D_llm) tensors instead.
        """
        budget = self.check_budget(budget, tokens.num_tokens)
        sources = tokens.sources()
        if self.space == "projected":
            projected = project(sources)
            plan = self.plan(tokens, budget, projected=projected)
            out = plan.apply(projected)
        else:
            plan = self.plan(tokens, budget)
            out = project(plan.apply(sources))
        if plan.lengths is not None:
            return [o[:n] for o, n in zip(out, plan.lengths.tolist())], plan
        return out, plan


class EncoderCompressor(Compressor):
    """Merges inside the vision encoder, so it re-runs the encoder itself (ToMe)."""

    stage = "in_encoder"

    def compress_pixels(self, adapter, pixels: torch.Tensor, budget: int) -> tuple[torch.Tensor, KeepPlan]:
        """LLM-input embeddings (B, K, D_llm) of the merged encoder output and an "encoder" provenance plan."""
        raise NotImplementedError


class InLLMHook:
    """A bound in-LLM compressor: before each decoder layer of ``schedule`` keep that many visual tokens.

    ``last_keep`` (B, budget) holds, after a forward, the original indices (0..N-1, raster order) of the
    visual tokens that survived the last pruning layer; a merged token counts as its largest-weight original
    token (the lowest index among equal weights). ``last_weights`` (B, budget, N) is, for methods that merge
    (``select`` returning merge weights), what each surviving token is made of over the original tokens, in
    sequence order; None for pure selection.
    """

    def __init__(self, compressor: "InLLMCompressor", schedule: dict[int, int]):
        self.compressor = compressor
        self.schedule = dict(sorted(schedule.items()))
        self.layers = tuple(self.schedule)
        self.budget = self.schedule[self.layers[-1]]
        self.position_policy = compressor.position_policy
        self.last_keep: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self._alive: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None  # (B, K, N) provenance once a merge happened
        self._memo: dict = {}
        self._num = 0

    @property
    def layer(self) -> int:
        """The last pruning layer (where the budget is reached)."""
        return self.layers[-1]

    def select(self, ctx: InLLMContext) -> tuple:
        """``(keep, gain)`` -- sorted columns of ``ctx.visual_index`` to keep (B, K') and optional relaxed gains
        (B, K') -- or ``(keep, gain, merge)`` for a method that merges (see
        :class:`robustvtc.models.base.InLLMHook`)."""
        if ctx.layer == self.layers[0]:
            b, n = ctx.visual_index.shape
            self._alive = torch.arange(n, device=ctx.visual_index.device).expand(b, n)
            self._weights, self._memo, self._num = None, {}, n
        ctx.memo = self._memo
        keep, gain, *merge = self.compressor.select(ctx, self.schedule[ctx.layer])
        merge = merge[0] if merge else None
        if merge is None:
            keep, order = keep.sort(dim=1)
            if gain is not None:
                gain = gain.gather(1, order)
            self._alive = self._alive.gather(1, keep)
            if self._weights is not None:
                self._weights = self._weights.gather(1, keep.unsqueeze(-1).expand(-1, -1, self._weights.shape[-1]))
        else:  # merge rows are in sequence order: keep gives the places only
            keep = keep.sort(dim=1).values
            if self._weights is None:
                self._weights = F.one_hot(self._alive, self._num).float()
            self._weights = torch.einsum("bkn,bnm->bkm", merge.detach().float(), self._weights)
            self._alive = self._weights.argmax(dim=-1)
        if ctx.layer == self.layers[-1]:
            self.last_keep = self._alive.detach().sort(dim=1).values
            self.last_weights = None if self._weights is None else self._weights.detach()
        return (keep, gain) if merge is None else (keep, gain, merge)


class InLLMCompressor(Compressor):
    """Drops visual tokens before decoder layer ``layer`` (scored with layer ``layer - 1``'s attention)."""

    stage = "in_llm"
    layer: int = 2
    position_policy: str = "original"  # keep the kept tokens' RoPE positions ("original") or renumber ("contiguous")

    def schedule(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict[int, int]:
        """Pruning layer -> visual tokens kept from that layer on; the last entry is the budget."""
        return {self.layer: budget}

    def scores(self, ctx: InLLMContext) -> torch.Tensor:
        """(B, K) importance of the visual tokens alive at ``ctx`` (score-based methods)."""
        raise NotImplementedError

    def select(self, ctx: InLLMContext, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Columns of ``ctx.visual_index`` to keep (B, keep) and relaxed gains; default: top-``keep`` scores."""
        scores = self.scores(ctx)
        index = topk_sorted(scores, keep)
        return index, self.gains(scores, index, keep)

    def bind(self, budget: int, num_tokens: int, num_layers: int | None = None) -> InLLMHook:
        schedule = self.schedule(self.check_budget(budget, num_tokens), num_tokens, num_layers)
        for layer in schedule:
            if layer < 1 or (num_layers is not None and layer >= num_layers):
                top = "" if num_layers is None else f"..{num_layers - 1}"
                raise UserInputError(f"{self.name} prunes before decoder layer {layer}; accepted layers: 1{top} "
                                     "(a layer needs a previous one to score with)")
        return InLLMHook(self, schedule)

    def budget_mapping(self, budget: int, num_tokens: int, num_layers: int | None = None) -> dict:
        schedule = self.schedule(budget, num_tokens, num_layers)
        return {"budget": budget, "prune_before_layers": list(schedule), "kept_per_layer": list(schedule.values())}


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, returned in ascending (raster) order; ties -> lower index."""
    return scores.detach().float().topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def remaining_indices(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n - k) the indices 0..n-1 not in ``chosen`` (B, k), ascending."""
    free = torch.ones(chosen.shape[0], n, dtype=torch.bool, device=chosen.device).scatter(1, chosen, False)
    return torch.arange(n, device=chosen.device).expand(chosen.shape[0], n)[free].view(chosen.shape[0], -1)


def soft_membership(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Differentiable top-k membership in (0, 1): sigmoid((s - tau) / T) per row.

    tau lies halfway between the k-th and (k+1)-th highest score (so exactly the exact top-k sit above
    0.5) and T = temperature * std(s), which makes the relaxation independent of the score scale.
    """
    s = scores.float()
    n = s.shape[-1]
    top = s.topk(min(k + 1, n), dim=-1).values
    spread = s.detach().std(dim=-1, keepdim=True).nan_to_num(0.0).clamp_min(1e-12)
    tau = (top[..., k - 1: k] + top[..., k: k + 1]) / 2 if k < n else top[..., -1:] - spread
    return torch.sigmoid((s - tau) / (temperature * spread))


def relaxed_gains(scores: torch.Tensor, index: torch.Tensor, k: int, relaxation: str,
                  temperature: float) -> torch.Tensor | None:
    """Per-kept-token weights carrying gradient w.r.t. ``scores``.

    "straight_through": exactly 1 in the forward pass, d(soft membership)/d(scores) backward;
    "soft_topk": the soft membership itself (the forward pass changes); "none": None (exact rule).
    """
    if relaxation == "none":
        return None
    m = soft_membership(scores, k, temperature).gather(-1, index)
    return 1 + (m - m.detach()) if relaxation == "straight_through" else m
