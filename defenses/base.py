"""Defense interface: a hook at one point of the pipeline, declared on the class (garak-style).

Every defense says where it acts (``hook``), whether it draws randomness (``randomized``) and whether its
gradient is exact (``differentiable``; otherwise ``bpda`` names the surrogate its backward pass uses). A
:class:`~robustvtc.target.Target` applies defenses at their hook points, and attacks on a defended target
adapt from these declarations alone: EOT over the randomness (:func:`adaptive_attack_options`) and BPDA,
which non-differentiable defenses build into their own forward pass, so no attack needs to know them.

Hyper-parameters are keywords with defaults (torchattacks-style) and show in ``repr``; randomised
defenses draw from their own generator seeded by ``seed``, so a run repeats and successive draws differ.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch

from robustvtc.compression.base import KeepPlan, PreLLMCompressor
from robustvtc.errors import UserInputError
from robustvtc.models.base import VisualTokens
from robustvtc.registry import Registry

if TYPE_CHECKING:
    from robustvtc.target import Target

DEFENSES: Registry = Registry("defense", group="robustvtc.defenses")

HOOKS = {
    "input": "transforms the pixels before the vision encoder",
    "scores": "changes the importance scores (CLS attention) a compressor ranks tokens by",
    "selection": "changes how the kept token set is chosen",
    "output": "changes how answer scores are formed from the rest of the pipeline",
    "detection": "flags suspicious inputs",
}

ScoreTransform = Callable[[torch.Tensor, VisualTokens, "int | None", str], torch.Tensor]
"""(scores, tokens, layer, reduce) -> scores of the same shape; ``layer``/``reduce`` as in ``cls_attention``."""


def get_defense(name: str, **kwargs: Any) -> "Defense":
    """``get_defense("jpeg", quality=50)`` -- the defense registered under ``name``."""
    return DEFENSES.get(name)(**kwargs)


def list_defenses(pattern: str = "*") -> list[str]:
    return DEFENSES.names(pattern)


def build_defenses(spec: "Defense | str | Mapping | Iterable | None") -> tuple["Defense", ...]:
    """Defenses from names, ``{name: kwargs}`` mappings, Defense objects, or a sequence of those (in order)."""
    if spec is None:
        return ()
    if isinstance(spec, (Defense, str)):
        spec = [spec]
    elif isinstance(spec, Mapping):
        spec = [{k: v} for k, v in spec.items()]
    out: list[Defense] = []
    for item in spec:
        if isinstance(item, Defense):
            out.append(item)
        elif isinstance(item, str):
            out.append(get_defense(item))
        elif isinstance(item, Mapping):
            for name, kwargs in item.items():
                if kwargs is not None and not isinstance(kwargs, Mapping):
                    raise UserInputError(f"options of defense {name!r} must be a mapping, got {kwargs!r}")
                out.append(get_defense(name, **(kwargs or {})))
        else:
            raise UserInputError(f"a defense is a name, a {{name: options}} mapping or a Defense, got {item!r}")
    return tuple(out)


def adaptive_attack_options(target: "Target", eot_samples: int = 8) -> dict[str, Any]:
    """Common attack options that make an attack on ``target`` adaptive to its declared defenses.

    A randomised target (compressor or any defense) gets EOT with ``eot_samples`` draws per step; BPDA needs
    no option, because non-differentiable defenses already give their surrogate gradient in backward.
    """
    return {"eot_samples": eot_samples if target.randomized else 1}


class Defense:
    """Base class; subclasses set the class metadata below and implement their hook's method."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    hook: ClassVar[str]
    randomized: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    bpda: ClassVar[str] = ""  # the backward-pass surrogate of a non-differentiable defense

    def check(self, target: "Target") -> None:
        """Raise :class:`UserInputError` when the defense cannot act on ``target``."""

    # ------------------------------------------------------------------ hyper-parameters
    @classmethod
    def _parameters(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind in named]

    def hyperparameters(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self._parameters()}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({body})"

    # ------------------------------------------------------------------ randomness
    def _seed(self, seed: int) -> None:
        self.seed = int_in_range(seed, "seed", 0)
        self._generator = torch.Generator().manual_seed(self.seed)

    def _randn(self, like: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Standard normal draws (shape of ``like`` by default) from this defense's generator."""
        shape = like.shape if shape is None else shape
        return torch.randn(tuple(shape), generator=self._generator).to(like.device, like.dtype)

    def _randint(self, low: int, high: int, count: int) -> list[int]:
        """``count`` integers uniform in [low, high]."""
        return torch.randint(low, high + 1, (count,), generator=self._generator).tolist()


DEFENSES.base = Defense  # module:Class references and entry-point plug-ins must subclass it


class InputDefense(Defense):
    hook = "input"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> transformed pixels of the same shape and range."""
        raise NotImplementedError


class ScoreDefense(Defense):
    """Changes the CLS-attention importance every score-based pre-LLM compressor reads via ``cls_attention``."""

    hook = "scores"

    def check(self, target: "Target") -> None:
        require_ranking_compressor(self, target)

    def bind(self, target: "Target", pixels: torch.Tensor | None, layers: Sequence[int]) -> ScoreTransform:
        """The transform for one forward of ``target`` on ``pixels`` (encoded with ``layers``)."""
        return self.transform

    def transform(self, scores: torch.Tensor, tokens: VisualTokens, layer: int | None, reduce: str) -> torch.Tensor:
        raise NotImplementedError


class SelectionDefense(Defense):
    """Chooses the kept set in place of (or around) the deployed pre-LLM compressor's own rule."""

    hook = "selection"

    def check(self, target: "Target") -> None:
        if not isinstance(target.compressor, PreLLMCompressor):
            raise UserInputError(f"defense {self.name!r} chooses which tokens a pre-LLM compressor keeps; "
                                 f"compressor {target.compressor.name!r} is not one")

    def plan(self, compressor: PreLLMCompressor, tokens: VisualTokens, budget: int,
             project: Callable[[torch.Tensor], torch.Tensor]) -> KeepPlan:
        raise NotImplementedError


class OutputDefense(Defense):
    hook = "output"

    def aggregate(self, loglik: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        """Defended log-likelihoods given ``loglik(pixels)``, the rest of the pipeline (B, ...)."""
        raise NotImplementedError


@dataclass(frozen=True)
class DetectionRates:
    """True-positive rate on adversarial inputs and false-positive rate on clean ones."""

    tpr: float
    fpr: float
    adversarial: int
    clean: int


def detection_rates(clean_flags: Sequence[bool] | torch.Tensor,
                    adversarial_flags: Sequence[bool] | torch.Tensor) -> DetectionRates:
    """TPR = flagged share of the adversarial inputs, FPR = flagged share of the clean ones."""
    clean = torch.as_tensor(clean_flags, dtype=torch.bool).flatten()
    adv = torch.as_tensor(adversarial_flags, dtype=torch.bool).flatten()
    if clean.numel() == 0 or adv.numel() == 0:
        raise UserInputError("detection rates need at least one clean and one adversarial input")
    return DetectionRates(adv.float().mean().item(), clean.float().mean().item(), adv.numel(), clean.numel())


class DetectionDefense(Defense):
    """Flags an input when its statistic exceeds a threshold calibrated on clean data at a target FPR."""

    hook = "detection"
    threshold: float | None = None

    def statistic(self, target: "Target", pixels: torch.Tensor) -> torch.Tensor:
        """(B,) higher = more suspicious."""
        raise NotImplementedError

    def surrogate(self, target: "Target", pixels: torch.Tensor) -> torch.Tensor:
        """(B,) a differentiable stand-in for :meth:`statistic` (higher = more suspicious) that detection-aware
        attacks descend; the statistic itself by default (a detector whose statistic has no gradient overrides)."""
        with torch.enable_grad():
            return self.statistic(target, pixels)

    def calibrate(self, target: "Target", clean: torch.Tensor, fpr: float | None = None) -> float:
        """Set the threshold so that at most ``fpr`` (default: the defense's own) of ``clean`` is flagged."""
        fpr = self.fpr if fpr is None else fpr
        stats = self.statistic(target, clean).detach().double().cpu()
        self.threshold = float(torch.quantile(stats, 1 - fpr, interpolation="higher"))
        return self.threshold

    @torch.no_grad()
    def flags(self, target: "Target", pixels: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            raise UserInputError(f"defense {self.name!r} has no threshold: calibrate it on clean images first "
                                 "(defense.calibrate(target, clean_pixels)) or pass threshold=")
        return self.statistic(target, pixels) > self.threshold

    def rates(self, target: "Target", clean: torch.Tensor, adversarial: torch.Tensor) -> DetectionRates:
        return detection_rates(self.flags(target, clean), self.flags(target, adversarial))


def require_ranking_compressor(defense: Defense, target: "Target") -> None:
    """Refuse a compressor that does not rank tokens by CLS attention before the LLM ("none" keeps all: no-op)."""
    comp = target.compressor
    if comp.name != "none" and (not isinstance(comp, PreLLMCompressor) or "cls_token" not in comp.requires):
        raise UserInputError(f"defense {defense.name!r} acts on the CLS-attention importance a pre-LLM compressor "
                             f"ranks by; compressor {comp.name!r} does not rank by it")


def straight_through(pixels: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(pixels)`` forward, identity backward: BPDA with the identity as the differentiable surrogate."""
    with torch.no_grad():
        out = fn(pixels.detach())
    return out + (pixels - pixels.detach())  # exactly ``out`` forward


def int_in_range(value: Any, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        accepted = f">= {low}" if high is None else f"in {low}..{high}"
        raise UserInputError(f"{what} must be an integer {accepted}, got {value!r}")
    return value


def float_in_range(value: Any, what: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise UserInputError(f"{what} must be a number {bound}, got {value!r}")
    return value
