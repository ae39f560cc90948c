"""A learned token scorer as a robustvtc compressor plug-in (the worked example of docs/plugins.md).

The rule, in the style of learned pruning methods: a small MLP reads each visual token's encoder feature
(layer-normalised, no learned affine) and gives it a score; the K highest-scoring tokens reach the LLM, in
raster order. The MLP is trained by ``train.py`` (this folder) to put its score mass where the model's own
answer depends on the tokens (gradient x input saliency of the answer loss, full tokens) and saved as
``scorer.safetensors``; the class reads it back from the path given as ``weights``.

Use it from a scenario without installing anything (see ``scenario.yaml``)::

    compressors:
      - {name: examples.learned_scorer.scorer:LearnedScorer, weights: scorer.safetensors}

or register it for good through an entry point in your package's pyproject.toml::

    [project.entry-points."robustvtc.compressors"]
    learned_scorer = "examples.learned_scorer.scorer:LearnedScorer"
"""
from __future__ import annotations

from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from robustvtc.compression import KeepPlan, PreLLMCompressor
from robustvtc.compression.base import topk_sorted
from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens


class ScorerNet(torch.nn.Module):
    """feature (D) -> LayerNorm (no affine) -> Linear(D, hidden) -> GELU -> Linear(hidden, 1)."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N)
        x = torch.nn.functional.layer_norm(features.float(), (self.dim,))
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))).squeeze(-1)

    def save(self, path: str, **metadata: str) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path,
                  metadata={"dim": str(self.dim), "hidden": str(self.hidden), **metadata})

    @classmethod
    def load(cls, path: str) -> "ScorerNet":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            state = load_file(path)
        except FileNotFoundError:
            raise UserInputError(f"learned_scorer: weights file not found: {path}; accepted: a .safetensors file "
                                 "written by examples/learned_scorer/train.py") from None
        except Exception as exc:  # noqa: BLE001 -- a corrupt or foreign file, said in one line
            raise UserInputError(f"learned_scorer: {path} is not a safetensors file ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        expected = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        if set(state) != expected or "dim" not in meta:
            raise UserInputError(f"learned_scorer: {path} holds {sorted(state)}; accepted: a scorer written by "
                                 f"train.py ({', '.join(sorted(expected))} and dim/hidden metadata)")
        net = cls(int(meta["dim"]), int(meta.get("hidden", state["fc1.weight"].shape[0])))
        net.load_state_dict(state)
        return net.eval().requires_grad_(False)


class LearnedScorer(PreLLMCompressor):
    """Top-K visual tokens by a learned per-token MLP score (trained by ``train.py``)."""

    name = "learned_scorer"
    paper = "example plug-in (examples/learned_scorer): MLP token scorer distilled from answer-loss saliency"
    native_knob = "budget = K tokens kept by the learned score"
    fidelity = "example, not a published method"
    relaxable = True
    path_options: ClassVar[tuple[str, ...]] = ("weights",)  # resolved against a scenario file's folder

    def __init__(self, weights: str = "scorer.safetensors", relaxation: str = "none", temperature: float = 0.1):
        self.weights = str(weights)
        self._net = ScorerNet.load(self.weights)
        self._set_relaxation(relaxation, temperature)

    def scores(self, tokens: VisualTokens) -> torch.Tensor:
        if tokens.features.shape[-1] != self._net.dim:
            raise UserInputError(f"learned_scorer: {self.weights} scores {self._net.dim}-d features, got "
                                 f"{tokens.features.shape[-1]}-d ones (train a scorer on this model with train.py)")
        net = self._net.to(tokens.features.device)
        return net(tokens.features)

    def plan(self, tokens: VisualTokens, budget: int, projected: torch.Tensor | None = None) -> KeepPlan:
        scores = self.scores(tokens)
        index = topk_sorted(scores, budget)
        return KeepPlan.from_indices(index, tokens.num_tokens).scale_rows(self.gains(scores, index, budget))
