"""What every attack shares: ε parsing, threat-model metadata, the PGD loop, the result object, the registry.

An attack subclass only says *what to maximise*: :meth:`Attack.prepare` computes clean reference quantities
once and :meth:`Attack.objective` returns one value per sample for a perturbed batch. The base class owns
everything else, so every attack gets the same L∞/L2 projection, random start, EOT, per-sample best
iterate, loss trace, seeding and 8-bit quantisation (torchattacks-style usage, one loop to trust).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from robustvtc.errors import UserInputError
from robustvtc.models.base import CAPABILITIES, VisualTokens
from robustvtc.registry import Registry
from robustvtc.target import Target

ATTACKS: Registry = Registry("attack", group="robustvtc.attacks")

NORMS = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2"}

# Options every attack accepts; a subclass may change a default through its ``defaults`` class attribute.
COMMON_DEFAULTS: dict[str, Any] = {
    "eps": "8/255",       # radius of the ball in [0, 1] pixel space at model resolution
    "norm": "Linf",       # "Linf" (sign steps) or "L2" (normalised-gradient steps)
    "alpha": None,        # step size; None = eps / 4 (torchattacks' 2/255 for 8/255, CAGE's 0.5/255 for 2/255)
    "steps": 10,
    "random_start": True,  # uniform start in the ball; a feature-distance loss has zero gradient at δ = 0
    "seed": 0,
    "eot_samples": 1,     # gradient averaged over this many draws of a randomised target (EOT)
    "quantize": False,    # round the result to the 8-bit grid, as saving a PNG would
    "evade_detection": "auto",  # against a detection defense, evade it and the task at once (see Attack.__call__)
}


# an iterate the detector flags ranks below every iterate it does not flag (the best iterate evades if any did)
DETECTED_PENALTY = 1e6


def list_attacks(pattern: str = "*") -> list[str]:
    return ATTACKS.names(pattern)


def parse_eps(value: Any, what: str = "eps") -> float:
    """A radius or step size from a number or a string such as ``"8/255"`` or ``"0.03"``.

    A string is one number or one quotient of two numbers ("2.5/255"); nothing is evaluated.
    """
    if isinstance(value, bool):
        raise UserInputError(f"{what} must be a number or a string like '8/255', got {value!r}")
    if isinstance(value, str):
        try:
            parts = [float(p) for p in value.split("/")]
            if len(parts) > 2:
                raise ValueError(value)
            parsed = parts[0] / parts[1] if len(parts) == 2 else parts[0]
        except (ValueError, ZeroDivisionError):
            raise UserInputError(f"{what} {value!r} is not a number; accepted: a float like 0.03 or a fraction "
                                 "like '8/255'") from None
    elif isinstance(value, (int, float)):
        parsed = float(value)
    else:
        raise UserInputError(f"{what} must be a number or a string like '8/255', got {type(value).__name__}")
    if not math.isfinite(parsed) or parsed < 0:
        raise UserInputError(f"{what} must be a finite number >= 0, got {value!r}")
    return parsed


def parse_norm(value: Any) -> str:
    key = str(value).strip().lower().replace("∞", "inf")
    if key not in NORMS:
        raise UserInputError(f"unknown norm {value!r}; accepted: Linf, L2")
    return NORMS[key]


@dataclass(frozen=True)
class ThreatModel:
    """What an attack may use (declared on the class, garak-style, and copied into every result).

    ``gradients``: "encoder" = grey-box, only the vision encoder's outputs and gradients;
    "model" = white-box, encoder + projector + LLM.
    """

    gradients: str
    compressor_known: bool
    budget_known: bool
    uses_question: bool

    def describe(self) -> str:
        parts = ["encoder gradients only" if self.gradients == "encoder" else "whole-model gradients",
                 "compressor known" if self.compressor_known else "compressor unknown",
                 "budget known" if self.budget_known else "budget unknown",
                 "uses the question" if self.uses_question else "no text"]
        return ", ".join(parts)


@dataclass
class AttackResult:
    """The adversarial batch and how it was found.

    ``loss_trace[t, b]`` is the attack's objective at iterate t for sample b (t = 0 is the start point,
    t = steps the last iterate); ``adv[b]`` is the iterate with the highest objective for that sample,
    ``best_step[b]`` its index and ``best_loss[b]`` the objective of the returned image (re-evaluated after
    quantisation).
    """

    adv: torch.Tensor
    loss_trace: torch.Tensor
    best_loss: torch.Tensor
    best_step: torch.Tensor
    metadata: dict = field(default_factory=dict)


class Attack:
    """Base class: subclasses set ``name``, ``threat`` and implement :meth:`prepare` / :meth:`objective`.

    ``model`` is a :class:`~robustvtc.target.Target` or an LVLM adapter (wrapped as the full-token target).
    Call an attack like torchattacks: ``attack(pixels, questions, answers)`` -> :class:`AttackResult`.

    Against a target with a detection defense (``evade_detection`` "auto", the default, or true) the loop is
    detection-aware -- it evades the detector and the task at once, the selective variant of Bryniarski et al.'s
    orthogonal PGD (ICLR 2022): at each step a sample the detector flags takes a step down the detector's
    differentiable statistic, the others a step up the attack's objective, and the returned iterate is the best
    one the detector does not flag (the best flagged one only when every iterate was flagged). The campaign's
    adaptive evaluation crafts against each defended target, so this is used there automatically.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    threat: ClassVar[ThreatModel]
    defaults: ClassVar[dict[str, Any]] = {}
    # what a campaign compares it as: "baseline" (full-token), "compression_aligned", "whitebox", "stealth", "other"
    role: ClassVar[str] = "other"
    # what the objective reads from the model (keys of robustvtc.models.base.CAPABILITIES), e.g. CLS attention
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model, **common: Any):
        unknown = sorted(set(common) - set(COMMON_DEFAULTS))
        if unknown:
            accepted = ", ".join([*self._own_parameters(), *COMMON_DEFAULTS])
            raise UserInputError(f"{self.name}: unknown option {', '.join(unknown)}; accepted: {accepted}")
        opts = {**COMMON_DEFAULTS, **self.defaults, **common}
        if isinstance(model, Target):
            self.target = model
        elif hasattr(model, "encode") and hasattr(model, "num_visual_tokens"):
            self.target = Target(model)
        else:
            raise UserInputError(f"{self.name}: model must be a Target or an LVLM adapter, got {type(model).__name__}")
        self.norm = parse_norm(opts["norm"])
        self.eps = parse_eps(opts["eps"])
        if self.norm == "Linf" and self.eps > 1:
            raise UserInputError(f"eps {opts['eps']!r} exceeds 1, the whole [0, 1] pixel range, under Linf")
        self.alpha = self.eps / 4 if opts["alpha"] is None else parse_eps(opts["alpha"], "alpha")
        self.steps = _non_negative_int(opts["steps"], "steps")
        self.random_start = bool(opts["random_start"])
        self.seed = _non_negative_int(opts["seed"], "seed")
        self.eot_samples = _non_negative_int(opts["eot_samples"], "eot_samples")
        if self.eot_samples < 1:
            raise UserInputError("eot_samples must be >= 1")
        self.quantize = bool(opts["quantize"])
        if opts["evade_detection"] not in ("auto", True, False):
            raise UserInputError(f"evade_detection must be 'auto', true or false, got {opts['evade_detection']!r}")
        self.evade_detection = opts["evade_detection"]
        self._require(self.requires)

    @property
    def adapter(self):
        return self.target.adapter

    def _require(self, capabilities, option: str = "") -> None:
        """Refuse a model without what the objective reads, in one line naming what runs on it instead."""
        adapter = self.adapter
        missing = [c for c in capabilities if c not in adapter.capabilities]
        if not missing:
            return
        if option:
            accepted = "score='norm' (the feature norm)"
        else:
            runnable = [n for n in ATTACKS.names() if set(ATTACKS.get(n).requires) <= set(adapter.capabilities)]
            accepted = f"a model that has it, or {', '.join(runnable)} (cage and known_budget with score='norm')"
        raise UserInputError(f"{self.name}{option} needs {CAPABILITIES[missing[0]]}, which the {adapter.family} model "
                             f"{adapter.name!r} does not have; accepted: {accepted}")

    # ------------------------------------------------------------------ what subclasses provide
    def prepare(self, clean: torch.Tensor, questions: Sequence[str] | None, answers: Sequence[str] | None,
                target_answers: Sequence[str] | None) -> Any:
        """Reference quantities computed once on the clean batch (no gradient); passed to :meth:`objective`."""
        return None

    def objective(self, pixels: torch.Tensor, state: Any) -> torch.Tensor:
        """Per-sample value (B,) to maximise at ``pixels``; differentiable w.r.t. them."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hyper-parameters
    @classmethod
    def _own_parameters(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

    def hyperparameters(self) -> dict[str, Any]:
        """Every hyper-parameter with its resolved value (attack-specific first, then the common ones)."""
        names = [*self._own_parameters(), *COMMON_DEFAULTS]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({body})"

    # ------------------------------------------------------------------ the loop
    def __call__(self, pixels: torch.Tensor, questions: Sequence[str] | None = None,
                 answers: Sequence[str] | None = None, *, target_answers: Sequence[str] | None = None) -> AttackResult:
        clean = self.adapter.check_pixels(pixels).detach()
        batch = clean.shape[0]
        for what, values in (("questions", questions), ("answers", answers), ("target_answers", target_answers)):
            if values is not None and len(values) != batch:
                raise UserInputError(f"{len(values)} {what} for {batch} images")
        if self.threat.uses_question and questions is None:
            raise UserInputError(f"attack {self.name!r} needs the questions (its threat model uses them)")
        if self.quantize and not _on_grid(clean):
            raise UserInputError("quantize=True needs clean pixels on the 8-bit grid (multiples of 1/255); "
                                 "quantise the clean image first or pass quantize=False")
        devices = [clean.device] if clean.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)  # randomised targets drawing from the global RNG repeat under a seed
            with torch.no_grad():
                state = self.prepare(clean, questions, answers, target_answers)
            delta = self._start(clean)
            best = torch.full((batch,), -math.inf, device=clean.device)
            best_delta, best_step = delta.clone(), torch.zeros(batch, dtype=torch.long, device=clean.device)
            trace = []
            detectors = self._detectors()
            for step in range(self.steps + 1):
                last = step == self.steps
                grad, loss = self.gradient(clean, delta, state, need_grad=not last)
                trace.append(loss)
                rank = loss
                if detectors:  # selective steps: a flagged sample descends the detector, the others the task
                    flagged = self.target.detect(clean + delta).to(clean.device)
                    rank = torch.where(flagged, loss - DETECTED_PENALTY, loss)  # undetected iterates rank first
                    if not last and bool(flagged.any()):
                        grad = torch.where(flagged.view(-1, *[1] * (grad.dim() - 1)),
                                           -self._detector_gradient(clean, delta, detectors), grad)
                loss = rank
                better = loss > best
                best = torch.where(better, loss, best)
                best_delta[better] = delta[better]
                best_step[better] = step
                if not last:
                    delta = self._step(clean, delta, grad)
            adv = (clean + best_delta).clamp(0, 1)
            if self.quantize:
                adv = self._quantized(clean, adv)
                best = self.gradient(clean, adv - clean, state, need_grad=False)[1]
        delta = (adv - clean).flatten(1)
        meta = {"attack": self.name, "params": self.hyperparameters(), "threat_model": asdict(self.threat),
                "targeted": target_answers is not None or getattr(self, "target_answer", None) is not None,
                "target": repr(self.target),
                "linf": delta.abs().amax(dim=1).tolist(), "l2": delta.norm(dim=1).tolist()}
        return AttackResult(adv.detach(), torch.stack(trace), best, best_step, meta)

    def _detectors(self) -> list:
        """The target's detection defenses the attack evades ("auto": whenever the target has one)."""
        if self.evade_detection is False:
            return []
        found = [d for d in getattr(self.target, "defenses", ()) if getattr(d, "hook", None) == "detection"]
        if self.evade_detection is True and not found:
            raise UserInputError(f"{self.name}: evade_detection=true needs a target with a detection defense")
        return found

    def _detector_gradient(self, clean: torch.Tensor, delta: torch.Tensor, detectors) -> torch.Tensor:
        """∇δ of the detectors' differentiable statistics (``DetectionDefense.surrogate``), summed."""
        d = delta.detach().requires_grad_(True)
        total = sum(det.surrogate(self.target, clean + d).sum() for det in detectors)
        return torch.autograd.grad(total, d)[0]

    def gradient(self, clean: torch.Tensor, delta: torch.Tensor, state: Any,
                 need_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """EOT: the objective and its gradient w.r.t. δ, each averaged over ``eot_samples`` draws.

        For a deterministic target every draw is the same, so the default of one draw costs nothing extra.
        """
        total = torch.zeros(clean.shape[0], device=clean.device)
        grad = torch.zeros_like(delta) if need_grad else None
        for _ in range(self.eot_samples):
            if need_grad:
                d = delta.detach().requires_grad_(True)
                loss = self.objective(clean + d, state)
                grad += torch.autograd.grad(loss.sum(), d)[0]
            else:
                with torch.no_grad():
                    loss = self.objective(clean + delta, state)
            total += loss.detach().float()
        n = self.eot_samples
        return (None if grad is None else grad / n), total / n

    def _start(self, clean: torch.Tensor) -> torch.Tensor:
        if not self.random_start or self.eps == 0:
            return torch.zeros_like(clean)
        gen = torch.Generator(device=clean.device).manual_seed(self.seed)
        if self.norm == "Linf":
            delta = (torch.rand(clean.shape, generator=gen, device=clean.device) * 2 - 1) * self.eps
        else:  # random direction, radius uniform in [0, eps] (torchattacks' PGDL2)
            direction = torch.randn(clean.shape, generator=gen, device=clean.device)
            direction = direction / _batch_norm(direction)
            radius = torch.rand(clean.shape[0], generator=gen, device=clean.device).view(-1, 1, 1, 1) * self.eps
            delta = direction * radius
        return (clean + delta).clamp(0, 1) - clean

    def _step(self, clean: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One ascent step then projection onto the ε-ball and the [0, 1] box.

        Clamping to the box after the ball projection keeps the norm bound: it only moves coordinates
        towards the clean image.
        """
        if self.norm == "Linf":
            delta = (delta + self.alpha * grad.sign()).clamp(-self.eps, self.eps)
        else:
            delta = delta + self.alpha * grad / _batch_norm(grad).clamp_min(1e-12)
            delta = delta * (self.eps / _batch_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return ((clean + delta).clamp(0, 1) - clean).detach()

    def _quantized(self, clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """Nearest 8-bit value per pixel; where that would leave the ball, the grid value towards the clean pixel.

        With a clean image on the grid, truncating δ towards zero never increases |δ_i|, so the result stays
        inside the L∞ and L2 balls (rounding to nearest may not, e.g. for eps=2.5/255).
        """
        delta = (adv - clean) * 255
        nearest, toward = delta.round(), delta.trunc()
        if self.norm == "Linf":
            q = torch.where(nearest.abs() > self.eps * 255 + 1e-4, toward, nearest)
        else:
            outside = _batch_norm(nearest) > self.eps * 255 + 1e-4
            q = torch.where(outside, toward, nearest)
        return (clean + q / 255).clamp(0, 1)


ATTACKS.base = Attack  # module:Class references and entry-point plug-ins must subclass it


class EncoderAttack(Attack):
    """Grey-box attacks on the vision encoder: the objective sees only visual tokens at the feature layer.

    ``prepare`` stores the clean features; subclasses reduce the per-token distortion d_i = 1 - cos(adv, clean)
    (VEAttack's and CAGE's distance) to one value per sample in :meth:`reduce`.
    """

    def signal_layers(self) -> tuple[int, ...]:
        """Encoder layers whose attention signals the objective needs besides the feature layer."""
        return ()

    def encode(self, pixels: torch.Tensor) -> VisualTokens:
        """Through the target, so an adaptive attack sees its input and score defenses."""
        return self.target.encode(pixels, self.signal_layers(), validate=False)

    def prepare(self, clean, questions, answers, target_answers) -> torch.Tensor:
        return self.encode(clean).features.float()

    def objective(self, pixels: torch.Tensor, clean_features: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(pixels)
        distortion = 1 - torch.nn.functional.cosine_similarity(tokens.features.float(), clean_features, dim=-1)
        return self.reduce(tokens, distortion)

    def reduce(self, tokens: VisualTokens, distortion: torch.Tensor) -> torch.Tensor:
        """(B, N) per-token distortion -> (B,) objective."""
        raise NotImplementedError


def check_choice(value: Any, accepted: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``accepted``, else a one-line :class:`UserInputError`."""
    if value not in accepted:
        raise UserInputError(f"unknown {what} {value!r}; accepted: {', '.join(map(str, accepted))}")
    return value


IMPORTANCE_SCORES = ("attention", "norm", "received")
SCORE_REQUIRES = {"attention": {"cls_token"}, "received": {"received_attention"}, "norm": set()}


def importance(tokens: VisualTokens, score: str = "attention", layer: int | None = None) -> torch.Tensor:
    """Token importance (B, N) the way CLS-attention compressors rank tokens: head-mean CLS->patch attention
    of ``layer`` (None = the feature layer, LLaVA's penultimate, as VisionZip/FasterVLM and CAGE use) or,
    with ``score="norm"``, the feature norm (CAGE's alternative), or, with ``score="received"``, the attention
    each token receives at the encoder's last layer -- VisionZip's CLS-free score in its official Qwen2.5-VL port
    (``visionzip_qwen``; models with capability ``received_attention``)."""
    choice = check_choice(score, IMPORTANCE_SCORES, "importance score")
    if choice == "attention":
        return tokens.cls_attention(layer, reduce="mean").float()
    if choice == "received":
        return tokens.received_attention(layer).float()
    return tokens.norms().float()


def descending_rank(scores: torch.Tensor, stable: bool = False) -> torch.Tensor:
    """Rank of every entry in descending order along the last axis (0 = most important), no gradient; ``stable``:
    ties keep their index order."""
    order = scores.detach().argsort(dim=-1, descending=True, stable=stable)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def attack_target(target: Target, relaxation: str | None) -> Target:
    """The target gradients are taken through: ``target`` itself, or a copy whose compressor uses one of its
    differentiable relaxations (compressors with ``relaxable = True`` accept ``relaxation=`` in their
    constructor: "straight_through" or "soft_topk").

    "auto" picks "straight_through" where offered -- the forward pass stays the exact deployed rule, so the
    objective the attack tracks is the real one, while the backward pass reaches the importance scores --
    and keeps a target that already has a relaxation as it is. None or "none" is the exact rule:
    gradients flow through the kept tokens' values and the selection is held fixed for the step.
    """
    comp = target.compressor
    current = getattr(comp, "relaxation", "none")
    if relaxation is None or relaxation == "none" or (relaxation == "auto" and current != "none"):
        return target
    if not getattr(comp, "relaxable", False):
        if relaxation == "auto":
            return target
        raise UserInputError(f"compressor {comp.name!r} has no differentiable relaxation; "
                             "use relaxation='auto' or None")
    if relaxation == "auto":
        relaxation = "straight_through"
    if relaxation == current:
        return target
    sig = inspect.signature(type(comp).__init__).parameters
    kwargs = {k: v for k, v in vars(comp).items() if k in sig and k != "relaxation"}
    return Target(target.adapter, type(comp)(**kwargs, relaxation=relaxation), target.budget,
                  defenses=getattr(target, "defenses", ()))


def full_token_target(target: Target) -> Target:
    """The uncompressed model behind ``target``, with the same defenses (score and selection defenses are
    no-ops without compression; input defenses still apply)."""
    return Target(target.adapter, defenses=getattr(target, "defenses", ()))


def _batch_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _on_grid(pixels: torch.Tensor) -> bool:
    scaled = pixels * 255
    return bool(((scaled - scaled.round()).abs() <= 1e-3).all())


def _non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserInputError(f"{what} must be an integer >= 0, got {value!r}")
    return value
