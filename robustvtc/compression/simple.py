"""The reference points every study needs: no compression and uniformly random selection."""
from __future__ import annotations

import torch

from ..errors import UserInputError
from ..models.base import VisualTokens
from .base import KeepPlan, PreLLMCompressor
from .registry import COMPRESSORS


@COMPRESSORS.register()
class NoCompression(PreLLMCompressor):
    """All N patch tokens in raster order (LLaVA's own path); the only accepted budget is N."""

    name = "none"
    fidelity = "exact (identity: all N tokens in raster order)"
    paper = "-"
    native_knob = "none (budget must equal the token count)"

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        if budget != tokens.num_tokens:
            raise UserInputError(f"compressor 'none' keeps all {tokens.num_tokens} tokens; got budget {budget}")
        idx = torch.arange(tokens.num_tokens, device=tokens.features.device).expand(tokens.batch_size, -1)
        return KeepPlan.from_indices(idx, tokens.num_tokens)


@COMPRESSORS.register()
class RandomSelection(PreLLMCompressor):
    """Uniform random subset of K patches, sorted to raster order (UniPruneBench's Random pre-LLM baseline).

    Draws come from the compressor's own generator (seeded at construction), so a run is reproducible
    and successive calls differ -- which is what EOT averages over.
    """

    name = "random"
    fidelity = "baseline, no reference code: seeded uniform draw (budget and reproducibility tested)"
    paper = "UniPruneBench random baseline (arXiv 2511.02650)"
    randomized = True
    native_knob = "keep_ratio = budget / N"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        noise = torch.rand(tokens.batch_size, tokens.num_tokens, generator=self._gen)
        idx = noise.topk(budget, dim=-1).indices.sort(dim=-1).values.to(tokens.features.device)
        return KeepPlan.from_indices(idx, tokens.num_tokens)
