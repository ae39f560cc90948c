"""Clean accuracy of a model under every compressor x budget, from per-sample records.

Each batch of images is encoded once; the visual tokens (with every signal any compressor needs) are
reused across the whole compressor x budget grid, and only the compression + LLM part repeats.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd
import torch

from .compression import COMPRESSORS
from .data import synthetic as S
from .errors import UserInputError
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


def build_targets(adapter, compressors: Sequence[str], budgets: Sequence[int], seed: int = 0) -> list[Target]:
    """One target per compressor x budget ('none' once, at all tokens); randomised compressors get ``seed``."""
    n = adapter.num_visual_tokens
    targets = []
    for name in compressors:
        cls = COMPRESSORS.get(name)
        comp = cls(seed=seed) if cls.randomized else cls()
        for budget in ([n] if name == "none" else budgets):
            targets.append(Target(adapter, comp, budget))
    return targets


@torch.no_grad()
def evaluate(adapter, compressors: Sequence[str] = ("none", "random", "fastervlm"), budgets: Sequence[int] = (16, 32, 48),
             samples: int = 500, split: str = "test", seed: int = 0, batch_size: int = 50, progress=None) -> pd.DataFrame:
    """Per-sample records: one row per (sample, compressor, budget) with the prediction and correctness."""
    targets = build_targets(adapter, compressors, budgets, seed)
    layers = sorted({layer for t in targets for layer in t.signal_layers})
    data = S.generate_dataset(samples, split)
    records = []
    for start in range(0, samples, batch_size):
        chunk = data[start:start + batch_size]
        pixels = S.to_pixels(chunk)
        tokens = adapter.encode(pixels, layers)
        questions = [s.question for s in chunk]
        for target in targets:
            preds = target.predict(pixels, questions, S.ANSWERS, tokens=tokens)
            for s, p in zip(chunk, preds):
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
