"""The grid a campaign evaluates: targets for every compressor x budget, one encoder pass shared across them,
and the per-sample measures of what compression kept (kept-set overlap, rank correlation, kept-token
distortion).

Each batch of images is encoded once; the visual tokens (with every signal any compressor needs) are
reused across the whole compressor x budget grid, and only the compression + LLM part repeats.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..compression import COMPRESSORS, KeepPlan
from ..errors import UserInputError
from ..models.base import VisualTokens
from ..target import EncodingCache, Target


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


def campaign_budgets(budgets: Iterable[int | str], num_tokens: int) -> list[int]:
    """A scenario's budgets as distinct ints for a model with ``num_tokens`` visual tokens (one line naming
    the ``budgets`` key otherwise)."""
    try:
        return list(dict.fromkeys(parse_budgets(budgets, num_tokens)))
    except UserInputError as exc:
        raise UserInputError(f"budgets: {exc}") from None


def chunked(items: Sequence, size: int) -> list:
    """Fixed consecutive chunks of ``size`` items: a chunk's composition never depends on what already ran."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_target(adapter, compressor: str, budget: int | None = None, seed: int = 0,
                defenses: Sequence = (), scenario=None) -> Target:
    """A target with a fresh compressor (a randomised one seeded with ``seed``) and optional defenses.

    ``compressor``: a registered name, a plug-in, ``module.path:ClassName``, or a label of ``scenario``'s
    ``compressors`` (which then gives the class and its options)."""
    name, options = scenario.compressor_spec(compressor) if scenario is not None else (compressor, {})
    cls = COMPRESSORS.get(name)
    if cls.randomized and "seed" in inspect.signature(cls.__init__).parameters:
        options["seed"] = seed
    try:
        comp = cls(**options)
    except TypeError as exc:  # a plug-in's constructor refusing an option the scenario could not check
        raise UserInputError(f"compressor {compressor!r}: {exc}") from None
    return Target(adapter, comp, budget, **({"defenses": list(defenses)} if defenses else {}))


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
                  keep_maps: bool = False, encodings: EncodingCache | None = None) -> list[CellResult]:
    """Evaluate ``pixels`` on every target, the batch encoded once for the whole grid (read from ``encodings``
    when it holds these pixels).

    Only the compression and LLM part repeats per target (a target with input defenses re-encodes its own
    transformed pixels). ``keep_maps`` also records each pre-LLM / in-encoder compressor's kept patches, taken
    from the forward pass that scored (the compressor runs once per target; a target whose output defense
    scores noisy copies runs it once more on the pixels themselves).
    """
    layers = sorted({layer for t in targets for layer in t.signal_layers})
    common = None
    if targets:
        adapter = targets[0].adapter
        common = encodings.encode(adapter, pixels, layers) if encodings else adapter.encode(pixels, layers)
    out = []
    for target in targets:
        with target.recording() as made:
            predictions = predict(target, pixels, common)
        tokens, kept = common, None
        if keep_maps and target.compressor.stage != "in_llm":
            fwd = made[0] if made and not target.scores_own_pixels else target.forward(pixels, common)
            tokens, kept = fwd.tokens, None if fwd.plan is None else kept_sources(fwd.plan)
        out.append(CellResult(predictions, tokens, kept, target.detect(pixels).tolist()))
    return out


# ---------------------------------------------------------------------------------------------- per-sample measures
def kept_overlap(clean: torch.Tensor | None, adv: torch.Tensor | None) -> list[float] | None:
    """|kept_adv ∩ kept_clean| / K per sample, K = |kept_clean| (CAGE, arXiv 2601.21531: the share of the
    clean image's kept tokens the compressor still keeps on the adversarial one); None without a keep plan."""
    if clean is None or adv is None:
        return None
    inter = (clean & adv).sum(dim=1).float()
    return (inter / clean.sum(dim=1).float().clamp_min(1)).tolist()


def rank_correlations(clean, adv) -> tuple[list[float] | None, list[float] | None]:
    """Spearman and Kendall correlation of the clean and adversarial CLS-attention importance, per sample."""
    from scipy.stats import kendalltau, spearmanr

    from ..attacks.base import importance

    if clean.cls is None or adv.cls is None:
        return None, None
    x, y = importance(clean).cpu().numpy(), importance(adv).cpu().numpy()
    return ([float(spearmanr(a, b).statistic) for a, b in zip(x, y)],
            [float(kendalltau(a, b).statistic) for a, b in zip(x, y)])


def kept_disruption(clean, adv, kept: torch.Tensor | None) -> list[float] | None:
    """Mean 1 - cos(adversarial, clean) feature of the tokens the adversarial image's plan kept, per sample."""
    if kept is None:
        return None
    d = 1 - torch.nn.functional.cosine_similarity(adv.features.float(), clean.features.float(), dim=-1)
    k = kept.to(d.device).float()
    return ((d * k).sum(dim=1) / k.sum(dim=1).clamp_min(1)).tolist()


# ---------------------------------------------------------------------------------------------- determinism
def derived_seed(scenario_seed: int, *parts) -> int:
    """A seed derived from the scenario seed and what is being done, so a unit's records do not depend on the
    order units run in."""
    import hashlib
    import json

    text = json.dumps([scenario_seed, *map(str, parts)])
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global RNG set to ``seed`` inside, restored after (randomised compressors and defenses draw
    from it)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def value_at(values: list | None, b: int):
    """Item ``b`` of a per-sample measure, None for a missing measure or a non-finite value (JSON-safe)."""
    if values is None:
        return None
    value = values[b]
    return None if isinstance(value, float) and not math.isfinite(value) else value
