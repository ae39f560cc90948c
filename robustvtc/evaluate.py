"""Clean accuracy of a model under every compressor x budget, from per-sample records.

Each batch of images is encoded once; the visual tokens (with every signal any compressor needs) are
reused across the whole compressor x budget grid, and only the compression + LLM part repeats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch

from .compression import COMPRESSORS, KeepPlan
from .data import synthetic as S
from .errors import UserInputError
from .models.base import VisualTokens
from .target import Target


def parse_budgets(budgets: Iterable[int | str], num_tokens: int) -> list[int]:
    """Budgets as ints; "all" means every visual token."""
    out = []
    for b in budgets:
        if isinstance(b, str) and b.strip().lower() == "all":
            out.append(num_tokens)
            continue
        try:
            value = int(b)
        except (TypeError, ValueError):
            raise UserInputError(f"budget {b!r} is not an integer; accepted: 1..{num_tokens} or 'all'") from None
        if not 1 <= value <= num_tokens:
            raise UserInputError(f"budget {value} out of range; accepted: 1..{num_tokens} or 'all'")
        out.append(value)
    return out


def make_target(adapter, compressor: str, budget: int | None = None, seed: int = 0,
                defenses: Sequence = ()) -> Target:
    """A target with a fresh compressor (a randomised one seeded with ``seed``) and optional defenses."""
    cls = COMPRESSORS.get(compressor)
    comp = cls(seed=seed) if cls.randomized else cls()
    return Target(adapter, comp, budget, **({"defenses": list(defenses)} if defenses else {}))


def build_targets(adapter, compressors: Sequence[str], budgets: Sequence[int], seed: int = 0,
                  defenses: Sequence = ()) -> list[Target]:
    """One target per compressor x budget ('none' once, at all tokens); randomised compressors get ``seed``."""
    n = adapter.num_visual_tokens
    return [make_target(adapter, name, budget, seed, defenses)
            for name in compressors for budget in ([n] if name == "none" else budgets)]


@dataclass
class CellResult:
    """One target's evaluation of a batch: predictions, the visual tokens it saw, the patches it kept and
    what its detection defenses flagged."""

    predictions: list[str]
    tokens: VisualTokens
    kept: torch.Tensor | None  # (B, N) bool, see kept_sources; None where the compressor decides inside the LLM
    flagged: list[bool]


def kept_sources(plan: KeepPlan) -> torch.Tensor:
    """(B, N) bool: the patches the kept tokens stand for, a merged token counting as its largest-weight source.

    (Every patch contributes to some merged token in VisionZip or PruMerge, so "contributes" would mark all.)
    """
    n = plan.num_patches
    real = plan.weights.abs().sum(dim=-1) > 0  # rows past an adaptive method's length are zero
    src = torch.where(real, plan.primary_sources(), n)
    mask = torch.zeros(src.shape[0], n + 1, dtype=torch.bool, device=src.device)
    return mask.scatter_(1, src, True)[:, :n]


Predict = Callable[[Target, torch.Tensor, VisualTokens], list[str]]


@torch.no_grad()
def evaluate_grid(targets: Sequence[Target], pixels: torch.Tensor, predict: Predict,
                  keep_maps: bool = False) -> list[CellResult]:
    """Evaluate ``pixels`` on every target, the batch encoded once for the whole grid.

    Only the compression and LLM part repeats per target (a target with input defenses re-encodes its own
    transformed pixels). ``keep_maps`` also records each pre-LLM / in-encoder compressor's kept patches.
    """
    layers = sorted({layer for t in targets for layer in t.signal_layers})
    common = targets[0].adapter.encode(pixels, layers) if targets else None
    out = []
    for target in targets:
        tokens, kept = common, None
        if keep_maps and target.compressor.stage != "in_llm":
            fwd = target.forward(pixels, common)
            tokens, kept = fwd.tokens, None if fwd.plan is None else kept_sources(fwd.plan)
        out.append(CellResult(predict(target, pixels, tokens), tokens, kept, target.detect(pixels).tolist()))
    return out


@torch.no_grad()
def evaluate(adapter, compressors: Sequence[str] = ("none", "random", "fastervlm"), budgets: Sequence[int] = (16, 32, 48),
             samples: int = 500, split: str = "test", seed: int = 0, batch_size: int = 50, progress=None) -> pd.DataFrame:
    """Per-sample records: one row per (sample, compressor, budget) with the prediction and correctness."""
    targets = build_targets(adapter, compressors, budgets, seed)
    data = S.generate_dataset(samples, split)
    records = []
    for start in range(0, samples, batch_size):
        chunk = data[start:start + batch_size]
        questions = [s.question for s in chunk]
        cells = evaluate_grid(targets, S.to_pixels(chunk),
                              lambda t, px, tok: t.predict(px, questions, S.ANSWERS, tokens=tok))
        for target, cell in zip(targets, cells):
            for s, p in zip(chunk, cell.predictions):
                records.append({"sample": s.index, "qtype": s.qtype, "compressor": target.compressor.name,
                                "budget": target.budget, "answer": s.answer, "prediction": p,
                                "correct": p == s.answer})
        if progress is not None:
            progress(len(chunk))
    return pd.DataFrame.from_records(records)


def accuracy_table(records: pd.DataFrame, by_type: bool = False) -> pd.DataFrame:
    """Accuracy (%): compressors x budgets, or (compressor, budget) x question type with an "all" column."""
    if not by_type:
        table = records.pivot_table(index="compressor", columns="budget", values="correct", aggfunc="mean")
    else:
        table = records.pivot_table(index=["compressor", "budget"], columns="qtype", values="correct", aggfunc="mean")
        table["all"] = records.groupby(["compressor", "budget"])["correct"].mean()
    return (table * 100).round(1)
