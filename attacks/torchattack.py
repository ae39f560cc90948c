"""Any torchattacks class as a campaign attack: ``attacks: [{name: torchattacks.PGD, eps: 8/255, steps: 10}]``.

The target, the samples' questions and the task's candidate answers become a classifier over the answers
(:class:`~robustvtc.attacks.bridge.CandidateLogits`); the torchattacks class runs on it unchanged and its
images are evaluated like any other attack's. Threat model: white-box through the answer scores (whole-model
gradients, compressor and budget known, the question used), so a campaign crafts one image per compressor x
budget cell, like ``whitebox``.

Keyword arguments are checked against the class's own signature (one line naming what is accepted). The
campaign's radius is the class's ``eps``; its schedule sets ``steps``, ``alpha`` (None = eps/4) and
``random_start`` where the class has them; ``n_classes`` is the number of candidate answers where the class
has it (APGDT, FAB, AutoAttack; APGDT then targets every other candidate). Refused, in one line: classes
without a radius (CW, DeepFool, JSMA, ... are minimal-perturbation attacks: run them from Python through
:func:`~robustvtc.attacks.bridge.run_torchattack`), MultiAttack (it needs attack objects: list the attacks
instead, or use AutoAttack), and a data source without a closed answer set.

AutoAttack's budget: its sub-attacks run 100 steps (APGD, APGDT, FAB) and 5000 queries (Square) whatever
``steps`` says; here ``steps`` (the campaign schedule) replaces the steps of every APGD/APGDT/FAB sub-attack
and ``n_queries`` (an option of this wrapper for AutoAttack, default 5000) Square's queries, so
``{name: torchattacks.AutoAttack, version: standard, n_queries: 100}`` with ``steps: 10`` is a cheap AutoAttack.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import asdict
from typing import Any, Sequence

import torch

from robustvtc.errors import UserInputError

from .base import COMMON_DEFAULTS, Attack, AttackResult, ThreatModel, parse_eps

PREFIX = "torchattacks."
SCHEDULE = ("steps", "alpha", "random_start")
NO_RADIUS_HINT = ("has no radius (eps) argument (minimal-perturbation, noise or surrogate-trained attacks); a "
                  "campaign compares attacks at a radius. Run it from Python through robustvtc.attacks.run_torchattack")
# what AutoAttack's budget option changes on its sub-attacks
AUTOATTACK_OPTIONS = {"n_queries": 5000}


def torchattacks_names() -> list[str]:
    """``torchattacks.<Class>`` for every attack class the installed torchattacks offers ([] without it)."""
    try:
        import torchattacks
    except ImportError:
        return []
    return sorted(PREFIX + n for n, c in vars(torchattacks).items()
                  if inspect.isclass(c) and issubclass(c, torchattacks.attack.Attack) and n != "Attack")


def refusal(name: str) -> str | None:
    """Why ``torchattacks.<Class>`` cannot run in a campaign, or None."""
    cls = _torch_class(name)
    if cls.__name__ == "MultiAttack":
        return "torchattacks.MultiAttack needs attack objects; list the attacks in the scenario, or use AutoAttack"
    if "eps" not in inspect.signature(cls.__init__).parameters:
        return f"{name} {NO_RADIUS_HINT}"
    return None


def _torch_class(name: str):
    try:
        import torchattacks
    except ImportError:
        raise UserInputError(f"attack {name!r} needs torchattacks: pip install torchattacks --no-deps") from None
    attr = name[len(PREFIX):] if name.startswith(PREFIX) else name
    cls = getattr(torchattacks, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, torchattacks.attack.Attack)) or attr == "Attack":
        raise UserInputError(f"unknown attack {name!r}; accepted: {', '.join(torchattacks_names())}")
    return cls


def torchattack_class(name: str) -> type["TorchAttack"]:
    """The robustvtc attack class running ``torchattacks.<Class>`` (one per name, cached)."""
    cls = _torch_class(name)
    key = PREFIX + cls.__name__
    if key not in _CLASSES:
        _CLASSES[key] = type(f"TorchAttack_{cls.__name__}", (TorchAttack,),
                             {"name": key, "torch_class": cls, "paper": f"torchattacks {cls.__name__}",
                              "__doc__": f"torchattacks.{cls.__name__} through the answer scores."})
    return _CLASSES[key]


_CLASSES: dict[str, type] = {}


def torch_options(name: str) -> list[str]:
    """The keyword arguments ``torchattacks.<Class>`` accepts (besides the model) plus this wrapper's."""
    cls = _torch_class(name)
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    return own + (list(AUTOATTACK_OPTIONS) if cls.__name__ == "AutoAttack" else [])


class TorchAttack(Attack):
    """Base of the per-class wrappers :func:`torchattack_class` builds; ``candidates``: the answer options
    (the campaign passes the task's)."""

    name = "torchattacks"
    role = "whitebox"
    threat = ThreatModel(gradients="model", compressor_known=True, budget_known=True, uses_question=True)
    torch_class: Any = None
    needs_candidates = True

    def __init__(self, model, *, candidates: Sequence[str] | None = None, **options):
        problem = refusal(self.name)
        if problem:
            raise UserInputError(problem)
        accepted = torch_options(self.name)
        unknown = sorted(set(options) - set(accepted) - set(COMMON_DEFAULTS))
        if unknown:
            raise UserInputError(f"{self.name}: unknown option {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        common = {k: v for k, v in options.items() if k in COMMON_DEFAULTS}
        super().__init__(model, **common)
        self.candidates = None if candidates is None else list(candidates)
        if self.candidates is not None and len(self.candidates) < 2:
            raise UserInputError(f"{self.name} needs at least 2 candidate answers")
        own = {k: v for k, v in options.items() if k in accepted and k not in COMMON_DEFAULTS}
        sig = inspect.signature(self.torch_class.__init__).parameters
        if "eps" in sig:
            own["eps"] = self.eps
        for key in SCHEDULE:
            if key in sig and key in options:
                own[key] = self.alpha if key == "alpha" else options[key]
        if "seed" in sig and "seed" in options:
            own["seed"] = self.seed
        if "norm" in sig and "norm" in options:
            own["norm"] = self.norm
        for key in ("alpha", "eps"):
            if key in own and isinstance(own[key], str):
                own[key] = parse_eps(own[key], key)
        self.kwargs = own

    def hyperparameters(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in COMMON_DEFAULTS}, **self.kwargs}

    def _build(self, bridge):
        auto = self.torch_class.__name__ == "AutoAttack"
        kwargs = {k: v for k, v in self.kwargs.items() if not (auto and k in AUTOATTACK_OPTIONS)}
        sig = inspect.signature(self.torch_class.__init__).parameters
        if "n_classes" in sig and "n_classes" not in kwargs:
            kwargs["n_classes"] = len(self.candidates)
        try:
            attack = self.torch_class(bridge, **kwargs)
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"{self.name}: {exc}") from None
        if auto:  # the documented budget: steps and Square's queries
            for sub in attack._autoattack.attacks:
                if hasattr(sub, "steps"):
                    sub.steps = self.steps
                if hasattr(sub, "n_queries"):
                    sub.n_queries = int(self.kwargs.get("n_queries", AUTOATTACK_OPTIONS["n_queries"]))
        return attack

    def __call__(self, pixels: torch.Tensor, questions: Sequence[str] | None = None,
                 answers: Sequence[str] | None = None, *, target_answers: Sequence[str] | None = None) -> AttackResult:
        from .bridge import CandidateLogits, run_torchattack

        if self.candidates is None:
            raise UserInputError(f"{self.name} needs the candidate answers (candidates=[...]); a campaign passes "
                                 "its task's")
        if questions is None or answers is None:
            raise UserInputError(f"{self.name} needs the questions and the answers (its labels)")
        if target_answers is not None:
            raise UserInputError(f"{self.name}: targeted torchattacks runs are not supported; use whitebox with "
                                 "target_answer")
        clean = self.adapter.check_pixels(pixels).detach().contiguous()
        bridge = CandidateLogits(self.target, clean, questions, self.candidates)
        labels = bridge.labels(answers)
        devices = [clean.device] if clean.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            torch.manual_seed(self.seed)
            warnings.filterwarnings("ignore", message="torchattacks .* returns the clean image")
            adv = run_torchattack(self._build(bridge), clean, labels).detach()
        adv = (clean + (adv - clean).clamp(-self.eps, self.eps) if self.norm == "Linf" else adv).clamp(0, 1)
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(bridge(adv).float(), labels, reduction="none")
        delta = (adv - clean).flatten(1)
        meta = {"attack": self.name, "params": self.hyperparameters(), "threat_model": asdict(self.threat),
                "targeted": False, "target": repr(self.target), "linf": delta.abs().amax(dim=1).tolist(),
                "l2": delta.norm(dim=1).tolist()}
        return AttackResult(adv, loss.unsqueeze(0), loss, torch.zeros_like(labels), meta)
